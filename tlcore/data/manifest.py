"""A dataset version's manifest (one JSON object per image) and its splits.

`manifest.jsonl` lives in `home.dataset_dir(id)`; a version never changes once written.
Splits are stratified per class and seeded, so the same labels, ratios and seed always give
the same split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Iterable, Sequence

from tlcore.errors import InvalidInput
from tlcore.records import home
from tlcore.records.atomic import write_text_atomically

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.jsonl"


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    path: Path  # absolute path of the image in blobs/
    label: str
    split: str  # train / val / test
    sha256: str
    source: str  # the original relative path, for galleries
    width: int
    height: int


def write_manifest(dataset_id: str, entries: Iterable[ManifestEntry]) -> Path:
    """Write `manifest.jsonl` for `dataset_id` (atomically) and return its path."""
    path = home.dataset_dir(dataset_id) / MANIFEST_NAME

    def rows() -> Iterable[str]:
        for e in entries:
            row = dataclasses.asdict(e)
            row["path"] = str(e.path)
            yield json.dumps(row, ensure_ascii=False) + "\n"

    return write_text_atomically(path, "".join(rows()))


def load_manifest(dataset_id: str) -> list[ManifestEntry]:
    """The entries of dataset `dataset_id`, in the order they were written.

    Raises:
        FileNotFoundError: the dataset has no manifest in this data home.
    """
    path = home.data_home() / "datasets" / dataset_id / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No manifest for dataset {dataset_id!r} at {path}. "
            "`python -m tlcore datasets list` shows the datasets in this data home."
        )
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["path"] = Path(row["path"])
                entries.append(ManifestEntry(**row))
    return entries


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """`ratios` as (train, val, test); two values mean no test split.

    Raises:
        ValueError: not 2 or 3 non-negative numbers summing to 1 with a positive train share.
    """
    r = tuple(float(x) for x in ratios)
    if len(r) == 2:
        r = (*r, 0.0)
    if (len(r) != 3 or any(x < 0 or math.isnan(x) for x in r) or r[0] <= 0
            or abs(sum(r) - 1.0) > 1e-6):
        raise InvalidInput(
            "`split` must be 2 or 3 non-negative fractions (train, val[, test]) that sum to 1 "
            f"with train > 0, e.g. (0.7, 0.15, 0.15). Received: split={tuple(ratios)!r}"
        )
    return r  # type: ignore[return-value]


def stratified_split(labels: Sequence[str], ratios: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> list[str]:
    """A split name (`train`/`val`/`test`) for each label, stratified per class and seeded.

    Each class is shuffled on its own (seeded by `seed` and the class name, so adding a class
    does not reshuffle the others) and cut by largest remainder. Every class with at least 3
    images gets at least one train, one val and one test image (where those ratios are > 0);
    a class of 2 gets one train and one val; a class of 1 goes to train.
    Defaults to 70/15/15 with seed 0.
    """
    r = check_ratios(ratios)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    out = [""] * len(labels)
    for label, idx in by_class.items():
        rng = random.Random(f"{seed}:{label}")
        idx = idx[:]
        rng.shuffle(idx)
        n_train, n_val, _ = _class_counts(len(idx), r)
        for k, i in enumerate(idx):
            out[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return out


def _class_counts(n: int, r: tuple[float, float, float]) -> list[int]:
    quotas = [n * x for x in r]
    counts = [math.floor(q) for q in quotas]
    # largest remainder; ties go to the earlier split (train, then val)
    order = sorted(range(3), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    wanted = [k for k in range(3) if r[k] > 0]
    if n >= len(wanted):
        minimum = wanted
    else:  # too few images to give every split one: train first, then val
        minimum = [k for k in (0, 1, 2) if r[k] > 0][:n]
    for k in minimum:
        if counts[k] == 0:
            donor = max(range(3), key=lambda j: (counts[j] - (j in minimum), -j))
            counts[donor] -= 1
            counts[k] += 1
    return counts


def resplit(entries: Sequence[ManifestEntry], ratios: Sequence[float] = (0.7, 0.15, 0.15),
            seed: int = 0) -> list[ManifestEntry]:
    """The same entries with fresh stratified, seeded splits (for datasets without given splits).

    Independent of the input order: members of a class are ordered by content hash first.
    Returns the entries in their original order, each with its new `split`.
    """
    order = sorted(range(len(entries)), key=lambda i: (entries[i].label, entries[i].sha256,
                                                       entries[i].source))
    splits = stratified_split([entries[i].label for i in order], ratios, seed)
    new = list(entries)
    for i, split in zip(order, splits):
        new[i] = dataclasses.replace(entries[i], split=split)
    return new


def run_entries(dataset, split: Sequence[float] | None, seed: int) -> list[ManifestEntry]:
    """The entries of `dataset` (a store `Dataset`) with the splits a run with recipe `split`/`seed`
    trains on: re-split when the recipe asks for it and the dataset has no given splits."""
    entries = load_manifest(dataset.id)
    if split and not dataset.report.get("given_splits"):
        entries = resplit(entries, split, seed)
    return entries
