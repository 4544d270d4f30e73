"""One measured side of the benchmark, run in its own process by `bench/run.py`.

    python bench/worker.py TASK ARGS.json RESULT.json

TASK is `baseline` (the Keras tutorial recipe), `tlcore` (the same job through
`tlcore.train.training.execute_run`) or `probe` (demo latency of a saved run, then the raw
forward and forward+backward throughput of the backbone on tensors already in memory).
`$TLCORE_HOME` is set by the caller.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tlcore.records.atomic import write_text_atomically  # noqa: E402


def task_baseline(args: dict) -> dict:
    from bench.baseline import run_baseline

    return run_baseline(**args)


def task_tlcore(args: dict) -> dict:
    from tlcore.records.config import RunSpec, TrainConfig
    from tlcore.records.store import RunStatus, Store
    from tlcore.train.training import execute_run

    wall0, t0 = time.time(), time.perf_counter()
    store = Store()
    config = TrainConfig(**args["config"])
    run = store.create_run("bench", RunSpec(config), status=RunStatus.RUNNING)
    summary = execute_run(run.id, store)
    total = time.perf_counter() - t0
    store.finish_run(run.id, RunStatus.SUCCEEDED, summary=summary)
    epochs = [{"phase": e.phase, "epoch": e.epoch, "elapsed_s": e.at - wall0, **e.metrics}
              for e in store.epochs(run.id)]
    return {"run_id": run.id, "summary": summary.to_dict(), "epochs": epochs, "wall_s": total,
            "accuracy": summary.metrics.accuracy, "macro_f1": summary.metrics.macro_f1}


def _pace(step, min_seconds: float, min_steps: int = 3) -> tuple[float, int]:
    """Seconds per call of `step` after two warm-up calls, timed over >= min_seconds."""
    step()
    step()
    n, t = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t < min_seconds:
        step()
        n += 1
    return (time.perf_counter() - t) / n, n


def task_probe(args: dict) -> dict:
    import keras
    import tensorflow as tf

    out: dict = {}
    # Demo latency first, while nothing of the model is loaded in this process yet.
    run_id, files = args.get("run_id"), args.get("demo_files") or []
    if run_id and files:
        try:
            from tlcore.deploy.inference import load_run_model
        except ImportError:
            load_run_model = None
        blobs = [Path(f).read_bytes() for f in files]
        if load_run_model is not None:
            t = time.perf_counter()
            loaded = load_run_model(run_id)
            out["demo_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            loaded.predict_image(blobs[0])
            out["demo_cold_ms"] = (time.perf_counter() - t) * 1000
            out["demo_via"] = "tlcore.deploy.inference.load_run_model(run_id).predict_image(file bytes)"
            predict = loaded.predict_image
        else:  # fallback: a keras model on one load_resized image through a tf.function
            from tlcore.data.images import load_resized
            from tlcore.records.run_folder import RunFolder

            t = time.perf_counter()
            model = keras.saving.load_model(RunFolder(run_id).model, compile=False)
            forward = tf.function(lambda x: model(x, training=False))
            out["demo_load_s"] = time.perf_counter() - t
            size = int(model.input_shape[1])

            def predict(data):
                import io
                return forward(load_resized(io.BytesIO(data), size)[None].astype("float32")).numpy()

            t = time.perf_counter()
            predict(blobs[0])
            out["demo_cold_ms"] = (time.perf_counter() - t) * 1000
            out["demo_via"] = "keras model + tf.function on load_resized(file bytes)"
        latencies = []
        for i in range(args.get("demo_repeats", 100)):
            t = time.perf_counter()
            predict(blobs[i % len(blobs)])
            latencies.append((time.perf_counter() - t) * 1000)
        out["demo_p50_ms"] = float(np.percentile(latencies, 50))
        out["demo_p95_ms"] = float(np.percentile(latencies, 95))
        out["demo_n"] = len(latencies)

    # Raw backbone pace on tensors already in memory (the ceiling a pipeline can reach), for the
    # stock Keras model and for the BatchNorm-folded twin tlcore actually runs.
    from tlcore.backbones import get_backbone, resolve_weights
    from tlcore.backbones.classifier import build_classifier, compile_classifier, unfreeze_top
    from tlcore.backbones.folding import fold_batchnorm

    size, batch, classes = args["size"], args["batch_size"], args["num_classes"]
    spec = get_backbone("efficientnet_lite0")
    classifier = build_classifier(spec, size, resolve_weights(spec, "imagenet"), classes, 0.2)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, size, size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, classes, batch).astype("int32"))
    feature_model = classifier.features_model()
    for key, features in (("fwd", feature_model), ("fwd_folded", fold_batchnorm(feature_model))):
        forward = tf.function(lambda images, features=features: features(images, training=False))
        seconds, n = _pace(lambda forward=forward: forward(x).numpy(), args.get("min_seconds", 10))
        out[f"{key}_img_s"], out[f"{key}_batches"] = batch / seconds, n

    unfreeze_top(classifier.backbone, args["finetune_layers"])
    for key, trainer in (("fwdbwd", classifier.model), ("fwdbwd_folded", fold_batchnorm(classifier.model))):
        compile_classifier(trainer, 1e-4)  # tlcore's own compile for the fine-tune phase
        seconds, n = _pace(lambda trainer=trainer: trainer.train_on_batch(x, y), args.get("min_seconds", 10))
        out[f"{key}_img_s"], out[f"{key}_batches"] = batch / seconds, n
    out["batch_size"] = batch
    return out


def main() -> None:
    task, args_path, result_path = sys.argv[1:4]
    args = json.loads(Path(args_path).read_text())
    result = {"baseline": task_baseline, "tlcore": task_tlcore, "probe": task_probe}[task](args)
    write_text_atomically(result_path, json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
