"""Built-in offline datasets (real images from PyPI packages) and the download catalog."""

from __future__ import annotations

import time

import app_seed as seed
import numpy as np
import pytest
from PIL import Image

from tlcore.data import builtin
from tlcore.data.builtin import (
    BUILTIN,
    CATALOG,
    DatasetDownloadError,
    download_catalog,
    import_builtin,
    materialize_builtin,
)
from tlcore.data.images import load_resized
from tlcore.data.manifest import load_manifest


def test_materialize_digits(tmp_path):
    root = materialize_builtin("digits", tmp_path, per_class=5)
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    files = sorted((root / "3").glob("*.png"))
    assert len(files) == 5
    im = Image.open(files[0])
    assert im.size == (32, 32) and im.mode == "L"
    assert np.asarray(im).max() > 200  # real strokes, not blank


def test_materialize_textures_is_seeded_and_varied(tmp_path):
    a = materialize_builtin("textures", tmp_path / "a", per_class=4, seed=1)
    b = materialize_builtin("textures", tmp_path / "b", per_class=4, seed=1)
    assert sorted(p.name for p in a.iterdir()) == ["brick", "grass", "gravel"]
    first = [p.read_bytes() for p in sorted((a / "brick").iterdir())]
    assert first == [p.read_bytes() for p in sorted((b / "brick").iterdir())]
    assert len(set(first)) == 4
    assert Image.open(sorted((a / "gravel").iterdir())[0]).size == (96, 96)


@pytest.mark.parametrize("name, classes", [("digits", 10), ("textures", 3)])
def test_import_builtin(store, tlcore_home, name, classes):
    assert name in BUILTIN
    started = time.monotonic()
    result = import_builtin(name, store=store)
    print(f"import of {name} took {time.monotonic() - started:.1f} s")
    ds = result.dataset
    assert ds.name == name and ds.source == f"builtin:{name}" and len(ds.classes) == classes
    assert ds.num_images == 40 * classes and result.report["skipped"] == []
    assert ds.counts["train"][ds.classes[0]] == 28 and ds.has_test
    entry = load_manifest(ds.id)[0]
    assert load_resized(entry.path, 48).shape == (48, 48, 3)
    assert not list((tlcore_home / "uploads").iterdir())  # the staging folder is gone
    again = import_builtin(name, store=store)  # the same images: no second version
    assert again.unchanged and again.dataset.id == ds.id


def test_unknown_builtin(tmp_path):
    with pytest.raises(ValueError, match="`name` must be one of"):
        materialize_builtin("imagenet", tmp_path)


def test_a_catalog_archive_already_downloaded_is_imported_without_the_network(monkeypatch, store, tlcore_home,
                                                                             tmp_path):
    """tf_flowers as its archive is laid out (flower_photos/<class>/*.jpg and a LICENSE.txt), put where
    the download would have cached it: the import takes it from there, limited per class."""
    import tarfile

    from tlcore.records import home

    entry = CATALOG["tf_flowers"]
    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    root = tmp_path / "flower_photos"
    for k, label in enumerate(classes):
        for i in range(3):
            seed.image_file(root / label, f"{label}_{i}.jpg", color=(40 * k, 200 - 30 * i, 90), size=(48, 48))
    (root / "LICENSE.txt").write_text("CC-BY 2.0")
    with tarfile.open(home.cache_dir("downloads") / entry.url.rsplit("/", 1)[1], "w:gz") as tar:
        tar.add(root, arcname="flower_photos")
    monkeypatch.setattr(builtin, "check_reachable", lambda url, timeout: None)  # as if the host answered
    monkeypatch.setattr(builtin.urllib.request, "urlopen", _no_network)

    result = download_catalog("tf_flowers", limit_per_class=2, store=store)
    ds = result.dataset
    assert (ds.name, ds.source, ds.classes) == ("tf_flowers", entry.url, classes)
    assert len(ds.classes) == entry.classes and ds.num_images == 2 * entry.classes


def _no_network(*args, **kwargs):
    raise AssertionError("the cached archive should have been used")


@pytest.mark.parametrize("name", ["tf_flowers", "cats_vs_dogs", "cifar10"])
def test_download_offline_says_so(monkeypatch, store, tlcore_home, name):
    # `.invalid` never resolves (RFC 6761), so this holds with or without internet.
    entry = CATALOG[name]
    fake = builtin.CatalogEntry(**{**entry.__dict__, "url": "https://tlcore-offline.invalid/x.zip"})
    monkeypatch.setitem(CATALOG, name, fake)
    started = time.monotonic()
    with pytest.raises(DatasetDownloadError) as info:
        download_catalog(name, limit_per_class=5, store=store, timeout=2)
    print(f"the failed download gave up after {time.monotonic() - started:.1f} s")
    message = str(info.value)
    assert "Could not reach tlcore-offline.invalid" in message
    assert "no internet" in message and "import a zip or folder instead" in message
    assert store.list_datasets() == []


def test_download_rejects_unknown_name(store):
    with pytest.raises(ValueError, match="`name` must be one of"):
        download_catalog("imagenet", store=store)
