"""Issue 21: what each possible result of the default recipe's fine-tune scores, in the same run: the head
alone, the fine-tuned weights (the fine-tune always kept), the mean of the two models' probabilities, and the
mean of their weights at a share `alpha` of the fine-tuned weights (0.5: `finetune_result` "average").

    python bench/finetune_kept.py DEFAULTS_WORKDIR SET_NAME [--seeds 0,1,2] [--set FIELD=VALUE ...]

DEFAULTS_WORKDIR is a `bench/defaults.py --workdir` holding the set's data home (its sample, split and warm
caches); the recipe is that bench's default side (160 px, head 10 + fine-tune 2 epochs, flip/rotate/zoom),
with `--set` fields over it. Each seed trains in its own process, which keeps the fine-tuned weights and
reports, besides, validation and test accuracy and test macro F1 of every result above. Not a product path:
the choice is replaced in that process only. Prints a line per seed, then the means over seeds (Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.defaults import default_config, recipe_settings  # noqa: E402

ALPHAS = (0.3, 0.5, 0.7)
RESULTS = ("head", "fine-tune", "probabilities averaged", *(f"weights averaged, alpha {a:g}" for a in ALPHAS))


def one_run(home: str, name: str, seed: int, overrides: dict) -> dict:
    os.environ["TLCORE_HOME"] = home
    from tlcore.evaluate.comparison import macro_f1
    from tlcore.records.config import RunSpec, TrainConfig
    from tlcore.records.store import RunStatus, Store
    from tlcore.train import training

    scores = {}

    def score_every_result(self):
        rows = {split: np.sort(self.splits[split]) for split in ("val", self.eval_split)}

        def probabilities() -> dict[str, np.ndarray]:
            return {s: self.training_probabilities(r) for s, r in rows.items()}

        def keep(result: str, probs: dict[str, np.ndarray]) -> None:
            val, test = probs["val"], probs[self.eval_split]
            y_val, y_test = self.y_all[rows["val"]], self.y_all[rows[self.eval_split]]
            labels = [str(c) for c in range(len(self.labels))]
            scores[result] = {"val_accuracy": float((val.argmax(1) == y_val).mean()),
                              "accuracy": float((test.argmax(1) == y_test).mean()),
                              "macro_f1": macro_f1([str(y) for y in y_test], [str(p) for p in test.argmax(1)], labels)}

        tuned = [np.array(v.numpy()) for v, _ in self.head_weights]
        by_result = {"fine-tune": probabilities()}
        for alpha in ALPHAS:
            for (variable, head), weights in zip(self.head_weights, tuned):
                variable.assign((1 - alpha) * head + alpha * weights)
            by_result[f"weights averaged, alpha {alpha:g}"] = probabilities()
        for variable, head in self.head_weights:
            variable.assign(head)
        by_result["head"] = probabilities()
        by_result["probabilities averaged"] = {s: (by_result["head"][s] + by_result["fine-tune"][s]) / 2
                                               for s in rows}
        for result in RESULTS:
            keep(result, by_result[result])
        for (variable, _), weights in zip(self.head_weights, tuned):  # the run keeps the fine-tuned weights
            variable.assign(weights)
        self.head_weights = None

    training._Training.choose_finetune_result = score_every_result
    store = Store()
    dataset = next(d for d in store.list_datasets() if d.name == name)
    config = TrainConfig(**default_config(dataset.id, seed=seed, image_size=160, head_epochs=10, finetune_epochs=2,
                                          **overrides))
    run = store.create_run("finetune-kept", RunSpec(config), status=RunStatus.RUNNING)
    summary = training.execute_run(run.id, store)
    store.finish_run(run.id, RunStatus.SUCCEEDED, summary=summary)
    return {"scores": scores, "accuracy": summary.metrics.accuracy, "macro_f1": summary.metrics.macro_f1}


def table(name: str, runs: list[dict]) -> str:
    """Markdown: each result's mean ± std over seeds, and the seeds it beat / lost to the head on test accuracy."""
    lines = ["| set | result | val accuracy | test accuracy | test macro F1 | vs the head (seeds better / worse) |",
             "|---|---|---|---|---|---|"]
    head = np.array([r["scores"]["head"]["accuracy"] for r in runs])
    for result in RESULTS:
        values = {k: np.array([r["scores"][result][k] for r in runs]) for k in ("val_accuracy", "accuracy", "macro_f1")}
        cells = [f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}" for v in values.values()]
        diff = values["accuracy"] - head
        lines.append(f"| {name} | {result} | {' | '.join(cells)} | {diff.mean() * 100:+.1f} pts "
                     f"({(diff > 1e-9).sum()} / {(diff < -1e-9).sum()}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("name")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one seed's run, in its own process
    args = p.parse_args()
    overrides = recipe_settings(args.set)
    home = str(args.workdir / f"home-{args.name}")
    if args.one is not None:
        print(json.dumps(one_run(home, args.name, int(args.one), overrides)))
        return
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        command = [sys.executable, __file__, str(args.workdir), args.name, "--one", str(seed),
                   *(f"--set={item}" for item in args.set)]
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        s = runs[-1]["scores"]
        print(f"{args.name} seed {seed} {overrides or ''}: test accuracy "
              + ", ".join(f"{result} {s[result]['accuracy']:.3f}" for result in RESULTS), flush=True)
    print(table(args.name, runs), flush=True)


if __name__ == "__main__":
    main()
