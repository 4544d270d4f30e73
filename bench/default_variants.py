"""Issue 21: the default recipe against variants of it on one photo set, on bench/defaults.py's split.

    python bench/default_variants.py DATA_FOLDER --workdir DIR [--variants default,single-head]
        [--seeds 0,1,2] [--max-images 400] [--image-size 160] [--head-epochs 10] [--finetune-epochs 2]

The set is sampled and imported as `bench/defaults.py` does (the same seeded sample and tlcore's
stratified split, so the default side reproduces that bench's default runs and its tutorial
numbers in bench/results/ apply), then each variant trains once per seed, each run in its own
process. Prints test accuracy, macro F1 and CPU seconds per run; a run already in the workdir is
read back, not run again. Variants: "default" (TrainConfig's defaults with the bench's recipe),
"single-head" (the head search and class weighting off: one head at the recipe's own settings,
then the same fine-tune), "finetune-lr-0.2" / "-0.3" (the fine-tune at that fraction of the head's
rate, not 0.1), "views-4" (rotate and zoom reach the cached fine-tune as 4 augmented views per
training image) and "views-4-lr-0.2" (both).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.defaults import default_config, sampled_copy  # noqa: E402
from bench.run import import_into, measure_once, prepare_weights  # noqa: E402

VARIANTS = {
    "default": {},
    "single-head": {"head_search": "off", "class_weight": "none"},
    "finetune-lr-0.2": {"finetune_lr_scale": 0.2},
    "finetune-lr-0.3": {"finetune_lr_scale": 0.3},
    "views-4": {"finetune_views": 4},
    "views-4-lr-0.2": {"finetune_views": 4, "finetune_lr_scale": 0.2},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--variants", default="default,single-head")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-images", type=int, default=400)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    args = p.parse_args()
    name = args.data.name
    home, sample = args.workdir / f"home-{name}", args.workdir / f"source-{name}"
    if (home / "runs").is_dir():
        os.environ["TLCORE_HOME"] = str(home)
        from tlcore.records.store import Store

        dataset = next(d for d in Store().list_datasets() if d.name == name)
    else:
        sampled_copy(args.data, sample, args.max_images)
        dataset, _, _ = import_into(home, sample, name)
        prepare_weights(home)
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = default_config(dataset.id, seed=seed, image_size=args.image_size, head_epochs=args.head_epochs,
                                    finetune_epochs=args.finetune_epochs, **VARIANTS[variant])
            result = measure_once("tlcore", {"config": config}, home, args.workdir, f"{name}-{variant}-{seed}")
            print(f"{name} {variant} seed {seed}: test accuracy {result['accuracy']:.3f}, macro F1 "
                  f"{result['macro_f1']:.3f}, CPU {result.get('cpu_s', 0):.1f} s", flush=True)


if __name__ == "__main__":
    main()
