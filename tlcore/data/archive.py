"""Safe zip extraction: nothing is written outside the destination, ever.

Refused outright (`UnsafeArchive`): a file that is not a zip, entries that climb out of the
destination (`../`, absolute paths, drive letters), symlink entries, password-protected
entries, and zip bombs (too many entries, too many bytes in total or per entry, or an extreme
compression ratio). Sizes are enforced while streaming, not taken from the headers on trust.
Operating-system litter (`__MACOSX/`, `.DS_Store`, `Thumbs.db`, hidden files) is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import zipfile
import zlib
from pathlib import Path

from tlcore.errors import UnsafeArchive

CHUNK = 1024 * 1024

# Names that operating systems leave in folders and archives; never data.
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db"})


def is_ignored_name(part: str) -> bool:
    """True for a path component that is hidden or OS litter (`.DS_Store`, `__MACOSX`, ...)."""
    return part.startswith(".") or part.lower() in JUNK_NAMES


@dataclasses.dataclass(frozen=True)
class ZipLimits:
    """How much a zip may unpack to. Defaults to 2 GiB in total, 512 MiB per entry,
    100,000 entries, and a compression ratio of at most 200 for entries over 1 MiB."""

    max_total_bytes: int = 2 * 1024**3
    max_entry_bytes: int = 512 * 1024**2
    max_entries: int = 100_000
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1024**2


@dataclasses.dataclass(frozen=True)
class Extracted:
    dest: Path
    files: list[Path]  # extracted regular files
    ignored: list[str]  # entry names skipped as OS litter or hidden files
    total_bytes: int


def safe_extract_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike,
                     limits: ZipLimits | None = None) -> Extracted:
    """Extract `zip_path` into `dest_dir` (created if missing) without ever writing outside it.

    Args:
        zip_path: the archive.
        dest_dir: where to extract; should be a fresh, private folder.
        limits: a `ZipLimits`. Defaults to `ZipLimits()`.

    Raises:
        UnsafeArchive: not a zip, zip slip, symlink entry, encrypted entry or zip bomb. What was
            extracted before the problem was found stays in `dest_dir` for the caller to delete.
    """
    limits = limits or ZipLimits()
    zip_path = Path(zip_path)
    name = zip_path.name
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    dest = Path(os.path.realpath(dest))

    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise UnsafeArchive(
            "not_zip", f"{name} is not a zip archive (it may be another format renamed to .zip, "
            "or an incomplete upload). Upload a real .zip of class folders."
        ) from e
    except OSError as e:
        raise UnsafeArchive("unreadable", f"{name} could not be read ({e.strerror or e}).") from e

    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise UnsafeArchive(
                "too_many_entries", f"{name} has {len(infos):,} entries; at most "
                f"{limits.max_entries:,} are accepted (a possible zip bomb). Split the dataset "
                "into smaller zips or import a server folder."
            )
        declared = 0
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        ignored: list[str] = []
        for info in infos:
            parts = _safe_parts(info.filename, name)
            if _is_symlink(info):
                raise UnsafeArchive(
                    "symlink", f"{name} contains a symbolic link ({info.filename!r}); links in "
                    "archives are refused because they can point outside the dataset. Zip the "
                    "real files instead (e.g. `zip -r` without -y)."
                )
            if not parts or any(is_ignored_name(p) for p in parts):
                if parts and not info.is_dir():
                    ignored.append(info.filename)
                continue
            if info.flag_bits & 0x1:
                raise UnsafeArchive(
                    "encrypted", f"{name} has password-protected entries ({info.filename!r}); "
                    "upload an unencrypted zip."
                )
            if not info.is_dir():
                _check_entry_size(info, info.file_size, name, limits)
                declared += info.file_size
            plan.append((info, parts))
        if declared > limits.max_total_bytes:
            raise UnsafeArchive("too_large", _total_message(name, declared, limits))

        files: list[Path] = []
        total = 0
        for info, parts in plan:
            target = dest.joinpath(*parts)
            real_parent = os.path.realpath(target.parent if not info.is_dir() else target)
            if not _within(real_parent, dest):
                raise UnsafeArchive("zip_slip", _slip_message(name, info.filename))
            if info.is_dir():
                _mkdirs(dest, parts, name, info.filename)
                continue
            _mkdirs(dest, parts[:-1], name, info.filename)
            total += _stream_entry(zf, info, target, name, limits, limits.max_total_bytes - total)
            files.append(target)
    return Extracted(dest=dest, files=files, ignored=ignored, total_bytes=total)


# ---------------------------------------------------------------- helpers

_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_parts(filename: str, zip_name: str) -> list[str]:
    """The entry's path components, refusing anything that could leave the destination."""
    if "\x00" in filename:
        raise UnsafeArchive("zip_slip", _slip_message(zip_name, filename))
    normalised = filename.replace("\\", "/")
    if normalised.startswith("/") or _DRIVE.match(normalised):
        raise UnsafeArchive("zip_slip", _slip_message(zip_name, filename))
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchive("zip_slip", _slip_message(zip_name, filename))
    return parts


def _slip_message(zip_name: str, entry: str) -> str:
    return (f"{zip_name} contains the entry {entry!r}, which points outside the folder it "
            "would be extracted to (a 'zip slip'); the archive was refused and nothing was "
            "written outside the import folder. Re-create the zip from the class folders.")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_entry_size(info: zipfile.ZipInfo, size: int, zip_name: str, limits: ZipLimits) -> None:
    if size > limits.max_entry_bytes:
        raise UnsafeArchive(
            "too_large", f"{zip_name}: entry {info.filename!r} unpacks to {size / 2**20:,.0f} MB; "
            f"at most {limits.max_entry_bytes / 2**20:,.0f} MB per file is accepted."
        )
    if size >= limits.ratio_min_bytes and size > limits.max_ratio * max(info.compress_size, 1):
        ratio = size / max(info.compress_size, 1)
        raise UnsafeArchive(
            "zip_bomb", f"{zip_name}: entry {info.filename!r} expands {ratio:,.0f}-fold "
            f"({info.compress_size:,} -> {size:,} bytes); at most {limits.max_ratio:g}-fold is "
            "accepted (a possible zip bomb). Images barely compress; check what is in the zip."
        )


def _total_message(zip_name: str, total: int, limits: ZipLimits) -> str:
    return (f"{zip_name} unpacks to more than {limits.max_total_bytes / 2**30:.1f} GiB "
            f"({total / 2**30:.1f} GiB seen); import it as a server folder instead, or split it.")


def _within(path: str, root: Path) -> bool:
    root_s = str(root)
    return path == root_s or path.startswith(root_s.rstrip(os.sep) + os.sep)


def _mkdirs(dest: Path, parts: list[str], zip_name: str, entry: str) -> None:
    current = dest
    for part in parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise UnsafeArchive(
                "conflict", f"{zip_name}: entry {entry!r} needs {part!r} to be a folder, but the "
                "zip also has a file by that name. Re-create the zip."
            )
        try:
            current.mkdir(exist_ok=True)
        except OSError as e:
            raise UnsafeArchive("bad_name", f"{zip_name}: entry {entry!r} cannot be created "
                                f"here ({e.strerror or e}).") from e


def _stream_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, zip_name: str,
                  limits: ZipLimits, budget: int) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o644)
    except FileExistsError as e:
        raise UnsafeArchive(
            "duplicate_entry", f"{zip_name} contains {info.filename!r} more than once (or a "
            "file and folder with the same name). Re-create the zip."
        ) from e
    except OSError as e:
        raise UnsafeArchive("bad_name", f"{zip_name}: entry {info.filename!r} cannot be "
                            f"created here ({e.strerror or e}).") from e
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                # Headers can lie: count what actually comes out.
                if written > budget:
                    raise UnsafeArchive("too_large", _total_message(zip_name, written, limits))
                if written > info.file_size:
                    raise UnsafeArchive(
                        "zip_bomb", f"{zip_name}: entry {info.filename!r} unpacks to more than "
                        f"the {info.file_size:,} bytes its header declares; the zip is refused."
                    )
                _check_entry_size(info, written, zip_name, limits)
                out.write(chunk)
    except UnsafeArchive:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as e:
        raise UnsafeArchive(
            "corrupt", f"{zip_name}: entry {info.filename!r} is damaged ({e}). Upload the zip again."
        ) from e
    except NotImplementedError as e:
        raise UnsafeArchive(
            "unsupported", f"{zip_name}: entry {info.filename!r} uses a compression method this "
            f"server cannot read ({e}). Re-create the zip with standard (deflate) compression."
        ) from e
    return written

