"""import_dataset end to end on a generated corpus of good, bad and hostile input."""

from __future__ import annotations

import collections
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import SHARED_DATASETS
from test_data_images import (
    HTML,
    TEXT,
    make_16bit_png,
    make_animated_gif,
    make_bomb_png,
    make_cmyk_jpeg,
    make_exif_rotated_jpeg,
    make_grey_jpeg,
    make_palette_gif,
    make_photo,
    make_rgba_png,
    make_tiff,
    make_tiny_png,
    make_truncated_jpeg,
    make_webp,
)

from tlcore.data.archive import UnsafeArchive
from tlcore.data.images import load_resized
from tlcore.data.importer import DatasetImportError, import_dataset
from tlcore.data.manifest import ManifestEntry, load_manifest, resplit, stratified_split
from tlcore.data.sources import SourceNotAllowed
from tlcore.records import home

SHELL_NAME = "$(rm -rf x) ;&.jpg"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            for p in sorted(root.rglob("*"))}


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_corpus(root: Path) -> dict[str, set[str]]:
    """The issue-6 bad-input corpus as class folders. Returns what must be kept per class."""
    cats = root / "cats"
    for i in range(6):
        write(cats / f"good_{i}.jpg", make_photo(seed=i))
    formats = {
        "alpha.png": make_rgba_png(), "deep16.png": make_16bit_png(), "cmyk.jpg": make_cmyk_jpeg(),
        "grey.jpg": make_grey_jpeg(), "palette.gif": make_palette_gif(), "anim.gif": make_animated_gif(),
        "photo.webp": make_webp(), "scan.tif": make_tiff(), "rotated.jpg": make_exif_rotated_jpeg(),
        "with space.jpg": make_photo(seed=20), "ünïcödé 猫.jpg": make_photo(seed=21),
        SHELL_NAME: make_photo(seed=22), "nested/deeper/inner.jpg": make_photo(seed=23),
    }
    bad = {
        "truncated.jpg": make_truncated_jpeg(), "empty.jpg": b"", "notes.jpg": TEXT,
        "page.jpg": HTML, "pixel.png": make_tiny_png(1, 1), "bomb.png": make_bomb_png(),
        "copy of good_0.jpg": make_photo(seed=0),  # duplicate within the class
        "conflict.jpg": make_photo(seed=99),  # also in dogs
    }
    for name, data in {**formats, **bad}.items():
        write(cats / name, data)
    litter = ["cats/.DS_Store", "cats/Thumbs.db", "cats/.hidden.jpg", "__MACOSX/cats/._good_0.jpg",
              "dogs/.DS_Store"]
    for name in litter:
        write(root / name, b"\x00\x05\x16\x07 litter")
    dogs = root / "dogs"
    for i in range(6):
        write(dogs / f"dog_{i}.jpg", make_photo(seed=100 + i))
    write(dogs / "conflict.jpg", make_photo(seed=99))
    write(root / "birds" / "broken.jpg", make_truncated_jpeg())  # zero valid images
    write(root / "birds" / "empty.png", b"")
    write(root / "fish" / "only.jpg", make_photo(seed=200))  # one valid image
    (root / "empty_class").mkdir()
    return {
        # 'copy of good_0.jpg' sorts before 'good_0.jpg', so the copy is the one kept
        "cats": {f"good_{i}.jpg" for i in range(1, 6)} | {"copy of good_0.jpg"}
        | {Path(n).name for n in formats},
        "dogs": {f"dog_{i}.jpg" for i in range(6)},
        "fish": {"only.jpg"},
    }


def check_corpus_result(result, expected: dict[str, set[str]], prefix: str = "") -> None:
    report = result.report
    entries = load_manifest(result.dataset.id)
    kept = collections.defaultdict(set)
    for e in entries:
        kept[e.label].add(Path(e.source).name)
    assert dict(kept) == expected
    assert result.dataset.classes == ["cats", "dogs", "fish"]
    assert not report["given_splits"]

    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    p = prefix
    assert reasons == {
        f"{p}cats/truncated.jpg": "corrupt", f"{p}cats/empty.jpg": "empty",
        f"{p}cats/notes.jpg": "not_image", f"{p}cats/page.jpg": "not_image",
        f"{p}cats/pixel.png": "too_small", f"{p}cats/bomb.png": "too_large",
        f"{p}cats/good_0.jpg": "duplicate",
        f"{p}cats/conflict.jpg": "label_conflict", f"{p}dogs/conflict.jpg": "label_conflict",
        f"{p}birds/broken.jpg": "corrupt", f"{p}birds/empty.png": "empty",
    }
    messages = {s["file"]: s["message"] for s in report["skipped"]}
    assert "HTML" in messages[f"{p}cats/page.jpg"]
    assert "megapixels" in messages[f"{p}cats/bomb.png"]
    assert "'cats' and 'dogs'" in messages[f"{p}cats/conflict.jpg"]
    assert "duplicate of" in messages[f"{p}cats/good_0.jpg"]
    assert report["conflicts"] == [{"sha256": report["conflicts"][0]["sha256"],
                                    "classes": ["cats", "dogs"],
                                    "files": [f"{p}cats/conflict.jpg", f"{p}dogs/conflict.jpg"]}]
    assert report["ignored"] == 5
    warnings = " ".join(report["warnings"])
    assert "'birds' has no usable images" in warnings
    assert "'empty_class' has no usable images" in warnings
    assert "'fish' has very few images (1)" in warnings
    assert "imbalanced" in warnings
    json.dumps(report)  # JSON-able

    # the EXIF-rotated photo is upright when the training pipeline reads it
    rotated = next(e for e in entries if e.source.endswith("rotated.jpg"))
    assert (rotated.width, rotated.height) == (32, 64)
    px = load_resized(rotated.path, 32).astype(int)
    assert px[4, 16, 0] > 200 and px[4, 16, 2] < 60  # red on top
    assert px[28, 16, 2] > 200 and px[28, 16, 0] < 60  # blue below
    # blobs hold the original bytes, by content hash, inside the data home
    for e in entries:
        assert e.path.is_file() and e.path.is_relative_to(home.blobs_dir())
        assert e.path.name.startswith(e.sha256) and e.split in ("train", "val", "test")
    shell = next(e for e in entries if e.source.endswith(SHELL_NAME))
    assert shell.path.suffix == ".jpg"


def assert_home_clean(tlcore_home: Path) -> None:
    """Only the data home's own folders; no upload temp left behind."""
    assert {p.name for p in tlcore_home.iterdir()} <= {"store.db", "store.db-wal", "store.db-shm",
                                                       "blobs", "datasets", "uploads"}
    uploads = tlcore_home / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir())


def test_bad_input_corpus_folder(tmp_path, store, tlcore_home):
    src = tmp_path / "my pets"
    expected = build_corpus(src)
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "x").write_text("keep")
    before_src, before_sentinel = snapshot(src), snapshot(tmp_path / "sentinel")

    result = import_dataset(src, store=store)

    assert result.dataset.name == "my pets" and result.dataset.version == 1
    check_corpus_result(result, expected)
    assert snapshot(src) == before_src  # the source is only read
    assert snapshot(tmp_path / "sentinel") == before_sentinel
    assert not (tmp_path / "x").exists() and not Path("x").exists()
    assert_home_clean(tlcore_home)
    folder = home.dataset_dir(result.dataset.id)
    assert json.loads((folder / "report.json").read_text())["counts"] == result.dataset.counts
    assert store.get_dataset("my pets").id == result.dataset.id


def test_bad_input_corpus_zip_with_wrapper_folder(tmp_path, store, tlcore_home):
    src = tmp_path / "pets"
    expected = build_corpus(src / "pets")
    archive = tmp_path / "pets upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    result = import_dataset(archive, store=store)
    assert result.dataset.name == "pets upload"
    check_corpus_result(result, expected, prefix="pets/")
    assert_home_clean(tlcore_home)


def test_hostile_zip_writes_nothing(tmp_path, store, tlcore_home):
    archive = tmp_path / "up" / "evil.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cats/a.jpg", make_photo(seed=1))
        zf.writestr("dogs/b.jpg", make_photo(seed=2))
        zf.writestr("../evil.jpg", make_photo(seed=3))
    with pytest.raises(UnsafeArchive, match="zip slip"):
        import_dataset(archive, store=store)
    assert not (tmp_path / "evil.jpg").exists() and not (tlcore_home / "evil.jpg").exists()
    assert not list(tmp_path.rglob("evil.jpg"))
    assert store.list_datasets() == []
    assert_home_clean(tlcore_home)
    assert not list((tlcore_home / "blobs").rglob("*.*"))


def test_non_zip_renamed_zip(tmp_path, store, tlcore_home):
    fake = tmp_path / "photos.zip"
    fake.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(UnsafeArchive, match="not a zip archive"):
        import_dataset(fake, store=store)
    assert_home_clean(tlcore_home)


def test_other_file_types_and_missing_source(tmp_path, store):
    tgz = tmp_path / "photos.tgz"
    tgz.write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    with pytest.raises(DatasetImportError, match="neither a folder nor a .zip"):
        import_dataset(tgz, store=store)
    with pytest.raises(DatasetImportError, match="does not exist"):
        import_dataset(tmp_path / "nope", store=store)


def test_single_class_is_refused(tmp_path, store, tlcore_home):
    for i in range(4):
        write(tmp_path / "src" / "cats" / f"{i}.jpg", make_photo(seed=i))
    write(tmp_path / "src" / "dogs" / "bad.jpg", TEXT)
    with pytest.raises(DatasetImportError) as info:
        import_dataset(tmp_path / "src", store=store)
    message = str(info.value)
    assert "only one class ('cats')" in message and "at least two class folders" in message
    assert "1 not image" in message
    assert info.value.report["skipped"][0]["reason"] == "not_image"
    assert store.list_datasets() == []
    assert not list((tlcore_home / "blobs").rglob("*.*"))  # nothing copied for a failed import


def test_no_images_at_all(tmp_path, store):
    write(tmp_path / "src" / "readme.txt", TEXT)
    with pytest.raises(DatasetImportError, match="Found no usable images"):
        import_dataset(tmp_path / "src", store=store)


def test_symlinks_in_folder_pointing_outside(tmp_path, store, tlcore_home):
    outside = tmp_path / "outside"
    write(outside / "secret.jpg", make_photo(seed=50))
    write(outside / "dir" / "s2.jpg", make_photo(seed=51))
    src = tmp_path / "src"
    for c, s in (("cats", 1), ("dogs", 2)):
        write(src / c / "a.jpg", make_photo(seed=s))
        write(src / c / "b.jpg", make_photo(seed=s + 10))
    (src / "cats" / "sneaky.jpg").symlink_to(outside / "secret.jpg")
    (src / "cats" / "sneaky_dir").symlink_to(outside / "dir", target_is_directory=True)
    (src / "dogs" / "inside.jpg").symlink_to(src / "dogs" / "a.jpg")  # inside: followed (a duplicate)
    (src / "dogs" / "loop").symlink_to(src / "dogs", target_is_directory=True)  # loop: not re-walked
    result = import_dataset(src, store=store)
    reasons = {s["file"]: s["reason"] for s in result.report["skipped"]}
    assert reasons == {"cats/sneaky.jpg": "outside_source", "cats/sneaky_dir": "outside_source",
                       "dogs/inside.jpg": "duplicate"}
    assert "outside the folder being imported" in result.report["skipped"][0]["message"]
    shas = {e.sha256 for e in load_manifest(result.dataset.id)}
    assert len(shas) == 4
    blob_names = {p.name.split(".")[0] for p in (tlcore_home / "blobs").rglob("*.*")}
    assert blob_names == shas  # the outside files were never copied


def test_class_folder_symlinked_outside_is_not_read(tmp_path, store, tlcore_home):
    outside = tmp_path / "outside" / "secrets"
    write(outside / "s.jpg", make_photo(seed=60))
    src = tmp_path / "src"
    for c, s in (("cats", 61), ("dogs", 62)):
        write(src / c / "a.jpg", make_photo(seed=s))
    (src / "birds").symlink_to(outside, target_is_directory=True)
    (src / "top.jpg").symlink_to(outside / "s.jpg")
    result = import_dataset(src, store=store)
    assert result.dataset.classes == ["cats", "dogs"]
    assert {s["file"]: s["reason"] for s in result.report["skipped"]} == {
        "birds": "outside_source", "top.jpg": "outside_source"}
    assert len(list((tlcore_home / "blobs").rglob("*.*"))) == 2


def test_server_import_respects_roots(tmp_path, store):
    root = tmp_path / "root"
    for k, c in enumerate(("cats", "dogs")):
        for i in range(2):
            write(root / "set" / c / f"{i}.jpg", make_photo(seed=300 + 10 * k + i))
    write(tmp_path / "elsewhere" / "cats" / "x.jpg", make_photo(seed=7))
    write(tmp_path / "elsewhere" / "dogs" / "y.jpg", make_photo(seed=8))
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    assert import_dataset(root / "set", store=store, roots=[root]).dataset.num_images == 4
    for bad in (Path("/etc"), root / ".." / "elsewhere", root / "link"):
        with pytest.raises(SourceNotAllowed, match="outside the folders open for import"):
            import_dataset(bad, store=store, roots=[root])
    assert len(store.list_datasets()) == 1


def test_given_splits_are_kept(tmp_path, store):
    src = tmp_path / "split"
    layout = {"train": 4, "validation": 2, "test": 2}
    seed = 0
    for split, n in layout.items():
        for c in ("ants", "bees"):
            for i in range(n):
                seed += 1
                write(src / split / c / f"{i}.jpg", make_photo(seed=seed))
    write(src / "train" / "stray.jpg", make_photo(seed=500))  # not in a class folder
    result = import_dataset(src, store=store)
    assert result.report["given_splits"]
    assert result.dataset.counts == {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2},
                                     "test": {"ants": 2, "bees": 2}}
    assert result.dataset.has_test
    for e in load_manifest(result.dataset.id):
        given = e.source.split("/")[0]
        assert e.split == {"validation": "val"}.get(given, given) and e.source.split("/")[1] == e.label
    assert result.report["skipped"][0]["reason"] == "no_class"


def test_train_and_test_only_carves_val_from_train(tmp_path, store):
    src = tmp_path / "tt"
    for split, n in (("train", 10), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                write(src / split / c / f"{i}.png", make_photo(seed=len(list(src.rglob("*"))), fmt="PNG"))
    result = import_dataset(src, store=store)
    counts = result.dataset.counts
    assert counts["test"] == {"a": 2, "b": 2}
    assert counts["val"]["a"] >= 1 and counts["train"]["a"] + counts["val"]["a"] == 10
    assert any("No val/ folder" in w for w in result.report["warnings"])


def make_balanced(src: Path, per_class: int = 20) -> None:
    for k, c in enumerate(("cats", "dogs")):
        for i in range(per_class):
            write(src / c / f"{i:02d}.png", make_photo(16, 16, seed=1000 * k + i, fmt="PNG"))


def test_stratified_seeded_split_and_reimport_version(tmp_path, store):
    src = tmp_path / "pets"
    make_balanced(src)
    first = import_dataset(src, store=store)
    second = import_dataset(src, store=store, new_version=True)
    other_seed = import_dataset(src, store=store, seed=1)
    assert (first.dataset.version, second.dataset.version, other_seed.dataset.version) == (1, 2, 3)
    assert not (first.unchanged or second.unchanged or other_seed.unchanged)
    assert first.dataset.counts == {s: {"cats": n, "dogs": n}
                                    for s, n in (("train", 14), ("val", 3), ("test", 3))}

    def splits(r):
        return {e.sha256: e.split for e in load_manifest(r.dataset.id)}

    assert splits(first) == splits(second)  # deterministic
    assert splits(first) != splits(other_seed)
    assert first.report["split"] == {"ratios": [0.7, 0.15, 0.15], "seed": 0}

    custom = import_dataset(src, "pets-80", store=store, split=(0.8, 0.2))
    assert custom.dataset.counts == {"train": {"cats": 16, "dogs": 16}, "val": {"cats": 4, "dogs": 4}}
    assert not custom.dataset.has_test
    with pytest.raises(ValueError, match="`split` must be"):
        import_dataset(src, store=store, split=(0.5, 0.2))


def test_importing_an_unchanged_folder_again_returns_the_existing_version(tmp_path, store):
    src = tmp_path / "pets"
    make_balanced(src)
    first = import_dataset(src, store=store)
    again = import_dataset(src, store=store)
    assert again.unchanged and again.dataset.id == first.dataset.id
    assert [d.label for d in store.list_datasets()] == ["pets v1"]

    (src / "cats" / "00.png").rename(src / "cats" / "renamed.png")
    changed = import_dataset(src, store=store)  # same pictures, one under a new name: a new version
    assert not changed.unchanged and changed.dataset.version == 2


def test_hymenoptera_slice_keeps_given_splits(tmp_path, store):
    real = SHARED_DATASETS / "hymenoptera"
    if not real.is_dir():
        pytest.skip("shared hymenoptera dataset not present")
    src = tmp_path / "hymenoptera"
    for split in ("train", "val"):
        for c in ("ants", "bees"):
            (src / split / c).mkdir(parents=True)
            for f in sorted((real / split / c).iterdir())[:6]:
                shutil.copyfile(f, src / split / c / f.name)
    result = import_dataset(src, store=store)
    assert result.report["given_splits"]
    assert result.dataset.counts == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 6, "bees": 6}}
    assert result.report["skipped"] == []
    entry = load_manifest(result.dataset.id)[0]
    assert load_resized(entry.path, 64).shape == (64, 64, 3)


# ------------------------------------------------------------------ manifest


def test_stratified_split_guarantees():
    labels = ["a"] * 3 + ["b"] * 2 + ["c"] * 1 + ["d"] * 100
    out = stratified_split(labels, seed=5)
    by = collections.defaultdict(collections.Counter)
    for label, s in zip(labels, out):
        by[label][s] += 1
    assert by["a"] == {"train": 1, "val": 1, "test": 1}
    assert by["b"] == {"train": 1, "val": 1}
    assert by["c"] == {"train": 1}
    assert by["d"] == {"train": 70, "val": 15, "test": 15}
    assert stratified_split(labels, seed=5) == out
    assert stratified_split(labels, seed=6) != out
    # adding a class does not reshuffle the others
    assert stratified_split(labels + ["e"] * 9, seed=5)[: len(labels)] == out


def test_resplit_is_order_independent(tmp_path):
    entries = [ManifestEntry(tmp_path / f"{i}.png", "ab"[i % 2], "train", f"{i:064x}", f"{i}.png", 16, 16)
               for i in range(40)]
    a = resplit(entries, (0.8, 0.1, 0.1), seed=3)
    b = resplit(list(reversed(entries)), (0.8, 0.1, 0.1), seed=3)
    assert {e.sha256: e.split for e in a} == {e.sha256: e.split for e in b}
    assert [e.sha256 for e in a] == [e.sha256 for e in entries]
    assert collections.Counter(e.split for e in a) == {"train": 32, "val": 4, "test": 4}


def test_load_manifest_missing():
    with pytest.raises(FileNotFoundError, match="No manifest for dataset 'ds-nope'"):
        load_manifest("ds-nope")


def test_camera_snapshot_class_names_cannot_leave_the_work_folder(tmp_path, store):
    import io

    from PIL import Image

    from tlcore.data.snapshots import check_class_name, import_snapshots

    def jpeg(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buf, "JPEG")
        return buf.getvalue()

    for hostile in ("../../escape", "/etc/cron.d", "a/b", "..", ".hidden", "x\\y", ""):
        with pytest.raises(ValueError):
            check_class_name(hostile)
    with pytest.raises(ValueError, match="plain name"):
        import_snapshots({"../../escape": [jpeg("red")] * 3, "ok": [jpeg("blue")] * 3}, store=store)
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()

    result = import_snapshots({"red mug": [jpeg((200, 0, 0)), jpeg((210, 0, 0)), jpeg((190, 0, 0))],
                               "blue mug": [jpeg((0, 0, 200)), jpeg((0, 0, 210)), jpeg((0, 0, 190))]},
                              "mugs", store=store)
    assert result.dataset.classes == ["blue mug", "red mug"] and result.dataset.num_images == 6
