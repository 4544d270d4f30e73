"""The two-phase transfer recipe, run for one stored run.

Phase 1 (head): the backbone is frozen. Without augmentation its pooled features are
computed once and cached, and a new softmax head trains on them in seconds.
Phase 2 (fine-tune): the top layers of the backbone are unfrozen (BatchNorm stays in inference
mode), the whole model trains on augmented pixels with a warm-up + cosine learning rate,
early stopping and best-epoch weights restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np

from tlcore import devices, home
from tlcore.backbones import get_backbone, resolve_weights
from tlcore.backbones.folding import fold_batchnorm
from tlcore.backbones.preprocessing import BackbonePreprocessing
from tlcore.config import TrainConfig
from tlcore.data import pipeline
from tlcore.data.manifest import load_manifest, resplit
from tlcore.evaluation import compute_report, write_predictions
from tlcore.features import cached_features, feature_cache_path, pad_batch
from tlcore.store import Store

TOP_K = 5


class RunCancelled(Exception):
    """The run was asked to stop; raised between batches."""


@dataclasses.dataclass
class _Context:
    """What the phases of one run share."""

    run_id: str
    store: Store
    config: TrainConfig
    folder: Path
    should_stop: Callable[[], bool]
    progress_bar: bool
    step: int = 0  # epochs finished across phases: the x axis of the curves
    last_beat: float = 0.0

    def log(self, message: str) -> None:
        self.store.log(self.run_id, message)
        if self.progress_bar:
            print(message, flush=True)

    def beat(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Write progress at most once a second; True when the run should stop."""
        now = time.monotonic()
        cancel = False
        if force or now - self.last_beat > 1.0:
            self.last_beat = now
            cancel = self.store.heartbeat(self.run_id, progress)
        return cancel or self.should_stop()


def execute_run(run_id: str, store: Store, *, should_stop: Callable[[], bool] = lambda: False,
                progress_bar: bool = False) -> dict[str, Any]:
    """Train, evaluate and save run `run_id` from its stored config; return its summary.

    Writes epochs, logs and progress to `store` as it goes and artifacts to the run folder.
    Raises `RunCancelled` if `should_stop()` (or a cancel in the store) stops it. The caller
    sets the final status.
    """
    started = time.perf_counter()
    run = store.get_run(run_id)
    config = TrainConfig.from_dict(run.config)
    ctx = _Context(run_id, store, config, home.run_dir(run_id), should_stop, progress_bar)
    timings: dict[str, float] = {}

    dataset = store.get_dataset(run.dataset_id)
    spec = get_backbone(config.backbone)
    size = config.image_size or spec.default_size
    if size < spec.min_size:
        raise ValueError(f"`image_size` must be at least {spec.min_size} for {spec.display_name}. "
                         f"Received: image_size={size}")
    entries = load_manifest(dataset.id)
    if config.split and not dataset.report.get("given_splits"):
        entries = resplit(entries, config.split, config.seed)
    labels = list(dataset.classes)
    y_all = np.array([labels.index(e.label) for e in entries], dtype=np.int32)
    splits = pipeline.split_indices(entries)
    eval_split = "test" if len(splits["test"]) else "val"
    if not len(splits["train"]) or not len(splits[eval_split]):
        raise ValueError(f"Dataset {dataset.label} needs images in both train and {eval_split} splits; "
                         f"it has {len(splits['train'])} and {len(splits[eval_split])}. Add images per class.")

    (ctx.folder / "config.json").write_text(json.dumps(
        {**config.to_dict(), "dataset_id": dataset.id, "image_size": size}, indent=2))
    (ctx.folder / "labels.json").write_text(json.dumps(labels))

    device_plan = devices.plan(config.mixed_precision, config.xla)
    strategy = devices.apply(device_plan)
    ctx.log(f"Device: {device_plan.describe()}.")
    keras.utils.set_random_seed(config.seed)

    t = time.perf_counter()
    ctx.beat({"phase": "preparing", "message": "Decoding images"}, force=True)
    pixels, reused = pipeline.pixel_cache(
        dataset.id, entries, size,
        on_progress=lambda done, total: ctx.beat({"phase": "preparing", "message": f"Decoded {done}/{total} images"}))
    timings["pixels_s"] = time.perf_counter() - t
    ctx.log(f"Pixel cache {'reused' if reused else 'built'}: {len(pixels)} images at {size} px "
            f"({timings['pixels_s']:.1f} s).")

    weights_path = resolve_weights(spec, config.weights)
    ctx.log(f"Backbone {spec.display_name}, weights: "
            f"{'ImageNet' if weights_path else 'none (random initialisation, no transfer)'}.")
    with strategy.scope():
        model, base = build_classifier(spec, size, weights_path, len(labels), config.dropout)

    resume = _resume_point(config, run.config.get("resume_from"))
    if resume:
        model.load_weights(resume["weights"])
        ctx.step = len(store.epochs(run.config["resume_from"]))
        ctx.log(f"Resumed from run {run.config['resume_from']} after {resume['phase']} epoch {resume['epoch']}.")

    head_on_features = None
    if config.head_epochs and not resume:
        t = time.perf_counter()
        if config.head_augment:
            _fit_pixels(ctx, model, pixels, splits, y_all, "head", config.head_epochs, config.lr,
                        config.augment, strategy, device_plan)
        else:
            head_on_features = _fit_head_on_features(ctx, model, spec, size, dataset.id, pixels, splits, y_all,
                                                     strategy, timings)
        timings["head_s"] = time.perf_counter() - t
        _save_checkpoint(ctx, model, "head", config.head_epochs)

    if config.finetune_epochs:
        t = time.perf_counter()
        unfrozen = unfreeze_top(base, config.finetune_layers)
        ctx.log(f"Fine-tuning the top {unfrozen} layers of {spec.display_name} (BatchNorm frozen), "
                f"lr {config.lr * config.finetune_lr_scale:g} with warm-up and cosine decay.")
        initial = resume["epoch"] if resume and resume["phase"] == "finetune" else 0
        _fit_pixels(ctx, model, pixels, splits, y_all, "finetune", config.finetune_epochs,
                    config.lr * config.finetune_lr_scale, config.augment, strategy, device_plan,
                    initial_epoch=initial, schedule=True)
        timings["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ctx.beat({"phase": "evaluating", "message": f"Evaluating on {eval_split}"}, force=True)
    eval_rows = np.sort(splits[eval_split])
    if head_on_features is not None and not config.finetune_epochs:
        # The head shares its weights with the saved model, so its output on the cached
        # features is the model's output on the pixels, without a second backbone pass.
        head, features = head_on_features
        probs = head.predict(features[eval_rows], batch_size=256, verbose=0)
    else:
        probs = model_probabilities(fold_batchnorm(model, only_frozen=False), pixels.images, eval_rows,
                                    config.batch_size)
    report_rows = prediction_rows(probs, eval_rows, entries, labels)
    write_predictions(ctx.folder, report_rows)
    import pandas as pd

    report = compute_report(labels, pd.DataFrame(report_rows))
    timings["eval_s"] = time.perf_counter() - t

    model_path = save_model_atomically(model, ctx.folder / "model.keras")
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "run_id": run_id,
        "status": "succeeded",
        "backbone": spec.name,
        "weights": config.weights,
        "dataset": dataset.label,
        "dataset_id": dataset.id,
        "image_size": size,
        "eval_split": eval_split,
        "eval_images": int(len(splits[eval_split])),
        "metrics": report.metrics(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "device": device_plan.describe(),
        "feature_cache_reused": bool(timings.get("features_reused")),
        "model_path": str(model_path),
    }
    ctx.log(f"Done: {eval_split} accuracy {report.accuracy:.4f}, macro F1 {report.macro_f1:.4f} "
            f"in {timings['total_s']:.1f} s.")
    return summary


def build_classifier(spec, size: int, weights_path: str | None, num_classes: int, dropout: float):
    """RGB 0-255 in, class probabilities out, preprocessing inside. Returns (model, backbone)."""
    inputs = keras.Input((size, size, 3), name="image")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocessing")(inputs)
    base = spec.build(size, weights_path)
    base.trainable = False
    # training=False keeps BatchNorm in inference mode even after the top layers are unfrozen.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier"), base


def unfreeze_top(base, n_layers: int) -> int:
    """Make the top `n_layers` weighted layers of `base` trainable, BatchNorm excluded."""
    base.trainable = True
    weighted = [layer for layer in base.layers if layer.weights]
    top = set(id(layer) for layer in weighted[-n_layers:]) if n_layers else set()
    count = 0
    for layer in base.layers:
        layer.trainable = id(layer) in top and not isinstance(layer, keras.layers.BatchNormalization)
        count += layer.trainable
    return count


def _compile(model, learning_rate, xla: bool) -> None:
    # Keras 3 compile takes keywords: a positional list would land in the wrong parameter.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=xla,
    )


def _fit_head_on_features(ctx, model, spec, size, dataset_id, pixels, splits, y_all, strategy, timings):
    config = ctx.config
    with strategy.scope():
        feature_model = fold_batchnorm(keras.Model(model.input, model.get_layer("pool").output))
    batch_size = max(config.batch_size, 32)

    def features_of(rows=None, mirror=False):
        path = feature_cache_path(dataset_id, spec.name, size, config.weights, config.seed,
                                  mirrored_rows=rows if mirror else None)
        bar = keras.utils.Progbar(len(pixels.images) if rows is None else len(rows),
                                  unit_name="image") if ctx.progress_bar else None

        def on_batch(done, total):
            if bar is not None:
                bar.update(done)
            if ctx.beat({"phase": "features", "message": f"Backbone features {done}/{total}",
                         "batch": done, "batches": total}):
                raise RunCancelled("Cancelled during feature extraction; the epochs logged so far are kept.")

        found, reused, seconds = cached_features(path, feature_model, pixels.images, batch_size, rows=rows,
                                                 mirror=mirror, on_batch=on_batch)
        what = "Mirrored training-image features" if mirror else "Backbone features"
        ctx.log(f"{what} {'reused from the cache' if reused else 'computed and cached'} "
                f"({len(found)} images, {seconds:.1f} s): {path.name}.")
        return found, reused, seconds

    features, reused, seconds = features_of()
    timings["features_s"] = seconds
    timings["features_reused"] = float(reused)
    train = splits["train"]
    x_train, y_train = features[train], y_all[train]
    if "flip" in config.augment:
        # Flip augmentation without giving up the cache: the head also sees each training image mirrored.
        mirrored, _, seconds = features_of(train, mirror=True)
        timings["features_s"] += seconds
        x_train, y_train = np.concatenate([x_train, mirrored]), np.concatenate([y_train, y_train])

    # The head model shares its layers with the classifier, so training it trains the classifier.
    with strategy.scope():
        feat_in = keras.Input(features.shape[1:], name="features")
        out = model.get_layer("head")(model.get_layer("head_dropout")(feat_in))
        head = keras.Model(feat_in, out, name="head_only")
        _compile(head, config.lr, xla=False)
    val = splits["val"]
    fit_val = (features[val], y_all[val]) if len(val) else None
    head.fit(
        x_train, y_train,
        batch_size=config.batch_size,
        epochs=config.head_epochs,
        validation_data=fit_val,
        shuffle=True,
        verbose=2 if ctx.progress_bar else 0,
        callbacks=_callbacks(ctx, "head", config.head_epochs, len(splits["train"]), has_val=bool(len(val))),
    )
    _raise_if_cancelled(ctx)
    return head, features


def _fit_pixels(ctx, model, pixels, splits, y_all, phase, epochs, learning_rate, augment, strategy,
                device_plan, *, initial_epoch: int = 0, schedule: bool = False):
    config = ctx.config
    train, val = splits["train"], splits["val"]
    steps = -(-len(train) // config.batch_size)
    if schedule:
        warmup = min(steps, max(1, steps * epochs // 10))
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=learning_rate * 0.1, decay_steps=max(1, steps * epochs - warmup),
            warmup_target=learning_rate, warmup_steps=warmup)
    with strategy.scope():
        # The twin shares every trainable weight with `model`: training it trains `model`.
        trainer = fold_batchnorm(model)
        _compile(trainer, learning_rate, device_plan.xla)
    train_data = pipeline.batches(pixels.images, train, y_all[train], config.batch_size,
                                  shuffle=True, seed=config.seed, augment=augment)
    val_data = (pipeline.batches(pixels.images, val, y_all[val], config.batch_size, shuffle=False, seed=0)
                if len(val) else None)
    trainer.fit(
        train_data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        validation_data=val_data,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=1 if ctx.progress_bar else 0,
        callbacks=_callbacks(ctx, phase, epochs, len(train), has_val=bool(len(val)),
                             checkpoint_model=model if phase == "finetune" else None),
    )
    _raise_if_cancelled(ctx)


def _callbacks(ctx, phase, epochs, train_images, *, has_val, checkpoint_model=None):
    monitor = "val_loss" if has_val else "loss"
    return [
        _StoreProgress(ctx, phase, epochs, checkpoint_model),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=ctx.config.early_stopping_patience,
                                      restore_best_weights=True, verbose=0),
        keras.callbacks.TensorBoard(log_dir=str(ctx.folder / "tensorboard" / phase), write_graph=False,
                                    profile_batch=0),
    ]


def _raise_if_cancelled(ctx):
    if ctx.beat({"phase": "stopping"}, force=True):
        raise RunCancelled("Cancelled by request; the epochs logged so far are kept.")


class _StoreProgress(keras.callbacks.Callback):
    """Streams batch progress and epoch metrics into the store; stops training on cancel."""

    def __init__(self, ctx: _Context, phase: str, epochs: int, checkpoint_model=None):
        super().__init__()
        self.ctx, self.phase, self.epochs = ctx, phase, epochs
        self.checkpoint_model = checkpoint_model
        self.cancelled = False
        self.epoch_started = time.monotonic()
        self.epoch_seconds: list[float] = []
        self.epoch = 1
        self.batches = None

    def _progress(self, batch: int | None) -> dict[str, Any]:
        """Progress in the current epoch (1-based `self.epoch`); the ETA covers it and the rest."""
        per_epoch = (sum(self.epoch_seconds) / len(self.epoch_seconds)) if self.epoch_seconds else None
        elapsed = time.monotonic() - self.epoch_started
        left = self.epochs - self.epoch + 1  # epochs not finished yet, the current one included
        eta = None
        if per_epoch is not None:
            eta = max(0.0, per_epoch * left - elapsed)
        elif batch and self.batches:
            eta = elapsed / batch * (self.batches * left - batch)
        return {"phase": self.phase, "epoch": self.epoch, "epochs": self.epochs, "batch": batch,
                "batches": self.batches, "eta_s": eta, "step": self.ctx.step}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self.epoch_started = time.monotonic()
        self.batches = self.params.get("steps") if self.params else None
        if self.ctx.beat(self._progress(0), force=True):
            self._stop()

    def on_train_batch_end(self, batch, logs=None):
        if self.ctx.beat(self._progress(batch + 1)):
            self._stop()

    def _stop(self):
        self.cancelled = True
        self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.monotonic() - self.epoch_started
        self.epoch_seconds.append(seconds)
        if self.cancelled:
            return
        self.ctx.step += 1
        metrics = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) or np.ndim(v) == 0}
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is not None:
            metrics["lr"] = float(np.asarray(lr))
        metrics["seconds"] = seconds
        self.ctx.store.log_epoch(self.ctx.run_id, self.phase, epoch + 1, self.ctx.step, metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in
                          ("loss", "accuracy", "val_loss", "val_accuracy"))
        self.ctx.log(f"{self.phase} epoch {epoch + 1}/{self.epochs}: {shown} ({seconds:.1f} s)")
        if self.checkpoint_model is not None:
            _save_checkpoint(self.ctx, self.checkpoint_model, self.phase, epoch + 1)
        self.epoch, self.epoch_started = epoch + 2, time.monotonic()
        self.ctx.beat(self._progress(0), force=True)


def _save_checkpoint(ctx, model, phase: str, epoch: int) -> None:
    """Weights after `phase` epoch `epoch`; a failed save keeps the previous checkpoint."""
    write_atomically(ctx.folder / home.CHECKPOINT_FILE, model.save_weights)
    write_atomically(ctx.folder / "checkpoint.json",
                     lambda tmp: tmp.write_text(json.dumps({"phase": phase, "epoch": epoch})))


def _resume_point(config: TrainConfig, resume_from: str | None) -> dict[str, Any] | None:
    if not resume_from:
        return None
    folder = home.data_home() / "runs" / resume_from
    state_path, weights = folder / "checkpoint.json", folder / home.CHECKPOINT_FILE
    if not (state_path.exists() and weights.exists()):
        raise ValueError(f"Run {resume_from} left no checkpoint to resume from; relaunch it instead.")
    return {**json.loads(state_path.read_text()), "weights": str(weights)}


def model_probabilities(model, images: np.ndarray, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities of the full model for the cached pixel rows `indices` (sorted)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(x):
        return model(tf.cast(x, tf.float32), training=False)

    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        out.append(forward(pad_batch(np.asarray(images[chunk]), batch_size)).numpy()[:len(chunk)])
    return np.concatenate(out)


def prediction_rows(probs: np.ndarray, indices: np.ndarray, entries, labels) -> list[dict[str, Any]]:
    """Per-image predictions (path, source, true, pred, confidence, top-k) for the rows `indices`."""
    rows = []
    k = min(TOP_K, len(labels))
    for index, p in zip(indices, probs):
        entry = entries[index]
        order = np.argsort(-p)[:k]
        rows.append({
            "path": str(entry.path),
            "source": getattr(entry, "source", str(entry.path)),
            "true": entry.label,
            "pred": labels[int(order[0])],
            "confidence": float(p[order[0]]),
            "topk": [[labels[int(i)], float(p[i])] for i in order],
        })
    return rows


def save_model_atomically(model, path: Path) -> Path:
    """Save the model; a full disk leaves the previous `path` readable."""
    return write_atomically(path, model.save)


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`.

    A failure (a full disk, say) removes the partial file, keeps the old `path` intact and is
    raised as an `OSError` that says what to do.
    """
    tmp = path.with_name(f"{path.name.split('.')[0]}.tmp{os.getpid()}{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, f"Could not save {path.name} in {path.parent} ({exc.strerror or exc}). "
                                 "Free disk space and resume the run; the previous file is kept.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
