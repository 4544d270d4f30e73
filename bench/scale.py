"""Scale with the data: each step's wall time, images/s and peak memory at growing dataset sizes.

    nice -n 15 python bench/scale.py --sets /work/wt/data/large-2000 /work/wt/data/large-6000 [--workdir DIR] \
        [--image-size 96] [--out bench/results/scale.json]

Make the sets first with `bench/make_large_set.py`. For each set, in a fresh data home, each step
runs in its own process so its peak memory is its own: `import` (scan, validate, dedupe, copy
blobs, split), `train` (head-only EfficientNet-Lite0 with ImageNet weights at `--image-size`:
pixel cache, features, head, evaluation, calibration; the run's own timings split it), `audit`
(on the features the run cached), `export` (ONNX with its check on the evaluation split, which
streams in batches). A sampler thread in each step's process reads /proc/self/status every
50 ms: "peak anon" is the largest RssAnon + RssShmem seen (resident memory minus file-backed
pages such as the memory-mapped pixel cache), "peak RSS" the kernel's VmHWM, "CPU s" the step's
process CPU time (user + system, with the children it waited for). The growth ratio
divides the largest set's figures by the smallest's (pass the 10,000 set with the 100,000 one for
100k/10k). Results go to a JSON file after every step (a set already in it is not measured again
unless `--again`; a set cut off part way continues in its data home from the first step it lacks)
and a Markdown table on stdout. With `--ray-runs N`,
N head-only runs of the largest set then go to a fresh 2-node local Ray cluster (`python -m tlcore
worker --cluster`), one after the other (`--ray-client`: joined through a Ray client server,
ray://): the dispatcher's peak RSS, what the nodes fetched into their (fresh) node cache and
reused, and what came back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("import", "train", "audit", "export")


# ----------------------------------------------------------------- in a step's process


class MemorySampler(threading.Thread):
    """The largest anonymous resident memory (RssAnon + RssShmem, MB) of this process while it runs."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.every_s, self.peak_anon_mb = every_s, 0.0
        self.done = threading.Event()

    @staticmethod
    def status() -> dict[str, float]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            s = self.status()
            self.peak_anon_mb = max(self.peak_anon_mb, s["RssAnon"] + s["RssShmem"])

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        s = self.status()
        return {"peak_anon_mb": round(max(self.peak_anon_mb, s["RssAnon"] + s["RssShmem"]), 1),
                "peak_rss_mb": round(s["VmHWM"], 1)}


def run_step(step: str, folder: str, image_size: int, state: dict) -> dict:
    from tlcore.records.store import Store

    store = Store()
    if step == "import":
        from tlcore.data.importer import import_dataset

        dataset = import_dataset(folder, name="large", store=store).dataset
        return {"dataset_id": dataset.id, "images": dataset.num_images}
    if step == "train":
        from tlcore.queue import jobs
        from tlcore.records.config import TrainConfig

        run = jobs.run_foreground(TrainConfig(
            dataset=state["dataset_id"], backbone="efficientnet_lite0", weights="imagenet", image_size=image_size,
            head_epochs=3, finetune_epochs=0, batch_size=64, name="scale"), store)
        if run.summary is None:
            raise RuntimeError(f"the run ended {run.status.value}: {run.error}")
        t = run.summary.timings
        return {"run_id": run.id, "images": state["images"], "accuracy": run.accuracy,
                "parts_s": {"pixels": t.pixels_s, "features": t.features_s, "head": t.head_s, "eval": t.eval_s}}
    if step == "audit":
        from tlcore.evaluate.audit import audit_dataset

        report = audit_dataset(state["dataset_id"], image_size=image_size, store=store)
        return {"images": report.images, "duplicate_groups": len(report.duplicate_groups),
                "duplicate_pairs": report.duplicate_pairs, "label_issues": len(report.label_issues)}
    if step == "export":
        from tlcore.deploy.export import export_run, read_report

        report = read_report(export_run(state["run_id"], "onnx"))
        return {"images": report["eval_images"], "top1_agreement": report["top1_agreement"]}
    raise ValueError(step)


def child(argv: list[str]) -> None:
    step, folder, image_size, state_file, result_file = argv
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    result = run_step(step, folder, int(image_size), json.loads(Path(state_file).read_text()))
    result["seconds"] = round(time.perf_counter() - started, 2)
    cpu = os.times()  # this process and the children it waited for: the figure load on a shared machine bends least
    result["cpu_s"] = round(cpu.user + cpu.system + cpu.children_user + cpu.children_system, 2)
    result.update(sampler.stop())
    Path(result_file).write_text(json.dumps(result))


# ----------------------------------------------------------------- the driver


def measure_set(folder: Path, image_size: int, on_step: Callable[[dict], None] = lambda result: None,
                earlier: dict | None = None, workdir: Path | None = None) -> dict:
    """Each step of `folder` in its own process; `on_step(result so far)` after each. With `earlier`
    (a result cut off part way), its data home is reused and only the steps it lacks run. A new data
    home goes in `workdir` (default: the system's temporary folder)."""
    if earlier and Path(earlier["home"]).is_dir():
        home, steps = Path(earlier["home"]), dict(earlier["steps"])
    else:
        home, steps = Path(tempfile.mkdtemp(prefix="tl-scale-", dir=workdir)), {}
    env = {**os.environ, "TLCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    state: dict = {}
    for result in steps.values():
        state.update({k: result[k] for k in ("dataset_id", "run_id") if k in result})
        state.setdefault("images", result["images"])
    for step in STEPS:
        if step in steps:
            continue
        state_file, result_file = home / "state.json", home / f"{step}.json"
        state_file.write_text(json.dumps(state))
        subprocess.run([sys.executable, __file__, "--child", step, str(folder), str(image_size), str(state_file),
                        str(result_file)], env=env, check=True, cwd=ROOT)
        result = json.loads(result_file.read_text())
        result["img_per_s"] = round(result["images"] / result["seconds"], 1)
        state.update({k: result[k] for k in ("dataset_id", "run_id") if k in result})
        state.setdefault("images", result["images"])
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        steps[step] = result
        print(f"{folder.name} {step}: {json.dumps(result)}", flush=True)
        on_step({"set": str(folder), "images": state["images"], "home": str(home), "steps": steps})
    return {"set": str(folder), "images": state["images"], "home": str(home), "steps": steps}


def client_server(cluster) -> tuple[subprocess.Popen, str]:
    """A Ray client server on `cluster` (one client at a time) and its ray:// address."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", f"--address={cluster.address}",
                             "--host=127.0.0.1", f"--port={port}", "--mode=specific-server"], cwd=ROOT)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"ray://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the Ray client server did not start") from None
            time.sleep(0.2)


def measure_ray(result: dict, image_size: int, runs: int, through_client: bool = False,
                workdir: Path | None = None) -> dict:
    """`runs` head-only runs of a measured set dispatched to a fresh 2-node local Ray cluster (joined
    through a Ray client server, ray://, with `through_client`: the dispatcher then sends the image
    files itself, by way of the relay actor): the dispatcher's peak memory (sampled every 50 ms),
    what the nodes fetched, what came back."""
    import psutil

    sys.path.insert(0, str(ROOT))
    from bench.cluster import ray_cluster, stop
    from tlcore.queue import jobs
    from tlcore.records.config import TrainConfig
    from tlcore.records.run_folder import RunFolder
    from tlcore.records.store import Store

    os.environ["TLCORE_HOME"] = result["home"]
    node_cache = Path(tempfile.mkdtemp(prefix="tl-node-", dir=workdir))
    os.environ["TLCORE_NODE_CACHE"] = str(node_cache)  # the nodes inherit it from this process
    cluster = ray_cluster(2)
    server, address = client_server(cluster) if through_client else (None, cluster.address)
    log = open(Path(result["home"]) / "dispatcher.out", "ab")
    dispatcher = subprocess.Popen([sys.executable, "-m", "tlcore", "worker", "--cluster", address],
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                  stderr=subprocess.STDOUT)
    peak = {"rss_mb": 0.0, "anon_mb": 0.0, "cpu_s": 0.0}
    done = threading.Event()

    def sample() -> None:
        proc = psutil.Process(dispatcher.pid)
        while not done.wait(0.05):
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                return
            peak["rss_mb"] = max(peak["rss_mb"], info.rss / 2**20)
            peak["anon_mb"] = max(peak["anon_mb"], (info.rss - info.shared) / 2**20)
            cpu = proc.cpu_times()
            peak["cpu_s"] = cpu.user + cpu.system

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    store, out = Store(), []
    try:
        for seed in range(runs):
            started = time.perf_counter()
            run = jobs.submit(TrainConfig(dataset=result["steps"]["import"]["dataset_id"],
                                          backbone="efficientnet_lite0", weights="imagenet", image_size=image_size,
                                          head_epochs=3, finetune_epochs=0, batch_size=64, seed=seed,
                                          name=f"scale-ray-{seed}"), store)
            while not store.get_run(run.id).status.is_terminal:
                time.sleep(0.5)
            run = store.get_run(run.id)
            folder = RunFolder(run.id).path
            said = ("Fetched", "Pixel cache", "Backbone features", "Dispatched")
            out.append({"status": run.status.value, "error": run.error,
                        "seconds": round(time.perf_counter() - started, 1),
                        "log": [line.message for line in store.logs(run.id) if line.message.startswith(said)],
                        "returned_mb": round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)})
            print(f"ray run {seed}: {json.dumps(out[-1])}", flush=True)
    finally:
        done.set()
        stop(dispatcher)
        if server is not None:
            stop(server)
        cluster.shutdown()
    return {"images": result["images"], "address": "ray://" if through_client else "GCS", "runs": out,
            "dispatcher_peak_rss_mb": round(peak["rss_mb"], 1),
            "dispatcher_peak_rss_minus_shared_mb": round(peak["anon_mb"], 1),
            "dispatcher_cpu_s": round(peak["cpu_s"], 1)}


def table(results: list[dict]) -> str:
    lines = ["| step | " + " | ".join(f"{r['images']:,} photos: s / CPU s / img/s / peak anon MB / peak RSS MB"
                                        for r in results) + " | growth (largest/smallest): time per photo, peak anon |",
             "|---|" + "---|" * (len(results) + 1)]
    small, large = results[0], results[-1]
    for step in STEPS:
        cells = [f"{r['steps'][step]['seconds']:.1f} / {r['steps'][step].get('cpu_s', float('nan')):.1f} / "
                 f"{r['steps'][step]['img_per_s']:.1f} / "
                 f"{r['steps'][step]['peak_anon_mb']:.0f} / {r['steps'][step]['peak_rss_mb']:.0f}"
                 if step in r["steps"] else "not measured" for r in results]
        if step not in small["steps"] or step not in large["steps"]:
            lines.append(f"| {step} | " + " | ".join(cells) + " | — |")
            continue
        a, b = small["steps"][step], large["steps"][step]
        per_photo = (b["seconds"] / b["images"]) / (a["seconds"] / a["images"])
        cpu_per_photo = (b.get("cpu_s", float("nan")) / b["images"]) / (a.get("cpu_s", float("nan")) / a["images"])
        growth = b["peak_anon_mb"] / a["peak_anon_mb"]
        lines.append(f"| {step} | " + " | ".join(cells)
                     + f" | {per_photo:.2f}x (CPU {cpu_per_photo:.2f}x), {growth:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=Path, nargs="+", required=True, help="folders made by make_large_set.py")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--again", action="store_true", help="measure sets the results file already holds again")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the data homes and node caches go (default: the system's temporary folder)")
    parser.add_argument("--ray-runs", type=int, default=0,
                        help="then dispatch this many head-only runs of the largest set to a 2-node local Ray cluster")
    parser.add_argument("--ray-client", action="store_true",
                        help="the dispatcher joins that cluster through a Ray client server (ray://)")
    args = parser.parse_args()
    done = {}
    if args.out.is_file():  # sets measured by an earlier call at this size are kept, not measured again
        earlier = json.loads(args.out.read_text())
        if earlier["image_size"] == args.image_size:
            done = {r["set"]: r for r in earlier["results"]}

    def save(result: dict) -> None:
        done[result["set"]] = result
        kept = json.loads(args.out.read_text()) if args.out.is_file() else {}  # the Ray figures stay
        args.out.write_text(json.dumps({**kept, "image_size": args.image_size, "results": list(done.values()),
                                        "machine": f"{os.cpu_count()} cores, shared"}, indent=1))

    for folder in args.sets:
        earlier = done.get(str(folder))
        if earlier is None or args.again:
            save(measure_set(folder, args.image_size, save, workdir=args.workdir))
        elif len(earlier["steps"]) < len(STEPS):  # cut off part way: continue in its data home
            save(measure_set(folder, args.image_size, save, earlier, workdir=args.workdir))
    results = sorted((done[str(folder)] for folder in args.sets), key=lambda r: r["images"])
    print(table(results))
    if args.ray_runs:
        ray = measure_ray(results[-1], args.image_size, args.ray_runs, args.ray_client, args.workdir)
        ray.setdefault("address", "GCS")
        data = json.loads(args.out.read_text())
        earlier = data.get("ray") or []
        earlier = earlier if isinstance(earlier, list) else [{**earlier, "address": "GCS"}]  # before 10k/30k
        data["ray"] = sorted([r for r in earlier if (r["images"], r["address"]) != (ray["images"], ray["address"])]
                             + [ray], key=lambda r: (r["images"], r["address"]))
        args.out.write_text(json.dumps(data, indent=1))
        print(json.dumps(ray, indent=1))


if __name__ == "__main__":
    main()
