"""GPU acceptance: what a person with 1-8 NVIDIA GPUs runs to prove the GPU path end to end.

    bash tools/gpu_acceptance.sh            (or: python bench/gpu_acceptance.py [--keep])

Prints one verdict line per check (PASS, FAIL or SKIP, then what was measured) and exits 1 if
any check failed. Everything runs in a fresh data home on the built-in "textures" dataset
(no download, EfficientNet-Lite0's packaged weights), each training in its own process:
1. precision x XLA matrix on one GPU: every combination succeeds, no NaN loss, accuracy within
   3 points of float32 without XLA;
2. the mixed-precision model reloads as float32 on the CPU and predicts what evaluation wrote;
3. it exports to SavedModel and TFLite;
4. with 2+ GPUs: a 2-replica fine-tune, stopped after an epoch and resumed to the end;
5. the dashboard's model process (one GPU, capped) and a training worker on the same GPU at
   once, with their memory as `nvidia-smi` reports it.
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


def gpu_memory_by_pid() -> dict[int, int]:
    """MB of GPU memory per process, as nvidia-smi reports it."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    used: dict[int, int] = {}
    for line in out.stdout.splitlines():
        pid, _, mb = line.partition(",")
        if pid.strip().isdigit() and mb.strip().isdigit():
            used[int(pid)] = used.get(int(pid), 0) + int(mb)
    return used


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
        from tlcore import inference
        from tlcore.data.images import load_resized
        from tlcore.run_folder import RunFolder
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
    ok = True
    for fmt in ("savedmodel", "tflite"):
        result = tlcore({**env, "CUDA_VISIBLE_DEVICES": ""}, "export", "--run", run_id, "--format", fmt)
        ok = verdict("error" not in result, f"export {fmt} of the mixed-precision model",
                     result.get("error") or str(result.get("path", result))[:200]) and ok
    return ok


def check_two_replicas(env: dict[str, str], dataset: str, gpus: int) -> bool:
    if gpus < 2:
        return verdict(None, "2-replica fine-tune and resume", f"needs 2 GPUs, this machine has {gpus}")
    two = {**env, "TLCORE_TRAIN_DEVICES": "/gpu:0,/gpu:1"}
    result = python(two, f"""
        import json
        from tlcore import jobs
        from tlcore.cli import build_parser, config_from_args
        from tlcore.errors import RunCancelled
        from tlcore.store import Store
        from tlcore.training import execute_run
        store = Store()
        args = build_parser().parse_args(["train", "--data", {dataset!r}, *{RECIPE!r}, "--finetune-epochs", "3"])
        config = config_from_args(args)
        config_dict, ds = jobs.prepare(config, store)
        first = store.create_run("2 replicas, stopped", ds.id, config.backbone, config.weights, config_dict,
                                 status=jobs.RunStatus.RUNNING)
        try:
            execute_run(first.id, store, should_stop=lambda: len(store.epochs(first.id)) >= 5)
        except RunCancelled:
            pass
        store.finish_run(first.id, jobs.RunStatus.CANCELLED, error="stopped by the acceptance check")
        second = jobs.resume(first.id, store)
        store.update_run(second.id, status=jobs.RunStatus.RUNNING)
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
        from tlcore import devices, inference
        print(devices.declare_process("dashboard"), flush=True)
        loaded = inference.load_run_model({run_id!r})
        end = time.time() + 60
        while time.time() < end:
            loaded.probabilities(np.zeros((8, loaded.image_size, loaded.image_size, 3), np.uint8))
    """)], env=ui, cwd=ROOT)
    worker = subprocess.Popen([sys.executable, "-m", "tlcore", "train", "--data", dataset, *RECIPE,
                               "--name", "beside the dashboard"], env={**env, "TLCORE_TRAIN_DEVICES": "/gpu:0"},
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_ui = peak_worker = 0
    while worker.poll() is None:
        used = gpu_memory_by_pid()
        peak_ui, peak_worker = max(peak_ui, used.get(dashboard.pid, 0)), max(peak_worker, used.get(worker.pid, 0))
        time.sleep(1)
    dashboard.wait(timeout=120)
    # The cap bounds TensorFlow's allocator; the CUDA context adds a few hundred MB on top.
    return verdict(worker.returncode == 0 and dashboard.returncode == 0 and peak_ui <= UI_CAP_MB + 600,
                   "dashboard and worker on one GPU",
                   f"dashboard peak {peak_ui} MB (cap {UI_CAP_MB} MB + CUDA context), worker peak {peak_worker} MB, "
                   f"worker exit {worker.returncode}, dashboard exit {dashboard.returncode}")


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
    probe = python(env, "import json; from tlcore import devices; print(json.dumps(devices.describe()))")
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
    ok = check_two_replicas(env, dataset, len(names)) and ok
    print(f"{'PASS' if ok else 'FAIL'}  all checks: {time.perf_counter() - started:.0f} s, data home {home}"
          + ("" if args.keep else " (removed)"), flush=True)
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
