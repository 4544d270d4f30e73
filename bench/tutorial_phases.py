"""Issue 21: where the tutorial recipe's accuracy comes from: its test accuracy after the head phase
and after the fine-tune, with its augmentations and with a flip alone, on a bench/defaults.py split.

    python bench/tutorial_phases.py DEFAULTS_WORKDIR SET_NAME [--seeds 0,1,2] [--augment flip,rotate,zoom]
        [--image-size 160] [--head-epochs 10] [--finetune-epochs 2]

DEFAULTS_WORKDIR is a `bench/defaults.py --workdir` that holds the set (its `splits-SET_NAME` folder and
data home, hence its sample and split); each seed runs `bench/baseline.py`'s recipe in its own process
(`bench/run.py`'s `measure`), as that bench does, with the head phase evaluated too. With the full
augmentation the final accuracies reproduce that bench's tutorial runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.defaults import RECIPE  # noqa: E402
from bench.run import measure_once  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("name")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--augment", default="flip,rotate,zoom")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    args = p.parse_args()
    split_dir = args.workdir / f"splits-{args.name}"
    labels = sorted(d.name for d in (split_dir / "train").iterdir())
    augment = tuple(a for a in args.augment.split(",") if a)
    for seed in (int(s) for s in args.seeds.split(",")):
        label = f"{args.name}-phases-{'-'.join(augment) or 'none'}-{seed}"
        result = measure_once("baseline", dict(
            split_dir=str(split_dir), labels=labels, size=args.image_size, head_epochs=args.head_epochs,
            finetune_epochs=args.finetune_epochs, seed=seed, eval_split="test", augment=augment, head_eval=True,
            **RECIPE), args.workdir / f"home-{args.name}", args.workdir, label)
        print(f"{args.name} tutorial, augment {','.join(augment) or 'none'}, seed {seed}: test accuracy "
              f"{result['head_accuracy']:.3f} after the head, {result['accuracy']:.3f} after the fine-tune "
              f"(CPU {result.get('cpu_s', 0):.0f} s)", flush=True)


if __name__ == "__main__":
    main()
