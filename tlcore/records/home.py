"""The data home: the one folder everything the engine writes lives under.

`$TLCORE_HOME` chooses it; the default is `~/.tlcore`. Layout:

    store.db                 SQLite store (WAL): datasets, runs, epochs, logs
    blobs/ab/<sha256>.<ext>  imported image files, content-addressed and immutable
    datasets/<id>/           manifest.jsonl and report.json of one dataset version
    runs/<id>/               artifacts of one run (`tlcore.records.run_folder.RunFolder` knows the layout)
    cache/pixels/            decoded, resized uint8 arrays per (image content, size)
    cache/features/          backbone features per (image content, backbone, size, weights)
    weights/                 converted or dropped-in backbone weights
    uploads/                 temporary space for uploads being imported
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.tlcore")


def data_home() -> Path:
    """The data home folder, created if missing. `$TLCORE_HOME` overrides the default `~/.tlcore`."""
    home = Path(os.environ.get("TLCORE_HOME") or DEFAULT_HOME).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def subdir(*parts: str) -> Path:
    """A folder under the data home, created if missing."""
    path = data_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_path() -> Path:
    return data_home() / "store.db"


def blobs_dir() -> Path:
    return subdir("blobs")


def dataset_dir(dataset_id: str) -> Path:
    return subdir("datasets", dataset_id)


def cache_dir(kind: str) -> Path:
    return subdir("cache", kind)


def weights_dir() -> Path:
    return subdir("weights")


def uploads_dir() -> Path:
    return subdir("uploads")
