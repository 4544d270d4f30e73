"""The learning-rate finder: an exponential LR range test, as fastai's `lr_find`.

The rate grows exponentially from `min_lr` to `max_lr`, one mini-batch per step, while the
training loss is recorded (smoothed with an exponential moving average, bias-corrected). The
loss first falls, then flattens, then blows up; the test stops once the smoothed loss passes
four times its best. The suggestion is a tenth of the rate at the smoothed loss's minimum
(fastai's "minimum / 10" rule): the fastest rate still well short of divergence.

Phase "head" runs on the backbone's cached features (the same cache the run's head phase
uses, so a later run reuses it): a fresh head, a few hundred steps, seconds. Phase
"finetune" first fits the head on those features at the recipe's rate, then runs the test
through the recipe's top `finetune_layers` of the backbone on the pixels, as phase 2 trains;
the suggestion is then for the fine-tune rate (`lr * finetune_lr_scale` in the recipe).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from tlcore.errors import InvalidInput

PHASES = ("head", "finetune")
SMOOTHING = 0.98  # weight of the running average of the loss
DIVERGENCE = 4.0  # stop once the smoothed loss exceeds this multiple of its best


@dataclasses.dataclass(frozen=True)
class LRFinding:
    """What one range test found."""

    phase: str  # "head" or "finetune"
    suggested_lr: float
    min_loss_lr: float  # the rate at the smoothed loss's minimum
    curve: list[tuple[float, float]]  # (learning rate, smoothed loss), one per step
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "suggested_lr": self.suggested_lr, "min_loss_lr": self.min_loss_lr,
                "curve": [[lr, loss] for lr, loss in self.curve], "seconds": round(self.seconds, 3)}


def learning_rates(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """`steps` rates from `min_lr` to `max_lr`, evenly spaced on a log scale."""
    if not 0 < min_lr < max_lr:
        raise InvalidInput(f"`min_lr` must be positive and below `max_lr`. Received: min_lr={min_lr}, "
                           f"max_lr={max_lr}")
    if steps < 10:
        raise InvalidInput(f"`steps` must be at least 10. Received: steps={steps}")
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def range_test(train_step: Callable[[float], float], rates: np.ndarray) -> list[tuple[float, float]]:
    """Run `train_step(lr) -> batch loss` at each rate; the smoothed curve, cut where it diverges."""
    average, best, curve = 0.0, math.inf, []
    for step, lr in enumerate(rates, 1):
        loss = train_step(float(lr))
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** step)
        curve.append((float(lr), float(smoothed)))
        best = min(best, smoothed)
        if step > len(rates) // 10 and smoothed > DIVERGENCE * best:
            break
    return curve


def suggest(curve: list[tuple[float, float]]) -> tuple[float, float]:
    """(suggested rate, rate at the minimum) of a range-test curve: a tenth of the minimum's rate,
    never below the curve's first rate."""
    if len(curve) < 2:
        raise InvalidInput("The range test stopped before it had two finite losses; lower `min_lr`.")
    at_min = min(curve, key=lambda point: point[1])[0]
    return max(at_min / 10, curve[0][0]), at_min


def find_lr(config, store=None, *, phase: str = "head", min_lr: float | None = None, max_lr: float | None = None,
            steps: int | None = None, on_progress: Callable[[str], None] | None = None) -> LRFinding:
    """The LR range test for recipe `config` (a `TrainConfig`) on its dataset.

    Args:
        config: the recipe; its dataset, backbone, size, weights, batch size, seed (and, for
            "finetune", `finetune_layers` and `lr`) are used.
        store: the store holding the dataset. Defaults to the data home's.
        phase: "head" (on cached features, seconds) or "finetune" (through the top layers, on
            pixels; minutes on CPU). Defaults to "head".
        min_lr, max_lr, steps: the range and its number of mini-batches. Default to 1e-6..1 in
            300 steps for the head, 1e-7..1e-1 in 60 steps for the fine-tune phase.
        on_progress: called with a sentence as each stage starts.
    """
    if phase not in PHASES:
        raise InvalidInput(f"`phase` must be one of {', '.join(PHASES)}. Received: phase={phase!r}")
    head = phase == "head"
    rates = learning_rates(min_lr or (1e-6 if head else 1e-7), max_lr or (1.0 if head else 1e-1),
                           steps or (300 if head else 60))
    say = on_progress or (lambda message: None)
    started = time.perf_counter()
    data = _Data(config, store, say)
    if head:
        curve = _head_range_test(data, rates)
    else:
        curve = _finetune_range_test(data, rates, say)
    suggested, at_min = suggest(curve)
    return LRFinding(phase, suggested, at_min, curve, time.perf_counter() - started)


class _Data:
    """A recipe's dataset as the run would see it: pixels, cached features, labels, classifier."""

    def __init__(self, config, store, say):
        import keras

        from tlcore.backbones import get_backbone, resolve_weights
        from tlcore.backbones.classifier import build_classifier
        from tlcore.backbones.features import cached_features, feature_cache
        from tlcore.backbones.folding import fold_batchnorm
        from tlcore.data import pipeline
        from tlcore.data.importer import resolve_dataset
        from tlcore.data.manifest import run_entries
        from tlcore.records.store import Store
        from tlcore.train.training import class_weights

        self.config = config
        store = store or Store()
        dataset = resolve_dataset(config.dataset, store, seed=config.seed, split=config.split)
        entries = run_entries(dataset, config.split, config.seed)
        spec = get_backbone(config.backbone)
        size = config.resolved_image_size(spec)
        labels = list(dataset.classes)
        y_all = np.array([labels.index(e.label) for e in entries], dtype=np.int32)
        self.train = pipeline.split_indices(entries)["train"]
        if len(self.train) < 2:
            raise InvalidInput(f"Dataset {dataset.label} has {len(self.train)} training images; the range test "
                               "needs at least 2.")
        self.batch_size = min(config.batch_size, len(self.train))  # a small set: every step sees all of it
        self.y_train = y_all[self.train]
        self.class_weight = class_weights(config.class_weight, self.y_train, len(labels))
        keras.utils.set_random_seed(config.seed)
        say(f"Decoding {len(entries)} images at {size} px")
        self.pixels, _ = pipeline.pixel_cache(entries, size)
        self.classifier = build_classifier(spec, size, resolve_weights(spec, config.weights), len(labels),
                                           config.dropout)
        say("Backbone features (cached after the first time)")
        feature_model = fold_batchnorm(self.classifier.features_model())
        cache = feature_cache(spec.name, size, config.weights, config.seed)
        found, _ = cached_features(cache, [e.sha256 for e in entries], feature_model, self.pixels.images,
                                   max(config.batch_size, 32))
        self.features = np.asarray(found.array)[self.train]

    def head_model(self, learning_rate: float):
        """The classifier's head (its own layers) on feature vectors, compiled at `learning_rate`."""
        from tlcore.backbones.classifier import compile_classifier

        head = self.classifier.head_on_features()
        compile_classifier(head, learning_rate)
        return head

    def batches(self, source_rows: Callable[[np.ndarray], np.ndarray]):
        """Endless shuffled mini-batches `(x, y)`, x from `source_rows(positions in train)`."""
        rng = np.random.default_rng(self.config.seed)
        size = self.batch_size
        while True:
            order = rng.permutation(len(self.train))
            for start in range(0, len(order) - size + 1, size):
                positions = np.sort(order[start:start + size])
                yield source_rows(positions), self.y_train[positions]


def _stepper(model, batches, class_weight):
    def train_step(lr: float) -> float:
        model.optimizer.learning_rate.assign(lr)
        x, y = next(batches)
        return float(model.train_on_batch(x, y, class_weight=class_weight, return_dict=True)["loss"])

    return train_step


def _head_range_test(data: _Data, rates: np.ndarray) -> list[tuple[float, float]]:
    head = data.head_model(float(rates[0]))
    return range_test(_stepper(head, data.batches(lambda p: data.features[p]), data.class_weight), rates)


def _finetune_range_test(data: _Data, rates: np.ndarray, say) -> list[tuple[float, float]]:
    from tlcore.backbones.classifier import compile_classifier, unfreeze_top
    from tlcore.backbones.folding import fold_batchnorm

    config = data.config
    say(f"Fitting the head on the features first (lr {config.lr:g})")
    head = data.head_model(config.lr)
    head.fit(data.features, data.y_train, batch_size=data.batch_size, epochs=max(1, min(config.head_epochs, 10)),
             class_weight=data.class_weight, verbose=0)
    unfreeze_top(data.classifier.backbone, config.finetune_layers)
    trainer = fold_batchnorm(data.classifier.model)  # shares the trainable weights, as phase 2 trains
    compile_classifier(trainer, float(rates[0]))
    say(f"Range test through the top {config.finetune_layers} layers ({len(rates)} steps)")
    images = data.pixels.images
    pixels = data.batches(lambda p: np.asarray(images[data.train[p]], dtype=np.float32))
    return range_test(_stepper(trainer, pixels, data.class_weight), rates)
