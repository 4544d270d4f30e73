"""Datasets that need no upload: built-in ones made offline from real images that PyPI
packages ship, and a catalog of public ones downloaded when the server has internet.

Built-in (offline):
    digits    scikit-learn's handwritten digits (UCI), 10 classes, 8x8 scans upscaled to 32x32
    textures  random crops of scikit-image's brick, grass and gravel photographs, 3 classes

Catalog (needs internet): cifar10, fashion_mnist (via `keras.datasets`, cached in the Keras
cache), tf_flowers and cats_vs_dogs (archives cached in `cache/downloads/`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tlcore.data.archive import ZipLimits, is_ignored_name, safe_extract_zip
from tlcore.errors import DatasetDownloadError, InvalidInput
from tlcore.records import home
from tlcore.records.atomic import write_atomically

# The first entry is the offline default the dashboard offers.
BUILTIN: dict[str, str] = {
    "textures": "Brick, grass and gravel (scikit-image photographs): 3 classes x 40 random "
                "96x96 crops with flips. Real photo textures, trains in seconds.",
    "digits": "Handwritten digits 0-9 (scikit-learn, UCI): 10 classes x 40 greyscale scans, "
              "8x8 upscaled to 32x32. Trains in seconds.",
}

DIGITS_SIZE = 32
TEXTURE_CROP = 96


# ------------------------------------------------------------------ built-in


def materialize_builtin(name: str, dest: str | os.PathLike, per_class: int = 40,
                        seed: int = 0) -> Path:
    """Write built-in dataset `name` as class folders of PNGs under `dest/<name>/`.

    Args:
        name: one of `BUILTIN`.
        dest: the parent folder (created if missing).
        per_class: images per class. Defaults to 40.
        seed: seed for the texture crops. Defaults to 0.

    Returns:
        The dataset folder, `dest/<name>`.
    """
    if name not in BUILTIN:
        raise InvalidInput(f"`name` must be one of {sorted(BUILTIN)}. Received: name={name!r}")
    if not 1 <= int(per_class) <= 1000:
        raise InvalidInput(f"`per_class` must be between 1 and 1000. Received: per_class={per_class!r}")
    root = Path(dest) / name
    if root.exists():
        shutil.rmtree(root)
    makers: dict[str, Callable[[int, int], dict[str, list[np.ndarray]]]] = {
        "digits": _digits, "textures": _textures,
    }
    for label, arrays in makers[name](int(per_class), seed).items():
        folder = root / label
        folder.mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(folder / f"{label}_{i:03d}.png", optimize=False)
    return root


def import_builtin(name: str, store=None, per_class: int = 40, seed: int = 0, *, dataset_name: str | None = None,
                   split: tuple[float, float, float] = (0.7, 0.15, 0.15), new_version: bool = False):
    """Build built-in dataset `name` and import it (the existing version if it is already imported).

    Args:
        dataset_name: the name to import it under. Defaults to `name`.
        split: train, val and test fractions. Defaults to 0.7, 0.15, 0.15.
        new_version: record a new version even if the latest one holds exactly these images.

    Returns:
        `ImportResult` from the importer.
    """
    from tlcore.data.importer import _import

    work = Path(tempfile.mkdtemp(prefix="builtin-", dir=home.uploads_dir()))
    try:
        folder = materialize_builtin(name, work, per_class=per_class, seed=seed)
        return _import(folder, dataset_name or name, store=store, seed=seed, split=split,
                       roots=None, source_label=f"builtin:{name}", new_version=new_version)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _digits(per_class: int, seed: int) -> dict[str, list[np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out: dict[str, list[np.ndarray]] = {}
    for d in range(10):
        picks = np.flatnonzero(digits.target == d)[:per_class]
        arrays = []
        for i in picks:
            a = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
            big = Image.fromarray(a, "L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
            arrays.append(np.asarray(big))
        out[str(d)] = arrays
    return out


def _textures(per_class: int, seed: int) -> dict[str, list[np.ndarray]]:
    from skimage import data

    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for label, photo in (("brick", data.brick()), ("grass", data.grass()), ("gravel", data.gravel())):
        h, w = photo.shape[:2]
        seen: set[tuple[int, int, int]] = set()
        arrays = []
        while len(arrays) < per_class:
            y = int(rng.integers(0, h - TEXTURE_CROP + 1))
            x = int(rng.integers(0, w - TEXTURE_CROP + 1))
            flip = int(rng.integers(0, 4))
            if (y, x, flip) in seen:
                continue
            seen.add((y, x, flip))
            crop = photo[y:y + TEXTURE_CROP, x:x + TEXTURE_CROP]
            if flip & 1:
                crop = crop[:, ::-1]
            if flip & 2:
                crop = crop[::-1, :]
            arrays.append(np.ascontiguousarray(crop).astype(np.uint8))
        out[label] = arrays
    return out


# ------------------------------------------------------------------- catalog


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    url: str  # what is fetched (the first one, for keras.datasets)
    size_mb: int
    classes: int
    license: str


CATALOG: dict[str, CatalogEntry] = {
    e.name: e for e in [
        CatalogEntry("cifar10", "CIFAR-10: 60,000 32x32 colour photos, 10 classes "
                     "(airplane ... truck), given train/test.",
                     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 163, 10,
                     "see https://www.cs.toronto.edu/~kriz/cifar.html"),
        CatalogEntry("fashion_mnist", "Fashion-MNIST: 70,000 28x28 greyscale Zalando product "
                     "photos, 10 classes, given train/test.",
                     "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
                     "train-labels-idx1-ubyte.gz", 30, 10, "MIT"),
        CatalogEntry("tf_flowers", "TensorFlow flowers: 3,670 photos of daisies, dandelions, "
                     "roses, sunflowers and tulips.",
                     "https://storage.googleapis.com/download.tensorflow.org/example_images/"
                     "flower_photos.tgz", 218, 5, "CC-BY 2.0"),
        CatalogEntry("cats_vs_dogs", "Microsoft/Kaggle cats vs dogs: about 25,000 photos, "
                     "2 classes (a few files are corrupt and get skipped).",
                     "https://download.microsoft.com/download/3/E/1/"
                     "3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip", 787, 2,
                     "Microsoft Research (see download page)"),
    ]
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
FASHION_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle_boot"]


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise `DatasetDownloadError` unless a TCP connection to `url`'s host opens in time."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise DatasetDownloadError(
            f"Could not reach {host}: this server has no internet (or it is blocked); import a "
            f"zip or folder instead, or use a built-in dataset ({', '.join(BUILTIN)})."
        ) from e


def download_catalog(name: str, limit_per_class: int | None = None, *, store=None,
                     timeout: float = 10.0, seed: int = 0):
    """Download catalog dataset `name` into the data home and import it.

    Args:
        name: one of `CATALOG`.
        limit_per_class: keep at most this many images per class and split (quicker
            experiments). Defaults to all.
        store: where to record it. Defaults to the data home's store.
        timeout: seconds to wait for the server to answer. Defaults to 10.

    Returns:
        `ImportResult` from the importer.

    Raises:
        DatasetDownloadError: the host cannot be reached or the download fails.
    """
    if name not in CATALOG:
        raise InvalidInput(f"`name` must be one of {sorted(CATALOG)}. Received: name={name!r}")
    if limit_per_class is not None and int(limit_per_class) < 1:
        raise InvalidInput(f"`limit_per_class` must be a positive integer or None. "
                         f"Received: limit_per_class={limit_per_class!r}")
    entry = CATALOG[name]
    check_reachable(entry.url, timeout)
    from tlcore.data.importer import _import

    work = Path(tempfile.mkdtemp(prefix=f"catalog-{name}-", dir=home.uploads_dir()))
    try:
        if name in ("cifar10", "fashion_mnist"):
            folder = _keras_dataset(name, work, limit_per_class)
        else:
            archive = _fetch(entry.url, timeout)
            extracted = work / "extracted"
            if archive.name.endswith(".zip"):
                safe_extract_zip(archive, extracted, ZipLimits(max_total_bytes=4 * 1024**3))
            else:
                _safe_extract_tar(archive, extracted)
            folder = _limit(extracted, work / "limited", limit_per_class) if limit_per_class \
                else extracted
        return _import(folder, name, store=store, seed=seed, split=(0.7, 0.15, 0.15),
                       roots=None, source_label=entry.url)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(url: str, timeout: float) -> Path:
    target = home.cache_dir("downloads") / Path(urllib.parse.urlsplit(url).path).name
    if target.exists():
        return target

    def download(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, 1024 * 1024)
        except (urllib.error.URLError, OSError) as e:
            host = urllib.parse.urlsplit(url).hostname
            raise DatasetDownloadError(
                f"Downloading {url} failed ({getattr(e, 'reason', e)}); check that {host} is "
                "reachable, or import a zip or folder instead."
            ) from e

    return write_atomically(target, download)


def _safe_extract_tar(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        # the "data" filter refuses absolute paths, `..`, links out and device files
        tar.extractall(dest, filter="data")


def _limit(src: Path, dest: Path, per_class: int) -> Path:
    """A copy of `src` keeping the first `per_class` files (by name) of each leaf folder."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored_name(d))
        files = sorted(f for f in filenames if not is_ignored_name(f))
        if not dirnames:
            files = files[:per_class]
        out = dest / Path(dirpath).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(Path(dirpath) / f, out / f)
    return dest


def _keras_dataset(name: str, work: Path, limit: int | None) -> Path:
    import keras

    try:
        if name == "cifar10":
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
            classes = CIFAR10_CLASSES
        else:
            (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
            classes = FASHION_CLASSES
    except Exception as e:
        raise DatasetDownloadError(
            f"Downloading {name} through keras.datasets failed ({e}); import a zip or folder "
            "instead."
        ) from e
    root = work / name
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        ys = np.asarray(ys).reshape(-1)
        for k, cls in enumerate(classes):
            idx = np.flatnonzero(ys == k)[:limit] if limit else np.flatnonzero(ys == k)
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in idx:
                Image.fromarray(xs[i]).save(folder / f"{cls}_{i:05d}.png")
    return root
