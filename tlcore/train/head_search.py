"""The head chooses its own settings on cached backbone features.

A softmax head on cached features costs seconds, so instead of one fixed recipe the head phase
fits a small fixed grid of heads at once (learning rate x dropout x label smoothing x class
weighting) and keeps the one with the best validation macro F1. All trials train together,
vectorised in NumPy: one weight tensor of shape (trials, features, classes), one Adam state per
trial, the same batches in the same order, one dropout draw per batch shared by every trial (each
trial keeps the units its rate lets through). Each trial stops on its own (early stopping on
validation macro F1, then validation loss) and keeps its best epoch's weights, as Keras'
`EarlyStopping(restore_best_weights=True)` would. The chosen kernel and bias are copied into the
classifier's Dense head, so no second fit is needed.

The maths is Keras' own for `Dropout -> Dense(softmax)` trained with `SparseCategoricalCrossentropy`
(mean over the batch of per-image weighted losses, optional label smoothing) and Adam (beta 0.9,
0.999, epsilon 1e-7), glorot-uniform kernel and zero bias.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from tlcore.records.run_record import ClassWeightChoice, HeadSearch, HeadTrial

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
DROPOUTS = (0.2, 0.5)
LABEL_SMOOTHINGS = (0.0, 0.1)
CLASS_WEIGHT_MODES = ("none", "balanced")
MODES = ("auto", "off")  # --head-search


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """One head recipe tried: what it trains with."""

    lr: float
    dropout: float
    label_smoothing: float
    class_weight: str  # "none" or "balanced"


@dataclasses.dataclass
class FittedHeads:
    """What the trials ended with: the record (trials and the choice) and each trial's best weights,
    plus the per-epoch metrics of every trial (epochs x trials) for the chosen trial's curves."""

    record: HeadSearch
    kernels: np.ndarray  # (trials, features, classes), each trial's best epoch
    biases: np.ndarray  # (trials, classes)
    # loss, accuracy, val_loss, val_accuracy, val_macro_f1, seconds (of the epoch, all live trials): (epochs, trials)
    history: dict[str, np.ndarray]

    @property
    def chosen(self) -> HeadTrial:
        return self.record.trials[self.record.chosen]

    def chosen_weights(self) -> list[np.ndarray]:
        """[kernel, bias] of the chosen trial, as `Dense.set_weights` takes them."""
        return [self.kernels[self.record.chosen], self.biases[self.record.chosen]]

    def chosen_history(self) -> list[dict[str, float]]:
        """The chosen trial's metrics per epoch it ran (Keras' names), for the run's curves."""
        k, ran = self.record.chosen, self.chosen.epochs
        return [{name: float(values[e, k]) for name, values in self.history.items()} for e in range(ran)]


def class_weights(mode: str, y_train: np.ndarray, num_classes: int) -> dict[int, float] | None:
    """Keras `class_weight` for `mode` ("balanced": n / (classes present * count), as scikit-learn's;
    "none", or "auto" before the head search decided it: None). A class without training images
    gets weight 0 (it never reaches the loss)."""
    if mode != "balanced":
        return None
    counts = np.bincount(y_train, minlength=num_classes)
    present = int((counts > 0).sum())
    return {c: float(len(y_train) / (present * n)) if n else 0.0 for c, n in enumerate(counts)}


def trial_grid(lr: float, dropout: float, class_weight: str, search: bool) -> list[TrialSettings]:
    """The trials to fit. First the recipe's own settings (so a tie keeps them), once per class
    weighting `class_weight` allows ("auto": none then balanced); with `search`, the fixed grid too."""
    modes = CLASS_WEIGHT_MODES if class_weight == "auto" else (class_weight,)
    trials = [TrialSettings(lr, dropout, 0.0, mode) for mode in modes]
    if search:
        for lr_, dropout_, smoothing, mode in itertools.product(LEARNING_RATES, DROPOUTS, LABEL_SMOOTHINGS, modes):
            settings = TrialSettings(lr_, dropout_, smoothing, mode)
            if settings not in trials:
                trials.append(settings)
    return trials


def fit_heads(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
              trials: list[TrialSettings], *, lr_scale: float, batch_size: int, max_epochs: int, patience: int,
              seed: int, on_epoch: Callable[[int], bool] | None = None) -> FittedHeads:
    """Fit one softmax head per trial on features `x_train` (an array, or rows gathered by index such as
    `tlcore.data.pipeline.StackedRows`), choose on `x_val` (validation macro F1,
    then accuracy, then no class weighting, then the earlier trial). `on_epoch(epoch)` (1-based)
    is called after each epoch; True stops every trial.

    Each trial trains at its `lr` times `lr_scale`, the run's factor for its global batch
    (`TrainConfig.lr_scale`), as the single head fit and the fine-tune do; the record keeps the
    unscaled `lr`, which is what the fine-tune scales again.

    Successive halving keeps the cost near a few single fits: after every `rung` epochs the
    worse half of the trials still training stops (ranked by their best validation macro F1,
    then loss), until `KEEP` remain; each trial also stops after `patience` epochs without
    improving."""
    with threadpool_limits(1):  # tiny matrix products: BLAS threads only contend on a shared machine
        return _fit_heads(x_train, y_train, x_val, y_val, num_classes, trials, lr_scale=lr_scale,
                          batch_size=batch_size, max_epochs=max_epochs, patience=patience, seed=seed,
                          on_epoch=on_epoch)


KEEP = 3  # trials that train to the end (or to their own early stop)


def _fit_heads(x_train, y_train, x_val, y_val, num_classes, trials, *, lr_scale, batch_size, max_epochs, patience,
               seed, on_epoch) -> FittedHeads:
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x_val = np.asarray(x_val, np.float32)  # x_train is read a batch at a time (it may be `pipeline.StackedRows`)
    n_trials, dim, n = len(trials), x_train.shape[1], len(x_train)
    limit = np.sqrt(6.0 / (dim + num_classes))
    init = rng.uniform(-limit, limit, (1, dim, num_classes)).astype(np.float32)
    live = _LiveTrials(trials, lr_scale, init.repeat(n_trials, axis=0), y_train, num_classes)
    rung = max(2, max_epochs // 6)

    best = {"f1": np.full(n_trials, -1.0), "loss": np.full(n_trials, np.inf), "epoch": np.zeros(n_trials, int)}
    best_kernel, best_bias = live.kernel.copy(), live.bias.copy()
    waited = np.zeros(n_trials, int)
    ran = np.zeros(n_trials, int)
    names = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "seconds")
    history = {name: np.full((max_epochs, n_trials), np.nan) for name in names}
    for epoch in range(max_epochs):
        epoch_started = time.perf_counter()
        order = rng.permutation(n)
        loss_sum, correct = np.zeros(len(live.ids)), np.zeros(len(live.ids))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            batch_loss, batch_correct = live.step(np.asarray(x_train[rows], np.float32), y_train[rows], rng)
            loss_sum += batch_loss
            correct += batch_correct
        ids = live.ids
        val_loss, val_acc, val_f1 = evaluate_heads(live.kernel, live.bias, x_val, y_val, num_classes)
        seconds = time.perf_counter() - epoch_started  # the epoch of every trial still live, fitted together
        for name, values in zip(names, (loss_sum / n, correct / n, val_loss, val_acc, val_f1, seconds)):
            history[name][epoch, ids] = values
        ran[ids] += 1
        better = (val_f1 > best["f1"][ids] + 1e-12) | ((np.abs(val_f1 - best["f1"][ids]) <= 1e-12)
                                                      & (val_loss < best["loss"][ids]))
        improved = ids[better]
        best["f1"][improved], best["loss"][improved] = val_f1[better], val_loss[better]
        best["epoch"][improved] = epoch + 1
        best_kernel[improved], best_bias[improved] = live.kernel[better], live.bias[better]
        waited[ids] = np.where(better, 0, waited[ids] + 1)
        keep = waited[ids] < patience
        if (epoch + 1) % rung == 0 and keep.sum() > KEEP:
            candidates = np.flatnonzero(keep)
            ranked = sorted(candidates, key=lambda i: (-best["f1"][ids[i]], best["loss"][ids[i]], ids[i]))
            keep[ranked[max(KEEP, -(-len(ranked) // 2)):]] = False
        live.keep(keep)
        if (on_epoch is not None and on_epoch(epoch + 1)) or not len(live.ids):
            break

    _, best_acc, best_f1 = evaluate_heads(best_kernel, best_bias, x_val, y_val, num_classes)
    records = [HeadTrial(lr=float(t.lr), dropout=float(t.dropout), label_smoothing=float(t.label_smoothing),
                         class_weight=t.class_weight, val_macro_f1=float(best_f1[k]), val_accuracy=float(best_acc[k]),
                         best_epoch=int(best["epoch"][k]), epochs=int(ran[k]))
               for k, t in enumerate(trials)]
    chosen = choose(records)
    by_mode = {mode: max((r.val_macro_f1 for r in records if r.class_weight == mode), default=None)
               for mode in CLASS_WEIGHT_MODES}
    class_weight = None
    if all(score is not None for score in by_mode.values()):
        class_weight = ClassWeightChoice(chosen=records[chosen].class_weight, none_val_macro_f1=by_mode["none"],
                                         balanced_val_macro_f1=by_mode["balanced"])
    record = HeadSearch(trials=records, chosen=chosen, seconds=round(time.perf_counter() - started, 3),
                        class_weight=class_weight)
    return FittedHeads(record, best_kernel, best_bias, history)


class _LiveTrials:
    """The trials still training: their weights, Adam state and settings, compacted as trials stop."""

    def __init__(self, trials: list[TrialSettings], lr_scale: float, kernel: np.ndarray, y_train: np.ndarray,
                 num_classes: int):
        n_trials = len(trials)
        self.ids = np.arange(n_trials)
        self.kernel, self.bias = kernel, np.zeros((n_trials, num_classes), np.float32)
        self.adam = [_Adam(self.kernel.shape), _Adam(self.bias.shape)]
        self.lrs = np.array([t.lr * lr_scale for t in trials], np.float32)
        self.smoothing = np.array([t.label_smoothing for t in trials], np.float32)[:, None, None]
        self.rates = np.array([t.dropout for t in trials], np.float32)
        self.class_weights = np.stack([_weight_row(t.class_weight, y_train, num_classes) for t in trials])
        self.num_classes = num_classes

    def keep(self, mask: np.ndarray) -> None:
        if mask.all():
            return
        self.ids = self.ids[mask]
        for name in ("kernel", "bias", "lrs", "smoothing", "rates", "class_weights"):
            setattr(self, name, getattr(self, name)[mask])
        for adam in self.adam:
            adam.m, adam.v = adam.m[mask], adam.v[mask]

    def step(self, x: np.ndarray, y: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """One Adam step of every live trial on batch (`x`, `y`); their weighted loss sums and hits."""
        b, dim, classes = len(x), x.shape[1], self.num_classes
        draw = rng.random(x.shape, dtype=np.float32)
        logits = np.empty((len(self.ids), b, classes), np.float32)
        groups = [(rate, np.flatnonzero(self.rates == rate)) for rate in np.unique(self.rates)]
        # One dropped copy of the batch per dropout rate (Keras' inverted dropout), times the kernels
        # of that rate's trials side by side: one matrix product per rate.
        dropped = {rate: x * (draw >= rate) / (1 - rate) for rate, _ in groups}
        for rate, group in groups:
            side = self.kernel[group].transpose(1, 0, 2).reshape(dim, -1)
            logits[group] = (dropped[rate] @ side).reshape(b, len(group), classes).transpose(1, 0, 2)
        probs = _softmax(logits + self.bias[:, None, :])
        target = _targets(y, classes, self.smoothing)
        weights = self.class_weights[:, y]  # (trials, b)
        losses = (weights * -(target * np.log(np.clip(probs, 1e-7, 1))).sum(-1)).sum(1)
        hits = (probs.argmax(-1) == y).sum(1)
        grad_logits = weights[:, :, None] * (probs - target) / b
        grad_kernel = np.empty_like(self.kernel)
        for rate, group in groups:
            side = dropped[rate].T @ grad_logits[group].transpose(1, 0, 2).reshape(b, -1)
            grad_kernel[group] = side.reshape(dim, len(group), classes).transpose(1, 0, 2)
        self.kernel -= self.adam[0].step(grad_kernel, self.lrs)
        self.bias -= self.adam[1].step(grad_logits.sum(1), self.lrs)
        return losses, hits


def choose(trials: list[HeadTrial]) -> int:
    """Index of the trial to keep: best validation macro F1, then accuracy; ties go to no class
    weighting, then to the earlier trial (the recipe's own settings come first)."""
    return ranking(trials)[0]


def ranking(trials: list[HeadTrial]) -> list[int]:
    """Indices of `trials`, best first, by the order `choose` keeps."""
    return sorted(range(len(trials)), key=lambda k: (-round(trials[k].val_macro_f1, 9),
                                                     -round(trials[k].val_accuracy, 9),
                                                     trials[k].class_weight != "none", k))


def _weight_row(mode: str, y_train: np.ndarray, num_classes: int) -> np.ndarray:
    weights = class_weights(mode, y_train, num_classes)
    return np.ones(num_classes, np.float32) if weights is None else \
        np.array([weights[c] for c in range(num_classes)], np.float32)


def _targets(y: np.ndarray, num_classes: int, smoothing: np.ndarray) -> np.ndarray:
    """One-hot rows of `y`, smoothed per trial as Keras does: (1 - s) * one_hot + s / classes."""
    one_hot = np.eye(num_classes, dtype=np.float32)[y][None]
    return one_hot * (1 - smoothing) + smoothing / num_classes


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def evaluate_heads(kernel, bias, x, y, num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per trial: validation loss (unweighted, unsmoothed), accuracy and macro F1 (over the classes
    present in `y`, as `tlcore.evaluate.evaluation` computes it)."""
    probs = _softmax(x[None] @ kernel + bias[:, None, :])
    loss = -np.log(np.clip(probs[:, np.arange(len(y)), y], 1e-7, 1)).mean(1)
    pred = probs.argmax(-1)
    accuracy = (pred == y).mean(1)
    present = np.unique(y)
    f1 = np.zeros(len(kernel))
    for c in present:
        tp = ((pred == c) & (y == c)).sum(1)
        predicted, support = (pred == c).sum(1), (y == c).sum()
        f1 += np.where(tp > 0, 2 * tp / np.maximum(predicted + support, 1), 0.0)
    return loss, accuracy, f1 / len(present)


class _Adam:
    """Keras' Adam, one learning rate per trial (the first axis)."""

    def __init__(self, shape, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.m, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)  # trials first
        self.beta_1, self.beta_2, self.epsilon, self.t = beta_1, beta_2, epsilon, 0

    def step(self, grad: np.ndarray, lrs: np.ndarray) -> np.ndarray:
        """The update to subtract for gradient `grad`."""
        self.t += 1
        self.m *= self.beta_1
        self.m += (1 - self.beta_1) * grad
        grad *= grad
        self.v *= self.beta_2
        self.v += (1 - self.beta_2) * grad
        alpha = lrs * np.sqrt(1 - self.beta_2 ** self.t) / (1 - self.beta_1 ** self.t)
        update = np.sqrt(self.v)
        update += self.epsilon
        np.divide(self.m, update, out=update)
        update *= alpha.reshape((-1,) + (1,) * (grad.ndim - 1))
        return update
