"""Issue 21: the chosen head alone vs the average of the top-k heads of the search, on cached features.

    python bench/head_topk.py HOME[,HOME...] [--seeds 0-9] [--k 1,3,5] [--out RESULTS.json]
    python bench/head_topk.py RESULTS.json --table   # the Markdown table of a results file

Each HOME is a data home left by `bench/defaults.py` (one imported set, its feature caches warm:
plain and mirrored training images at the bench's size). For every seed the head search
(`tlcore.train.head_search`, the default grid of 24 trials, 10 epochs, patience 3, batch 32) is
fitted once on the set's cached features; then the test split is scored by the trial chosen on
validation (k = 1, today's default) and by the average of the logits of the k best trials by the
same ranking (for linear heads: one head whose kernel and bias are the k trials' mean).
Head only (no fine-tune), so it isolates the choice; test split of the set's own 70/15/15 split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cached_set(home: Path, size: int):
    """(name, classes, features of every image, mirrored training features, labels, split names, training rows)
    of the one set imported into data home `home`, from its warm feature caches at `size`."""
    os.environ["TLCORE_HOME"] = str(home)
    from tlcore.backbones.features import feature_cache
    from tlcore.data.manifest import load_manifest
    from tlcore.records.store import Store

    dataset = Store().list_datasets()[0]
    entries = load_manifest(dataset.id)
    shas = [e.sha256 for e in entries]
    labels = list(dataset.classes)
    y = np.array([labels.index(e.label) for e in entries])
    split = np.array([e.split for e in entries])
    train = np.flatnonzero(split == "train")
    plain = feature_cache("efficientnet_lite0", size, "imagenet", 0).complete(shas)
    mirror = feature_cache("efficientnet_lite0", size, "imagenet", 0, mirror=True).complete([shas[r] for r in train])
    if plain is None or mirror is None:
        raise SystemExit(f"{home}: the feature caches are not warm at {size} px")
    return dataset.name, len(labels), plain.array, mirror.array, y, split, train


def table(results: dict, first_column: str = "k", label=lambda variant, row: variant) -> str:
    """Markdown: per set and variant (k here), mean ± std over seeds of test accuracy and macro F1, and
    the paired difference to the first variant (mean, seeds better / worse); `label(variant, row)`
    names a variant."""
    lines = [f"| set (test / val images) | {first_column} | test accuracy | test macro F1 "
             "| accuracy vs the first (seeds better / worse) |", "|---|---|---|---|---|"]
    for name, row in results.items():
        variants = list(row["scores"])
        first = np.array(row["scores"][variants[0]]["accuracy"])
        for variant in variants:
            scores = row["scores"][variant]
            diff = np.array(scores["accuracy"]) - first
            lines.append(f"| {name} ({row['test_images']} / {row['val_images']}) | {label(variant, row)} "
                         f"| {np.mean(scores['accuracy']):.3f} ± {sd(scores['accuracy']):.3f} "
                         f"| {np.mean(scores['macro_f1']):.3f} ± {sd(scores['macro_f1']):.3f} "
                         f"| {diff.mean() * 100:+.1f} pts ({(diff > 0).sum()} / {(diff < 0).sum()}) |")
    return "\n".join(lines)


def sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# How a run at the bench's scale fits its heads (`head_search.fit_heads`' settings besides the trials).
SEARCH_FIT = dict(lr_scale=1.0, batch_size=32, max_epochs=10, patience=3)


def default_trials():
    """The default grid as the bench's recipe makes it (lr 1e-3, dropout 0.2, class weighting auto): 24 trials."""
    from tlcore.train import head_search

    return head_search.trial_grid(1e-3, 0.2, "auto", True)


def default_search(x_train, y_train, x_val, y_val, classes: int, seed: int):
    """The default head search as a run at the bench's scale makes it: 24 trials, 10 epochs, patience 3, batch 32."""
    from tlcore.train import head_search

    return head_search.fit_heads(x_train, y_train, x_val, y_val, classes, default_trials(), **SEARCH_FIT, seed=seed)


def with_mirrored(x: np.ndarray, x_mirror: np.ndarray, y: np.ndarray, rows: np.ndarray):
    """What a head trains on: the features of images `rows` of `x`, then their mirrored features `x_mirror`
    (in the order of `rows`), and the labels of both."""
    return np.concatenate([x[rows], x_mirror]), np.concatenate([y[rows], y[rows]])


def score(kernel, bias, x, y, classes: int, into: dict) -> None:
    """Test accuracy and macro F1 of one linear head (`kernel`, `bias`), appended to `into`'s lists."""
    from tlcore.train import head_search

    _, accuracy, f1 = head_search.evaluate_heads(kernel[None], bias[None], x, y, classes)
    into["accuracy"].append(float(accuracy[0]))
    into["macro_f1"].append(float(f1[0]))


def parser(doc: str) -> argparse.ArgumentParser:
    """The options this study and `bench/head_views.py` share."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("homes", help="data homes, comma-separated; or, with --table, a results file")
    p.add_argument("--table", action="store_true", help="print the Markdown table of a results file")
    p.add_argument("--seeds", default="0-9", help="a range, first-last")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--out")
    return p


def parse(p: argparse.ArgumentParser, argv, make_table) -> tuple[argparse.Namespace, range | None]:
    """The arguments and the seeds; with --table, the table printed and no seeds (nothing to run)."""
    args = p.parse_args(argv)
    if args.table:
        print(make_table(json.loads(Path(args.homes).read_text())))
        return args, None
    first, _, last = args.seeds.partition("-")
    return args, range(int(first), int(last or first) + 1)


def finish(args: argparse.Namespace, results: dict, make_table) -> None:
    """Write the results to --out, if given, and print their table."""
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(make_table(results))


def main(argv=None) -> None:
    from tlcore.train import head_search

    p = parser(__doc__)
    p.add_argument("--k", default="1,3,5")
    args, seeds = parse(p, argv, table)
    if seeds is None:
        return
    ks = [int(k) for k in args.k.split(",")]
    results = {}
    for home in args.homes.split(","):
        name, classes, x, x_mirror, y, split, train = cached_set(Path(home), args.image_size)
        val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
        x_train, y_train = with_mirrored(x, x_mirror, y, train)
        scores = {k: {"accuracy": [], "macro_f1": []} for k in ks}
        for seed in seeds:
            fitted = default_search(x_train, y_train, x[val], y[val], classes, seed)
            order = head_search.ranking(fitted.record.trials)
            for k in ks:
                score(fitted.kernels[order[:k]].mean(0), fitted.biases[order[:k]].mean(0), x[test], y[test],
                      classes, scores[k])
        results[name] = {"test_images": len(test), "val_images": len(val), "seeds": list(seeds), "scores": scores}
        print(f"[head_topk] {name}: done", flush=True)
    finish(args, results, table)


if __name__ == "__main__":
    main()
