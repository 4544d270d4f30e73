"""Issue 21: where the default recipe's CPU time goes, step by step, in one run.

    python bench/default_cpu_steps.py DATA_HOME [--image-size 160] [--head-epochs 10] [--finetune-epochs 2]

Runs the default recipe of `bench/defaults.py` (seed 0) once on the first dataset of the data home
DATA_HOME (e.g. a copy of one of its `home-*` folders: with their pixel and feature caches warm, as
every run after a set's first finds them) and prints, per step of `tlcore.train.training`, the CPU
seconds of this process (`time.process_time`: user + system of all its threads) and the wall
seconds. CPU time is what other sessions' load disturbs least; the wall split of
`bench/defaults.py`'s runs is only as good as the load was steady.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CPU0, WALL0 = time.process_time(), time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("build_model", "fit_head", "search_head", "fine_tune", "choose_finetune_result", "evaluate",
         "calibrate")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("home")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    args = p.parse_args(argv)
    os.environ["TLCORE_HOME"] = str(Path(args.home).resolve())
    from bench.run import AUGMENT
    from tlcore.queue import jobs
    from tlcore.records.config import TrainConfig
    from tlcore.records.store import RunStatus, Store
    from tlcore.train import training

    cpu = {"start-up (imports)": time.process_time() - CPU0}
    wall = {"start-up (imports)": time.perf_counter() - WALL0}

    def timed(owner, name: str) -> None:
        real = getattr(owner, name)

        def step(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
                wall[name] = wall.get(name, 0.0) + time.perf_counter() - w
        setattr(owner, name, step)

    for name in STEPS:
        timed(training._Training, name)
    store = Store()
    dataset = store.list_datasets()[0]
    config = TrainConfig(dataset=dataset.id, image_size=args.image_size, seed=0, augment=list(AUGMENT),
                         head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs, finetune_layers=20,
                         batch_size=32, lr=1e-3, dropout=0.2)
    spec, _ = jobs.prepare(config, store)
    run = store.create_run("cpu-steps", spec, status=RunStatus.RUNNING)
    c, w = time.process_time(), time.perf_counter()
    summary = training.execute_run(run.id, store)
    cpu["execute_run"], wall["execute_run"] = time.process_time() - c, time.perf_counter() - w
    cpu["process"], wall["process"] = time.process_time(), time.perf_counter() - WALL0
    out = {"dataset": dataset.name, "features_reused": bool(summary.timings.features_reused),
           "cpu_s": {k: round(v, 2) for k, v in cpu.items()}, "wall_s": {k: round(v, 2) for k, v in wall.items()},
           "args": vars(args)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
