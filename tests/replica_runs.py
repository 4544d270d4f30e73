"""Runs for tests/test_gpu_path.py, in a fresh process whose CPU is split into two logical
devices, so that MirroredStrategy trains two replicas the way it would on two GPUs.

Usage: python tests/replica_runs.py DATASET_ID OUT_JSON (with $TLCORE_HOME set). Writes what
each run produced as JSON; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import tensorflow as tf

# Before anything touches the runtime: one physical CPU seen as two devices.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tlcore.backbones.classifier import compile_classifier  # noqa: E402
from tlcore.errors import RunCancelled  # noqa: E402
from tlcore.records.config import RunSpec, TrainConfig  # noqa: E402
from tlcore.records.run_folder import RunFolder  # noqa: E402
from tlcore.records.store import RunStatus, Store  # noqa: E402
from tlcore.train import devices  # noqa: E402
from tlcore.train.training import execute_run  # noqa: E402

TWO_REPLICAS = "/cpu:0,/cpu:1"
ONE_DEVICE = "/cpu:0"  # OneDeviceStrategy, the one-GPU path
DEFAULT = ""  # no devices named and no GPU: the default strategy
# Nothing random inside the model, so that runs can be compared: each replica would draw its
# own head dropout masks, so head dropout is off. The backbone runs with training=False, so no
# backbone draws anything (EfficientNet-Lite's drop-connect included: two calls differ by 0.0);
# MobileNetV2 from random weights because it needs nothing downloaded.
# The fine-tune on pixels, the path several replicas take, so that every strategy trains the same way
# (on one device the default would train on cached activations, without the zoom).
# The dataset has a validation split apart from the test split, so each run ends with the average of its
# head's and its fine-tuned weights: a resumed run must read the head's from the stopped run's checkpoint.
# One head (no search, no class weighting), as a run on several GPUs would fit it.
RECIPE = dict(backbone="mobilenet_v2", weights="none", image_size=32, batch_size=4, batch_scope="global",
              head_epochs=1, finetune_epochs=2, finetune_layers=10, finetune_inputs="pixels", augment=("flip", "zoom"),
              dropout=0.0, lr=0.05,  # a rate that moves the outputs well away from uniform in a few steps
              head_search="off", class_weight="none")


def _create(store: Store, dataset_id: str, name: str, config: TrainConfig, extra=None):
    return store.create_run(name, RunSpec.from_dict({**config.to_dict(), **(extra or {})}, dataset_id=dataset_id),
                            status=RunStatus.RUNNING)


def _result(store: Store, run_id: str, summary) -> dict:
    rows = [json.loads(line) for line in RunFolder(run_id).predictions.read_text().splitlines()]
    return {"run_id": run_id, "device_record": summary.device_record.to_dict(), "model_path": summary.model_path,
            "probabilities": [[p for _, p in sorted(row["topk"])] for row in rows],
            "losses": [e.metrics["loss"] for e in store.epochs(run_id)],
            "epochs": [(e.phase, e.epoch, e.step) for e in store.epochs(run_id)],
            "has_model": RunFolder(run_id).model.exists(),
            "finetune": summary.finetune.to_dict() if summary.finetune else None,
            "log": "\n".join(line.message for line in store.logs(run_id))}


def _use(devices: str) -> None:
    if devices:
        os.environ["TLCORE_TRAIN_DEVICES"] = devices
    else:
        os.environ.pop("TLCORE_TRAIN_DEVICES", None)


def uninterrupted(store: Store, dataset_id: str, devices: str) -> dict:
    """The recipe from start to end without a stop."""
    _use(devices)
    config = TrainConfig(dataset=dataset_id, **RECIPE)
    run = _create(store, dataset_id, f"uninterrupted on {devices or 'the default strategy'}", config)
    return _result(store, run.id, execute_run(run.id, store))


def interrupted_then_resumed(store: Store, dataset_id: str, first_devices: str, then_devices: str) -> dict:
    """Head on cached features and one fine-tune epoch on `first_devices`, stopped; then resumed to
    the end on `then_devices` (as a run moved to another machine would be)."""
    _use(first_devices)
    config = TrainConfig(dataset=dataset_id, **RECIPE)
    first = _create(store, dataset_id, f"interrupted on {first_devices}", config)
    try:
        execute_run(first.id, store, should_stop=lambda: len(store.epochs(first.id)) >= 2)
        raise AssertionError("the run was not stopped after its first fine-tune epoch")
    except RunCancelled:
        pass
    stopped_at = json.loads(RunFolder(first.id).checkpoint_state.read_text())
    _use(then_devices)
    second = _create(store, dataset_id, f"resumed on {then_devices}", config, {"resume_from": first.id})
    result = _result(store, second.id, execute_run(second.id, store))
    result["first_log"] = "\n".join(line.message for line in store.logs(first.id))
    result["first_strategy"] = re.search(r"strategy (\w+)", result["first_log"]).group(1)
    result["interrupted_run_id"] = first.id
    result["stopped_checkpoint"] = stopped_at
    result["stopped_has_model"] = RunFolder(first.id).model.exists()
    return result


def resumed_from_weights_only(store: Store, dataset_id: str, interrupted_run_id: str) -> dict:
    """The same stopped run resumed after its optimizer state was removed, as a checkpoint from
    before that state was kept: it still resumes, from the weights."""
    _use(DEFAULT)
    RunFolder(interrupted_run_id).checkpoint_training_state.unlink()
    config = TrainConfig(dataset=dataset_id, **RECIPE)
    run = _create(store, dataset_id, "resumed from weights only", config, {"resume_from": interrupted_run_id})
    return _result(store, run.id, execute_run(run.id, store))


def mixed_precision_run(store: Store, dataset_id: str) -> dict:
    """Two replicas with mixed precision forced on (float16 compute on a CPU: slow, but runs).

    Head only: its head trains through the loss-scale optimizer on both replicas, and the
    evaluation runs the whole saved model on pixels (never the cached-feature shortcut under
    mixed precision); a fine-tune would only add minutes of graph tracing.
    """
    os.environ["TLCORE_TRAIN_DEVICES"] = TWO_REPLICAS
    config = TrainConfig(dataset=dataset_id, **{**RECIPE, "finetune_epochs": 0, "mixed_precision": "on"})
    run = _create(store, dataset_id, "mixed precision", config)
    return _result(store, run.id, execute_run(run.id, store))


def overflow_on_one_replica() -> dict:
    """One training step where only the second replica's half of the batch overflows float16."""
    os.environ["TLCORE_TRAIN_DEVICES"] = TWO_REPLICAS
    strategy = devices.apply(devices.plan("on", "off"))
    with strategy.scope():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4),
                                  keras.layers.Dense(2, activation="softmax", dtype="float32")])
        compile_classifier(model, 0.1)
    before = [w.copy() for w in model.get_weights()]
    x = np.array([[1, 2], [3, 4], [1e5, 1e5], [1e5, 1e5]], np.float32)  # 1e5 > float16's max (65504)
    model.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, shuffle=False, verbose=0)
    after = model.get_weights()
    return {"weights_finite": all(bool(np.isfinite(w).all()) for w in after),
            "weights_unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
            "loss_scale": float(np.asarray(model.optimizer.dynamic_scale))}


def features_across_replicas() -> dict:
    """Backbone-feature extraction under two replicas: each batch split across both, same features."""
    from tlcore.backbones.features import extract_features

    _use(TWO_REPLICAS)
    strategy = devices.apply(devices.plan("off", "off"))
    traced = []

    class Spy(keras.layers.Layer):
        def call(self, x):
            traced.append(int(x.shape[0]) if x.shape[0] is not None else None)  # runs while tracing only
            return x

    with strategy.scope():
        model = keras.Sequential([keras.Input((8, 8, 3)), Spy(), keras.layers.Conv2D(4, 3),
                                  keras.layers.GlobalAveragePooling2D()])
    traced.clear()  # building the model called it once, symbolically
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    split = extract_features(model, images, 4, strategy=strategy)
    split_traces = list(traced)
    whole = extract_features(model, images, 4)
    return {"split_traces": split_traces, "whole_traces": traced[len(split_traces):],
            "max_gap": float(np.abs(split - whole).max())}


def main(dataset_id: str, out: str) -> None:
    store = Store()
    results, timings = {}, {}
    for name, job in (("resumed", lambda: interrupted_then_resumed(store, dataset_id, ONE_DEVICE, TWO_REPLICAS)),
                      ("default", lambda: uninterrupted(store, dataset_id, DEFAULT)),
                      ("weights_only", lambda: resumed_from_weights_only(
                          store, dataset_id, results["resumed"]["interrupted_run_id"])),
                      ("mixed_precision", lambda: mixed_precision_run(store, dataset_id)),
                      ("overflow", overflow_on_one_replica),
                      ("features", features_across_replicas)):
        started = time.perf_counter()
        results[name] = job()
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {timings[name]} s", flush=True)
    results["timings_s"] = timings
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
