"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file the engine writes in place (models, checkpoints, manifests, caches, worker state)
goes through `write_atomically`: the content is written under a temporary name beside the
target and renamed over it. Import-light, so any module may use it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from tlcore.errors import SaveFailed


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any], *, mode: int | None = None) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`.

    The temporary name keeps `path`'s suffixes (Keras, h5py and numpy choose the format by
    them) and is unique per call, so threads and processes can write the same target at once.
    `mode` sets the file's permissions before the rename.

    Raises:
        SaveFailed: the write or the rename failed (a full disk, say); the partial file is
            removed and the previous `path` is kept.
    """
    path = Path(path)
    base = path.name.split(".")[0]
    tmp = path.with_name(f".{base}.{uuid.uuid4().hex[:12]}.tmp{''.join(path.suffixes)}")
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise SaveFailed(f"Could not save {path.name} in {path.parent} ({exc.strerror or exc}). "
                         "Free disk space and try again; the previous file is kept.", exc.errno) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes_atomically(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Replace `path` with `data` atomically."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, data: Any, *, indent: int | None = None) -> Path:
    """Replace `path` with `data` as JSON atomically."""
    return write_text_atomically(path, json.dumps(data, indent=indent))
