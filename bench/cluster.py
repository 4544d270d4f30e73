"""The queue on a Ray cluster against the local worker, on this machine.

    python bench/cluster.py [--data /work/shared/datasets/hymenoptera] [--image-size 224] [--out FILE]

Measures, each in a fresh data home:
  1. dispatch overhead: queued -> first batch (the first progress record of a batch of model
     work reaching the store), for the local worker and the Ray dispatcher (one-node cluster),
     on a cold worker (TensorFlow not imported yet) and a warm one (the next run);
  2. a 4-run sweep (2 learning rates x 2 seeds) on that one-node cluster (1 CPU; its worker is
     warm by then) and on a fresh two-node cluster (1 CPU each; both workers cold): wall time
     from queueing to the last run finishing;
  3. the image files each node fetched (by content hash, once per node) against the dataset's size on
     disk, and bytes that came back.

Both "nodes" are processes on the same machine sharing its cores (and whatever else runs on
it), so the two-node figure shows concurrency, not extra hardware. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tlcore.queue import jobs  # noqa: E402
from tlcore.records.config import TrainConfig  # noqa: E402
from tlcore.records.store import RunStatus, Store  # noqa: E402

WORK_PHASES = ("features", "head", "finetune")


def fresh_home(name: str) -> Path:
    home = Path(tempfile.mkdtemp(prefix=f"tl-bench-{name}-"))
    os.environ["TLCORE_HOME"] = str(home)
    return home


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def start(argv: list[str], home: Path) -> subprocess.Popen:
    log = open(home / "worker.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "tlcore", *argv], cwd=ROOT, env=env(), stdout=log,
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()


def recipe(dataset: str, size: int, seed: int, lr: float = 1e-3) -> TrainConfig:
    return TrainConfig(dataset=dataset, backbone="efficientnet_lite0", weights="imagenet", image_size=size,
                       head_epochs=5, lr=lr, seed=seed, batch_size=32)


def until_first_batch(store: Store, run_id: str, timeout: float = 1800) -> float:
    """Seconds from the run being queued to the first batch of model work (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if (run.progress.phase in WORK_PHASES and (run.progress.batch or 0) >= 1) or store.epochs(run_id):
            return time.time() - run.created_at
        if run.status.is_terminal:
            raise RuntimeError(f"{run_id} ended {run.status.value} before its first batch: {run.error}")
        time.sleep(0.05)
    raise TimeoutError(run_id)


def until_done(store: Store, run_ids: list[str], timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [store.get_run(r) for r in run_ids]
        if all(r.status.is_terminal for r in runs):
            bad = [f"{r.id}: {r.error}" for r in runs if r.status is not RunStatus.SUCCEEDED]
            if bad:
                raise RuntimeError("; ".join(bad))
            return
        time.sleep(0.2)
    raise TimeoutError(run_ids)


def overhead(store: Store, dataset: str, size: int, seeds: tuple[int, int]) -> dict[str, float]:
    """Queued -> first batch for a cold run, then a warm one (distinct seeds: no feature cache reuse)."""
    out = {}
    for label, seed in zip(("cold_s", "warm_s"), seeds):
        run = jobs.submit(recipe(dataset, size, seed), store)
        out[label] = round(until_first_batch(store, run.id), 2)
        until_done(store, [run.id])
    return out


def ray_cluster(nodes: int):
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = env()["PYTHONPATH"]
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # short: socket paths
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a loaded machine starts nodes slowly
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def sweep_wall_time(store: Store, dataset: str, size: int) -> tuple[float, list[str]]:
    from tlcore.queue.sweeps import submit_sweep

    started = time.time()
    queued = submit_sweep(dataset, {"lr": [1e-3, 3e-4]}, [10, 11],
                          fixed={"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": size,
                                 "head_epochs": 5, "batch_size": 32}, store=store)
    ids = [r.id for r in queued.runs]
    until_done(store, ids)
    return round(time.time() - started, 1), ids


def overlap_s(store: Store, run_ids: list[str]) -> float:
    """Seconds during which two or more of the runs were training on their nodes at once."""
    spans = sorted((r.executor.began_at, r.finished_at) for r in map(store.get_run, run_ids))
    total = 0.0
    for i, (start_a, end_a) in enumerate(spans):
        for start_b, end_b in spans[i + 1:]:
            total += max(0.0, min(end_a, end_b) - max(start_a, start_b))
    return round(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "hymenoptera"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    parser.add_argument("--parts", default="local,1,2",
                        help="what to measure: local (the local worker), 1 and 2 (clusters of that many nodes); "
                             "results are merged into --out")
    args = parser.parse_args()
    parts = args.parts.split(",")
    out = Path(args.out)
    results: dict = json.loads(out.read_text()) if out.is_file() and args.parts != "local,1,2" else {}
    results.update({"data": args.data, "image_size": args.image_size, "cpus": os.cpu_count()})
    results[f"load_before_{args.parts}"] = os.getloadavg()

    from tlcore.data.importer import import_dataset

    # 1a. the local worker
    if "local" in parts:
        home = fresh_home("local")
        store = Store()
        dataset = import_dataset(args.data, name="bench", store=store).dataset
        worker = start(["worker"], home)
        try:
            results["local_overhead"] = overhead(store, dataset.id, args.image_size, (1, 2))
        finally:
            stop(worker)
        print("local", results["local_overhead"], flush=True)

    # 1b + 2. Ray's overhead on a fresh one-node cluster, then sweeps on one and two nodes
    for nodes in [int(p) for p in parts if p.isdigit()]:
        home = fresh_home(f"ray{nodes}")
        store = Store()
        dataset = import_dataset(args.data, name="bench", store=store).dataset
        cluster = ray_cluster(nodes)
        dispatcher = start(["worker", "--cluster", cluster.address], home)
        try:
            if nodes == 1:
                results["ray_overhead"] = overhead(store, dataset.id, args.image_size, (3, 4))
                print("ray", results["ray_overhead"], flush=True)
            wall, ids = sweep_wall_time(store, dataset.id, args.image_size)
            results[f"sweep_{nodes}_node"] = {"wall_s": wall, "overlap_s": overlap_s(store, ids),
                                              "runs_s": [round(store.get_run(r).finished_at
                                                               - store.get_run(r).executor.began_at, 1)
                                                         for r in ids],
                                              "load_after": os.getloadavg()}
            print(f"sweep on {nodes} node(s)", results[f"sweep_{nodes}_node"], flush=True)
            if nodes == 2:
                from tlcore.data.manifest import load_manifest
                from tlcore.records.run_folder import RunFolder

                entries = load_manifest(dataset.id)
                folder = RunFolder(ids[0]).path
                results["bytes"] = {
                    "dataset_files": sum(e.path.stat().st_size for e in entries),
                    "returned": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                    "images": len(entries),
                    # what was sent (the manifest) and what each run's node fetched by content hash
                    "dispatch_log": [line.message for r in ids for line in store.logs(r)
                                     if "sent the manifest" in line.message or line.message.startswith("Fetched ")],
                }
        finally:
            stop(dispatcher)
            cluster.shutdown()
    results[f"load_after_{args.parts}"] = os.getloadavg()
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
