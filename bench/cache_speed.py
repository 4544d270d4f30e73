"""Warm-path cost of the content-addressed caches against loading the same array file directly
(what the per-dataset caches did): `python bench/cache_speed.py DATA_HOME DATASET [SIZE]`.

Needs a data home where DATASET's pixels (at SIZE) and EfficientNet-Lite0 features are cached.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    os.environ["TLCORE_HOME"] = sys.argv[1]
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 224
    from tlcore.backbones.features import feature_cache
    from tlcore.data.manifest import load_manifest
    from tlcore.data.pipeline import pixel_cache
    from tlcore.records.store import Store

    entries = load_manifest(Store().get_dataset(sys.argv[2]).id)
    shas = [e.sha256 for e in entries]
    features = feature_cache("efficientnet_lite0", size, "imagenet", 0)
    pixels, _ = pixel_cache(entries, size)
    feature_file = features.complete(shas).path
    rows = {
        "pixels: np.load(mmap) of the file": best_of(lambda: np.load(pixels.path, mmap_mode="r")),
        "pixels: pixel_cache(entries)": best_of(lambda: pixel_cache(entries, size)),
        "features: np.load of the file": best_of(lambda: np.load(feature_file)),
        "features: cache.rows(shas)": best_of(lambda: features.rows(shas, (0,), np.float32, None)),
    }
    print(f"{len(entries)} images at {size} px, best of 5:")
    for name, seconds in rows.items():
        print(f"  {name}: {seconds * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
