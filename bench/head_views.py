"""Issue 21: does the head on cached features gain from seeing rotated and zoomed views as well?

    python bench/head_views.py HOME[,HOME...] [--views 4] [--seeds 0-9] [--out RESULTS.json]
    python bench/head_views.py RESULTS.json --table   # the Markdown table of a results file

Each HOME is a data home left by `bench/defaults.py` (one imported set, its pixel and feature
caches warm at the bench's size). The training images get `--views` fixed augmented copies (flip,
rotate, zoom as the fine-tune draws them, `tlcore.data.augment`, view v of every image drawn from
seed v), whose backbone features are computed once here. For every seed the default head search
(24 trials, 10 epochs, patience 3, batch 32) is fitted twice: on the plain and mirrored training
features (today's default) and on those plus the augmented views' features; the chosen head of
each scores the test split. Head only (no fine-tune); the choice on validation is the same rule.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("plain + mirrored", "plus views")


def _set(home: Path, size: int, views: int):
    """`cached_set` of `home` and the features of `views` augmented views of its training images
    (views x training images), with the CPU seconds they took."""
    from bench.head_topk import cached_set
    from tlcore.backbones import get_backbone, resolve_weights
    from tlcore.backbones.classifier import build_classifier
    from tlcore.backbones.features import extract_features
    from tlcore.backbones.folding import fold_batchnorm
    from tlcore.data import pipeline
    from tlcore.data.augment import augment_batch
    from tlcore.data.manifest import load_manifest
    from tlcore.records.store import Store

    name, classes, x, x_mirror, y, split, train = cached_set(home, size)
    entries = load_manifest(Store().list_datasets()[0].id)
    pixels, _ = pipeline.pixel_cache(entries, size)
    spec = get_backbone("efficientnet_lite0")
    model = fold_batchnorm(build_classifier(spec, size, resolve_weights(spec, "imagenet"), classes, 0.2)
                           .features_model())
    started = time.process_time()
    seen = []
    for view in range(views):
        images = augment_batch(np.asarray(pixels.images[train]), ("flip", "rotate", "zoom"),
                               np.random.default_rng([1000, view]))
        seen.append(extract_features(model, images, 32))
    return name, classes, x, x_mirror, np.stack(seen), y, split, train, time.process_time() - started


def table(results: dict) -> str:
    from bench.head_topk import table as variants_table

    return variants_table(results, "head trained on", lambda side, row: side if side == SIDES[0]
                          else f"plain + mirrored + {row['views']} views")


def main(argv=None) -> None:
    from bench.head_topk import default_search, finish, parse, parser, score, with_mirrored

    p = parser(__doc__)
    p.add_argument("--views", type=int, default=4)
    args, seeds = parse(p, argv, table)
    if seeds is None:
        return
    results = {}
    for home in args.homes.split(","):
        name, classes, x, x_mirror, x_views, y, split, train, seconds = _set(Path(home), args.image_size, args.views)
        val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
        plain_x, plain_y = with_mirrored(x, x_mirror, y, train)
        inputs = {SIDES[0]: (plain_x, plain_y),
                  SIDES[1]: (np.concatenate([plain_x, *x_views]), np.concatenate([plain_y] + [y[train]] * args.views))}
        scores = {side: {"accuracy": [], "macro_f1": []} for side in SIDES}
        for seed in seeds:
            for side, (x_train, y_train) in inputs.items():
                fitted = default_search(x_train, y_train, x[val], y[val], classes, seed)
                score(*fitted.chosen_weights(), x[test], y[test], classes, scores[side])
        results[name] = {"views": args.views, "train_images": len(train), "test_images": len(test),
                         "val_images": len(val),
                         "view_features_cpu_s": round(seconds, 1), "seeds": list(seeds), "scores": scores}
        print(f"[head_views] {name}: done ({seconds:.0f} s CPU for the views' features)", flush=True)
    finish(args, results, table)


if __name__ == "__main__":
    main()
