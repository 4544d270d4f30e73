"""The feedback inbox of a dataset: photos a demo got wrong, filed with the class the user says
they are, until they are folded into a new version of the dataset.

One inbox per dataset name (versions share it), under `feedback/` in the data home: the photos
by content hash and `inbox.jsonl`, one object per photo (a photo filed again keeps its latest
label). Folding lays the latest version's images out in their splits plus the inbox's photos in
`train/`, and imports that as the next version through `import_dataset`, so every check, the
dedupe and the versioning are the importer's own; no existing version changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tlcore import home
from tlcore.atomic import write_bytes_atomically, write_text_atomically
from tlcore.data import images
from tlcore.data.importer import ImportResult, import_dataset
from tlcore.data.manifest import load_manifest
from tlcore.errors import InvalidInput
from tlcore.store import Store

INBOX_FILE = "inbox.jsonl"
FOLD_SPLIT = "train"  # filed photos are hard cases to learn from, not a fair test


@dataclasses.dataclass(frozen=True)
class FeedbackItem:
    """One filed photo: its content hash, the file in the inbox, the class the user gave."""

    sha256: str
    file: str
    label: str
    run_id: str | None = None  # the run whose demo was wrong
    predicted: str | None = None  # what it said
    filed_at: float = 0.0


def _inbox_dir(dataset_name: str) -> Path:
    # Dataset names come from users: the folder is named by a hash, the name kept in the records.
    digest = hashlib.sha256(dataset_name.encode("utf-8")).hexdigest()[:16]
    return home.subdir("feedback", digest)


def inbox(dataset_name: str) -> list[FeedbackItem]:
    """The photos filed for dataset `dataset_name`, oldest first."""
    path = _inbox_dir(dataset_name) / INBOX_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [FeedbackItem(**{k: v for k, v in row.items() if k != "dataset"}) for row in rows]


def _write_inbox(dataset_name: str, items: list[FeedbackItem]) -> None:
    text = "".join(json.dumps({"dataset": dataset_name, **dataclasses.asdict(i)}) + "\n" for i in items)
    write_text_atomically(_inbox_dir(dataset_name) / INBOX_FILE, text)


def add_feedback(dataset_name: str, photo: bytes, label: str, classes: list[str], *, run_id: str | None = None,
                 predicted: str | None = None) -> FeedbackItem:
    """File `photo` (the file's bytes) as class `label` in the inbox of dataset `dataset_name`.

    Raises:
        InvalidInput: `label` is not one of `classes`.
        ImageRejected: the bytes are not a usable image.
    """
    if label not in classes:
        raise InvalidInput(f"`label` must be one of the dataset's classes ({', '.join(classes)}). "
                           f"Received: label={label!r}")
    image = images.open_image(photo, name="The photo")
    digest = hashlib.sha256(photo).hexdigest()
    target = _inbox_dir(dataset_name) / f"{digest}.{images.blob_extension(image)}"
    if not target.exists():
        write_bytes_atomically(target, photo)
    item = FeedbackItem(sha256=digest, file=str(target), label=label, run_id=run_id, predicted=predicted,
                        filed_at=time.time())
    _write_inbox(dataset_name, [i for i in inbox(dataset_name) if i.sha256 != digest] + [item])
    return item


def discard(dataset_name: str, sha256: str) -> None:
    """Take one photo out of the inbox (its file too)."""
    items = inbox(dataset_name)
    for item in items:
        if item.sha256 == sha256:
            Path(item.file).unlink(missing_ok=True)
    _write_inbox(dataset_name, [i for i in items if i.sha256 != sha256])


def already_in(dataset_id: str, items: list[FeedbackItem]) -> list[FeedbackItem]:
    """The filed photos that dataset version `dataset_id` already holds (folding skips them)."""
    present = {e.sha256 for e in load_manifest(dataset_id)}
    return [i for i in items if i.sha256 in present]


def fold_inbox(dataset_ref: str, store: Store | None = None) -> ImportResult:
    """A new version of the dataset: its latest version's images in their splits plus the inbox's
    photos in `train/`; the inbox is emptied of what was folded.

    Raises:
        InvalidInput: the inbox holds no photo the dataset does not already have.
        DatasetImportError: the importer could not make a version (its sentence says why).
    """
    store = store or Store()
    dataset = store.get_dataset(store.get_dataset(dataset_ref).name)  # the latest version
    entries = load_manifest(dataset.id)
    present = {e.sha256 for e in entries}
    # A photo already in the dataset would be a label conflict the importer leaves out (the
    # dataset's own copy with it): such photos stay in the inbox, and the page says so.
    items = [i for i in inbox(dataset.name) if i.sha256 not in present]
    if not items:
        raise InvalidInput(f"The feedback inbox of {dataset.name} has no photo that is not already in "
                           f"{dataset.label}: file photos from the Demo first.")
    work = Path(tempfile.mkdtemp(prefix="fold-", dir=home.uploads_dir()))
    try:
        for entry in entries:
            _place(Path(entry.path), work / entry.split / entry.label, Path(entry.source).name, entry.sha256)
        for item in items:
            _place(Path(item.file), work / FOLD_SPLIT / item.label, f"feedback-{Path(item.file).name}", item.sha256)
        result = import_dataset(work, dataset.name, store=store,
                                source_label=f"{dataset.label} + {len(items)} feedback photo(s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    folded = {i.sha256 for i in items}
    _write_inbox(dataset.name, [i for i in inbox(dataset.name) if i.sha256 not in folded])
    return result


def _place(source: Path, folder: Path, name: str, sha256: str) -> None:
    """Link (or copy) `source` into `folder` as `name`, made unique with its hash when taken."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        target = folder / f"{sha256[:12]}-{name}"
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
