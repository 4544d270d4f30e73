"""Deployment benchmark for one finished run: the HTTP endpoint, int8 against float32, ONNX Runtime against Keras.

    python bench/deploy.py --run RUN [--requests 200] [--clients 8] [--out BENCHMARKS.md]

Uses the data home in `$TLCORE_HOME`. Measures, on the run's evaluation photos (their original
files, sent as they are):
- the endpoint (`python -m tlcore serve`, its own process): latency p50/p95 for one client sending
  one photo at a time, and throughput with `--clients` concurrent clients;
- the same photos through the model in-process (`LoadedModel.predict_image`: decode, resize,
  forward pass), one at a time;
- the int8 and float32 TFLite exports (accuracy on the evaluation split, size, interpreter
  latency per image), as the export itself reports them;
- ONNX Runtime against Keras, one image per call and batches of 32, on the same pixels.

The section "Deploying a model" of `--out` is replaced (or appended) with the figures; the raw
numbers go to `bench/results/deploy.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Deploying a model"


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "n": len(ms)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_endpoint(run_id: str, photos: list[tuple[str, bytes]], requests_n: int, clients: int) -> dict:
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tlcore", "serve", "--run", run_id, "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 300:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        startup_s = time.perf_counter() - started

        def send(session, i):
            name, data = photos[i % len(photos)]
            t = time.perf_counter()
            reply = session.post(f"{url}/v1/predict", files={"file": (name, data)}, params={"top_k": 3}, timeout=60)
            reply.raise_for_status()
            return (time.perf_counter() - t) * 1000

        with requests.Session() as session:
            for i in range(10):
                send(session, i)  # warm-up
            single = [send(session, i) for i in range(requests_n)]

        local = threading.local()

        def client_send(i):
            if not hasattr(local, "session"):
                local.session = requests.Session()
            return send(local.session, i)

        total = requests_n * 2
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_send, range(clients * 2)))  # warm-up, one connection per client
            t = time.perf_counter()
            loaded = list(pool.map(client_send, range(total)))
            wall = time.perf_counter() - t
        return {"startup_s": startup_s, "one_client": percentiles(single),
                "concurrent": {"clients": clients, "requests": total, "images_per_s": total / wall,
                               **percentiles(loaded)},
                "one_client_images_per_s": 1000 / float(np.mean(single))}
    finally:
        server.terminate()
        server.wait(30)


def bench_in_process(run_id: str, photos: list[tuple[str, bytes]], requests_n: int) -> dict:
    from tlcore.deploy import inference

    loaded = inference.load_run_model(run_id)
    loaded.warm_up()
    for i in range(10):
        loaded.predict_image(photos[i % len(photos)][1])
    ms = []
    for i in range(requests_n):
        t = time.perf_counter()
        loaded.predict_image(photos[i % len(photos)][1], top_k=3)
        ms.append((time.perf_counter() - t) * 1000)
    return {**percentiles(ms), "images_per_s": 1000 / float(np.mean(ms))}


def bench_onnx_vs_keras(run_id: str, pixels: np.ndarray, repeats: int) -> dict:
    import onnxruntime

    from tlcore.deploy import inference
    from tlcore.deploy.export import export_run, read_report

    onnx_path = export_run(run_id, "onnx")
    loaded = inference.load_run_model(run_id)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = pixels.astype("float32")
    runners = {
        "keras_folded": lambda b: loaded.probabilities(b),  # what predict and the endpoint run
        "keras_stock": lambda b: loaded.model.predict_on_batch(b.astype("float32")),
        "onnxruntime": lambda b: session.run(None, {name: b.astype("float32")})[0],
    }
    out = {}
    for label, fn in runners.items():
        fn(pixels[:1])
        fn(pixels[:32])
        one = []
        for i in range(repeats):
            t = time.perf_counter()
            fn(pixels[i % len(pixels)][None])
            one.append((time.perf_counter() - t) * 1000)
        batch = []
        for i in range(max(3, repeats // 20)):
            start = (i * 32) % max(1, len(x) - 32)
            t = time.perf_counter()
            fn(pixels[start:start + 32])
            batch.append((time.perf_counter() - t) * 1000 / 32)
        out[label] = {"one_image": percentiles(one), "batch32_ms_per_image": float(np.median(batch))}
    out["check"] = read_report(onnx_path)
    return out


def bench_int8(run_id: str) -> dict:
    from tlcore.deploy.export import export_run, read_report

    t = time.perf_counter()
    path = export_run(run_id, "tflite-int8")
    return {**read_report(path), "export_s": time.perf_counter() - t}


def report_section(r: dict) -> str:
    ep, ip, ox, q = r["endpoint"], r["in_process"], r["onnx"], r["int8"]
    one, conc = ep["one_client"], ep["concurrent"]
    lines = [
        SECTION, "",
        f"`python bench/deploy.py --run {r['run']['id']}` ({r['date']}, {r['machine']}). "
        f"Run: {r['run']['recipe']}; {r['run']['eval_split']} accuracy {r['run']['accuracy']:.1%} on "
        f"{r['run']['eval_images']} photos. The {r['cpus']} CPU cores were shared with other sessions "
        "working on the same machine while this ran (1-minute load average "
        f"{r['load_before']:.1f} at the start, {r['load_after']:.1f} at the end), so the figures are noisy "
        "and on the slow side.", "",
        "### HTTP endpoint against the model in-process", "",
        f"`python -m tlcore serve` in its own process (ready {ep['startup_s']:.1f} s after start), clients in "
        "the benchmark process on the same cores; each request is one original photo file "
        f"(multipart `file`, top 3). In-process: `LoadedModel.predict_image` on the same bytes.", "",
        "| | p50 | p95 | images/s |", "|---|---:|---:|---:|",
        f"| in-process, one at a time | {ip['p50_ms']:.1f} ms | {ip['p95_ms']:.1f} ms | {ip['images_per_s']:.0f} |",
        f"| endpoint, 1 client | {one['p50_ms']:.1f} ms | {one['p95_ms']:.1f} ms | "
        f"{ep['one_client_images_per_s']:.0f} |",
        f"| endpoint, {conc['clients']} concurrent clients | {conc['p50_ms']:.1f} ms | {conc['p95_ms']:.1f} ms | "
        f"{conc['images_per_s']:.0f} |", "",
        "### int8 against float32 (TFLite interpreter, one image per call)", "",
        f"Full-integer quantization with {q['representative_images']} training photos; accuracy on the "
        f"{q['eval_images']} {q['eval_split']} photos (Keras: {r['run']['accuracy']:.1%}). "
        f"Export took {q['export_s']:.0f} s (both TFLite files and both checks).", "",
        "| | accuracy | size | latency p50 |", "|---|---:|---:|---:|",
    ]
    for name in ("float32", "int8"):
        m = q[name]
        lines.append(f"| {name} | {m['accuracy']:.1%} | {m['size_bytes'] / 2**20:.1f} MB | "
                     f"{m['latency_ms_p50']:.2f} ms |")
    lines += ["", f"int8 loses {q['accuracy_drop_points']:.1f} points" + (f": {q['warning']}" if q["warning"] else
              f" (within the {q['tolerance_points']:g}-point tolerance; no warning)."), "",
              "### ONNX Runtime against Keras (forward pass only, same pixels)", "",
              f"Check at export: top-1 agreement {ox['check']['top1_agreement']:.1%} on "
              f"{ox['check']['eval_images']} photos, largest probability difference "
              f"{ox['check']['max_probability_difference']:.1g}.", "",
              "| | 1 image p50 | 1 image p95 | batch of 32, per image |", "|---|---:|---:|---:|"]
    names = {"keras_folded": "Keras, BatchNorm folded (what tlcore runs)", "keras_stock": "Keras, saved model as is",
             "onnxruntime": "ONNX Runtime (CPU)"}
    for key, label in names.items():
        m = ox[key]
        lines.append(f"| {label} | {m['one_image']['p50_ms']:.2f} ms | {m['one_image']['p95_ms']:.2f} ms | "
                     f"{m['batch32_ms_per_image']:.2f} ms |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if SECTION in text:
        before, rest = text.split(SECTION, 1)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) == 2 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run id or name (in $TLCORE_HOME)")
    parser.add_argument("--requests", type=int, default=200, help="requests for the one-client figures")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()

    from tlcore.data.images import load_resized
    from tlcore.evaluate.evaluation import read_predictions
    from tlcore.evaluate.model_card import find_run

    run, folder = find_run(args.run)
    rows = read_predictions(folder.predictions)
    photos = [(Path(p).name, Path(p).read_bytes()) for p in rows["path"]]
    config = json.loads(folder.config_file.read_text())
    size = int(config["image_size"])
    pixels = np.stack([load_resized(p, size) for p in rows["path"][:64]])
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "run": {"id": run.id, "eval_split": run.summary.eval_split, "eval_images": len(rows),
                "accuracy": run.accuracy,
                "recipe": (f"{run.backbone} ({run.weights} weights) at {size} px, head {config['head_epochs']} "
                           f"epochs, fine-tune {config['finetune_epochs']} epochs, on {run.summary.dataset}")},
    }
    print("[deploy] endpoint ...", flush=True)
    results["endpoint"] = bench_endpoint(run.id, photos, args.requests, args.clients)
    print("[deploy] in-process ...", flush=True)
    results["in_process"] = bench_in_process(run.id, photos, args.requests)
    print("[deploy] onnx vs keras ...", flush=True)
    results["onnx"] = bench_onnx_vs_keras(run.id, pixels, args.requests)
    print("[deploy] int8 vs float32 ...", flush=True)
    results["int8"] = bench_int8(run.id)
    results["load_after"] = os.getloadavg()[0]
    out_json = REPO / "bench" / "results" / "deploy.json"
    out_json.write_text(json.dumps(results, indent=1))
    section = report_section(results)
    write_section(Path(args.out), section)
    print(section)


if __name__ == "__main__":
    main()
