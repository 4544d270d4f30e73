"""The data audit: likely label errors, near-duplicates, outliers and class balance of a dataset.

Everything is computed from the backbone features of the dataset's images (the content-addressed
feature cache: a dataset a run has trained on audits without a backbone pass):

- label errors: out-of-fold class probabilities from k softmax heads (logistic regression) on
  the features, each image scored by cleanlab's label-quality score and flagged by cleanlab's
  confident-learning filter;
- near-duplicates: pairs whose centred, normalised features have cosine similarity above a
  threshold, cross-split pairs first (a copy of a test image in train inflates test accuracy),
  found with a nearest-neighbour index (`tlcore.evaluate.neighbours`: every pair up to 20,000
  images, an inverted-file index above, so the time per photo does not grow with the set); copies
  of one photo are grouped into clusters (so a photo with 30 variants is one finding, not 435
  pairs) and the report keeps at most `MAX_PAIRS` pairs;
- outliers: images whose nearest neighbours are far less similar than a typical image's, on
  uncentred features (centring removes what all photos of a dataset share, and with it the
  difference between a flower and a page of text);
- an embedding map: a 2-D projection for a scatter coloured by class (fitted on a seeded sample of
  at most `MAP_FIT` images, drawn for one of at most `MAP_POINTS`). Linear discriminant
  analysis on a PCA of the features, chosen over UMAP and t-SNE for speed: on the 2 shared
  cores, umap-learn took 20-116 s to import (numba) and 60-120 s to fit 3,300 points, sklearn's
  t-SNE 93 s; LDA takes well under a second and still pulls classes apart (a mislabelled image
  sits among the class it looks like, in the other class's colour).

Memory: the feature matrix is memory-mapped from the feature cache and reduced a chunk of rows at
a time; what the steps hold beyond the reduced features (128 float32 per image, and the
neighbour index's copy of them) is bounded by `CHUNK`, the index's batch of queries and `MAP_FIT`,
not by the dataset's size (bench/audit_memory.py measures it).

The report is saved beside the dataset (`audit-<backbone>.json`) so the dashboard shows it
without recomputing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tlcore.backbones import get_backbone
from tlcore.backbones.features import feature_cache
from tlcore.data.manifest import ManifestEntry, load_manifest
from tlcore.errors import InvalidInput
from tlcore.evaluate.neighbours import EXACT_UP_TO, QUERY_ROWS, NeighbourIndex
from tlcore.records import home
from tlcore.records.atomic import write_json_atomically
from tlcore.records.store import Dataset, Store

DEFAULT_BACKBONE = "efficientnet_lite0"
FOLDS = 5
MIN_PER_CLASS = 3  # fewer images in a class than this and out-of-fold heads say nothing about it
DUPLICATE_SIMILARITY = 0.90  # centred cosine similarity; see BENCHMARKS.md for how it was chosen
OUTLIER_NEIGHBOURS = 5
OUTLIER_SPREAD = 4.0  # robust z-score (median/MAD) below which an image is an outlier
PCA_DIMS = 128
HEAD_C = 10.0  # inverse L2 strength of the out-of-fold heads, on unit-length features
CHUNK = 8192  # feature rows reduced at once
MAX_PAIRS = 1000  # near-duplicate pairs a report keeps (cross-split first, then most similar); groups count all
GROUP_MEMBERS = 50  # images a near-duplicate group lists by name (its size counts them all)
MAP_POINTS = 5000  # images drawn on the embedding map
MAP_FIT = 20000  # images the map's projection is fitted on


@dataclasses.dataclass(frozen=True)
class LabelIssue:
    source: str
    split: str
    given: str
    suggested: str
    score: float  # cleanlab label quality in [0, 1]: low means the given label is likely wrong


@dataclasses.dataclass(frozen=True)
class NearDuplicate:
    a: str
    b: str
    similarity: float
    splits: tuple[str, str]

    @property
    def cross_split(self) -> bool:
        return self.splits[0] != self.splits[1]


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Images linked by near-duplicate pairs (copies, crops, re-encodes of one photo)."""

    size: int
    members: list[str]  # sources, at most GROUP_MEMBERS of them
    splits: list[str]  # the splits its images are in
    labels: list[str]  # the classes its images are labelled with
    similarity: float  # its most similar pair

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1


@dataclasses.dataclass(frozen=True)
class Outlier:
    source: str
    split: str
    label: str
    score: float  # mean similarity to its nearest neighbours


@dataclasses.dataclass(frozen=True)
class MapPoint:
    source: str
    split: str
    label: str
    x: float
    y: float


@dataclasses.dataclass(frozen=True)
class AuditReport:
    dataset_id: str
    dataset: str
    backbone: str
    image_size: int
    images: int
    label_issues: list[LabelIssue]
    near_duplicates: list[NearDuplicate]
    outliers: list[Outlier]
    class_balance: dict[str, Any]
    embedding_map: list[MapPoint]
    timings: dict[str, float]
    duplicate_groups: list[DuplicateGroup] = dataclasses.field(default_factory=list)  # absent in older audits
    duplicate_pairs: int | None = None  # every pair found; `near_duplicates` keeps at most MAX_PAIRS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        fields = dict(data)
        fields["label_issues"] = [LabelIssue(**x) for x in data["label_issues"]]
        fields["near_duplicates"] = [NearDuplicate(**{**x, "splits": tuple(x["splits"])})
                                     for x in data["near_duplicates"]]
        fields["outliers"] = [Outlier(**x) for x in data["outliers"]]
        fields["embedding_map"] = [MapPoint(**x) for x in data["embedding_map"]]
        fields["duplicate_groups"] = [DuplicateGroup(**x) for x in data.get("duplicate_groups", [])]
        return cls(**fields)


def audit_dataset(ref: str, backbone: str = DEFAULT_BACKBONE, *, store: Store | None = None,
                  image_size: int | None = None, weights: str = "imagenet", folds: int = FOLDS,
                  duplicate_similarity: float = DUPLICATE_SIMILARITY,
                  on_progress: Callable[[str], None] | None = None) -> AuditReport:
    """Audit dataset `ref` (id, name or `name@version`) with `backbone`'s features; save and return it.

    Args:
        ref: the dataset.
        backbone: whose features to use. Defaults to EfficientNet-Lite0.
        image_size: the features' input size. Defaults to the backbone's default size.
        weights: "imagenet" or "none". Defaults to "imagenet".
        folds: k of the out-of-fold heads (fewer if the smallest class is smaller). Defaults to 5.
        duplicate_similarity: cosine similarity from which two images are near-duplicates.
        on_progress: called with a short sentence as each step starts.

    Raises:
        InvalidInput: fewer than two classes, or a class with fewer than 3 images.
        NotFound: no such dataset.
    """
    say = on_progress or (lambda message: None)
    started = time.perf_counter()
    store = store or Store()
    dataset = store.get_dataset(ref)
    entries = load_manifest(dataset.id)
    folds = _check_enough_images(dataset, entries, folds)
    spec = get_backbone(backbone)
    size = image_size or spec.default_size
    timings: dict[str, float] = {}

    def timed(key: str, message: str, step: Callable[[], Any]) -> Any:
        say(message)
        t = time.perf_counter()
        result = step()
        timings[key] = round(time.perf_counter() - t, 3)
        return result

    features = timed("features_s", "Backbone features", lambda: dataset_features(entries, spec.name, size, weights))
    findings = audit_features(entries, dataset.classes, features, folds, duplicate_similarity, timed)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    report = AuditReport(
        dataset_id=dataset.id, dataset=dataset.label, backbone=spec.name, image_size=size, images=len(entries),
        class_balance=class_balance(dataset), timings=timings, **findings)
    write_json_atomically(audit_path(dataset.id, spec.name), report.to_dict())
    return report


def audit_features(entries: Sequence[ManifestEntry], classes: Sequence[str], features: np.ndarray, folds: int,
                   duplicate_similarity: float = DUPLICATE_SIMILARITY,
                   timed: Callable[[str, str, Callable[[], Any]], Any] = lambda key, message, step: step(),
                   *, chunk: int = CHUNK, query_rows: int = QUERY_ROWS, exact_up_to: int = EXACT_UP_TO
                   ) -> dict[str, Any]:
    """The audit's findings from the features of `entries` (one row each): the AuditReport fields
    label_issues, near_duplicates, duplicate_groups, duplicate_pairs, outliers and embedding_map.

    `timed(key, message, step)` runs each step (to time it and say what is happening); `chunk`
    feature rows are reduced at once and `query_rows` images searched for neighbours at once; above
    `exact_up_to` images the neighbour search is approximate (see `tlcore.evaluate.neighbours`)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[e.label] for e in entries])
    with timed("imports_s", "Loading the audit's libraries", _one_blas_thread):
        reduced, uncentred = timed("pca_s", "Reducing features", lambda: _reduce(features, chunk))
        probs = timed("heads_s", f"{folds}-fold heads", lambda: out_of_fold_probabilities(reduced, labels, folds))
        issues = timed("label_issues_s", "Ranking label issues",
                       lambda: rank_label_issues(entries, classes, labels, probs))
        points = timed("map_s", "Embedding map", lambda: embedding_map(entries, reduced, labels))

        def index(rows: np.ndarray) -> NeighbourIndex:
            # In place: nothing needs the unscaled rows any more.
            return NeighbourIndex(_unit(rows, in_place=True), exact_up_to=exact_up_to, query_rows=query_rows)

        duplicates, groups, pair_count = timed("duplicates_s", "Near-duplicates",
                                               lambda: near_duplicates(entries, index(reduced), duplicate_similarity))
        outliers = timed("outliers_s", "Outliers", lambda: find_outliers(entries, index(uncentred)))
    return {"label_issues": issues, "near_duplicates": duplicates, "duplicate_groups": groups,
            "duplicate_pairs": pair_count, "outliers": outliers, "embedding_map": points}


def _one_blas_thread():
    """A context with one BLAS/OpenMP thread per library, the audit's libraries loaded first.

    The audit's LAPACK calls (QR, SVD, the heads' solver) are many small steps; with two OpenBLAS
    threads on two cores shared with other work, every step waits for a descheduled thread: on
    the 2 shared cores a QR took 10.5 s with two threads and 0.55 s with one.
    """
    import cleanlab.filter  # noqa: F401 - loaded now so the limit covers its BLAS too
    import faiss  # noqa: F401 - and its OpenMP
    import sklearn.discriminant_analysis  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.utils.extmath  # noqa: F401
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def audit_path(dataset_id: str, backbone: str) -> Path:
    """Where the last audit of a dataset with a backbone is saved."""
    return home.dataset_dir(dataset_id) / f"audit-{backbone}.json"


def saved_audit(dataset_id: str, backbone: str = DEFAULT_BACKBONE) -> AuditReport | None:
    """The last saved audit of the dataset with `backbone`, or None."""
    path = audit_path(dataset_id, backbone)
    if not path.exists():
        return None
    return AuditReport.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _check_enough_images(dataset: Dataset, entries: Sequence[ManifestEntry], folds: int) -> int:
    counts = Counter(e.label for e in entries)
    if len(counts) < 2:
        raise InvalidInput(f"Dataset {dataset.label} has only one class ({next(iter(counts), 'none')}); "
                           "an audit compares classes, so it needs at least two.")
    smallest = min(counts, key=counts.get)
    if counts[smallest] < MIN_PER_CLASS:
        raise InvalidInput(
            f"Class {smallest!r} of {dataset.label} has {counts[smallest]} image(s); the audit's out-of-fold "
            f"heads need at least {MIN_PER_CLASS} per class. Add images to it or leave the class out.")
    return max(2, min(folds, counts[smallest]))


def dataset_features(entries: Sequence[ManifestEntry], backbone: str, size: int, weights: str = "imagenet",
                     seed: int = 0) -> np.ndarray:
    """Pooled backbone features of `entries`, from the feature cache; unseen images go through the
    backbone (the same features a head-only training run caches and reuses)."""
    cache = feature_cache(backbone, size, weights, seed)
    shas = [e.sha256 for e in entries]
    found = cache.complete(shas, mmap=True)
    if found is not None:
        return found.array
    import keras

    from tlcore.backbones import resolve_weights
    from tlcore.backbones.classifier import build_classifier
    from tlcore.backbones.features import cached_features
    from tlcore.backbones.folding import fold_batchnorm
    from tlcore.data.pipeline import pixel_cache

    spec = get_backbone(backbone)
    keras.utils.set_random_seed(seed)
    classifier = build_classifier(spec, size, resolve_weights(spec, weights), 2, 0.0)
    feature_model = fold_batchnorm(classifier.features_model())
    pixels, _ = pixel_cache(entries, size)
    found, _ = cached_features(cache, shas, feature_model, pixels.images, 32)
    return found.array


def _reduce(features: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(centred features on their top principal components, the uncentred features in the span of
    those components and the mean): the heads, duplicates and map use the first; the outliers the
    second, where what every photo of the dataset shares still counts.

    Streams `chunk` rows at a time (two passes: the mean and covariance, then the projections), so
    the feature matrix can stay a memory map and no copy of it is ever made."""
    from scipy.linalg import eigh

    n, width = features.shape
    mean = np.zeros(width, np.float64)
    for start in range(0, n, chunk):
        mean += features[start:start + chunk].sum(axis=0, dtype=np.float64)
    mean = (mean / n).astype(np.float32)
    covariance = np.zeros((width, width), np.float64)
    for start in range(0, n, chunk):
        centred = np.asarray(features[start:start + chunk], np.float32) - mean
        covariance += centred.T @ centred
    dims = min(PCA_DIMS, n - 1, width)
    # The top eigenvectors of the (width x width) covariance: 0.3 s for 1280 features on one core.
    _, components = eigh(covariance, subset_by_index=[width - dims, width - 1])
    components = components[:, ::-1].astype(np.float32)  # the largest component first
    components *= np.sign(components[np.abs(components).argmax(axis=0), np.arange(dims)])  # one sign, every time
    basis, _ = np.linalg.qr(np.column_stack([components, mean]))
    reduced, uncentred = np.empty((n, dims), np.float32), np.empty((n, basis.shape[1]), np.float32)
    for start in range(0, n, chunk):
        rows = np.asarray(features[start:start + chunk], np.float32)
        reduced[start:start + len(rows)] = (rows - mean) @ components
        uncentred[start:start + len(rows)] = rows @ basis
    return reduced, uncentred


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Class probabilities for every image from a softmax head that never saw it (stratified k-fold),
    trained on the features scaled to unit length (the cosine geometry the duplicates use too)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    probs = np.zeros((len(labels), int(labels.max()) + 1), np.float64)
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        head = LogisticRegression(C=HEAD_C, max_iter=300).fit(x[train], labels[train])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(x[held_out])
    return probs


def rank_label_issues(entries: Sequence[ManifestEntry], classes: Sequence[str], labels: np.ndarray,
                      probs: np.ndarray) -> list[LabelIssue]:
    """Images cleanlab flags as likely mislabelled, most likely first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probs)
    # n_jobs=1: cleanlab would otherwise fork worker processes, and a fork of the threaded dashboard
    # server can deadlock (a forked child hung the browser test once).
    flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    suggested = probs.argmax(axis=1)
    return [LabelIssue(source=entries[i].source, split=entries[i].split, given=classes[labels[i]],
                       suggested=classes[suggested[i]], score=round(float(scores[i]), 4))
            for i in flagged]


def _unit(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if in_place:
        x /= norms
        return x
    return x / norms


def near_duplicates(entries: Sequence[ManifestEntry], index: NeighbourIndex, threshold: float,
                    max_pairs: int = MAX_PAIRS) -> tuple[list[NearDuplicate], list[DuplicateGroup], int]:
    """Images with cosine similarity >= `threshold` in `index` (rows in the order of `entries`).

    Returns (at most `max_pairs` pairs, cross-split first, then most similar; the groups the pairs
    link, cross-split first, then largest; how many pairs there are in all). Memory holds one batch
    of the index's answers, the kept pairs and a group id and a similarity per image, never every pair.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(entries)
    split = np.unique([e.split for e in entries], return_inverse=True)[1]
    group = np.arange(n)  # a group id per image: the groups the pairs so far link
    best = np.zeros(n, np.float32)  # per image, the similarity of its most similar pair
    kept = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    total = 0
    for rows, cols, sims in index.pairs_at_least(threshold):
        total += len(rows)
        np.maximum.at(best, rows, sims)
        np.maximum.at(best, cols, sims)
        links = coo_matrix((np.ones(len(rows), np.int8), (group[rows], group[cols])), shape=(n, n))
        group = connected_components(links, directed=False)[1][group]
        i, j, similarity = (np.concatenate(pair) for pair in zip(kept, (rows, cols, sims)))
        # Cross-split first, then most similar, then later images first (a stable order for ties).
        order = np.lexsort((-j, -i, -similarity, split[i] == split[j]))[:max_pairs]
        kept = (i[order], j[order], similarity[order])
    duplicates = [NearDuplicate(a=entries[i].source, b=entries[j].source, similarity=round(float(s), 4),
                                splits=(entries[i].split, entries[j].split))
                  for i, j, s in zip(*(column.tolist() for column in kept))]
    by_group = np.argsort(group, kind="stable")  # each group's images in the order of `entries`
    starts = np.flatnonzero(np.r_[True, np.diff(group[by_group]) != 0])
    members = [m for m in np.split(by_group, starts[1:]) if len(m) > 1]
    members.sort(key=lambda m: m[0])
    groups = [DuplicateGroup(size=len(m), members=[entries[i].source for i in m[:GROUP_MEMBERS].tolist()],
                             splits=sorted({entries[i].split for i in m.tolist()}),
                             labels=sorted({entries[i].label for i in m.tolist()}),
                             similarity=round(float(best[m].max()), 4))
              for m in members]
    groups.sort(key=lambda g: (not g.cross_split, -g.size, -g.similarity))
    return duplicates, groups, total


def find_outliers(entries: Sequence[ManifestEntry], index: NeighbourIndex) -> list[Outlier]:
    """Images whose nearest neighbours in `index` are far less similar than a typical image's (robust
    z-score below -OUTLIER_SPREAD), least similar first."""
    neighbour_similarity = index.mean_nearest_similarity(min(OUTLIER_NEIGHBOURS, len(entries) - 1))
    median = np.median(neighbour_similarity)
    spread = 1.4826 * np.median(np.abs(neighbour_similarity - median)) or 1e-6
    z = (neighbour_similarity - median) / spread
    return [Outlier(source=entries[i].source, split=entries[i].split, label=entries[i].label,
                    score=round(float(neighbour_similarity[i]), 4))
            for i in np.argsort(neighbour_similarity) if z[i] < -OUTLIER_SPREAD]


def class_balance(dataset: Dataset) -> dict[str, Any]:
    """Images per class (all splits and per split), the largest/smallest ratio and the smallest class."""
    totals = {c: sum(dataset.counts.get(s, {}).get(c, 0) for s in dataset.counts) for c in dataset.classes}
    smallest, largest = min(totals, key=totals.get), max(totals, key=totals.get)
    return {"per_class": totals, "per_split": dataset.counts, "smallest": smallest, "largest": largest,
            "ratio": round(totals[largest] / max(1, totals[smallest]), 2)}


def embedding_map(entries: Sequence[ManifestEntry], features: np.ndarray, labels: np.ndarray,
                  points: int = MAP_POINTS, fit_on: int = MAP_FIT) -> list[MapPoint]:
    """A 2-D projection of the features (LDA; with two classes, LDA's axis and the first principal one),
    fitted on a seeded sample of at most `fit_on` images (with one of each class at least) and drawn
    for a seeded sample of at most `points` of them."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    n_classes = int(labels.max()) + 1
    fitted = _sample(len(entries), fit_on, seed=1)
    fitted = np.union1d(fitted, np.unique(labels, return_index=True)[1])
    lda = LinearDiscriminantAnalysis(n_components=min(2, n_classes - 1)).fit(features[fitted], labels[fitted])
    shown = _sample(len(entries), points, seed=0)
    xy = lda.transform(features[shown])
    if xy.shape[1] == 1:
        xy = np.column_stack([xy[:, 0], features[shown, 0]])
    return [MapPoint(source=entries[i].source, split=entries[i].split, label=entries[i].label,
                     x=round(float(x), 4), y=round(float(y), 4)) for i, (x, y) in zip(shown.tolist(), xy)]


def _sample(n: int, at_most: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of at most `at_most` of `n` rows (all of them if fewer)."""
    if n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, at_most, replace=False))
