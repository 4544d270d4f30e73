"""Issue 21: the default recipe with its fine-tune always kept, to see what the fine-tune-or-head check
turns down: test accuracy of the fine-tuned model, and both validation accuracies the check compares.

    python bench/finetune_kept.py DEFAULTS_WORKDIR SET_NAME [--seeds 0,1,2] [--set FIELD=VALUE ...]

DEFAULTS_WORKDIR is a `bench/defaults.py --workdir` holding the set's data home (its sample, split and warm
caches); the recipe is that bench's default side (160 px, head 10 + fine-tune 2 epochs, flip/rotate/zoom),
with `--set` fields over it. Each seed trains in its own process. Not a product path: the check is replaced
in that process only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.defaults import default_config, recipe_settings  # noqa: E402


def one_run(home: str, name: str, seed: int, overrides: dict) -> dict:
    os.environ["TLCORE_HOME"] = home
    from tlcore.records.config import RunSpec, TrainConfig
    from tlcore.records.store import RunStatus, Store
    from tlcore.train import training

    compared = {}

    def keep_finetune(self):
        compared.update(head_val_accuracy=float(self.head_val_correct.mean()),
                        finetune_val_accuracy=float(self.val_correct().mean()))
        self.head_weights = None

    training._Training.choose_finetune_result = keep_finetune
    store = Store()
    dataset = next(d for d in store.list_datasets() if d.name == name)
    config = TrainConfig(**default_config(dataset.id, seed=seed, image_size=160, head_epochs=10, finetune_epochs=2,
                                          **overrides))
    run = store.create_run("finetune-kept", RunSpec(config), status=RunStatus.RUNNING)
    summary = training.execute_run(run.id, store)
    store.finish_run(run.id, RunStatus.SUCCEEDED, summary=summary)
    return {**compared, "accuracy": summary.metrics.accuracy, "macro_f1": summary.metrics.macro_f1}


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
    for seed in (int(s) for s in args.seeds.split(",")):
        command = [sys.executable, __file__, str(args.workdir), args.name, "--one", str(seed),
                   *(f"--set={item}" for item in args.set)]
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{args.name} seed {seed} {overrides or ''}: validation accuracy {r['head_val_accuracy']:.3f} after the "
              f"head, {r['finetune_val_accuracy']:.3f} after the fine-tune; test accuracy {r['accuracy']:.3f}, macro "
              f"F1 {r['macro_f1']:.3f} (fine-tune kept)", flush=True)


if __name__ == "__main__":
    main()
