"""The two-phase transfer recipe, run for one stored run.

Phase 1 (head): the backbone is frozen. Without augmentation its pooled features are
computed once and cached, and a new softmax head trains on them in seconds.
Phase 2 (fine-tune): the top layers of the backbone are unfrozen (BatchNorm stays in inference
mode) and train with the head, with a warm-up + cosine learning rate, early stopping and
best-epoch weights restored. By default (`finetune_inputs="cached"`) they train on the
backbone's activations just below them, cached per image like the features (the part below
never trains, so its output never changes; a flip is the mirrored images' activations, the
other augmentations are not applied); with "pixels", on augmented images through the whole model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import keras
import numpy as np
import pandas as pd

from tlcore.backbones import get_backbone, resolve_weights
from tlcore.backbones.classifier import FineTuneCut, build_classifier, compile_classifier, unfreeze_top
from tlcore.backbones.features import activation_cache, cached_features, feature_cache
from tlcore.backbones.folding import fold_batchnorm
from tlcore.data import pipeline
from tlcore.data.augment import AugmentedView
from tlcore.data.manifest import run_entries
from tlcore.errors import InvalidInput, RunCancelled
from tlcore.evaluate import calibration
from tlcore.evaluate.comparison import clearly_worse
from tlcore.evaluate.evaluation import EvalReport, compute_report, write_predictions
from tlcore.records.atomic import write_atomically
from tlcore.records.run_folder import Checkpoint, RunFolder
from tlcore.records.run_record import (
    DeviceRecord,
    FinetuneDecision,
    HeadSearch,
    RunProgress,
    RunSummary,
    Timings,
    describe_cached_augmentation,
)
from tlcore.records.store import Store
from tlcore.train import devices, head_search, training_state
from tlcore.train.head_search import TrialSettings, class_weights

TOP_K = 5


class RunSink(Protocol):
    """Where a run reports while it trains: the store here, or a channel back to a Ray dispatcher."""

    def log(self, message: str) -> None: ...

    def log_epoch(self, phase: str, epoch: int, step: int, metrics: dict[str, float]) -> None: ...

    def heartbeat(self, progress: RunProgress) -> bool:
        """Record progress and renew the lease; True when a cancel was requested."""
        ...

    def checkpoint_saved(self, folder: RunFolder) -> None:
        """A new checkpoint is in `folder` (a remote run sends it home)."""
        ...


@dataclasses.dataclass(frozen=True)
class StoreSink:
    """The local worker's sink: straight into the store; checkpoints are already in the run folder."""

    store: Store
    run_id: str

    def log(self, message: str) -> None:
        self.store.log(self.run_id, message)

    def log_epoch(self, phase: str, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.store.log_epoch(self.run_id, phase, epoch, step, metrics)

    def heartbeat(self, progress: RunProgress) -> bool:
        return self.store.heartbeat(self.run_id, progress)

    def checkpoint_saved(self, folder: RunFolder) -> None:
        pass


class _Training:
    """One run being trained: what its steps share, and the steps in the order they run."""

    def __init__(self, run_id: str, store: Store, should_stop: Callable[[], bool], progress_bar: bool,
                 sink: RunSink | None = None):
        self.run = store.get_run(run_id)
        self.run_id, self.store = run_id, store
        self.sink = sink or StoreSink(store, run_id)
        self.config = self.run.spec.recipe
        self.folder = RunFolder(run_id).created()
        self.progress_bar = progress_bar
        self.reporter = _RunReporter(self.sink, should_stop, echo=progress_bar)
        self.step = 0  # epochs finished across phases: the x axis of the curves
        self.times = _StepTimes()
        self.head_on_features: tuple[Any, np.ndarray] | None = None
        self.predictor = None  # the saved model with BatchNorm folded, made once for evaluation
        self.feature_extraction: _FeatureExtraction | None = None
        self.cut: FineTuneCut | None = None  # where the fine-tune's cached activations come from, if it uses them
        self.top_trainer = None  # the top on activations with the frozen BatchNorm folded (`top_layers`)
        self.top_predictor = None  # the top on activations with BatchNorm folded, made once for evaluation
        self.resumed: Checkpoint | None = None
        self.trainer = self.early_stopping = None  # of the phase training now, for its checkpoints
        # What the head phase settled on, carried into the fine-tune (the search may change it).
        self.settings = TrialSettings(self.config.lr, self.config.dropout, 0.0, self.config.class_weight)
        self.head_search: HeadSearch | None = None
        self.head_weights: list | None = None  # (variable, value after the head phase), during the fine-tune
        self.head_val_correct: np.ndarray | None = None  # which validation images the head got right
        self.finetune_decision: FinetuneDecision | None = None

    def log(self, message: str) -> None:
        self.reporter.log(message)

    def beat(self, progress: RunProgress, force: bool = False) -> bool:
        return self.reporter.beat(progress, force)

    def raise_if_cancelled(self) -> None:
        self.reporter.raise_if_cancelled()

    def execute(self) -> RunSummary:
        started = time.perf_counter()
        self.load_data()
        self.prepare_devices()
        self.decode_pixels()
        self.build_model()
        resume = self.restore_checkpoint()
        if self.config.head_epochs and not resume:
            self.times.timed("head_s", self.fit_head)
        if self.settings.class_weight == "auto":
            self.log("Class weighting auto: no head was fitted both ways here (resumed, head augmented, or no "
                     "validation split apart from the evaluation split), so it trains unweighted.")
            self.use_class_weight("none")
        if self.config.finetune_epochs:
            self.times.timed("finetune_s", lambda: self.fine_tune(resume))
            self.choose_finetune_result()
        with self.strategy.scope():
            # What is saved and evaluated computes in float32: a mixed-precision model would
            # reload as float16 on a CPU host and could not be converted to TFLite.
            self.final_model = devices.float32_model(self.model)
        report = self.times.timed("eval_s", self.evaluate)
        model_path = save_model_atomically(self.final_model, self.folder.model)
        total = self.times.add("total_s", time.perf_counter() - started)
        self.log(f"Done: {self.eval_split} accuracy {report.accuracy:.4f}, macro F1 {report.macro_f1:.4f} "
                 f"in {total:.1f} s.")
        return self.summary(report, model_path)

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
        if config.class_weight != "auto":
            self.use_class_weight(config.class_weight)
        self.eval_split = "test" if len(self.splits["test"]) else "val"
        if not len(self.splits["train"]) or not len(self.splits[self.eval_split]):
            raise InvalidInput(
                f"Dataset {self.dataset.label} needs images in both train and {self.eval_split} splits; it has "
                f"{len(self.splits['train'])} and {len(self.splits[self.eval_split])}. Add images per class.")
        # Choosing on validation (head search, class weighting auto, keeping the fine-tune) needs a
        # validation split that is not also the evaluation split: it would grade its own choice.
        self.choose_on_val = bool(len(self.splits["val"])) and self.eval_split != "val"
        self.folder.write_spec(self.run.spec)
        self.folder.write_labels(self.labels)

    def use_class_weight(self, mode: str) -> None:
        """Train both phases with class weighting `mode` ("none" or "balanced") from now on."""
        self.settings = dataclasses.replace(self.settings, class_weight=mode)
        self.class_weight = class_weights(mode, self.y_all[self.splits["train"]], len(self.labels))
        if self.class_weight:
            self.log("Class weights (balanced, both phases): " + ", ".join(
                f"{label} {self.class_weight[i]:.2f}" for i, label in enumerate(self.labels)) + ".")

    def prepare_devices(self) -> None:
        """The device plan (the rule for "auto" is in `devices.plan`), its strategy and batch sizes."""
        plan = self.device_plan = devices.plan(self.config.mixed_precision, self.config.xla)
        self.strategy = devices.apply(plan)
        per_replica, self.global_batch = self.config.batch_sizes(plan.replicas)
        self.lr_scale = self.config.lr_scale(self.global_batch)
        self.device_record = DeviceRecord(
            kind=plan.kind, devices=list(plan.devices), replicas=plan.replicas, strategy=plan.strategy_name,
            mixed_precision=plan.mixed_precision, xla=plan.xla, batch_per_replica=per_replica,
            global_batch=self.global_batch, lr_scaling=self.config.lr_scaling, lr_scale=self.lr_scale)
        self.log(f"Device: {plan.describe()}; {self.device_record.describe()}. "
                 f"Process device policy: {devices.current_policy() or 'none declared'}.")
        keras.utils.set_random_seed(self.config.seed)

    def decode_pixels(self) -> None:
        t = time.perf_counter()
        self.beat(RunProgress(phase="preparing", message="Decoding images"), force=True)
        self.pixels, reused = pipeline.pixel_cache(
            self.entries, self.size,
            on_progress=lambda done, total: self.beat(
                RunProgress(phase="preparing", message=f"Decoded {done}/{total} images")))
        seconds = self.times.add("pixels_s", time.perf_counter() - t)
        self.log(f"Pixel cache: {reused} of {len(self.pixels)} images at {self.size} px reused, the rest decoded "
                 f"({seconds:.1f} s).")

    def build_model(self) -> None:
        weights_path = resolve_weights(self.spec, self.config.weights)
        self.log(f"Backbone {self.spec.display_name}, weights: "
                 f"{'ImageNet' if weights_path else 'none (random initialisation, no transfer)'}.")
        with self.strategy.scope():
            self.classifier = build_classifier(self.spec, self.size, weights_path, len(self.labels),
                                               self.config.dropout)
        self.model = self.classifier.model
        if self.config.finetune_epochs and self.config.finetune_inputs == "cached":
            self.cut = self.fine_tune_cut()

    def fine_tune_cut(self) -> FineTuneCut | None:
        """Where the fine-tune's cached activations are taken, or None (with the reason logged) when
        it must run on pixels."""
        plan = self.device_plan
        if plan.mixed_precision or plan.replicas > 1:
            self.log("The fine-tune runs on pixels: cached activations are used on one device in float32 only.")
            return None
        cut = self.classifier.fine_tune_cut(self.config.finetune_layers)
        if cut is None:
            self.log(f"The fine-tune runs on pixels: no single activation of {self.spec.display_name} separates "
                     f"its top {self.config.finetune_layers} layers from the frozen ones.")
            return None
        if np.prod(cut.activation_shape) * 4 > self.size * self.size * 3:
            self.log(f"The fine-tune runs on pixels: the activations below its layers ({cut.layer}, "
                     f"{'x'.join(map(str, cut.activation_shape))} floats) would take more room than the images.")
            return None
        return cut

    def restore_checkpoint(self) -> Checkpoint | None:
        """Load the checkpoint of the run this one resumes, if it resumes one."""
        resume_from = self.run.spec.resume_from
        if not resume_from:
            return None
        checkpoint = RunFolder(resume_from).checkpoint()
        if checkpoint is None:
            raise InvalidInput(f"Run {resume_from} left no checkpoint to resume from; relaunch it instead.")
        self.model.load_weights(checkpoint.weights)
        self.step = len(self.store.epochs(resume_from))
        self.resumed = checkpoint
        self.log(f"Resumed from run {resume_from} after {checkpoint.phase} epoch {checkpoint.epoch}.")
        return checkpoint

    def fit_head(self) -> None:
        """Phase 1: the head on the frozen backbone, on cached features unless it augments."""
        config = self.config
        if config.head_augment:
            if self.settings.class_weight == "auto":
                self.use_class_weight("none")
            self.fit_pixels("head", config.head_epochs, config.lr * self.lr_scale)
        else:
            self.head_on_features = self.fit_head_on_features()
        self.save_checkpoint("head", config.head_epochs)

    def choose_finetune_result(self) -> None:
        """Fine-tune only when it helps. `finetune_result` "average": the fine-tuned layers and the head end
        at the mean of their weights after the head phase and after the fine-tune (weight averaging, as in
        WiSE-FT), unless the validation images show that average clearly worse than the head
        (`clearly_worse`); "best": the fine-tuned weights only when they end above the head's validation
        accuracy (a tie shows no help). When the head wins, its weights come back."""
        if self.head_weights is None:
            return
        tuned_correct = self.val_correct()
        averaged = None
        if self.config.finetune_result == "average":
            for variable, value in self.head_weights:
                variable.assign((value + np.asarray(variable.numpy())) / 2)
            averaged_correct = self.val_correct()
            averaged = round(float(averaged_correct.mean()), 6)
            kept = "head" if clearly_worse(averaged_correct, self.head_val_correct) else "average"
        else:
            kept = "finetune" if tuned_correct.mean() > self.head_val_correct.mean() else "head"
        if kept == "head":
            for variable, value in self.head_weights:
                variable.assign(value)
        self.head_weights = None
        self.finetune_decision = FinetuneDecision(head_val_accuracy=round(float(self.head_val_correct.mean()), 6),
                                                  finetune_val_accuracy=round(float(tuned_correct.mean()), 6),
                                                  kept=kept, averaged_val_accuracy=averaged)
        self.log(self.finetune_decision.describe())

    def val_correct(self) -> np.ndarray:
        """Which validation images (sorted rows) the classifier gets right."""
        val = np.sort(self.splits["val"])
        return self.training_probabilities(val).argmax(axis=1) == self.y_all[val]

    def training_probabilities(self, rows: np.ndarray) -> np.ndarray:
        """The model's probabilities for images `rows` as it stands in training: through the backbone, or
        the top layers on the cached activations when the fine-tune trains on them."""
        if self.cut is not None:
            return model_probabilities(self.top_layers(), self.extraction().activations(), rows, self.global_batch)
        return model_probabilities(self.model, self.pixels.images, rows, self.global_batch)

    def top_layers(self):
        """The top layers on the cached activations with the frozen BatchNorm folded, made once (the head's
        validation answers may ask for them before the fine-tune trains them). They share the trainable
        layers with `model`: training them trains `model`."""
        if self.top_trainer is None:
            with self.strategy.scope():
                self.top_trainer = fold_batchnorm(self.cut.top())
        return self.top_trainer

    def head_snapshot(self, resume: Checkpoint | None) -> list | None:
        """(variable, value) of what the fine-tune can change (BatchNorm stays frozen) as the head left it,
        with `head_val_correct`, for `choose_finetune_result`; None when there is nothing to choose between
        (no head phase, or no validation split apart from the evaluation split). Saved beside the
        checkpoint and read back by a run resumed in the fine-tune, so that it ends as an uninterrupted run."""
        config = self.config
        if not (config.head_epochs and self.choose_on_val):
            return None
        variables = self.model.trainable_weights
        if resume is not None and resume.phase == "finetune":
            saved = training_state.load_head(RunFolder(self.run.spec.resume_from).checkpoint_head, variables)
            if saved is None:
                self.log("The checkpoint resumed from holds no head weights (an older version made it), so the "
                         "fine-tuned weights are kept as they end.")
                return None
            values, self.head_val_correct = saved
        else:  # the model holds the head's weights: fitted here, or resumed after the head phase
            values, self.head_val_correct = [np.array(v.numpy()) for v in variables], self.val_correct()
        training_state.save_head(self.folder.checkpoint_head, values, self.head_val_correct)
        return list(zip(variables, values))

    def fine_tune(self, resume: Checkpoint | None) -> None:
        """Phase 2: the top layers of the backbone unfrozen, a lower rate, warm-up and cosine decay."""
        config = self.config
        unfrozen = unfreeze_top(self.classifier.backbone, config.finetune_layers)
        self.head_weights = self.head_snapshot(resume)
        learning_rate = self.settings.lr * config.finetune_lr_scale * self.lr_scale
        smoothing = f", label smoothing {self.settings.label_smoothing:g}" if self.settings.label_smoothing else ""
        self.log(f"Fine-tuning the top {unfrozen} layers of {self.spec.display_name} (BatchNorm frozen), "
                 f"lr {learning_rate:g} with warm-up and cosine decay{smoothing}.")
        initial = resume.epoch if resume and resume.phase == "finetune" else 0
        if self.cut is None:
            self.fit_pixels("finetune", config.finetune_epochs, learning_rate, initial_epoch=initial, schedule=True)
            return
        self.log(f"The fine-tune trains on the activations of {self.cut.layer} "
                 f"({'x'.join(map(str, self.cut.activation_shape))} per image), computed once and cached"
                 + describe_cached_augmentation(config.augment, len(self.augmented_views())) + ".")
        self.fit_activations(config.finetune_epochs, learning_rate, initial_epoch=initial)

    def augmented_views(self) -> list[AugmentedView]:
        """The augmented views of the training images the fine-tune on cached activations draws from:
        `finetune_views` of them when the recipe asks for an augmentation besides a flip."""
        config = self.config
        if not any(a != "flip" for a in config.augment):
            return []
        return [AugmentedView(tuple(config.augment), index) for index in range(config.finetune_views)]

    def evaluate(self) -> EvalReport:
        """Predictions on the evaluation split, written to the run folder, and their report."""
        self.beat(RunProgress(phase="evaluating", message=f"Evaluating on {self.eval_split}"), force=True)
        eval_rows = np.sort(self.splits[self.eval_split])
        probs = self.probabilities(eval_rows)
        rows = prediction_rows(probs, eval_rows, self.entries, self.labels)
        write_predictions(self.folder.predictions, rows)
        self.calibrate(probs, self.y_all[eval_rows])
        return compute_report(self.labels, pd.DataFrame(rows))

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """The saved model's class probabilities for the dataset rows `rows` (sorted); with test-time
        augmentation (`tta="flip"`), averaged with those of the mirrored images."""
        flip = self.config.tta == "flip"
        if self.head_on_features is not None and not self.config.finetune_epochs \
                and not self.device_plan.mixed_precision:
            # The head shares its weights with the saved model, so its output on the cached
            # (float32) features is the model's output on the pixels, without a second backbone pass.
            head, features = self.head_on_features
            probs = head.predict(features[rows], batch_size=256, verbose=0)
            if flip:
                mirrored, _, _ = self.feature_extraction.features(rows, mirror=True)
                probs = (probs + head.predict(mirrored, batch_size=256, verbose=0)) / 2
            return probs
        if self.cut is not None:
            # The top layers on the cached activations are the saved model on the pixels (float32, one device).
            if self.top_predictor is None:
                with self.strategy.scope():
                    self.top_predictor = fold_batchnorm(self.cut.top(), only_frozen=False)
            extraction = self.extraction()
            probs = model_probabilities(self.top_predictor, extraction.activations(), rows, self.global_batch)
            if flip:
                mirrored = extraction.activations(rows, mirror=True)
                probs = (probs + model_probabilities(self.top_predictor, mirrored, np.arange(len(rows)),
                                                     self.global_batch)) / 2
            return probs
        if self.predictor is None:
            with self.strategy.scope():
                self.predictor = fold_batchnorm(self.final_model, only_frozen=False)
        probs = model_probabilities(self.predictor, self.pixels.images, rows, self.global_batch)
        if flip:
            probs = (probs + model_probabilities(self.predictor, self.pixels.images, rows, self.global_batch,
                                                 mirror=True)) / 2
        return probs

    def calibrate(self, eval_probs: np.ndarray, eval_labels: np.ndarray) -> None:
        """Temperature and "not sure" threshold fitted on the validation split, kept with the run."""
        val_rows = np.sort(self.splits["val"])
        if self.eval_split == "val" or not len(val_rows):
            reason = ("The dataset has no test split, so its validation split is the evaluation split: "
                      "a temperature fitted on it would grade itself." if self.eval_split == "val" else
                      "The dataset has no validation split to fit a temperature on.")
            self.calibration, self.threshold = calibration.calibrate(None, None, eval_probs, eval_labels,
                                                                     no_val_reason=reason), None
        else:
            val_probs = self.probabilities(val_rows)
            val_labels = self.y_all[val_rows]
            self.calibration = calibration.calibrate(val_probs, val_labels, eval_probs, eval_labels)
            scaled = calibration.apply_temperature(val_probs, self.calibration.temperature)
            self.threshold = calibration.choose_threshold(scaled.max(axis=1), scaled.argmax(axis=1) == val_labels)
        calibration.write_run_calibration(self.run_id, self.calibration, self.threshold)
        after = (f"{self.calibration.ece_after:.3f} at T = {self.calibration.temperature:.2f}"
                 if self.calibration.temperature else f"not calibrated ({self.calibration.reason})")
        self.log(f"Calibration: ECE {self.calibration.ece_before:.3f} before, {after}.")

    def summary(self, report: EvalReport, model_path: Path) -> RunSummary:
        return RunSummary(
            backbone=self.spec.name,
            weights=self.config.weights,
            dataset=self.dataset.label,
            dataset_id=self.dataset.id,
            image_size=self.size,
            eval_split=self.eval_split,
            eval_images=int(len(self.splits[self.eval_split])),
            metrics=report.metrics(tta=self.config.tta),
            timings=self.times.record(),
            device=self.device_plan.describe(),
            device_record=self.device_record,
            model_path=str(model_path),
            calibration=self.calibration,
            threshold=self.threshold,
            head_search=self.head_search,
            class_weight=self.settings.class_weight,
            finetune=self.finetune_decision,
            finetune_inputs=("cached" if self.cut is not None else "pixels") if self.config.finetune_epochs else None,
            finetune_views=len(self.augmented_views())
            if self.cut is not None and self.config.finetune_epochs else None,
        )

    # ---------------------------------------------------------------- fitting

    def fit_head_on_features(self):
        config, splits = self.config, self.splits
        extractor = self.extraction()
        features, reused, seconds = extractor.features()
        self.times.add("features_s", seconds)
        self.times.features_reused = reused
        train = splits["train"]
        parts, y_train = [(features, train)], self.y_all[train]
        if "flip" in config.augment:
            # Flip augmentation without giving up the cache: the head also sees each training image mirrored.
            mirrored, _, seconds = extractor.features(train, mirror=True)
            self.times.add("features_s", seconds)
            parts.append((mirrored, np.arange(len(train))))
            y_train = np.concatenate([y_train, y_train])
        x_train = pipeline.StackedRows(*parts)  # batches read from the memory-mapped caches

        val = splits["val"]
        search = config.head_search == "auto"
        if self.choose_on_val and (search or config.class_weight == "auto"):
            self.search_head(x_train, y_train, features[val], self.y_all[val], search)
        with self.strategy.scope():
            head = self.classifier.head_on_features()  # training it trains the classifier's head
            compile_classifier(head, config.lr * self.lr_scale, xla=False)
        if self.head_search is not None:
            return head, features
        if self.settings.class_weight == "auto":
            self.use_class_weight("none")
        # Shuffled in `pipeline.epoch_order`, as the pixels are: the same batches under any strategy.
        train_data, steps = pipeline.shuffled_batches(
            len(x_train), self.global_batch, lambda _e, _s, p: (x_train[p], y_train[p]), x_train.shape[1:],
            "float32", seed=config.seed, epochs=config.head_epochs)
        head.fit(
            train_data,
            steps_per_epoch=steps,
            epochs=config.head_epochs,
            class_weight=self.class_weight,
            validation_data=(features[val], self.y_all[val]) if len(val) else None,
            shuffle=False,  # the batches come in `epoch_order`
            verbose=2 if self.progress_bar else 0,
            callbacks=self.callbacks("head", config.head_epochs),
        )
        self.raise_if_cancelled()
        return head, features

    def extraction(self) -> _FeatureExtraction:
        if self.feature_extraction is None:
            self.feature_extraction = _FeatureExtraction(self)
        return self.feature_extraction

    def search_head(self, x_train, y_train, x_val, y_val, search: bool) -> None:
        """Heads fitted at once on the cached features (`tlcore.train.head_search`): the recipe's own
        settings both ways for `class_weight="auto"`, the fixed grid too with `search`. The best on
        validation macro F1 becomes the classifier's head; its settings carry into the fine-tune."""
        config = self.config
        trials = head_search.trial_grid(config.lr, config.dropout, config.class_weight, search)
        scaled = f", each trial's lr x {self.lr_scale:g} for the global batch" if self.lr_scale != 1 else ""
        self.log(f"Head search: {len(trials)} heads fitted at once on the cached features, chosen on validation "
                 f"macro F1 ({len(x_val)} images), early stopping after {config.early_stopping_patience} epochs"
                 f"{scaled}.")
        fitted = head_search.fit_heads(
            x_train, y_train, x_val, y_val, len(self.labels), trials, lr_scale=self.lr_scale,
            batch_size=self.global_batch, max_epochs=config.head_epochs, patience=config.early_stopping_patience,
            seed=config.seed,
            on_epoch=lambda epoch: self.beat(RunProgress(phase="head", epoch=epoch, epochs=config.head_epochs,
                                                         step=self.step, message=f"Head search, {len(trials)} heads")))
        self.raise_if_cancelled()
        record, chosen = fitted.record, fitted.chosen
        for k, trial in enumerate(record.trials):
            self.log(f"Head trial {k + 1}/{len(trials)}{' (chosen)' if k == record.chosen else ''}: "
                     f"{trial.settings()}: val macro F1 {trial.val_macro_f1:.4f}, accuracy {trial.val_accuracy:.4f} "
                     f"(best epoch {trial.best_epoch} of {trial.epochs}).")
        if record.class_weight is not None:
            self.log(record.class_weight.describe())
        history = fitted.chosen_history()
        for epoch, metrics in enumerate(history, start=1):
            self.step += 1
            self.sink.log_epoch("head", epoch, self.step, metrics)
        _write_tensorboard(self.folder.tensorboard("head"), history)
        self.classifier.set_head(fitted.chosen_weights(), chosen.dropout)
        if chosen.class_weight != self.settings.class_weight:
            self.use_class_weight(chosen.class_weight)
        self.settings = TrialSettings(chosen.lr, chosen.dropout, chosen.label_smoothing, chosen.class_weight)
        self.head_search = record

    def fit_pixels(self, phase: str, epochs: int, learning_rate: float, *, initial_epoch: int = 0,
                   schedule: bool = False) -> None:
        config, images = self.config, self.pixels.images
        train, val = self.splits["train"], self.splits["val"]
        train_data, steps = pipeline.epoch_batches(images, train, self.y_all[train], self.global_batch,
                                                   seed=config.seed, epochs=epochs, initial_epoch=initial_epoch,
                                                   augment=config.augment)
        if schedule:
            learning_rate = warmup_cosine(learning_rate, steps, epochs)
        with self.strategy.scope():
            # The twin shares every trainable weight with `model`: training it trains `model`.
            trainer = self.trainer = fold_batchnorm(self.model)
            compile_classifier(trainer, learning_rate, xla=self.device_plan.xla,
                               label_smoothing=self.settings.label_smoothing)
        callbacks = self.callbacks(phase, epochs, checkpoint=phase == "finetune")
        if initial_epoch:
            with self.strategy.scope():
                self.restore_training_state(trainer)
        val_data = pipeline.batches(images, val, self.y_all[val], self.global_batch) if len(val) else None
        trainer.fit(
            train_data,
            steps_per_epoch=steps,
            epochs=epochs,
            class_weight=self.class_weight,
            initial_epoch=initial_epoch,
            validation_data=val_data,
            shuffle=False,  # the batches come in `epoch_order`
            verbose=1 if self.progress_bar else 0,
            callbacks=callbacks,
        )
        self.raise_if_cancelled()

    def fit_activations(self, epochs: int, learning_rate: float, *, initial_epoch: int) -> None:
        """The fine-tune on cached activations: the top layers and the head (`FineTuneCut.top`) trained
        as `fit_pixels` trains the whole model, with its schedule, callbacks and checkpoints."""
        config, extraction = self.config, self.extraction()
        train, val = self.splits["train"], np.sort(self.splits["val"])
        activations = extraction.activations()
        views = [extraction.activations(train, mirror=True)] if "flip" in config.augment else []
        views += [extraction.activations(train, view=view) for view in self.augmented_views()]
        train_data, steps = pipeline.view_batches(activations, train, views, self.y_all[train], self.global_batch,
                                                  seed=config.seed, epochs=epochs, initial_epoch=initial_epoch)
        trainer = self.trainer = self.top_layers()
        with self.strategy.scope():
            compile_classifier(trainer, warmup_cosine(learning_rate, steps, epochs), xla=self.device_plan.xla,
                               label_smoothing=self.settings.label_smoothing)
        callbacks = self.callbacks("finetune", epochs, checkpoint=True)
        if initial_epoch:
            with self.strategy.scope():
                self.restore_training_state(trainer)
        val_data = pipeline.batches(activations, val, self.y_all[val], self.global_batch) if len(val) else None
        trainer.fit(train_data, steps_per_epoch=steps, epochs=epochs, class_weight=self.class_weight,
                    initial_epoch=initial_epoch, validation_data=val_data, shuffle=False,
                    verbose=1 if self.progress_bar else 0, callbacks=callbacks)
        self.raise_if_cancelled()

    def restore_training_state(self, trainer) -> None:
        """The stopped run's optimizer moments and step (hence the schedule's step) and early-stopping
        state, when its checkpoint holds them (`tlcore.train.training_state`); else the weights alone."""
        path = RunFolder(self.run.spec.resume_from).checkpoint_training_state
        if training_state.restore(path, trainer.optimizer, trainer.trainable_variables, self.early_stopping,
                                  epoch=self.resumed.epoch):
            step = int(np.asarray(trainer.optimizer.iterations))
            self.log(f"Optimizer and early-stopping state restored: step {step}.")
        else:
            self.log("The checkpoint holds weights only (saved before optimizer state was kept): Adam's moments "
                     "start empty and the learning-rate schedule from step 0.")

    def callbacks(self, phase: str, epochs: int, *, checkpoint: bool = False) -> list:
        monitor = "val_loss" if len(self.splits["val"]) else "loss"
        self.early_stopping = training_state.ResumableEarlyStopping(
            monitor=monitor, patience=self.config.early_stopping_patience, restore_best_weights=True, verbose=0)
        return [
            self.early_stopping,  # before the checkpoint is saved, so the checkpoint holds this epoch's state
            _StoreProgress(self, phase, epochs, checkpoint),
            _EpochTensorBoard(log_dir=str(self.folder.tensorboard(phase)), write_graph=False, profile_batch=0),
        ]

    def save_checkpoint(self, phase: str, epoch: int) -> None:
        """Weights after `phase` epoch `epoch` (in the fine-tune also the optimizer and early-stopping
        state, written first); a failed save keeps the previous checkpoint."""
        if phase == "finetune":
            training_state.save(self.folder.checkpoint_training_state, self.trainer.optimizer, self.early_stopping,
                                epoch=epoch)
        write_atomically(self.folder.checkpoint_weights, self.model.save_weights)
        self.folder.write_checkpoint_state(phase, epoch)
        self.sink.checkpoint_saved(self.folder)


class _FeatureExtraction:
    """Backbone features of a run's images, from the feature cache or computed into it; with a
    fine-tune cut, through the activations at the cut (cached too, for the fine-tune)."""

    def __init__(self, training: _Training):
        self.training = training
        self.batch_size = max(training.global_batch, 32)
        self.models: dict[str, Any] = {}  # folded twins, made when first needed
        self.found: dict[tuple, np.ndarray] = {}  # activations already opened, by (rows, mirror, view)

    def model(self, part: str):
        if part not in self.models:
            t = self.training
            source = {"features": t.classifier.features_model, "prefix": lambda: t.cut.prefix,
                      "features_on_activations": lambda: t.cut.features}[part]
            with t.strategy.scope():
                self.models[part] = fold_batchnorm(source())
        return self.models[part]

    def features(self, rows: np.ndarray | None = None, mirror: bool = False) -> tuple[np.ndarray, bool, float]:
        t, config = self.training, self.training.config
        cache = feature_cache(t.spec.name, t.size, config.weights, config.seed, mirror=mirror,
                              mixed_precision=t.device_plan.mixed_precision)
        shas = [e.sha256 for e in t.entries]
        started = time.perf_counter()
        # Memory-mapped: a large set's feature matrix stays in the page cache, outside the heap.
        found = self.all_cached(cache, shas, rows, mmap=True)
        if found is not None:
            seconds = time.perf_counter() - started
        elif t.cut is None:
            found, seconds = cached_features(cache, shas, self.model("features"), t.pixels.images, self.batch_size,
                                             rows=rows, mirror=mirror, on_batch=self.on_batch("Backbone features"),
                                             strategy=t.strategy, mmap=True)
        else:  # features = the top of the backbone on the activations at the cut, which the fine-tune needs too
            activations = self.activations(rows, mirror)
            picked = np.arange(len(shas)) if rows is None else np.asarray(rows)
            found, _ = cached_features(cache, [shas[r] for r in picked], self.model("features_on_activations"),
                                       activations, self.batch_size, on_batch=self.on_batch("Backbone features"),
                                       strategy=t.strategy, mmap=True)
            seconds = time.perf_counter() - started
        what = "Mirrored training-image features" if mirror else "Backbone features"
        t.log(f"{what}: {found.reused} of {len(found.array)} images reused from the cache, the rest computed "
              f"({seconds:.1f} s).")
        return found.array, found.all_reused, seconds

    def activations(self, rows: np.ndarray | None = None, mirror: bool = False,
                    view: AugmentedView | None = None) -> np.ndarray:
        """The activations at the fine-tune's cut of the images `rows` (default all, in dataset order),
        mirrored with `mirror` or an augmented `view`: from the activation cache (memory-mapped), the
        rest computed into it."""
        key = (None if rows is None else np.asarray(rows).tobytes(), mirror, view)
        if key in self.found:
            return self.found[key]
        t, config = self.training, self.training.config
        cache = activation_cache(t.spec.name, t.size, config.weights, config.seed, t.cut.layer, mirror=mirror,
                                 view=view)
        shas = [e.sha256 for e in t.entries]
        started = time.perf_counter()
        found = self.all_cached(cache, shas, rows, mmap=True)
        seconds = time.perf_counter() - started
        what = ("Mirrored images' activations" if mirror else
                f"Augmented view {view.index + 1}'s activations" if view is not None else "Backbone activations")
        if found is None:
            found, seconds = cached_features(cache, shas, self.model("prefix"), t.pixels.images, self.batch_size,
                                             rows=rows, mirror=mirror, view=view, on_batch=self.on_batch(what),
                                             strategy=t.strategy, mmap=True)
        t.log(f"{what} at {t.cut.layer}: {found.reused} of {len(found.array)} images reused from the cache, the rest "
              f"computed ({seconds:.1f} s).")
        self.found[key] = found.array
        return found.array

    @staticmethod
    def all_cached(cache, shas: list[str], rows: np.ndarray | None, *, mmap: bool = False):
        """The cached rows of images `rows` (default all) when every one is cached already, else None:
        then no model needs building."""
        return cache.complete(shas if rows is None else [shas[r] for r in rows], mmap=mmap)

    def on_batch(self, what: str):
        t, bar = self.training, None

        def on_batch(done, total):  # total: the images not cached yet
            nonlocal bar
            if t.progress_bar:
                bar = bar or keras.utils.Progbar(total, unit_name="image")
                bar.update(done)
            if t.beat(RunProgress(phase="features", message=f"{what} {done}/{total}", batch=done, batches=total)):
                raise RunCancelled("Cancelled during feature extraction; the epochs logged so far are kept.")

        return on_batch


class _RunReporter:
    """What a run says while it trains: log lines into its sink (echoed to the terminal with
    `echo`), and progress at most once a second, each write renewing the run's lease and
    bringing back whether it was cancelled."""

    def __init__(self, sink: RunSink, should_stop: Callable[[], bool], *, echo: bool,
                 clock: Callable[[], float] = time.monotonic):
        self.sink, self.should_stop, self.echo, self.clock = sink, should_stop, echo, clock
        self.last_beat = 0.0

    def log(self, message: str) -> None:
        self.sink.log(message)
        if self.echo:
            print(message, flush=True)

    def beat(self, progress: RunProgress, force: bool = False) -> bool:
        """Write progress at most once a second (always with `force`); True when the run should stop."""
        now = self.clock()
        cancel = False
        if force or now - self.last_beat > 1.0:
            self.last_beat = now
            cancel = self.sink.heartbeat(progress)
        return cancel or self.should_stop()

    def raise_if_cancelled(self) -> None:
        if self.beat(RunProgress(phase="stopping"), force=True):
            raise RunCancelled("Cancelled by request; the epochs logged so far are kept.")


class _StepTimes:
    """Seconds each step of a run took, for its summary's `Timings`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.features_reused = False  # every backbone feature came from the cache

    def add(self, key: str, seconds: float) -> float:
        """Add `seconds` to step `key`; its seconds so far."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        return self.seconds[key]

    def timed(self, key: str, step: Callable[[], Any]) -> Any:
        """`step()`, its seconds added to `key`."""
        started = time.perf_counter()
        result = step()
        self.add(key, time.perf_counter() - started)
        return result

    def record(self) -> Timings:
        return Timings(**{key: round(seconds, 3) for key, seconds in self.seconds.items()},
                       features_reused=self.features_reused)


def execute_run(run_id: str, store: Store, *, should_stop: Callable[[], bool] = lambda: False,
                progress_bar: bool = False, sink: RunSink | None = None) -> RunSummary:
    """Train, evaluate and save run `run_id` from its stored config; return its summary.

    Writes epochs, logs and progress to `sink` (defaults to `store`) as it goes and artifacts
    to the run folder. Raises `RunCancelled` if `should_stop()` (or a cancel the sink reports)
    stops it. The caller sets the final status.
    """
    return _Training(run_id, store, should_stop, progress_bar, sink).execute()


class _EpochTensorBoard(keras.callbacks.TensorBoard):
    """TensorBoard logs per epoch, safe to call off the training thread between batches."""

    async_safe = True  # it writes nothing per batch (update_freq "epoch")


class _StoreProgress(keras.callbacks.Callback):
    """Streams batch progress and epoch metrics into the store; stops training on cancel.

    `async_safe`: its batch hook reads no metric, so Keras may call it off the training
    thread instead of waiting for the device after every step.
    """

    async_safe = True

    def __init__(self, training: _Training, phase: str, epochs: int, checkpoint: bool,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.ctx, self.phase, self.epochs = training, phase, epochs
        self.checkpoint = checkpoint  # save the classifier's weights after every epoch
        self.clock = clock
        self.cancelled = False
        self.epoch_started = clock()
        self.epoch_seconds: list[float] = []
        self.epoch = 1
        self.batches = None

    def _progress(self, batch: int | None) -> RunProgress:
        """Progress in the current epoch (1-based `self.epoch`); the ETA covers it and the rest."""
        per_epoch = (sum(self.epoch_seconds) / len(self.epoch_seconds)) if self.epoch_seconds else None
        elapsed = self.clock() - self.epoch_started
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
        self.epoch_started = self.clock()
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
        seconds = self.clock() - self.epoch_started
        self.epoch_seconds.append(seconds)
        if self.cancelled:
            return
        self.ctx.step += 1
        metrics = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) or np.ndim(v) == 0}
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is not None:
            metrics["lr"] = float(np.asarray(lr))
        metrics["seconds"] = seconds
        self.ctx.sink.log_epoch(self.phase, epoch + 1, self.ctx.step, metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in
                          ("loss", "accuracy", "val_loss", "val_accuracy"))
        self.ctx.log(f"{self.phase} epoch {epoch + 1}/{self.epochs}: {shown} ({seconds:.1f} s)")
        if self.checkpoint:
            self.ctx.save_checkpoint(self.phase, epoch + 1)
        self.epoch, self.epoch_started = epoch + 2, self.clock()
        self.ctx.beat(self._progress(0), force=True)


def _write_tensorboard(folder: Path, history: list[dict[str, float]]) -> None:
    """Per-epoch scalars as Keras' TensorBoard callback writes them (train/ and validation/, epoch_*)."""
    import tensorflow as tf

    for side, prefix in (("train", ""), ("validation", "val_")):
        writer = tf.summary.create_file_writer(str(folder / side))
        with writer.as_default():
            for epoch, metrics in enumerate(history):
                for name, value in metrics.items():
                    if name.startswith(prefix) and (prefix or not name.startswith("val_")):
                        tf.summary.scalar(f"epoch_{name[len(prefix):]}", value, step=epoch)
        writer.close()


def warmup_cosine(learning_rate: float, steps: int, epochs: int):
    """The fine-tune's schedule: a linear warm-up from a tenth of `learning_rate` over the first tenth of
    the steps (at least one, at most an epoch), then cosine decay over the rest."""
    warmup = min(steps, max(1, steps * epochs // 10))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate * 0.1, decay_steps=max(1, steps * epochs - warmup),
        warmup_target=learning_rate, warmup_steps=warmup)


def model_probabilities(model, images: np.ndarray, indices: np.ndarray, batch_size: int, *,
                        mirror: bool = False) -> np.ndarray:
    """Class probabilities of the full model for the cached pixel rows `indices`, in that order,
    each image mirrored left-right if `mirror`.

    `predict` over the prefetching pixel pipeline: a model built under a multi-replica
    strategy splits each batch across its replicas. The last batch is filled up with copies of
    the last image (their outputs dropped), so every batch has one shape: one compiled step.
    """
    source = images[:, :, ::-1] if mirror else images
    padded = np.concatenate([indices, np.repeat(indices[-1:], -len(indices) % batch_size)])
    data = pipeline.batches(source, padded, np.zeros(len(padded), np.int32), batch_size)
    return np.asarray(model.predict(data, verbose=0))[:len(indices)]


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
