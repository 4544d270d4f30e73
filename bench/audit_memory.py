"""The audit's memory beyond its feature matrix, and its CPU time per photo, at dataset sizes no real
set here has features for.

    nice -n 19 python bench/audit_memory.py --home HOME --images 10000 30000 100000 \
        [--image-size 96] [--exact-up-to N] [--findings DIR] [--label NAME] [--out bench/results/audit_memory.json]

`--home` is a data home where a dataset was imported (`TLCORE_HOME=HOME python -m tlcore datasets
import FOLDER`); its last dataset's features at `--image-size` are the real rows (computed and cached
on the first call if no run cached them). Each size is measured in its own process: the real rows
are cycled up to `--images` rows, each copy moved by Gaussian noise (a quarter of the features'
spread per dimension, so copies are not all near-duplicates of each other), with the labels and
splits of the rows they copy; then `audit_features` (every audit step after the backbone) runs on
them. "peak anon" is the largest RssAnon + RssShmem seen (sampled every 50 ms, as in bench/scale.py);
"beyond features" subtracts the anonymous memory held once the feature matrix is loaded, i.e. what
the audit's own steps add. `--exact-up-to` above the largest size makes the neighbour searches
compare every pair (the audit before its inverted-file index); with `--findings`, an exact and an
approximate measurement of one size (two `--label`s) can be compared pair for pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(images: int, exact_up_to: int | None, findings_to: Path | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from bench.scale import MemorySampler
    from tlcore.data.manifest import load_manifest
    from tlcore.evaluate.audit import _check_enough_images, audit_features, dataset_features
    from tlcore.records.store import Store

    store = Store()
    dataset = store.list_datasets()[-1]
    real = load_manifest(dataset.id)
    base = np.asarray(dataset_features(real, "efficientnet_lite0", int(os.environ["AUDIT_IMAGE_SIZE"])))
    rng = np.random.default_rng(0)
    spread = base.std(axis=0)
    features = np.empty((images, base.shape[1]), np.float32)
    for start in range(0, images, 4096):
        rows = np.arange(start, min(images, start + 4096))
        features[rows] = base[rows % len(base)] + rng.normal(size=(len(rows), base.shape[1])) * spread / 4
    entries = [dataclasses.replace(real[i % len(real)], source=f"{i}.jpg", sha256=f"{i:064d}") for i in range(images)]
    del base
    folds = _check_enough_images(dataset, entries, 5)
    before = MemorySampler.status()
    sampler = MemorySampler()
    sampler.start()
    started, cpu = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def timed(key, message, step):
        t = time.perf_counter()
        result = step()
        timings[key] = round(time.perf_counter() - t, 2)
        return result

    search = {} if exact_up_to is None else {"exact_up_to": exact_up_to}
    findings = audit_features(entries, dataset.classes, features, folds, timed=timed, **search)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    peak = sampler.stop()
    held = before["RssAnon"] + before["RssShmem"]
    return {"images": images, "features_mb": round(features.nbytes / 2**20, 1), "anon_before_mb": round(held, 1),
            "peak_anon_mb": peak["peak_anon_mb"], "beyond_features_mb": round(peak["peak_anon_mb"] - held, 1),
            "seconds": round(seconds, 1), "cpu_s": round(cpu_s, 1), "steps_s": timings,
            "duplicate_pairs": findings["duplicate_pairs"], "label_issues": len(findings["label_issues"]),
            "outliers": len(findings["outliers"]), "exact_up_to": exact_up_to, **_saved(findings, findings_to)}


def _saved(findings: dict, to: Path | None) -> dict:
    """Writes what the near-duplicate and outlier searches found to `to` (to compare an exact and an
    approximate search of the same rows); returns {"findings": path} or {}."""
    if to is None:
        return {}
    to.write_text(json.dumps({"pairs": findings["duplicate_pairs"],
                              "groups": sorted(sorted(g.members) for g in findings["duplicate_groups"]),
                              "outliers": [o.source for o in findings["outliers"]]}))
    return {"findings": str(to)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        exact_up_to, findings_to = json.loads(sys.argv[3]), json.loads(sys.argv[4])
        print(json.dumps(child(int(sys.argv[2]), exact_up_to, findings_to and Path(findings_to))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--images", type=int, nargs="+", required=True)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--label", default="", help="a name for this measurement in the results file")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--exact-up-to", type=int, default=None,
                        help="images up to which the neighbour searches compare every pair (the audit's default "
                             "if not given); a size above the largest --images measures the exact search")
    parser.add_argument("--findings", type=Path, default=None,
                        help="a folder: each size writes the pairs, groups and outliers it found there")
    args = parser.parse_args()
    env = {**os.environ, "TLCORE_HOME": str(args.home), "AUDIT_IMAGE_SIZE": str(args.image_size),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    results = []
    for images in args.images:
        findings_to = None
        if args.findings:
            args.findings.mkdir(parents=True, exist_ok=True)
            findings_to = str(args.findings / f"{images}-{args.label or 'default'}.json")
        out = subprocess.run([sys.executable, __file__, "--child", str(images), json.dumps(args.exact_up_to),
                              json.dumps(findings_to)], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        sys.path.insert(0, str(ROOT))
        from bench.run import machine

        kept = json.loads(args.out.read_text()) if args.out.is_file() else {"measurements": []}
        kept["measurements"].append({"label": args.label, "home": str(args.home), "command": shlex.join(sys.argv),
                                     "machine": machine(), "results": results})
        args.out.write_text(json.dumps(kept, indent=1))


if __name__ == "__main__":
    main()
