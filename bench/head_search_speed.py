"""Issue 21: the head search's cost against one plain head fit, on the same feature matrix.

    python bench/head_search_speed.py [--train 2000] [--val 400] [--classes 6] [--epochs 20] [--repeats 3]

The head phase on cached features is all this times (the backbone's features are computed once
either way, and a warm cache skips them). Both sides get the same float32 matrix of
EfficientNet-Lite0's feature width (1280), batch 32, the same epochs and early-stopping patience:

- "single fit": what `--head-search off` runs: `Dropout(0.2) -> Dense(softmax)` compiled with Adam 1e-3
  and `model.fit` with `EarlyStopping(patience=3, restore_best_weights=True)` on validation;
- "search": `tlcore.train.head_search.fit_heads` on the default grid (24 trials: the recipe's own settings
  both ways plus lr x dropout x label smoothing x class weighting), successive halving and per-trial
  early stopping.

The features are synthetic (class means plus noise, ReLU'd like pooled activations, imbalanced
3:1 from the largest to the smallest class): real ones would have to be computed through the
backbone first, which this measurement does not need. Prints seconds per side (median of
`--repeats`) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(n: int, centres: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    shares = np.linspace(3, 1, len(centres))
    y = rng.choice(len(centres), size=n, p=shares / shares.sum())
    return np.maximum(centres[y] + rng.normal(0, 1, (n, centres.shape[1])).astype(np.float32), 0), y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import keras

    from tlcore.train import head_search

    rng = np.random.default_rng(0)
    # Classes close enough that a head does not reach 100 %: its epochs and early stops look like real ones.
    centres = rng.normal(0, 0.1, (args.classes, 1280)).astype(np.float32)
    x, y = features(args.train, centres, rng)
    xv, yv = features(args.val, centres, rng)
    trials = head_search.trial_grid(1e-3, 0.2, "auto", search=True)
    single, search, chosen = [], [], None
    for repeat in range(args.repeats):
        t = time.perf_counter()
        model = keras.Sequential([keras.Input((1280,)), keras.layers.Dropout(0.2),
                                  keras.layers.Dense(args.classes, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        model.fit(x, y, batch_size=32, epochs=args.epochs, validation_data=(xv, yv), verbose=0,
                  callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)])
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        fitted = head_search.fit_heads(x, y, xv, yv, args.classes, trials, lr_scale=1.0, batch_size=32,
                                       max_epochs=args.epochs, patience=3, seed=repeat)
        search.append(time.perf_counter() - t)
        chosen = fitted.chosen
    out = {"single_fit_s": statistics.median(single), "search_s": statistics.median(search),
           "ratio": statistics.median(search) / statistics.median(single), "trials": len(trials),
           "trial_epochs": sum(t.epochs for t in fitted.record.trials), "chosen": chosen.to_dict(),
           "args": vars(args)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
