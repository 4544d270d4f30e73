"""`import_dataset`: scan a folder or zip, validate every file, dedupe, split, record.

Layouts understood (after unwrapping a single wrapper folder, as zips often have):

    <class>/...images...                       no split given: stratified, seeded split
    train/<class>/..., val/<class>/... [test/] splits kept as given

Images in nested folders inside a class folder belong to that class. Every file is opened and
fully decoded; what cannot be used is skipped and listed in the report with a reason code and a
plain sentence. Kept files are copied byte for byte into `blobs/` by content hash.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

from tlcore.data import images
from tlcore.data.archive import UnsafeArchive, ZipLimits, is_ignored_name, safe_extract_zip
from tlcore.data.manifest import (
    SPLITS,
    ManifestEntry,
    check_ratios,
    load_manifest,
    stratified_split,
    write_manifest,
)
from tlcore.data.sources import is_under, resolve_under_roots
from tlcore.errors import DatasetImportError, InvalidInput, NotFound
from tlcore.records import home
from tlcore.records.atomic import write_bytes_atomically
from tlcore.records.store import Dataset, Store, new_id

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
FEW_IMAGES = 5  # a class with fewer images than this gets a warning
IMBALANCE = 3.0  # largest class / smallest class above this gets a warning
MAX_UNWRAP = 3


@dataclasses.dataclass(frozen=True)
class ImportResult:
    dataset: Dataset
    report: dict[str, Any]
    unchanged: bool = False  # the latest version of this name already held exactly these images


@dataclasses.dataclass
class _Candidate:
    path: Path  # where to read it now
    rel: str  # path relative to the source, for messages and galleries
    label: str
    split: str | None  # given split, or None
    sha256: str = ""
    width: int = 0
    height: int = 0
    ext: str = ""


def import_dataset(source: str | os.PathLike, name: str | None = None, *,
                   store: Store | None = None, seed: int = 0,
                   split: tuple[float, ...] = (0.7, 0.15, 0.15),
                   roots: Iterable[str | os.PathLike] | None = None,
                   source_label: str | None = None, new_version: bool = False) -> ImportResult:
    """Import a folder of class folders (or a `.zip` of one) as a new dataset version.

    If the latest version of the same name already holds exactly these images, labels and
    splits, that version is returned (`unchanged=True`) and nothing new is recorded.

    Args:
        source: a folder (`<class>/` subfolders, or `train/` `val/` [`test/`] each with class
            subfolders) or a `.zip` of the same.
        name: the dataset's name. Defaults to the folder's name or the zip's stem. Importing
            the same name again makes the next version.
        store: where to record it. Defaults to the data home's store.
        seed: seed of the stratified split. Defaults to 0.
        split: (train, val, test) fractions when the source gives no splits. Defaults to
            (0.7, 0.15, 0.15).
        roots: if given, `source` must lie under one of these folders (server imports), and
            symlinks inside it may only point under them.
        new_version: record a new version even when nothing changed. Defaults to False.
        source_label: how messages and the report name the source (an upload's own file
            name rather than its temporary path). Defaults to the path.

    Returns:
        `ImportResult(dataset, report)`; the report is also in `datasets/<id>/report.json`.

    Raises:
        DatasetImportError: the source is missing or not a folder/zip, or fewer than two
            classes keep a usable image.
        UnsafeArchive: the zip is not a zip, or is hostile (zip slip, symlinks, bombs).
        SourceNotAllowed: `roots` given and `source` is outside them.
    """
    return _import(source, name, store=store, seed=seed, split=split, roots=roots,
                   source_label=source_label, new_version=new_version)


def _import(source, name, *, store, seed, split, roots, source_label: str | None = None,
            limits: ZipLimits | None = None, new_version: bool = False) -> ImportResult:
    started = time.monotonic()
    ratios = check_ratios(split)
    src = Path(os.fspath(source)).expanduser()
    roots_list = None if roots is None else [Path(os.path.realpath(r)) for r in roots]
    if roots_list is not None:
        real = resolve_under_roots(src, roots_list)
    else:
        real = Path(os.path.realpath(src))
        if not real.exists():
            raise DatasetImportError(
                f"{os.fspath(source)!r} does not exist. SOURCE must be a folder with one "
                "subfolder per class, or a .zip of such a folder."
            )
    name = (name or "").strip() or _default_name(src if src.name else real)
    label = source_label or os.fspath(source)

    workdir = None
    try:
        ignored = 0
        if real.is_file():
            if real.suffix.lower() != ".zip" and not _looks_like_zip(real):
                raise DatasetImportError(
                    f"{real.name} is neither a folder nor a .zip. SOURCE must be a folder with "
                    "one subfolder per class, or a .zip of such a folder."
                )
            workdir = Path(tempfile.mkdtemp(prefix="import-", dir=home.uploads_dir()))
            extracted = safe_extract_zip(real, workdir / "x", limits)
            root, boundary = extracted.dest, [extracted.dest]
            ignored += len(extracted.ignored)
        elif real.is_dir():
            root = real
            boundary = roots_list if roots_list is not None else [real]
        else:
            raise DatasetImportError(f"{os.fspath(source)!r} is not a regular file or folder.")

        scan = _scan(root, boundary)
        ignored += scan.ignored
        report: dict[str, Any] = {
            "source": label,
            "name": name,
            "given_splits": scan.given_splits,
            "skipped": scan.skipped,
            "ignored": ignored,
            "warnings": list(scan.warnings),
            "conflicts": [],
        }
        kept = _validate(scan.candidates, report)
        kept = _dedupe(kept, report)
        _warn_empty_classes(kept, scan, report)
        _require_two_classes(kept, report, label)
        kept = _copy_blobs(kept, report)
        _require_two_classes(kept, report, label)
        entries = _assign_splits(kept, scan.given_splits, ratios, seed, report)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    classes = sorted({e.label for e in entries})
    counts = count_per_split(entries, classes)
    _warn_balance(entries, classes, report)
    report.update(
        classes=classes,
        counts=counts,
        images=len(entries),
        split={"given": True} if scan.given_splits else {"ratios": list(ratios), "seed": seed},
        seconds=round(time.monotonic() - started, 2),
    )

    store = store or Store()
    if not new_version:
        latest = _latest_version(store, name)
        if latest is not None and _same_images(load_manifest(latest.id), entries):
            return ImportResult(dataset=latest, report=latest.report, unchanged=True)
    dataset_id = new_id("ds")
    report["dataset_id"] = dataset_id
    folder = home.dataset_dir(dataset_id)
    try:
        write_manifest(dataset_id, entries)
        (folder / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False),
                                            encoding="utf-8")
        dataset = store.add_dataset(name, label, classes, counts, report, dataset_id=dataset_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return ImportResult(dataset=dataset, report=report)


# ------------------------------------------------------------------ scanning


@dataclasses.dataclass
class _Scan:
    candidates: list[_Candidate]
    class_folders: set[str]
    given_splits: bool
    skipped: list[dict[str, str]]
    warnings: list[str]
    ignored: int = 0


def _scan(root: Path, boundary: list[Path]) -> _Scan:
    scan = _Scan([], set(), False, [], [])

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def skip(path: Path, reason: str, message: str) -> None:
        scan.skipped.append({"file": rel(path), "reason": reason, "message": message})

    def skip_link(path: Path, target: str) -> None:
        skip(path, "outside_source", f"{rel(path)} is a link to {target}, outside the folder "
             "being imported; links may only point inside it.")

    top = root
    for _ in range(MAX_UNWRAP):
        dirs, files = _visible_children(top, boundary)
        if (len(dirs) == 1 and not files and dirs[0].name.lower() not in SPLIT_ALIASES
                and _visible_children(dirs[0], boundary)[0]):
            scan.ignored += _ignored_in(top)
            top = dirs[0]
        else:
            break
    scan.ignored += _ignored_in(top)
    dirs, files = _visible_children(top, boundary, skip_link)
    split_dirs = {d: SPLIT_ALIASES.get(d.name.lower()) for d in dirs}
    given = "train" in split_dirs.values() and len(set(split_dirs.values()) - {None}) >= 2

    for f in files:
        if not f.is_file():
            skip(f, "unreadable", f"{rel(f)} is not a regular file and was not read.")
            continue
        skip(f, "no_class", f"{rel(f)} is not inside a class folder; put each image in a "
             "folder named after its class.")
    class_roots: list[tuple[str | None, Path]] = []
    if given:
        scan.given_splits = True
        for d, s in split_dirs.items():
            if s is None:
                for f in _walk(d, boundary, scan, skip):
                    skip(f, "no_split", f"{rel(f)} is outside the train/val/test folders; with "
                         "that layout every class folder must sit inside one of them.")
                continue
            sub_dirs, sub_files = _visible_children(d, boundary, skip_link)
            scan.ignored += _ignored_in(d)
            for f in sub_files:
                skip(f, "no_class", f"{rel(f)} is directly in {d.name}/, not inside a class "
                     "folder.")
            class_roots += [(s, c) for c in sub_dirs]
    else:
        if len(dirs) == 1 and split_dirs.get(dirs[0]) == "train":  # train/ alone: classes inside
            sub_dirs, sub_files = _visible_children(dirs[0], boundary, skip_link)
            scan.ignored += _ignored_in(dirs[0])
            for f in sub_files:
                skip(f, "no_class", f"{rel(f)} is not inside a class folder.")
            dirs = sub_dirs
        class_roots = [(None, c) for c in dirs]

    for split, class_dir in class_roots:
        scan.class_folders.add(class_dir.name)
        for f in _walk(class_dir, boundary, scan, skip):
            scan.candidates.append(_Candidate(path=f, rel=rel(f), label=class_dir.name, split=split))
    return scan


def _visible_children(d: Path, boundary: list[Path], skip_link=None) -> tuple[list[Path], list[Path]]:
    """Sub-folders and files of `d` that are not litter; links leaving `boundary` are left
    out (and reported through `skip_link(path, target)` when given)."""
    dirs, files = [], []
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return [], []
    for e in entries:
        if is_ignored_name(e.name):
            continue
        if e.is_symlink() and not is_under(os.path.realpath(e.path), boundary):
            if skip_link:
                skip_link(Path(e.path), os.path.realpath(e.path))
            continue
        (dirs if e.is_dir() else files).append(Path(e.path))
    return dirs, files


def _ignored_in(d: Path) -> int:
    """How many files OS litter and hidden entries directly in `d` account for."""
    try:
        entries = [e for e in os.scandir(d) if is_ignored_name(e.name)]
    except OSError:
        return 0
    return sum(_count_files(Path(e.path)) if e.is_dir(follow_symlinks=False) else 1 for e in entries)


def _walk(top: Path, boundary: list[Path], scan: _Scan, skip) -> Iterator[Path]:
    """Regular files under `top`, sorted; symlinks followed only while they stay in `boundary`."""
    seen = {os.path.realpath(top)}
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError as e:
            skip(d, "unreadable", f"The folder {d.name} could not be read ({e.strerror or e}).")
            continue
        files, subdirs = [], []
        for e in entries:
            path = Path(e.path)
            if is_ignored_name(e.name):
                scan.ignored += _count_files(path) if e.is_dir(follow_symlinks=False) else 1
                continue
            if e.is_symlink():
                target = os.path.realpath(path)
                if not is_under(target, boundary):
                    skip(path, "outside_source", f"{e.name} is a link to {target}, outside the "
                         "folder being imported; links may only point inside it.")
                    continue
                if os.path.isdir(target):
                    if target not in seen:
                        seen.add(target)
                        subdirs.append(path)
                    continue
                if os.path.isfile(target):
                    files.append(path)
                    continue
                skip(path, "unreadable", f"{e.name} is a broken link or points to something "
                     "that is not a file.")
            elif e.is_dir(follow_symlinks=False):
                real = os.path.realpath(path)
                if real not in seen:
                    seen.add(real)
                    subdirs.append(path)
            elif e.is_file(follow_symlinks=False):
                files.append(path)
            else:
                skip(path, "unreadable", f"{e.name} is not a regular file (a pipe, socket or "
                     "device) and was not read.")
        yield from reversed(files)
        stack.extend(subdirs)


def _count_files(d: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(d)) or 1


# ---------------------------------------------------------------- validating


VALIDATE_AT_LEAST = 256  # import only checks that an image decodes: big JPEGs decode at a fraction of their size


def _workers() -> int:
    return min(8, 2 * (os.cpu_count() or 2))


def _check_one(c: _Candidate) -> _Candidate | images.ImageRejected:
    try:
        data = images.read_bytes(c.path, c.rel)
        digest = hashlib.sha256(data).hexdigest()
        im = images.open_image(data, name=c.rel, at_least=VALIDATE_AT_LEAST)
    except images.ImageRejected as e:
        return e
    except Exception as e:  # never let one file stop an import
        return images.ImageRejected("unreadable", f"{c.rel} could not be checked ({e}).")
    c.sha256, (c.width, c.height), c.ext = digest, im.info["full_size"], images.blob_extension(im)
    return c


def _validate(candidates: list[_Candidate], report: dict[str, Any]) -> list[_Candidate]:
    kept = []
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for c, result in zip(candidates, pool.map(_check_one, candidates)):
            if isinstance(result, images.ImageRejected):
                report["skipped"].append({"file": c.rel, "reason": result.reason,
                                          "message": result.message})
            else:
                kept.append(result)
    return kept


def _split_rank(c: _Candidate) -> int:
    return SPLITS.index(c.split) if c.split else 0


def _dedupe(kept: list[_Candidate], report: dict[str, Any]) -> list[_Candidate]:
    """Same bytes twice in one class: keep the first. Same bytes in two classes: drop all."""
    kept = sorted(kept, key=lambda c: (_split_rank(c), c.label, c.rel))
    groups: dict[str, list[_Candidate]] = defaultdict(list)
    for c in kept:
        groups[c.sha256].append(c)
    out = []
    for c in kept:
        group = groups[c.sha256]
        labels = sorted({g.label for g in group})
        if len(labels) > 1:
            others = [g.rel for g in group if g is not c]
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            report["skipped"].append({
                "file": c.rel, "reason": "label_conflict",
                "message": f"{c.rel} has the same content as {shown}, filed under "
                           f"{' and '.join(repr(x) for x in labels)}; one picture cannot teach "
                           "two labels, so every copy was left out. Keep it only in the right "
                           "class folder.",
            })
            if c is group[0]:
                report["conflicts"].append({"sha256": c.sha256, "classes": labels,
                                            "files": [g.rel for g in group]})
        elif c is not group[0]:
            first = group[0]
            where = "" if first.split == c.split else \
                f" (kept in {first.split} so the same picture is not in two splits)"
            report["skipped"].append({
                "file": c.rel, "reason": "duplicate",
                "message": f"{c.rel} is a duplicate of {first.rel} (same content); only the "
                           f"first copy is kept{where}.",
            })
        else:
            out.append(c)
    return out


def _warn_empty_classes(kept: list[_Candidate], scan: _Scan, report: dict[str, Any]) -> None:
    have = {c.label for c in kept}
    tried = Counter(c.label for c in scan.candidates)
    for cls in sorted(scan.class_folders - have):
        why = (f"all {tried[cls]} of its files were skipped, see the list" if tried[cls]
               else "its folder holds no files")
        report["warnings"].append(f"Class {cls!r} has no usable images ({why}); it was left out.")


def _require_two_classes(kept: list[_Candidate], report: dict[str, Any], label: str) -> None:
    classes = sorted({c.label for c in kept})
    if len(classes) >= 2:
        return
    reasons = Counter(s["reason"] for s in report["skipped"])
    why = ""
    if reasons:
        why = " Skipped: " + ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in reasons.most_common()) + "."
    if classes:
        message = (f"Found only one class ({classes[0]!r}) with usable images in {label}; a "
                   "classifier needs at least two class folders, each with images. Add a folder "
                   "per class (e.g. cats/ and dogs/)." + why)
    else:
        message = (f"Found no usable images in {label}. Expected one folder per class with "
                   "JPEG/PNG/GIF/WebP/BMP/TIFF images inside (or train/ and val/ folders that "
                   "each hold class folders)." + why)
    report["classes"] = classes
    raise DatasetImportError(message, report)


def _copy_blobs(kept: list[_Candidate], report: dict[str, Any]) -> list[_Candidate]:
    blobs = home.blobs_dir()

    def copy(c: _Candidate) -> _Candidate | None:
        target = blobs / c.sha256[:2] / f"{c.sha256}.{c.ext}"
        if target.exists():
            return c
        try:
            data = images.read_bytes(c.path, c.rel)
        except images.ImageRejected:
            data = b""
        if hashlib.sha256(data).hexdigest() != c.sha256:
            return None  # changed (or vanished) since it was checked
        target.parent.mkdir(exist_ok=True)
        write_bytes_atomically(target, data, mode=0o444)
        return c

    out = []
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for c, result in zip(kept, pool.map(copy, kept)):
            if result is None:
                report["skipped"].append({"file": c.rel, "reason": "changed",
                                          "message": f"{c.rel} changed or disappeared while it "
                                                     "was being imported; import again."})
            else:
                out.append(c)
    return out


# ------------------------------------------------------------------ splitting


def _assign_splits(kept: list[_Candidate], given: bool, ratios, seed: int,
                   report: dict[str, Any]) -> list[ManifestEntry]:
    blobs = home.blobs_dir()
    kept = sorted(kept, key=lambda c: (c.label, c.sha256, c.rel))
    if given:
        splits = [c.split or "train" for c in kept]
        present = set(splits)
        if "val" not in present:
            train_idx = [i for i, s in enumerate(splits) if s == "train"]
            share = ratios[1] / (ratios[0] + ratios[1]) if ratios[1] > 0 else 0.15
            carved = stratified_split([kept[i].label for i in train_idx], (1 - share, share, 0.0), seed)
            for i, s in zip(train_idx, carved):
                splits[i] = s
            report["warnings"].append(
                f"No val/ folder was given: {carved.count('val')} train images were set aside "
                f"as val ({share:.0%} of each class, seed {seed})."
            )
    else:
        splits = stratified_split([c.label for c in kept], ratios, seed)
    return [
        ManifestEntry(path=blobs / c.sha256[:2] / f"{c.sha256}.{c.ext}", label=c.label, split=s,
                      sha256=c.sha256, source=c.rel, width=c.width, height=c.height)
        for c, s in zip(kept, splits)
    ]


def count_per_split(entries: list[ManifestEntry], classes: list[str]) -> dict[str, dict[str, int]]:
    """Images per class in each split (the test split only if it has images)."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        per = Counter(e.label for e in entries if e.split == split)
        if per or split != "test":
            counts[split] = {cls: per.get(cls, 0) for cls in classes}
    return counts


def _warn_balance(entries: list[ManifestEntry], classes: list[str], report: dict[str, Any]) -> None:
    totals = Counter(e.label for e in entries)
    warnings = report["warnings"]
    few = [c for c in classes if totals[c] < FEW_IMAGES]
    for c in few:
        warnings.append(f"Class {c!r} has very few images ({totals[c]}); {FEW_IMAGES} or more "
                        "per class give a more trustworthy model and evaluation.")
    biggest, smallest = max(classes, key=totals.get), min(classes, key=totals.get)
    if totals[biggest] > IMBALANCE * totals[smallest]:
        warnings.append(f"Classes are imbalanced: {biggest!r} has {totals[biggest]} images, "
                        f"{smallest!r} only {totals[smallest]} (more than {IMBALANCE:g}x). "
                        "Accuracy can look good while the small class is missed; check per-class "
                        "recall.")
    if report.get("given_splits"):
        for split in ("train", "val"):
            missing = [c for c in classes if not any(e.label == c and e.split == split for e in entries)]
            if missing:
                warnings.append(f"No {split} images for class(es) "
                                f"{', '.join(repr(c) for c in missing)}.")


# -------------------------------------------------------------------- helpers


def _latest_version(store: Store, name: str) -> Dataset | None:
    try:
        return store.get_dataset(name)
    except NotFound:
        return None


def _same_images(old: list[ManifestEntry], new: list[ManifestEntry]) -> bool:
    """The same image contents with the same labels, splits and original paths."""
    def key(entries):
        return sorted((e.sha256, e.label, e.split, e.source) for e in entries)
    return key(old) == key(new)


def _default_name(src: Path) -> str:
    stem = src.name[:-4] if src.name.lower().endswith(".zip") else src.name
    return stem or "dataset"


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except OSError:
        return False


__all__ = ["DatasetImportError", "ImportResult", "UnsafeArchive", "import_dataset"]


def resolve_dataset(ref: str, store: Store, *, seed: int = 0, split=None) -> Dataset:
    """A stored dataset for `ref`: an id or name, or a folder / `.zip` path imported now.

    A bare word names a stored dataset first; only if none matches is it tried as a folder
    in the working directory. Anything with a path separator, `.` or `~` in front, or a
    `.zip` ending is a path.
    """
    ref = str(ref).strip()
    if not ref:
        raise InvalidInput("`dataset` must name a dataset or a folder. Received: an empty string.")
    path = Path(ref).expanduser()
    looks_like_path = os.sep in ref or ref.startswith((".", "~")) or ref.lower().endswith(".zip")
    importable = path.exists() and (path.is_dir() or path.suffix.lower() == ".zip")
    if not looks_like_path:
        try:
            return store.get_dataset(ref)
        except NotFound:
            if not importable:
                raise
    if not importable:
        raise InvalidInput(f"No folder or .zip at {ref}. Pass an existing folder (one subfolder per class), "
                         "a .zip of one, or a dataset name from `python -m tlcore datasets list`.")
    kwargs: dict[str, Any] = {"store": store, "seed": seed}
    if split is not None:
        kwargs["split"] = tuple(split)
    return import_dataset(str(path), **kwargs).dataset
