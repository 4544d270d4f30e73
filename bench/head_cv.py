"""Issue 21: the head search's choice made on folds of the training split instead of on validation.

    python bench/head_cv.py HOME[,HOME...] [--folds 3] [--seeds 0-9] [--out RESULTS.json]
    python bench/head_cv.py RESULTS.json --table   # the Markdown table of a results file

Each HOME is a data home left by `bench/defaults.py` (one imported set, its feature caches warm).
For every seed three heads score the test split:
- "chosen on validation": the default search (24 trials, 10 epochs, patience 3, batch 32), its
  trial chosen on validation macro F1 (today's default);
- "chosen on training folds": the same 24 trials fitted `--folds` times, each time on the other
  folds of the training images (an image and its mirror stay in one fold) and scored on the held-out
  fold's plain images; the trial with the best mean macro F1 is fitted again on the whole training
  split, with early stopping on validation, which it was not chosen on;
- "one plain head": the recipe's own settings (lr 1e-3, dropout 0.2, no smoothing, no class weights).
The mean "validation minus test accuracy" of each says how optimistic its validation score is, which
is what the fine-tune-or-head check compares against. Head only (no fine-tune).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("chosen on validation", "chosen on training folds", "one plain head")


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image, every class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold[rows] = np.arange(len(rows)) % folds
    return fold


def choose_on_folds(x: np.ndarray, x_mirror: np.ndarray, y: np.ndarray, classes: int, folds: int, seed: int):
    """The grid's trial with the best mean held-out macro F1 over `folds` folds of training images `x`
    (their mirrored features `x_mirror` train beside them)."""
    from bench.head_topk import SEARCH_FIT, default_trials, with_mirrored
    from tlcore.records.run_record import HeadTrial
    from tlcore.train import head_search

    trials = default_trials()
    fold = stratified_folds(y, folds, seed)
    f1, accuracy = np.zeros(len(trials)), np.zeros(len(trials))
    for f in range(folds):
        fit, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        fitted = head_search.fit_heads(*with_mirrored(x, x_mirror[fit], y, fit), x[held], y[held], classes, trials,
                                       **SEARCH_FIT, seed=seed)
        f1 += [t.val_macro_f1 for t in fitted.record.trials]
        accuracy += [t.val_accuracy for t in fitted.record.trials]
    means = [HeadTrial(lr=t.lr, dropout=t.dropout, label_smoothing=t.label_smoothing, class_weight=t.class_weight,
                       val_macro_f1=f1[k] / folds, val_accuracy=accuracy[k] / folds, best_epoch=0, epochs=0)
             for k, t in enumerate(trials)]
    return trials[head_search.choose(means)]


def table(results: dict) -> str:
    from bench.head_topk import table as variants_table

    lines = [variants_table(results, "head", lambda side, row: side), "",
             "| set | head | validation minus test accuracy (mean over seeds) |", "|---|---|---|"]
    for name, row in results.items():
        lines += [f"| {name} | {side} | {np.mean(row['optimism'][side]) * 100:+.1f} pts |" for side in SIDES]
    return "\n".join(lines)


def main(argv=None) -> None:
    from bench.head_topk import SEARCH_FIT, cached_set, default_search, finish, parse, parser, score, with_mirrored
    from tlcore.train import head_search

    p = parser(__doc__)
    p.add_argument("--folds", type=int, default=3)
    args, seeds = parse(p, argv, table)
    if seeds is None:
        return
    results = {}
    for home in args.homes.split(","):
        name, classes, x, x_mirror, y, split, train = cached_set(Path(home), args.image_size)
        val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
        x_train, y_train = with_mirrored(x, x_mirror, y, train)
        scores = {side: {"accuracy": [], "macro_f1": []} for side in SIDES}
        optimism: dict[str, list[float]] = {side: [] for side in SIDES}

        data = (x_train, y_train, x[val], y[val], classes)
        for seed in seeds:
            on_folds = choose_on_folds(x[train], x_mirror, y[train], classes, args.folds, seed)
            heads = {SIDES[0]: default_search(*data, seed),
                     SIDES[1]: head_search.fit_heads(*data, [on_folds], **SEARCH_FIT, seed=seed),
                     SIDES[2]: head_search.fit_heads(*data, [head_search.TrialSettings(1e-3, 0.2, 0.0, "none")],
                                                     **SEARCH_FIT, seed=seed)}
            for side, fitted in heads.items():
                score(*fitted.chosen_weights(), x[test], y[test], classes, scores[side])
                optimism[side].append(fitted.chosen.val_accuracy - scores[side]["accuracy"][-1])
        results[name] = {"folds": args.folds, "test_images": len(test), "val_images": len(val),
                         "seeds": list(seeds), "scores": scores, "optimism": optimism}
        print(f"[head_cv] {name}: done", flush=True)
    finish(args, results, table)


if __name__ == "__main__":
    main()
