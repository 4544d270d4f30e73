"""What the audit's inverted-file index misses, on real features: its answers against every pair's.

    python bench/audit_neighbours.py --home HOME [--dataset NAME] [--image-size 96] \
        [--out bench/results/audit_neighbours.json]

`--home` as for bench/audit_memory.py (a data home with one imported set; its features are computed
and cached on the first call). The audit searches exactly up to 20,000 images; above, each image is
compared with the 8 cells (of about 128 images) nearest to it: 1 % of a 100,000-photo set. A real
set here is smaller, so the index is forced on its real rows with cells small enough that the same
share, or 2 % or 4 %, is probed. Reported per share probed: near-duplicate pairs found at the
audit's threshold (0.90) and at 0.80, against every pair's; the mean similarity of each image's 5
nearest neighbours (the outliers' score) that came out exact, and the mean and largest shortfall;
and the outliers found against the exact search's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--dataset", help="name, id or name@version of the set to use (default: the home's first)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["TLCORE_HOME"] = str(args.home)
    sys.path.insert(0, str(ROOT))
    from threadpoolctl import threadpool_limits

    from bench.run import machine
    from tlcore.data.manifest import load_manifest
    from tlcore.evaluate.audit import DUPLICATE_SIMILARITY, _reduce, _unit, dataset_features, find_outliers
    from tlcore.evaluate.neighbours import PROBES, NeighbourIndex
    from tlcore.records.store import Store

    store = Store()
    dataset = store.get_dataset(args.dataset) if args.dataset else store.list_datasets()[-1]
    entries = load_manifest(dataset.id)
    features = np.asarray(dataset_features(entries, "efficientnet_lite0", args.image_size))
    reduced, uncentred = _reduce(features)
    centred, plain = _unit(reduced), _unit(uncentred)

    def pairs(index: NeighbourIndex, threshold: float) -> set[tuple[int, int]]:
        return {(i, j) for found_i, found_j, _ in index.pairs_at_least(threshold)
                for i, j in zip(found_i.tolist(), found_j.tolist())}

    rows = []
    with threadpool_limits(1):
        exact = {"dup": NeighbourIndex(centred, exact_up_to=len(entries)),
                 "knn": NeighbourIndex(plain, exact_up_to=len(entries))}
        truth = {t: pairs(exact["dup"], t) for t in (DUPLICATE_SIMILARITY, 0.8)}
        nearest = exact["knn"].mean_nearest_similarity(5)
        outliers = {o.source for o in find_outliers(entries, exact["knn"])}
        for share in (0.01, 0.02, 0.04):
            cells = round(PROBES / share)
            cell_rows = max(1, len(entries) // cells)
            dup = NeighbourIndex(centred, exact_up_to=0, cell_rows=cell_rows)
            knn = NeighbourIndex(plain, exact_up_to=0, cell_rows=cell_rows)
            approximate = knn.mean_nearest_similarity(5)
            found = {o.source for o in find_outliers(entries, knn)}
            row = {"share_probed": round(PROBES / dup.index.nlist, 4), "cells": int(dup.index.nlist),
                   "cell_rows": cell_rows,
                   **{f"pairs_at_{t:.2f}": f"{len(pairs(dup, t))} of {len(truth[t])}" for t in truth},
                   "nearest_exact_share": round(float(np.mean(np.isclose(approximate, nearest, atol=1e-5))), 4),
                   "nearest_mean_shortfall": round(float(np.mean(nearest - approximate)), 5),
                   "nearest_max_shortfall": round(float(np.max(nearest - approximate)), 4),
                   "outliers": f"{len(found & outliers)} of {len(outliers)} found, {len(found - outliers)} more"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(["python", "bench/audit_neighbours.py", *sys.argv[1:]]),
                                        "dataset": dataset.label, "images": len(entries), "machine": machine(),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
