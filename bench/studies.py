"""Issue 15's measurements: the three offline backbones, the LR finder, class weighting, TTA.

    python bench/studies.py backbones [--data ../shared/datasets/flowers] [--seeds 3]
    python bench/studies.py lr-finder [--data ...] [--seeds 3]
    python bench/studies.py imbalance [--data ...] [--seeds 3] [--image-size 160]
    python bench/studies.py tta [--data ...] [--seeds 3]

Each study trains through the engine (`tlcore.jobs.run_foreground`, head only on cached
features, the `fast-offline` recipe unless said otherwise) in one data home under
/tmp/bench_studies (so the pixel and feature caches are shared between seeds: the first seed
of each backbone pays the feature extraction, the later ones reuse it), and writes its numbers
to `bench/results/study-<name>.json`. The seed changes the head's initialisation and batch
order; the dataset's split is the import's (seed 0). BENCHMARKS.md quotes these files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HOME = Path("/tmp/bench_studies")
sys.path.insert(0, str(REPO))
os.environ.setdefault("TLCORE_HOME", str(HOME))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def dataset_id(source: Path, name: str) -> str:
    """`source` imported once into the study home (reused when already there)."""
    from tlcore.data.importer import import_dataset
    from tlcore.store import Store

    store = Store()
    for dataset in store.list_datasets():
        if dataset.name == name:
            return dataset.id
    return import_dataset(source, name=name, store=store).dataset.id


def train(dataset: str, **options):
    """One run through the engine; returns its stored `Run` (summary typed)."""
    from tlcore.config import PRESETS, TrainConfig
    from tlcore.jobs import run_foreground

    run = run_foreground(TrainConfig(dataset=dataset, **{**PRESETS["fast-offline"], **options}))
    if run.summary is None:
        raise RuntimeError(f"run {run.id} ended {run.status.value}: {run.error}")
    return run


def demo_latency_ms(run_id: str, files: list[str], repeats: int = 40) -> dict:
    """Median and p95 of the Demo's path: `load_run_model(run).predict_image(file bytes)`, warmed up."""
    import numpy as np

    from tlcore.inference import load_run_model

    loaded = load_run_model(run_id)
    loaded.warm_up()
    blobs = [Path(f).read_bytes() for f in files]
    latencies = []
    for i in range(repeats):
        t = time.perf_counter()
        loaded.predict_image(blobs[i % len(blobs)])
        latencies.append((time.perf_counter() - t) * 1000)
    return {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))}


def study_backbones(args) -> dict:
    data = dataset_id(Path(args.data), "flowers")
    files = [str(p) for p in sorted(Path(args.data).rglob("*.jpg"))[:20]]
    out = {}
    for backbone in LITES:
        runs = [train(data, backbone=backbone, seed=seed) for seed in range(args.seeds)]
        latency = demo_latency_ms(runs[0].id, files)
        out[backbone] = {
            "image_size": runs[0].summary.image_size,
            "accuracy": mean_std(r.summary.metrics.accuracy for r in runs),
            "macro_f1": mean_std(r.summary.metrics.macro_f1 for r in runs),
            "total_s_cold": runs[0].summary.timings.total_s,  # the first seed extracts the features
            "features_s": runs[0].summary.timings.features_s,
            "total_s_warm": mean_std(r.summary.timings.total_s for r in runs[1:]) if len(runs) > 1 else None,
            "demo_ms": latency,
            "run_ids": [r.id for r in runs],
        }
        print(backbone, json.dumps(out[backbone]), flush=True)
    return out


STUDIES = {"backbones": study_backbones}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "flowers"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=160, help="for the imbalance study. Defaults to 160.")
    parser.add_argument("--fresh", action="store_true", help="start from an empty data home")
    args = parser.parse_args(argv)
    if args.fresh and HOME.exists():
        shutil.rmtree(HOME)
    started = time.perf_counter()
    result = {"study": args.study, "data": str(Path(args.data).resolve()), "seeds": args.seeds,
              "cpu_count": os.cpu_count(), "results": STUDIES[args.study](args)}
    result["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"study-{args.study}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote bench/results/study-{args.study}.json in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
