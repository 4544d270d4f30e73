"""GPU acceptance: what a person with 1-8 NVIDIA GPUs runs to prove the GPU path end to end.

    bash tools/gpu_acceptance.sh            (or: python bench/gpu_acceptance.py [--keep])

Prints one verdict line per check (PASS, FAIL or SKIP, then what was measured) and exits 1 if
any check failed. Everything runs in a fresh data home on the built-in "textures" dataset
(no download, EfficientNet-Lite0's packaged weights), each training in its own process:
1. precision x XLA matrix on one GPU: every combination succeeds, no NaN loss, accuracy within
   3 points of float32 without XLA;
2. the mixed-precision model reloads as float32 on the CPU and predicts what evaluation wrote;
3. it exports to SavedModel, TFLite and ONNX with the GPU visible (under the CLI's cap), ONNX
   Runtime agreeing with Keras on every evaluation image;
4. with 2+ GPUs: a 2-replica fine-tune, stopped after an epoch and resumed to the end;
5. the dashboard's model process (one GPU, capped) and a training worker on the same GPU at
   once, and the dashboard's other GPU paths (LR finder, audit, export) under the cap, with
   memory per process from NVML (`pynvml`, from the optional `nvidia-ml-py`; without it, or
   when NVML lists no processes, as in many containers, the memory part is a SKIP, never a
   PASS at 0 MB);
6. `tlcore serve` on the GPU: p50 latency with 8 concurrent clients;
7. a Ray task sees and declares the GPU it was given (skipped without Ray);
8. compile counts: one traced training step under XLA with a ragged dataset size, and no
   serving trace after warm-up for any batch size 1..32.
Nothing here has run on a real GPU yet: the project's machines have none (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_POINTS = 3.0
RECIPE = ["--backbone", "efficientnet_lite0", "--image-size", "160", "--head-epochs", "4",
          "--finetune-epochs", "2", "--finetune-layers", "20", "--augment", "flip", "--batch-size", "16",
          "--seed", "0"]
UI_CAP_MB = 1024


def verdict(ok: bool | None, check: str, detail: str) -> bool:
    word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{word}  {check}: {detail}", flush=True)
    return ok is not False


def tlcore(env: dict[str, str], *args: str, timeout: float = 600) -> dict:
    """`python -m tlcore ARGS --json` in a child process; its last JSON line (or the error)."""
    done = subprocess.run([sys.executable, "-m", "tlcore", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def python(env: dict[str, str], code: str, timeout: float = 600) -> dict:
    """Run `code` (which prints one JSON line last) in a child process."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def gpu_memory_by_pid() -> dict[int, int] | None:
    """MB of GPU memory per process from NVML, or None when it cannot say (no `pynvml`, or no
    process listed: in a container NVML often shows none, and 0 MB would then pass any cap)."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    used: dict[int, int] = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0) // 2**20
    return used or None


def watch_memory(procs: dict[str, subprocess.Popen], until: subprocess.Popen) -> dict[str, int] | None:
    """Peak MB per named process until `until` exits, or None when NVML could not attribute memory."""
    peaks, seen = dict.fromkeys(procs, 0), False
    while until.poll() is None:
        used = gpu_memory_by_pid()
        if used is not None:
            seen = seen or any(p.pid in used for p in procs.values())
            peaks = {name: max(peaks[name], used.get(p.pid, 0)) for name, p in procs.items()}
        time.sleep(1)
    return peaks if seen else None


NO_NVML = "memory not measured: NVML unavailable (`pip install nvidia-ml-py`) or it lists no processes here"


def accuracy(run: dict) -> float:
    return float(run["metrics"]["accuracy"]) * 100


def check_matrix(env: dict[str, str], dataset: str) -> tuple[bool, dict[tuple[str, str], dict]]:
    one_gpu = {**env, "TLCORE_TRAIN_DEVICES": "/gpu:0"}
    runs, ok = {}, True
    for precision, xla in (("off", "off"), ("on", "off"), ("off", "on"), ("on", "on")):
        started = time.perf_counter()
        run = tlcore(one_gpu, "train", "--data", dataset, *RECIPE, "--mixed-precision", precision, "--xla", xla,
                     "--name", f"matrix mp={precision} xla={xla}")
        runs[(precision, xla)] = run
        label = f"matrix mixed precision {precision}, XLA {xla}"
        if run.get("status") != "succeeded":
            ok = verdict(False, label, run.get("error") or str(run)[:300]) and ok
            continue
        epochs = tlcore(env, "runs", "show", run["run_id"])["epochs"]
        losses = [e["metrics"].get("loss") for e in epochs]
        finite = all(loss is not None and loss == loss and abs(loss) != float("inf") for loss in losses)
        reference = runs[("off", "off")]
        gap = accuracy(reference) - accuracy(run) if "metrics" in reference else 0.0
        record = run.get("device_record") or {}
        ok = verdict(finite and gap <= ACCURACY_POINTS and record.get("mixed_precision") == (precision == "on")
                     and record.get("xla") == (xla == "on"), label,
                     f"accuracy {accuracy(run):.1f} % ({gap:+.1f} points below float32), losses finite: {finite}, "
                     f"{time.perf_counter() - started:.0f} s") and ok
    return ok, runs


def check_cpu_reload(env: dict[str, str], run_id: str) -> bool:
    cpu_only = {**env, "CUDA_VISIBLE_DEVICES": ""}
    result = python(cpu_only, f"""
        import json, numpy as np
        from tlcore.deploy import inference
        from tlcore.data.images import load_resized
        from tlcore.records.run_folder import RunFolder
        loaded = inference.load_run_model({run_id!r})
        import keras
        raw = keras.saving.load_model(str(RunFolder({run_id!r}).model), safe_mode=True)
        rows = [json.loads(l) for l in RunFolder({run_id!r}).predictions.read_text().splitlines()]
        probs = loaded.probabilities(np.stack([load_resized(r["path"], loaded.image_size) for r in rows]))
        gap = max(abs(float(p.max()) - r["confidence"]) for p, r in zip(probs, rows))
        same = all(loaded.labels[int(p.argmax())] == r["pred"] for p, r in zip(probs, rows))
        policies = sorted({{l.dtype_policy.name for l in raw.layers}})
        print(json.dumps({{"gap": gap, "same": same, "policies": policies, "n": len(rows)}}))
    """)
    if "error" in result:
        return verdict(False, "CPU reload of the mixed-precision model", result["error"])
    return verdict(result["same"] and result["gap"] < 1e-2 and result["policies"] == ["float32"],
                   "CPU reload of the mixed-precision model",
                   f"{result['n']} eval images, same top-1: {result['same']}, max confidence gap "
                   f"{result['gap']:.2e}, saved layer policies {result['policies']}")


def check_exports(env: dict[str, str], run_id: str) -> bool:
    """Exports with the GPU visible, as a user's `export` runs (the CLI's cap applies)."""
    ok = True
    for fmt in ("savedmodel", "tflite"):
        result = tlcore(env, "export", "--run", run_id, "--format", fmt)
        ok = verdict("error" not in result, f"export {fmt} of the mixed-precision model",
                     result.get("error") or str(result.get("path", result))[:200]) and ok
    result = tlcore(env, "export", "--run", run_id, "--format", "onnx")
    report = result.get("report") or {}
    return verdict("error" not in result and report.get("top1_agreement") == 1.0
                   and report.get("max_probability_difference", 1.0) < 1e-3, "export onnx and parity with Keras",
                   result.get("error") or f"top-1 agreement {report.get('top1_agreement')} on "
                   f"{report.get('eval_images')} images, max probability difference "
                   f"{report.get('max_probability_difference')}") and ok


def check_two_replicas(env: dict[str, str], dataset: str, gpus: int) -> bool:
    if gpus < 2:
        return verdict(None, "2-replica fine-tune and resume", f"needs 2 GPUs, this machine has {gpus}")
    two = {**env, "TLCORE_TRAIN_DEVICES": "/gpu:0,/gpu:1"}
    result = python(two, f"""
        import json
        from tlcore.queue import jobs
        from tlcore.cli import build_parser, config_from_args
        from tlcore.errors import RunCancelled
        from tlcore.records.store import Store
        from tlcore.train.training import execute_run
        store = Store()
        args = build_parser().parse_args(["train", "--data", {dataset!r}, *{RECIPE!r}, "--finetune-epochs", "3"])
        config = config_from_args(args)
        spec, ds = jobs.prepare(config, store)
        first = store.create_run("2 replicas, stopped", spec, status=jobs.RunStatus.RUNNING)
        try:
            execute_run(first.id, store, should_stop=lambda: len(store.epochs(first.id)) >= 5)
        except RunCancelled:
            pass
        store.finish_run(first.id, jobs.RunStatus.CANCELLED, error="stopped by the acceptance check")
        second = jobs.resume(first.id, store)
        store.start_run(second.id, "gpu-acceptance:1")
        summary = execute_run(second.id, store)
        losses = [e.metrics["loss"] for e in store.epochs(first.id) + store.epochs(second.id)]
        print(json.dumps({{"accuracy": summary.metrics.accuracy, "losses": losses,
                          "record": summary.device_record.to_dict()}}))
    """, timeout=900)
    if "error" in result:
        return verdict(False, "2-replica fine-tune and resume", result["error"])
    finite = all(loss == loss and abs(loss) != float("inf") for loss in result["losses"])
    return verdict(finite and result["record"]["replicas"] == 2, "2-replica fine-tune and resume",
                   f"accuracy {result['accuracy'] * 100:.1f} %, losses finite: {finite}, {result['record']}")


def check_shared_gpu(env: dict[str, str], dataset: str, run_id: str) -> bool:
    ui = {**env, "TLCORE_UI_DEVICE": "gpu:0", "TLCORE_UI_GPU_MEMORY_MB": str(UI_CAP_MB)}
    dashboard = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, numpy as np
        from tlcore.train import devices
        from tlcore.deploy import inference
        print(devices.declare_process("dashboard"), flush=True)
        loaded = inference.load_run_model({run_id!r})
        end = time.time() + 60
        while time.time() < end:
            loaded.probabilities(np.zeros((8, loaded.image_size, loaded.image_size, 3), np.uint8))
    """)], env=ui, cwd=ROOT)
    worker = subprocess.Popen([sys.executable, "-m", "tlcore", "train", "--data", dataset, *RECIPE,
                               "--name", "beside the dashboard"], env={**env, "TLCORE_TRAIN_DEVICES": "/gpu:0"},
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = watch_memory({"dashboard": dashboard, "worker": worker}, worker)
    dashboard.wait(timeout=120)
    exits = f"worker exit {worker.returncode}, dashboard exit {dashboard.returncode}"
    if worker.returncode != 0 or dashboard.returncode != 0:
        return verdict(False, "dashboard and worker on one GPU", exits)
    if peaks is None:
        return verdict(None, "dashboard and worker on one GPU", f"{exits}; {NO_NVML}")
    # The cap bounds TensorFlow's allocator; the CUDA context adds a few hundred MB on top.
    return verdict(peaks["dashboard"] <= UI_CAP_MB + 600, "dashboard and worker on one GPU",
                   f"dashboard peak {peaks['dashboard']} MB (cap {UI_CAP_MB} MB + CUDA context), worker peak "
                   f"{peaks['worker']} MB; {exits}")


def check_dashboard_paths(env: dict[str, str], dataset: str, run_id: str) -> bool:
    """The dashboard's other GPU paths (LR finder, audit, export) in one process under its cap."""
    ui = {**env, "TLCORE_UI_DEVICE": "gpu:0", "TLCORE_UI_GPU_MEMORY_MB": str(UI_CAP_MB)}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from tlcore.evaluate import audit
        from tlcore.train import devices, lr_finder
        from tlcore.deploy import export
        from tlcore.records.config import TrainConfig
        print(devices.declare_process("dashboard"), flush=True)
        lr_finder.find_lr(TrainConfig(dataset={dataset!r}, image_size=160))
        audit.audit_dataset({dataset!r})
        export.export_run({run_id!r}, "tflite-int8")
    """)], env=ui, cwd=ROOT)
    peaks = watch_memory({"dashboard": child}, child)
    if child.returncode != 0:
        return verdict(False, "dashboard LR finder, audit and export under the cap", f"exit {child.returncode}")
    if peaks is None:
        return verdict(None, "dashboard LR finder, audit and export under the cap", f"all ran; {NO_NVML}")
    return verdict(peaks["dashboard"] <= UI_CAP_MB + 600, "dashboard LR finder, audit and export under the cap",
                   f"peak {peaks['dashboard']} MB (cap {UI_CAP_MB} MB + CUDA context)")


def check_serve(env: dict[str, str], run_id: str, port: int = 8765) -> bool:
    """`tlcore serve` on the GPU (capped): every answer 200, p50 latency with 8 concurrent clients."""
    import concurrent.futures
    import statistics
    import urllib.request

    errors = Path(env["TLCORE_HOME"]) / "serve-acceptance.log"
    with open(errors, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "tlcore", "serve", "--run", run_id, "--port", str(port)],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        health = None
        for _ in range(600):
            if server.poll() is not None:
                break
            try:
                health = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        if health is None:
            tail = (errors.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            return verdict(False, "serve on the GPU, 8 concurrent clients",
                           f"the server did not answer in 300 s (exit {server.poll()}): {tail}")
        rows = [json.loads(line) for line in (Path(env["TLCORE_HOME"]) / "runs" / run_id / "predictions.jsonl")
                .read_text().splitlines()]
        photo = Path(rows[0]["path"]).read_bytes()
        boundary = "tlabacceptance"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()

        def one(_):
            request = urllib.request.Request(f"{base}/v1/predict", data=body, method="POST",
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, (time.perf_counter() - started) * 1000

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(160)))
        statuses = {status for status, _ in answers}
        p50 = statistics.median(ms for _, ms in answers)
        on_gpu = "on GPU" in str(health.get("device_policy"))
        return verdict(statuses == {200} and on_gpu, "serve on the GPU, 8 concurrent clients",
                       f"p50 {p50:.1f} ms over {len(answers)} requests, statuses {sorted(statuses)}, "
                       f"policy {health.get('device_policy')!r}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def check_ray_gpu(env: dict[str, str]) -> bool:
    result = python(env, """
        import json
        try:
            import ray
        except ImportError:
            print(json.dumps({"skip": "Ray is not installed (requirements-cluster.txt)"}))
            raise SystemExit
        ray.init(num_cpus=2, include_dashboard=False)

        @ray.remote(num_gpus=1)
        def on_gpu():
            from tlcore.train import devices
            return {"policy": devices.declare_process("ray_task"), "tf_gpus": devices.gpus(),
                    "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()]}

        print(json.dumps(ray.get(on_gpu.remote(), timeout=300)))
    """)
    if "skip" in result:
        return verdict(None, "Ray task on the GPU", result["skip"])
    if "error" in result:
        return verdict(False, "Ray task on the GPU", result["error"])
    return verdict(bool(result["tf_gpus"]) and bool(result["ray_gpu_ids"]), "Ray task on the GPU",
                   f"Ray gave GPU {result['ray_gpu_ids']}, TensorFlow in the task sees {result['tf_gpus']}; "
                   f"{result['policy']}")


def check_compile_counts(env: dict[str, str], run_id: str) -> bool:
    """Traces on the GPU (with XLA each is a compile): training with a ragged dataset size, serving 1..32."""
    result = python({**env, "TLCORE_TRAIN_DEVICES": "/gpu:0"}, f"""
        import json, keras, numpy as np
        from tlcore.train import devices
        from tlcore.deploy import inference
        from tlcore.data import pipeline
        devices.declare_process("worker")
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
        traces = []
        step = model.train_step
        model.train_step = lambda batch: (traces.append(str(tuple(batch[0].shape))), step(batch))[1]
        images = np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
        data, steps = pipeline.epoch_batches(images, np.arange(37), np.arange(37) % 2, 8, seed=0, epochs=3)
        model.fit(data, steps_per_epoch=steps, epochs=3, verbose=0)
        loaded = inference.load_run_model({run_id!r})
        serve_traces = []
        predict = loaded._predictor.predict_step
        loaded._predictor.predict_step = lambda data: (serve_traces.append(1), predict(data))[1]
        loaded.warm_up(inference.BATCH_BUCKETS)
        warmed = len(serve_traces)
        for n in range(1, 33):
            loaded.probabilities(np.zeros((n, loaded.image_size, loaded.image_size, 3), np.uint8))
        print(json.dumps({{"train_traces": len(traces), "train_shapes": sorted(set(traces)), "warm_up_traces": warmed,
                          "serving_traces_after": len(serve_traces) - warmed}}))
    """)
    if "error" in result:
        return verdict(False, "compile counts", result["error"])
    # A first trace that creates the optimizer's variables is traced again by TensorFlow: what
    # recompiles is a new input shape, so the check counts shapes.
    return verdict(len(result["train_shapes"]) == 1 and result["serving_traces_after"] == 0, "compile counts",
                   f"training (XLA, 37 images in batches of 8, 3 epochs): {result['train_traces']} trace(s) of "
                   f"input shapes {result['train_shapes']}; "
                   f"serving: {result['warm_up_traces']} at warm-up, {result['serving_traces_after']} after it "
                   "for batch sizes 1..32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary data home")
    args = parser.parse_args()
    started = time.perf_counter()
    names = gpu_names()
    if not names:
        verdict(None, "every check", "no NVIDIA GPU (nvidia-smi finds none); nothing to accept on this machine")
        return 0
    home = Path(tempfile.mkdtemp(prefix="tlab-gpu-acceptance-"))
    env = {**os.environ, "TLCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    env.pop("TLCORE_TRAIN_DEVICES", None)
    probe = python(env, "import json; from tlcore.train import devices; print(json.dumps(devices.describe()))")
    ok = verdict("error" not in probe and probe.get("kind") == "GPU", "TensorFlow sees the GPUs",
                 f"nvidia-smi: {len(names)} x {names[0]}; TensorFlow: {probe.get('summary') or probe.get('error')}")
    dataset = "textures"
    imported = python(env, f"""
        import json
        from tlcore.data.builtin import import_builtin
        print(json.dumps({{"id": import_builtin({dataset!r}).dataset.id}}))
    """)
    if "error" in imported:
        verdict(False, "import the built-in dataset", imported["error"])
        return 1
    matrix_ok, runs = check_matrix(env, dataset)
    ok = matrix_ok and ok
    mixed = runs.get(("on", "off"), {})
    if "run_id" in mixed:
        ok = check_cpu_reload(env, mixed["run_id"]) and ok
        ok = check_exports(env, mixed["run_id"]) and ok
        ok = check_shared_gpu(env, dataset, mixed["run_id"]) and ok
        ok = check_dashboard_paths(env, dataset, mixed["run_id"]) and ok
        ok = check_serve(env, mixed["run_id"]) and ok
        ok = check_compile_counts(env, mixed["run_id"]) and ok
    ok = check_ray_gpu(env) and ok
    ok = check_two_replicas(env, dataset, len(names)) and ok
    print(f"{'PASS' if ok else 'FAIL'}  all checks: {time.perf_counter() - started:.0f} s, data home {home}"
          + ("" if args.keep else " (removed)"), flush=True)
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
