"""Fixing a dataset: relabel or exclude images, recorded as a new immutable version with a change log.

The old version is never touched: the new version's manifest is the old one with the changes
applied (each image keeps its split, its blob and so its cached pixels and features), and its
report names the parent version and lists every change with who made it, when and why.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import shutil
import time
from typing import Any, Iterable, Mapping

from tlcore.data.importer import count_per_split
from tlcore.data.manifest import ManifestEntry, load_manifest, write_manifest
from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.store import Dataset, Store, new_id


@dataclasses.dataclass(frozen=True)
class Change:
    source: str  # the image's original relative path
    sha256: str
    action: str  # "relabel" or "exclude"
    old_label: str
    new_label: str | None = None  # for a relabel


@dataclasses.dataclass(frozen=True)
class FixResult:
    dataset: Dataset  # the new version
    parent: Dataset
    changes: list[Change]


def fix_dataset(ref: str, *, relabel: Mapping[str, str] | None = None, exclude: Iterable[str] = (),
                reason: str = "", author: str | None = None, store: Store | None = None) -> FixResult:
    """A new version of dataset `ref` with images relabelled (`relabel`: source -> class) or excluded.

    Images are named by their original relative path (`source`, as the audit and the galleries
    show them). Relabelling an image to the label it has changes nothing and is left out.

    Args:
        reason: why, for the change log.
        author: who, for the change log. Defaults to the login name.

    Raises:
        InvalidInput: an image not in the dataset, a class the dataset does not have, an image
            both relabelled and excluded, no change at all, or fewer than two classes left.
        NotFound: no such dataset.
    """
    store = store or Store()
    relabel = dict(relabel or {})
    exclude = list(dict.fromkeys(exclude))
    parent = store.get_dataset(ref)
    entries = load_manifest(parent.id)
    by_source = {e.source: e for e in entries}
    _check_request(parent, by_source, relabel, exclude)

    changes = [Change(s, by_source[s].sha256, "exclude", by_source[s].label) for s in exclude]
    changes += [Change(s, by_source[s].sha256, "relabel", by_source[s].label, label)
                for s, label in relabel.items() if by_source[s].label != label]
    if not changes:
        raise InvalidInput(f"Nothing to change in {parent.label}: every relabel gives an image the label it "
                           "already has, and nothing is excluded.")
    excluded = set(exclude)
    new_entries = [dataclasses.replace(e, label=relabel.get(e.source, e.label))
                   for e in entries if e.source not in excluded]
    classes = [c for c in parent.classes if any(e.label == c for e in new_entries)]
    if len(classes) < 2:
        raise InvalidInput(f"These changes would leave {parent.label} with {len(classes)} class(es); a classifier "
                           "needs at least two. Exclude fewer images.")

    dataset_id = new_id("ds")
    report = _report(parent, new_entries, classes, changes, reason, author or getpass.getuser(), dataset_id)
    folder = home.dataset_dir(dataset_id)
    try:
        write_manifest(dataset_id, new_entries)
        (folder / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        dataset = store.add_dataset(parent.name, parent.source, classes, report["counts"], report,
                                    dataset_id=dataset_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FixResult(dataset=dataset, parent=parent, changes=changes)


def change_log(dataset: Dataset) -> dict[str, Any] | None:
    """The change log of a fixed version (parent, who, when, why, changes), or None for an import."""
    return dataset.report.get("fix")


def _check_request(parent: Dataset, by_source: dict[str, ManifestEntry], relabel: dict[str, str],
                   exclude: list[str]) -> None:
    unknown = [s for s in [*relabel, *exclude] if s not in by_source]
    if unknown:
        raise InvalidInput(f"Not in {parent.label}: {', '.join(unknown[:10])}"
                           f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}. "
                           "Name images by their path as the audit lists them (e.g. daisy/123.jpg).")
    bad_labels = sorted({label for label in relabel.values() if label not in parent.classes})
    if bad_labels:
        raise InvalidInput(f"Unknown class {', '.join(map(repr, bad_labels))} for {parent.label}; "
                           f"its classes are {', '.join(parent.classes)}.")
    both = [s for s in exclude if s in relabel]
    if both:
        raise InvalidInput(f"{', '.join(both)} cannot be both relabelled and excluded; choose one.")


def _report(parent: Dataset, entries: list[ManifestEntry], classes: list[str], changes: list[Change],
            reason: str, author: str, dataset_id: str) -> dict[str, Any]:
    counts = count_per_split(entries, classes)
    return {
        "source": parent.source,
        "name": parent.name,
        "dataset_id": dataset_id,
        "given_splits": parent.report.get("given_splits", False),
        "split": parent.report.get("split"),
        "classes": classes,
        "counts": counts,
        "images": len(entries),
        "skipped": [],
        "warnings": [],
        "conflicts": [],
        "fix": {
            "parent": parent.id,
            "parent_label": parent.label,
            "author": author,
            "at": time.time(),
            "reason": reason,
            "changes": [dataclasses.asdict(c) for c in changes],
        },
    }
