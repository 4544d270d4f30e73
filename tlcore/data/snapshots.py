"""Datasets from in-memory images, such as camera snapshots taken per class in the browser.

Class names come from users, so each must be a plain folder name: nothing here may write
outside the temporary folder the snapshots are laid out in.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from tlcore.data.importer import ImportResult, import_dataset
from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.store import Store

MAX_CLASS_NAME = 100


def check_class_name(name: str) -> str:
    """`name` stripped, if it can be a class folder; else a ValueError that says why."""
    cleaned = (name or "").strip()
    if not cleaned:
        raise InvalidInput("A class needs a name.")
    if (cleaned in (".", "..") or cleaned.startswith(".") or any(c in cleaned for c in "/\\\0")
            or len(cleaned) > MAX_CLASS_NAME):
        raise InvalidInput(f"A class name must be a plain name of at most {MAX_CLASS_NAME} characters, without "
                         f"'/', '\\' or a leading '.'. Received: {cleaned[:40]!r}")
    return cleaned


def import_snapshots(snapshots: Mapping[str, Sequence[bytes]], name: str = "camera", *,
                     store: Store | None = None) -> ImportResult:
    """Import {class name: [image bytes, ...]} as a new dataset version (validated like any import)."""
    work = Path(tempfile.mkdtemp(prefix="snapshots-", dir=home.uploads_dir()))
    try:
        for label, shots in snapshots.items():
            folder = work / check_class_name(label)
            folder.mkdir(exist_ok=True)
            for i, data in enumerate(shots):
                (folder / f"{i:03d}.jpg").write_bytes(data)
        return import_dataset(work, name, store=store, source_label="camera snapshots")
    finally:
        shutil.rmtree(work, ignore_errors=True)
