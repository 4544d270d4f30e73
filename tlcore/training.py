"""The two-phase transfer recipe, run for one stored run.

Phase 1 (head): the backbone is frozen. Without augmentation its pooled features are
computed once and cached, and a new softmax head trains on them in seconds.
Phase 2 (fine-tune): the top layers of the backbone are unfrozen (BatchNorm stays in inference
mode), the whole model trains on augmented pixels with a warm-up + cosine learning rate,
early stopping and best-epoch weights restored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
import pandas as pd

from tlcore import devices
from tlcore.atomic import write_atomically
from tlcore.backbones import get_backbone, resolve_weights
from tlcore.backbones.folding import fold_batchnorm
from tlcore.backbones.preprocessing import BackbonePreprocessing
from tlcore.config import TrainConfig
from tlcore.data import pipeline
from tlcore.data.manifest import run_entries
from tlcore.errors import InvalidInput, RunCancelled
from tlcore.evaluation import EvalReport, compute_report, write_predictions
from tlcore.features import cached_features, feature_cache_path, pad_batch
from tlcore.run_folder import Checkpoint, RunFolder
from tlcore.run_record import RunProgress, RunSummary, Timings
from tlcore.store import Store

TOP_K = 5


class _Training:
    """One run being trained: what its steps share, and the steps in the order they run."""

    def __init__(self, run_id: str, store: Store, should_stop: Callable[[], bool], progress_bar: bool):
        self.run = store.get_run(run_id)
        self.run_id, self.store = run_id, store
        self.config = TrainConfig.from_dict(self.run.config)
        self.folder = RunFolder(run_id).created()
        self.should_stop, self.progress_bar = should_stop, progress_bar
        self.step = 0  # epochs finished across phases: the x axis of the curves
        self.last_beat = 0.0
        self.timings: dict[str, float] = {}
        self.head_on_features: tuple[Any, np.ndarray] | None = None
        self.feature_extraction: _FeatureExtraction | None = None

    def log(self, message: str) -> None:
        self.store.log(self.run_id, message)
        if self.progress_bar:
            print(message, flush=True)

    def beat(self, progress: RunProgress, force: bool = False) -> bool:
        """Write progress at most once a second; True when the run should stop."""
        now = time.monotonic()
        cancel = False
        if force or now - self.last_beat > 1.0:
            self.last_beat = now
            cancel = self.store.heartbeat(self.run_id, progress)
        return cancel or self.should_stop()

    def raise_if_cancelled(self) -> None:
        if self.beat(RunProgress(phase="stopping"), force=True):
            raise RunCancelled("Cancelled by request; the epochs logged so far are kept.")

    def execute(self) -> RunSummary:
        started = time.perf_counter()
        self.load_data()
        self.prepare_devices()
        self.decode_pixels()
        self.build_model()
        resume = self.restore_checkpoint()
        if self.config.head_epochs and not resume:
            self.timed("head_s", self.fit_head)
        if self.config.finetune_epochs:
            self.timed("finetune_s", lambda: self.fine_tune(resume))
        report = self.timed("eval_s", self.evaluate)
        model_path = save_model_atomically(self.model, self.folder.model)
        self.timings["total_s"] = time.perf_counter() - started
        self.log(f"Done: {self.eval_split} accuracy {report.accuracy:.4f}, macro F1 {report.macro_f1:.4f} "
                 f"in {self.timings['total_s']:.1f} s.")
        return self.summary(report, model_path)

    def timed(self, key: str, step: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = step()
        self.timings[key] = time.perf_counter() - t
        return result

    # ------------------------------------------------------------------ steps

    def load_data(self) -> None:
        """The dataset's entries (re-split if the recipe asks), labels and split rows."""
        config = self.config
        self.dataset = self.store.get_dataset(self.run.dataset_id)
        self.spec = get_backbone(config.backbone)
        self.size = config.resolved_image_size(self.spec)
        entries = run_entries(self.dataset, config.split, config.seed)
        self.entries, self.labels = entries, list(self.dataset.classes)
        self.y_all = np.array([self.labels.index(e.label) for e in entries], dtype=np.int32)
        self.splits = pipeline.split_indices(entries)
        self.class_weight = class_weights(config.class_weight, self.y_all[self.splits["train"]], len(self.labels))
        if self.class_weight:
            self.log("Class weights (balanced, both phases): " + ", ".join(
                f"{label} {self.class_weight[i]:.2f}" for i, label in enumerate(self.labels)) + ".")
        self.eval_split = "test" if len(self.splits["test"]) else "val"
        if not len(self.splits["train"]) or not len(self.splits[self.eval_split]):
            raise InvalidInput(
                f"Dataset {self.dataset.label} needs images in both train and {self.eval_split} splits; it has "
                f"{len(self.splits['train'])} and {len(self.splits[self.eval_split])}. Add images per class.")
        self.folder.write_config({**config.to_dict(), "dataset_id": self.dataset.id, "image_size": self.size})
        self.folder.write_labels(self.labels)

    def prepare_devices(self) -> None:
        self.device_plan = devices.plan(self.config.mixed_precision, self.config.xla)
        self.strategy = devices.apply(self.device_plan)
        self.log(f"Device: {self.device_plan.describe()}.")
        keras.utils.set_random_seed(self.config.seed)

    def decode_pixels(self) -> None:
        t = time.perf_counter()
        self.beat(RunProgress(phase="preparing", message="Decoding images"), force=True)
        self.pixels, reused = pipeline.pixel_cache(
            self.dataset.id, self.entries, self.size,
            on_progress=lambda done, total: self.beat(
                RunProgress(phase="preparing", message=f"Decoded {done}/{total} images")))
        self.timings["pixels_s"] = time.perf_counter() - t
        self.log(f"Pixel cache {'reused' if reused else 'built'}: {len(self.pixels)} images at {self.size} px "
                 f"({self.timings['pixels_s']:.1f} s).")

    def build_model(self) -> None:
        weights_path = resolve_weights(self.spec, self.config.weights)
        self.log(f"Backbone {self.spec.display_name}, weights: "
                 f"{'ImageNet' if weights_path else 'none (random initialisation, no transfer)'}.")
        with self.strategy.scope():
            self.model, self.base = build_classifier(self.spec, self.size, weights_path, len(self.labels),
                                                     self.config.dropout)

    def restore_checkpoint(self) -> Checkpoint | None:
        """Load the checkpoint of the run this one resumes, if it resumes one."""
        resume_from = self.run.config.get("resume_from")
        if not resume_from:
            return None
        checkpoint = RunFolder(resume_from).checkpoint()
        if checkpoint is None:
            raise InvalidInput(f"Run {resume_from} left no checkpoint to resume from; relaunch it instead.")
        self.model.load_weights(checkpoint.weights)
        self.step = len(self.store.epochs(resume_from))
        self.log(f"Resumed from run {resume_from} after {checkpoint.phase} epoch {checkpoint.epoch}.")
        return checkpoint

    def fit_head(self) -> None:
        """Phase 1: the head on the frozen backbone, on cached features unless it augments."""
        config = self.config
        if config.head_augment:
            self.fit_pixels("head", config.head_epochs, config.lr)
        else:
            self.head_on_features = self.fit_head_on_features()
        self.save_checkpoint("head", config.head_epochs)

    def fine_tune(self, resume: Checkpoint | None) -> None:
        """Phase 2: the top layers of the backbone unfrozen, a lower rate, warm-up and cosine decay."""
        config = self.config
        unfrozen = unfreeze_top(self.base, config.finetune_layers)
        learning_rate = config.lr * config.finetune_lr_scale
        self.log(f"Fine-tuning the top {unfrozen} layers of {self.spec.display_name} (BatchNorm frozen), "
                 f"lr {learning_rate:g} with warm-up and cosine decay.")
        initial = resume.epoch if resume and resume.phase == "finetune" else 0
        self.fit_pixels("finetune", config.finetune_epochs, learning_rate, initial_epoch=initial, schedule=True)

    def evaluate(self) -> EvalReport:
        """Predictions on the evaluation split, written to the run folder, and their report."""
        self.beat(RunProgress(phase="evaluating", message=f"Evaluating on {self.eval_split}"), force=True)
        eval_rows = np.sort(self.splits[self.eval_split])
        flip = self.config.tta == "flip"  # test-time augmentation: each image and its mirror, averaged
        if self.head_on_features is not None and not self.config.finetune_epochs:
            # The head shares its weights with the saved model, so its output on the cached
            # features is the model's output on the pixels, without a second backbone pass.
            head, features = self.head_on_features
            probs = head.predict(features[eval_rows], batch_size=256, verbose=0)
            if flip:
                mirrored, _, _ = self.feature_extraction.features(eval_rows, mirror=True)
                probs = (probs + head.predict(mirrored, batch_size=256, verbose=0)) / 2
        else:
            twin = fold_batchnorm(self.model, only_frozen=False)
            probs = model_probabilities(twin, self.pixels.images, eval_rows, self.config.batch_size)
            if flip:
                probs = (probs + model_probabilities(twin, self.pixels.images, eval_rows, self.config.batch_size,
                                                     mirror=True)) / 2
        rows = prediction_rows(probs, eval_rows, self.entries, self.labels)
        write_predictions(self.folder.predictions, rows)
        return compute_report(self.labels, pd.DataFrame(rows))

    def summary(self, report: EvalReport, model_path: Path) -> RunSummary:
        timings = {k: round(v, 3) for k, v in self.timings.items() if k != "features_reused"}
        return RunSummary(
            backbone=self.spec.name,
            weights=self.config.weights,
            dataset=self.dataset.label,
            dataset_id=self.dataset.id,
            image_size=self.size,
            eval_split=self.eval_split,
            eval_images=int(len(self.splits[self.eval_split])),
            metrics=report.metrics(tta=self.config.tta),
            timings=Timings(**timings, features_reused=bool(self.timings.get("features_reused"))),
            device=self.device_plan.describe(),
            model_path=str(model_path),
        )

    # ---------------------------------------------------------------- fitting

    def fit_head_on_features(self):
        config, splits = self.config, self.splits
        with self.strategy.scope():
            feature_model = fold_batchnorm(keras.Model(self.model.input, self.model.get_layer("pool").output))
        extractor = self.feature_extraction = _FeatureExtraction(self, feature_model)
        features, reused, seconds = extractor.features()
        self.timings["features_s"] = seconds
        self.timings["features_reused"] = float(reused)
        train = splits["train"]
        x_train, y_train = features[train], self.y_all[train]
        if "flip" in config.augment:
            # Flip augmentation without giving up the cache: the head also sees each training image mirrored.
            mirrored, _, seconds = extractor.features(train, mirror=True)
            self.timings["features_s"] += seconds
            x_train, y_train = np.concatenate([x_train, mirrored]), np.concatenate([y_train, y_train])

        # The head model shares its layers with the classifier, so training it trains the classifier.
        with self.strategy.scope():
            feat_in = keras.Input(features.shape[1:], name="features")
            out = self.model.get_layer("head")(self.model.get_layer("head_dropout")(feat_in))
            head = keras.Model(feat_in, out, name="head_only")
            _compile(head, config.lr, xla=False)
        val = splits["val"]
        head.fit(
            x_train, y_train,
            batch_size=config.batch_size,
            epochs=config.head_epochs,
            class_weight=self.class_weight,
            validation_data=(features[val], self.y_all[val]) if len(val) else None,
            shuffle=True,
            verbose=2 if self.progress_bar else 0,
            callbacks=self.callbacks("head", config.head_epochs),
        )
        self.raise_if_cancelled()
        return head, features

    def fit_pixels(self, phase: str, epochs: int, learning_rate: float, *, initial_epoch: int = 0,
                   schedule: bool = False) -> None:
        config, images = self.config, self.pixels.images
        train, val = self.splits["train"], self.splits["val"]
        steps = -(-len(train) // config.batch_size)
        if schedule:
            warmup = min(steps, max(1, steps * epochs // 10))
            learning_rate = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=learning_rate * 0.1, decay_steps=max(1, steps * epochs - warmup),
                warmup_target=learning_rate, warmup_steps=warmup)
        with self.strategy.scope():
            # The twin shares every trainable weight with `model`: training it trains `model`.
            trainer = fold_batchnorm(self.model)
            _compile(trainer, learning_rate, self.device_plan.xla)
        train_data = pipeline.batches(images, train, self.y_all[train], config.batch_size,
                                      shuffle=True, seed=config.seed, augment=config.augment)
        val_data = (pipeline.batches(images, val, self.y_all[val], config.batch_size, shuffle=False, seed=0)
                    if len(val) else None)
        trainer.fit(
            train_data,
            epochs=epochs,
            class_weight=self.class_weight,
            initial_epoch=initial_epoch,
            validation_data=val_data,
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=1 if self.progress_bar else 0,
            callbacks=self.callbacks(phase, epochs, checkpoint=phase == "finetune"),
        )
        self.raise_if_cancelled()

    def callbacks(self, phase: str, epochs: int, *, checkpoint: bool = False) -> list:
        monitor = "val_loss" if len(self.splits["val"]) else "loss"
        return [
            _StoreProgress(self, phase, epochs, checkpoint),
            keras.callbacks.EarlyStopping(monitor=monitor, patience=self.config.early_stopping_patience,
                                          restore_best_weights=True, verbose=0),
            keras.callbacks.TensorBoard(log_dir=str(self.folder.tensorboard(phase)), write_graph=False,
                                        profile_batch=0),
        ]

    def save_checkpoint(self, phase: str, epoch: int) -> None:
        """Weights after `phase` epoch `epoch`; a failed save keeps the previous checkpoint."""
        write_atomically(self.folder.checkpoint_weights, self.model.save_weights)
        self.folder.write_checkpoint_state(phase, epoch)


class _FeatureExtraction:
    """Backbone features of a run's images, from the feature cache or computed into it."""

    def __init__(self, training: _Training, feature_model):
        self.training, self.feature_model = training, feature_model
        self.batch_size = max(training.config.batch_size, 32)

    def features(self, rows: np.ndarray | None = None, mirror: bool = False) -> tuple[np.ndarray, bool, float]:
        t, config = self.training, self.training.config
        images = t.pixels.images
        path = feature_cache_path(t.dataset.id, t.spec.name, t.size, config.weights, config.seed,
                                  mirrored_rows=rows if mirror else None)
        bar = keras.utils.Progbar(len(images) if rows is None else len(rows),
                                  unit_name="image") if t.progress_bar else None

        def on_batch(done, total):
            if bar is not None:
                bar.update(done)
            if t.beat(RunProgress(phase="features", message=f"Backbone features {done}/{total}",
                                  batch=done, batches=total)):
                raise RunCancelled("Cancelled during feature extraction; the epochs logged so far are kept.")

        found, reused, seconds = cached_features(path, self.feature_model, images, self.batch_size, rows=rows,
                                                 mirror=mirror, on_batch=on_batch)
        what = "Mirrored training-image features" if mirror else "Backbone features"
        t.log(f"{what} {'reused from the cache' if reused else 'computed and cached'} "
              f"({len(found)} images, {seconds:.1f} s): {path.name}.")
        return found, reused, seconds


def execute_run(run_id: str, store: Store, *, should_stop: Callable[[], bool] = lambda: False,
                progress_bar: bool = False) -> RunSummary:
    """Train, evaluate and save run `run_id` from its stored config; return its summary.

    Writes epochs, logs and progress to `store` as it goes and artifacts to the run folder.
    Raises `RunCancelled` if `should_stop()` (or a cancel in the store) stops it. The caller
    sets the final status.
    """
    return _Training(run_id, store, should_stop, progress_bar).execute()


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


def class_weights(mode: str, y_train: np.ndarray, num_classes: int) -> dict[int, float] | None:
    """Keras `class_weight` for `mode` ("balanced": n / (classes present * count), as scikit-learn's;
    "none": None). A class without training images gets weight 0 (it never reaches the loss)."""
    if mode == "none":
        return None
    counts = np.bincount(y_train, minlength=num_classes)
    present = int((counts > 0).sum())
    return {c: float(len(y_train) / (present * n)) if n else 0.0 for c, n in enumerate(counts)}


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


class _StoreProgress(keras.callbacks.Callback):
    """Streams batch progress and epoch metrics into the store; stops training on cancel."""

    def __init__(self, training: _Training, phase: str, epochs: int, checkpoint: bool):
        super().__init__()
        self.ctx, self.phase, self.epochs = training, phase, epochs
        self.checkpoint = checkpoint  # save the classifier's weights after every epoch
        self.cancelled = False
        self.epoch_started = time.monotonic()
        self.epoch_seconds: list[float] = []
        self.epoch = 1
        self.batches = None

    def _progress(self, batch: int | None) -> RunProgress:
        """Progress in the current epoch (1-based `self.epoch`); the ETA covers it and the rest."""
        per_epoch = (sum(self.epoch_seconds) / len(self.epoch_seconds)) if self.epoch_seconds else None
        elapsed = time.monotonic() - self.epoch_started
        left = self.epochs - self.epoch + 1  # epochs not finished yet, the current one included
        eta = None
        if per_epoch is not None:
            eta = max(0.0, per_epoch * left - elapsed)
        elif batch and self.batches:
            eta = elapsed / batch * (self.batches * left - batch)
        return RunProgress(phase=self.phase, epoch=self.epoch, epochs=self.epochs, batch=batch,
                           batches=self.batches, eta_s=eta, step=self.ctx.step)

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
        if self.checkpoint:
            self.ctx.save_checkpoint(self.phase, epoch + 1)
        self.epoch, self.epoch_started = epoch + 2, time.monotonic()
        self.ctx.beat(self._progress(0), force=True)


def model_probabilities(model, images: np.ndarray, indices: np.ndarray, batch_size: int, *,
                        mirror: bool = False) -> np.ndarray:
    """Class probabilities of the full model for the cached pixel rows `indices` (sorted), each
    image mirrored left-right if `mirror`."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(x):
        return model(tf.cast(x, tf.float32), training=False)

    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = np.asarray(images[chunk])
        out.append(forward(pad_batch(batch[:, :, ::-1] if mirror else batch, batch_size)).numpy()[:len(chunk)])
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
