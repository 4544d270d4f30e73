"""The feedback inbox of a dataset: photos tried on the Demo, filed with the class the user says
they are (confirming or correcting the prediction) or as in none of the classes, until the
labelled ones are folded into a new version of the dataset.

One inbox per dataset name (versions share it), under `feedback/` in the data home: the photos
by content hash and `inbox.jsonl`, one object per photo (a photo filed again keeps its latest
answer) with its `answer`: "confirmed", "corrected" or "none of these". A "none of these" photo
is kept as a record and never enters training data. `fold_plan` says what folding would add
(photos per class); folding lays the latest version's images out in their splits plus the
labelled photos in `train/`, and imports that as the next version through `import_dataset`, so
every check, the dedupe and the versioning are the importer's own; no existing version changes.
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

from tlcore.data import images
from tlcore.data.importer import ImportResult, import_dataset
from tlcore.data.manifest import load_manifest
from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.atomic import write_bytes_atomically, write_text_atomically
from tlcore.records.store import Store

INBOX_FILE = "inbox.jsonl"
FOLD_SPLIT = "train"  # filed photos are hard cases to learn from, not a fair test
NONE_OF_THESE = None  # the label of a photo in none of the dataset's classes
CONFIRMED, CORRECTED, NOT_IN_ANY_CLASS = "confirmed", "corrected", "none of these"


@dataclasses.dataclass(frozen=True)
class FeedbackItem:
    """One filed photo: its content hash, the file in the inbox, the class the user gave (None:
    in none of the classes)."""

    sha256: str
    file: str
    label: str | None
    run_id: str | None = None  # the run whose demo it was
    predicted: str | None = None  # what it said
    filed_at: float = 0.0

    @property
    def answer(self) -> str:
        """"confirmed" (the prediction was right), "corrected" or "none of these"."""
        if self.label is NONE_OF_THESE:
            return NOT_IN_ANY_CLASS
        return CONFIRMED if self.label == self.predicted else CORRECTED

    @property
    def trainable(self) -> bool:
        """Whether folding may add it to the training data (it names one of the classes)."""
        return self.label is not NONE_OF_THESE


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """What folding the inbox would change: the photos it adds per class, and what it leaves."""

    dataset_label: str  # the version folded into, "name vN"
    next_label: str  # the version folding makes, "name vN+1"
    added: list[FeedbackItem]  # labelled photos the latest version does not hold yet
    already_in: list[FeedbackItem]  # labelled photos the latest version already holds (stay in the inbox)
    not_in_any_class: list[FeedbackItem]  # recorded only, never folded

    def added_per_class(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.added:
            counts[item.label] = counts.get(item.label, 0) + 1
        return dict(sorted(counts.items()))


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
    fields = {f.name for f in dataclasses.fields(FeedbackItem)}
    return [FeedbackItem(**{k: v for k, v in row.items() if k in fields}) for row in rows]


def _write_inbox(dataset_name: str, items: list[FeedbackItem]) -> None:
    # `answer` is written for whoever reads the file; reading derives it from label and predicted.
    text = "".join(json.dumps({"dataset": dataset_name, **dataclasses.asdict(i), "answer": i.answer}) + "\n"
                   for i in items)
    write_text_atomically(_inbox_dir(dataset_name) / INBOX_FILE, text)


def add_feedback(dataset_name: str, photo: bytes, label: str | None, classes: list[str], *,
                 run_id: str | None = None, predicted: str | None = None) -> FeedbackItem:
    """File `photo` (the file's bytes) as class `label` in the inbox of dataset `dataset_name`;
    `label` NONE_OF_THESE files it as in none of the classes (recorded, never trained on).

    Raises:
        InvalidInput: `label` is neither one of `classes` nor NONE_OF_THESE.
        ImageRejected: the bytes are not a usable image.
    """
    if label is not NONE_OF_THESE and label not in classes:
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


def fold_plan(dataset_ref: str, store: Store | None = None) -> FoldPlan:
    """What `fold_inbox(dataset_ref)` would add to the latest version of the dataset, and leave."""
    store = store or Store()
    dataset = store.get_dataset(store.get_dataset(dataset_ref).name)  # the latest version
    present = {e.sha256 for e in load_manifest(dataset.id)}
    items = inbox(dataset.name)
    labelled = [i for i in items if i.trainable]
    # A photo already in the dataset would be a label conflict the importer leaves out (the
    # dataset's own copy with it): such photos stay in the inbox, and the page says so.
    return FoldPlan(dataset.label, f"{dataset.name} v{dataset.version + 1}",
                    added=[i for i in labelled if i.sha256 not in present],
                    already_in=[i for i in labelled if i.sha256 in present],
                    not_in_any_class=[i for i in items if not i.trainable])


def fold_inbox(dataset_ref: str, store: Store | None = None) -> ImportResult:
    """A new version of the dataset: its latest version's images in their splits plus the inbox's
    labelled photos in `train/` (as `fold_plan` says); the inbox is emptied of what was folded.
    Photos filed as in none of the classes stay in the inbox, out of the data.

    Raises:
        InvalidInput: the inbox holds no labelled photo the dataset does not already have.
        DatasetImportError: the importer could not make a version (its sentence says why).
    """
    store = store or Store()
    dataset = store.get_dataset(store.get_dataset(dataset_ref).name)  # the latest version
    entries = load_manifest(dataset.id)
    items = fold_plan(dataset.id, store).added
    if not items:
        raise InvalidInput(f"The feedback inbox of {dataset.name} has no labelled photo that is not already in "
                           f"{dataset.label}: file photos with their class from the Demo first.")
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
