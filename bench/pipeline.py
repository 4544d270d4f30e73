"""The input pipeline alone: augmented images per second, per core, for each augmentation, no model.

Two measurements per augmentation on random uint8 images (default 224 px):
- one core: `augment_batch` over batches of 32 in this thread;
- all cores: the same batches through `tf.data` with `numpy_function` and as many parallel calls
  as cores, the way `tlcore.data.pipeline.epoch_batches` runs it.
Each is reported per CPU-second (images / CPU time this process used: what one core of its own
delivers, and much less moved by other sessions on a shared machine than wall time) and per
wall-clock second (what this machine delivered while the measurement ran).

A GPU trains EfficientNet-Lite0 at 224 px at roughly 3,000 img/s (issue 24): the cores one
GPU needs are 3,000 / (images per CPU-second through tf.data).

    nice -n 15 python bench/pipeline.py                      # this tree
    nice -n 15 python bench/pipeline.py --package-root /work/main --label before

Prints one line per augmentation and writes JSON to bench/results/pipeline-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

RECIPES = {
    "none": (),
    "flip": ("flip",),
    "rotate": ("rotate",),
    "zoom": ("zoom",),
    "translate": ("translate",),
    "contrast": ("contrast",),
    "flip+rotate+zoom": ("flip", "rotate", "zoom"),
    "all five": ("flip", "rotate", "zoom", "translate", "contrast"),
}
GPU_IMAGES_PER_S = 3000  # EfficientNet-Lite0 at 224 px on one GPU (issue 24's estimate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-root", default=str(Path(__file__).resolve().parents[1]),
                        help="the tree whose tlcore.data.augment is measured (default: this one)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256, help="images per measurement")
    args = parser.parse_args()
    sys.path.insert(0, args.package_root)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tlcore.data.augment import augment_batch

    cores = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    batches = [images[i:i + 32] for i in range(0, args.images, 32)]
    results = {}
    print(f"{args.label}: {args.package_root}, {args.images} images at {args.size} px, {cores} cores "
          "(a shared machine: other sessions were running)")
    for name, names in RECIPES.items():
        single_cpu, single_wall = _one_core(augment_batch, batches, names)
        parallel_cpu, parallel_wall = _tf_data(augment_batch, batches, names, cores)
        results[name] = {"one_core_img_per_cpu_s": round(single_cpu), "one_core_img_per_wall_s": round(single_wall),
                         "tf_data_img_per_cpu_s": round(parallel_cpu), "tf_data_img_per_wall_s": round(parallel_wall),
                         "cores_per_gpu": round(GPU_IMAGES_PER_S / parallel_cpu, 2)}
        print(f"{name:18s} one thread {single_cpu:7.0f} img/CPU-s ({single_wall:6.0f} img/s wall) · tf.data, "
              f"{cores} calls {parallel_cpu:7.0f} img/CPU-s ({parallel_wall:6.0f} img/s wall) · cores for "
              f"{GPU_IMAGES_PER_S} img/s: {GPU_IMAGES_PER_S / parallel_cpu:5.2f}", flush=True)
    out = Path(__file__).resolve().parent / "results" / f"pipeline-{args.label}.json"
    out.write_text(json.dumps({"size": args.size, "images": args.images, "cores": cores, "results": results},
                              indent=2))
    print(f"wrote {out}")


def _one_core(augment_batch, batches, names) -> tuple[float, float]:
    """(images per CPU-second of this thread, images per wall-clock second)."""
    augment_batch(batches[0], names, np.random.default_rng(0))  # imports and first-call set-up
    cpu, wall = time.thread_time(), time.perf_counter()
    for step, batch in enumerate(batches):
        augment_batch(batch, names, np.random.default_rng([0, step]))
    count = sum(map(len, batches))
    return count / max(time.thread_time() - cpu, 1e-9), count / (time.perf_counter() - wall)


def _tf_data(augment_batch, batches, names, cores: int) -> tuple[float, float]:
    """(images per CPU-second of the whole process, images per wall-clock second) through tf.data."""
    import tensorflow as tf

    stacked = np.stack(batches[:len(batches) - (len(batches[-1]) != 32)])

    def one(step):
        return augment_batch(stacked[step], names, np.random.default_rng([0, int(step)]))

    data = tf.data.Dataset.range(len(stacked)).map(
        lambda step: tf.numpy_function(one, [step], tf.uint8), num_parallel_calls=cores).prefetch(2)
    for _ in data.take(1):  # graph and thread pool set-up
        pass
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in data:
        pass
    count = len(stacked) * 32
    return count / max(time.process_time() - cpu, 1e-9), count / (time.perf_counter() - wall)


if __name__ == "__main__":
    main()
