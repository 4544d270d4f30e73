"""The data audit on a small slice of real flower photos with one error of each kind planted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATASETS
from PIL import Image, ImageDraw

from tlcore import cli
from tlcore.data.importer import import_dataset
from tlcore.data.manifest import ManifestEntry, write_manifest
from tlcore.errors import InvalidInput
from tlcore.evaluate.audit import _reduce, audit_dataset, audit_features, embedding_map, near_duplicates, saved_audit
from tlcore.evaluate.neighbours import NeighbourIndex
from tlcore.records.store import Store

SIZE = 96
CLASSES = ("daisy", "dandelion", "sunflower")
FLIPPED = "train/sunflower/flipped-daisy.jpg"  # a daisy filed as a sunflower
COPY = "train/dandelion/copy-of-test.jpg"  # a 0.8x resized copy of a test photo
STRAY = "train/daisy/scanned-page.png"  # a page of text: not a flower at all


def _planted_slice(root):
    """8 train and 3 test photos per class, plus the three planted errors; returns the copied test photo."""
    for label in CLASSES:
        photos = sorted((SHARED_DATASETS / "flowers" / label).iterdir())
        for split, chosen in (("train", photos[:8]), ("test", photos[8:11])):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                shutil.copy(photo, root / split / label / photo.name)
    shutil.copy(sorted((SHARED_DATASETS / "flowers" / "daisy").iterdir())[20], root / FLIPPED)
    test_photo = sorted((root / "test" / "dandelion").iterdir())[0]
    with Image.open(test_photo) as image:
        image.resize((round(image.width * 0.8), round(image.height * 0.8))).save(root / COPY, quality=90)
    page = Image.new("RGB", (227, 227), "white")
    draw = ImageDraw.Draw(page)
    for line in range(20):
        draw.text((6, 11 * line), "The quick brown fox jumps over the lazy dog.", fill="black")
    page.save(root / STRAY)
    return f"test/dandelion/{test_photo.name}"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(data home, dataset, copied test photo, audit report): the backbone runs once for the module."""
    root = tmp_path_factory.mktemp("audit")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLCORE_HOME", str(home))
        copied = _planted_slice(root / "flowers")
        dataset = import_dataset(root / "flowers", name="flowers", store=Store()).dataset
        report = audit_dataset(dataset.id, image_size=SIZE)
    return home, dataset, copied, report


@pytest.fixture
def audit_home(audited, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(audited[0]))
    return audited


def test_the_planted_label_flip_is_flagged_with_the_class_it_looks_like(audited):
    report = audited[3]
    top = {issue.source: issue for issue in report.label_issues[:3]}
    assert FLIPPED in top
    assert top[FLIPPED].given == "sunflower" and top[FLIPPED].suggested == "daisy"
    assert top[FLIPPED].split == "train" and 0 <= top[FLIPPED].score < 0.5


def test_a_resized_copy_of_a_test_photo_in_train_is_the_first_near_duplicate(audited):
    report, copied = audited[3], audited[2]
    first = report.near_duplicates[0]
    assert {first.a, first.b} == {copied, COPY}
    assert first.cross_split and "test" in first.splits and first.similarity > 0.9
    assert all(d.cross_split for d in report.near_duplicates[:sum(d.cross_split for d in report.near_duplicates)])


def test_an_image_far_from_every_class_is_an_outlier(audited):
    report = audited[3]
    assert report.outliers and report.outliers[0].source == STRAY and report.outliers[0].label == "daisy"


def test_class_balance_and_map_cover_every_image(audited):
    report = audited[3]
    balance = report.class_balance
    assert balance["per_class"] == {"daisy": 12, "dandelion": 12, "sunflower": 12}
    assert balance["ratio"] == 1.0 and balance["per_split"]["test"] == {c: 3 for c in CLASSES}
    assert len(report.embedding_map) == report.images == 36
    assert {p.label for p in report.embedding_map} == set(CLASSES)


def test_a_second_audit_reads_cached_features_and_the_cli_prints_json(audit_home, monkeypatch, capsys):
    _, dataset, _, report = audit_home
    assert saved_audit(dataset.id) == report

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built although every feature is cached")

    monkeypatch.setattr("tlcore.backbones.classifier.build_classifier", no_backbone)
    code = cli.main(["audit", "flowers", "--image-size", str(SIZE), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert out["label_issues"][0] == {key: getattr(report.label_issues[0], key)
                                      for key in ("source", "split", "given", "suggested", "score")}
    assert out["near_duplicates"][0]["a"] in (COPY, audit_home[2]) and out["near_duplicates"][0]["splits"]
    assert out["outliers"][0]["source"] == STRAY and out["timings"]["total_s"] > 0
    copies = out["duplicate_groups"][0]  # the copy of a test photo: a group across splits, listed first
    assert copies["size"] >= 2 and "test" in copies["splits"] and len(copies["splits"]) == 2

    cli.main(["audit", "flowers", "--image-size", str(SIZE), "--json", "--top", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(len(out[k]) <= 1 for k in ("label_issues", "near_duplicates", "duplicate_groups", "outliers"))
    assert out["near_duplicates_total"] == len(report.near_duplicates)  # the totals still count them all


def _entry(i: int, split: str = "train", label: str = "a") -> ManifestEntry:
    return ManifestEntry(path=f"/x/{i}.jpg", label=label, split=split, sha256=f"{i:064d}", source=f"{split}/{i}.jpg",
                         width=64, height=64)


def test_copies_of_one_photo_are_one_group_and_the_pairs_kept_are_bounded():
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(4, 32))
    # photo 0 with 5 variants (one in test), photo 1 with 2, photos 2 and 3 alone; 20 unrelated images
    rows = [photos[0] + rng.normal(scale=0.05, size=32) for _ in range(6)] + \
           [photos[1] + rng.normal(scale=0.05, size=32) for _ in range(3)] + [photos[2], photos[3]] + \
           list(rng.normal(size=(20, 32)))
    unit = np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
    entries = [_entry(i, "test" if i == 5 else "train") for i in range(len(rows))]

    pairs, groups, total = near_duplicates(entries, NeighbourIndex(unit), 0.9, max_pairs=4)

    assert total == 15 + 3  # every pair of the 6 copies, and of the 3
    assert [(g.size, g.splits) for g in groups] == [(6, ["test", "train"]), (3, ["train"])]
    assert len(pairs) == 4 and all(p.cross_split for p in pairs)  # the 5 pairs with the test copy come first
    assert all(p.similarity >= 0.9 for p in pairs) and groups[0].similarity >= max(p.similarity for p in pairs)


def test_the_inverted_file_index_finds_the_copies_and_outliers_the_exact_search_finds():
    """Above `exact_up_to` images the audit compares each image with a few cells of the set only; on
    4,000 clustered rows, 50 cells of which each image probes 8, it finds what comparing every pair finds."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 64))
    rows = centres[rng.integers(0, 40, 4000)] + rng.normal(scale=0.8, size=(4000, 64))
    picked = rng.choice(4000, 65, replace=False)
    copied, strays = picked[:60], picked[60:]
    rows[copied[30:]] = rows[copied[:30]] + rng.normal(scale=0.05, size=(30, 64))  # 30 pairs of copies
    rows[strays] = rng.normal(scale=3.0, size=(5, 64))  # and 5 images unlike any other
    unit = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    exact = NeighbourIndex(unit)
    approximate = NeighbourIndex(unit, exact_up_to=0, cell_rows=80, probes=8, query_rows=500)
    assert exact.exact and not approximate.exact and approximate.index.nlist == 50

    def pairs(index):
        return {(i, j) for rows, cols, _ in index.pairs_at_least(0.9) for i, j in zip(rows.tolist(), cols.tolist())}

    found = pairs(exact)
    assert {tuple(sorted(p)) for p in zip(copied[:30].tolist(), copied[30:].tolist())} <= found
    assert pairs(approximate) == found
    nearest, approximate_nearest = exact.mean_nearest_similarity(5), approximate.mean_nearest_similarity(5)
    assert np.all(approximate_nearest <= nearest + 1e-5)  # it can miss a neighbour, never invent one
    assert np.mean(np.isclose(approximate_nearest, nearest, atol=1e-5)) > 0.95
    assert set(np.argsort(nearest)[:5]) == set(np.argsort(approximate_nearest)[:5]) == set(strays)


def test_the_embedding_map_draws_a_sample_of_a_large_set():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 8))
    labels = np.arange(300) % 3
    entries = [_entry(i, label="abc"[i % 3]) for i in range(300)]
    points = embedding_map(entries, features, labels, points=50)
    assert len(points) == 50 and len({p.source for p in points}) == 50
    assert embedding_map(entries, features, labels, points=50) == points  # the same sample each time


def _small_features():
    """90 images of 3 classes (24 features): one mislabelled, a photo with 3 copies across splits, one outlier."""
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=1.5, size=(3, 24))
    labels = np.arange(90) % 3
    features = centres[labels] + rng.normal(size=(90, 24))
    features[[10, 40, 70]] = features[1] + rng.normal(scale=0.02, size=(3, 24))  # copies of image 1 (class 1)
    labels[[10, 40, 70]] = 1
    labels[5] = 0  # an image of class 2 labelled class 0
    features[88] = rng.normal(scale=12.0, size=24)
    entries = [_entry(i, "test" if i % 5 == 0 else "train", "abc"[labels[i]]) for i in range(90)]
    return entries, features.astype(np.float32)


def test_the_audit_held_a_few_rows_at_a_time_finds_what_it_finds_holding_them_all():
    entries, features = _small_features()
    whole = audit_features(entries, ["a", "b", "c"], features, 3, chunk=10**6, query_rows=10**6)
    chunked = audit_features(entries, ["a", "b", "c"], features, 3, chunk=7, query_rows=1)  # one image at a time

    assert [(i.source, i.suggested, i.score) for i in chunked["label_issues"]] == \
        [(i.source, i.suggested, i.score) for i in whole["label_issues"]]
    assert [(i.source, i.given, i.suggested) for i in chunked["label_issues"]] == [("test/5.jpg", "a", "c")]
    assert chunked["duplicate_pairs"] == whole["duplicate_pairs"] == 6  # the 4 copies of image 1, each pair once
    assert chunked["near_duplicates"] == whole["near_duplicates"]
    assert chunked["duplicate_groups"] == whole["duplicate_groups"]
    assert [o.source for o in chunked["outliers"]] == [o.source for o in whole["outliers"]]
    assert chunked["outliers"][0].source.endswith("/88.jpg")
    assert [p.source for p in chunked["embedding_map"]] == [p.source for p in whole["embedding_map"]]
    np.testing.assert_allclose([(p.x, p.y) for p in chunked["embedding_map"]],
                               [(p.x, p.y) for p in whole["embedding_map"]], atol=1e-3)


def test_the_streamed_reduction_is_the_principal_components_of_a_memory_mapped_matrix(tmp_path, monkeypatch):
    from sklearn.decomposition import PCA

    from tlcore.evaluate import audit

    monkeypatch.setattr(audit, "PCA_DIMS", 5)
    _, features = _small_features()
    mapped = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=features.shape)
    mapped[:] = features
    reduced, uncentred = _reduce(mapped, chunk=7)
    pca = PCA(5, svd_solver="full").fit(features.astype(np.float64))
    np.testing.assert_allclose(np.abs(reduced), np.abs(pca.transform(features)), rtol=1e-3, atol=1e-3)
    span, _ = np.linalg.qr(np.column_stack([pca.components_.T, pca.mean_]))  # the components and the mean
    np.testing.assert_allclose(np.linalg.norm(uncentred, axis=1), np.linalg.norm(features @ span, axis=1), rtol=1e-4)


def test_too_few_images_in_a_class_or_a_single_class_is_refused_in_a_sentence(store, tmp_path, capsys):
    photos = sorted((SHARED_DATASETS / "flowers" / "rose").iterdir())[:4]
    entries = [ManifestEntry(path=p, label="rose" if i < 2 else "tulip", split="train", sha256=f"{i}" * 64,
                             source=f"x/{i}.jpg", width=227, height=227) for i, p in enumerate(photos)]
    small = store.add_dataset("small", "x", ["rose", "tulip"], {"train": {"rose": 2, "tulip": 2}}, {})
    write_manifest(small.id, entries)
    with pytest.raises(InvalidInput, match="Class 'rose' of small v1 has 2 image.*at least 3 per class"):
        audit_dataset("small", store=store)
    single = store.add_dataset("single", "x", ["rose"], {"train": {"rose": 4}}, {})
    write_manifest(single.id, [ManifestEntry(**{**e.__dict__, "label": "rose"}) for e in entries])
    assert cli.main(["audit", "single"]) == 2
    assert "has only one class (rose)" in capsys.readouterr().err
