"""The typed contract of a run's live progress and final summary.

Training writes a `RunProgress` while it runs and a `RunSummary` when it finishes; the store
keeps them as JSON and hands them back as these dataclasses, so the CLI, the pages and the
benchmarks read attributes, never guessed dict keys. `to_dict`/`from_dict` round-trip through
JSON; keys a newer or older writer added that this code does not know are kept in `extra`,
so nothing is lost between versions.

To record something new about a run, add a field with a default to the dataclass it belongs
to (or a new dataclass as such a field): old rows read with the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T", bound="Record")


class Record:
    """Mixin for the dataclasses below: JSON-able dicts in and out, nested records typed."""

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "extra":
                data.update(value)
            else:
                data[field.name] = _plain(value)
        return data

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {name: _typed(hints[name], data.pop(name)) for name in list(data) if name in known - {"extra"}}
        if "extra" in known:
            kwargs["extra"] = data
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _typed(hint: Any, value: Any) -> Any:
    """`value` (plain JSON) as type `hint`: records built, optional and dict values followed."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        return {k: _typed(value_hint, v) for k, v in value.items()}
    if origin in (list, tuple):
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return origin(_typed(item_hint, v) for v in value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is bool:
        return bool(value)
    return value


@dataclasses.dataclass(frozen=True)
class RunProgress(Record):
    """Where a running run is: phase, epoch and batch within it, and the time left."""

    phase: str | None = None  # preparing, features, head, finetune, evaluating, stopping
    message: str | None = None
    epoch: int | None = None  # 1-based within the phase
    epochs: int | None = None
    batch: int | None = None
    batches: int | None = None
    eta_s: float | None = None
    step: int | None = None  # epochs finished across both phases
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Executor(Record):
    """Where a run trained: the local worker, or a Ray task on a cluster node."""

    kind: str = "local"  # "local" or "ray"
    host: str | None = None
    node_id: str | None = None  # the Ray node id (ray only)
    gpus: int = 0  # GPUs the run was given
    cpus: float | None = None  # CPUs the run was given (ray only)
    began_at: float | None = None  # when training began on that host (epoch seconds)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One line for people: `ray on node 3f2a… (gpu-box-2), 1 GPU` or `local worker on laptop, CPU`."""
        where = f"ray on node {self.node_id[:8]}… ({self.host})" if self.kind == "ray" and self.node_id \
            else f"{self.kind} worker on {self.host or 'this machine'}"
        return f"{where}, {f'{self.gpus} GPU' + ('s' if self.gpus > 1 else '') if self.gpus else 'CPU'}"


@dataclasses.dataclass(frozen=True)
class ClassMetrics(Record):
    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass(frozen=True)
class Metrics(Record):
    """Quality on the evaluation split."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics] = dataclasses.field(default_factory=dict)
    # Recall of the class with the fewest evaluation images (ties: the worse recall): what an
    # imbalance costs, which accuracy hides. None in summaries written before it was recorded.
    smallest_class: str | None = None
    smallest_class_recall: float | None = None
    # How the evaluation predicted: "none", or "flip" (each image and its mirror, averaged).
    tta: str = "none"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Timings(Record):
    """Seconds spent in each step of a run (None: the step did not run)."""

    pixels_s: float | None = None
    features_s: float | None = None
    head_s: float | None = None
    finetune_s: float | None = None
    eval_s: float | None = None
    total_s: float | None = None
    features_reused: bool = False  # the backbone features came from the cache
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DeviceRecord(Record):
    """Where a run trained and how: the device facts `devices.plan` resolved for it."""

    kind: str = "CPU"  # "GPU" or "CPU"
    devices: list[str] = dataclasses.field(default_factory=list)  # one per replica; empty: host CPU
    replicas: int = 1
    strategy: str = ""
    mixed_precision: bool = False
    xla: bool = False
    batch_per_replica: int | None = None
    global_batch: int | None = None  # images per optimizer step, summed over replicas
    # The rule the learning rates followed for that global batch (`TrainConfig.lr_scale`) and the
    # factor it gave; runs from before the rule trained with the rate unscaled.
    lr_scaling: str = "none"
    lr_scale: float = 1.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """'2 replicas (MirroredStrategy) · mixed precision · batch 32 per replica = 64 global'."""
        bits = [f"{self.replicas} replica{'s' if self.replicas > 1 else ''} ({self.strategy or self.kind})"]
        bits += [name for name, on in (("mixed precision", self.mixed_precision), ("XLA", self.xla)) if on]
        if self.batch_per_replica:
            bits.append(f"batch {self.batch_per_replica} per replica = {self.global_batch} global")
        if self.lr_scale != 1.0:
            bits.append(f"learning rates × {self.lr_scale:.3g} ({self.lr_scaling} rule)")
        return " · ".join(bits)


@dataclasses.dataclass(frozen=True)
class ReliabilityBin(Record):
    """One confidence bin: its range, how many predictions fell in it, their accuracy and mean confidence."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclasses.dataclass(frozen=True)
class Calibration(Record):
    """Temperature scaling fitted on validation, and the ECE it gives on the evaluation split.

    `temperature` is None when the run could not be calibrated; `reason` then says why.
    """

    temperature: float | None = None
    ece_before: float | None = None  # on the evaluation split, raw softmax
    ece_after: float | None = None  # on the evaluation split, after temperature scaling
    fitted_on: int = 0  # validation images the temperature was fitted on
    reliability_before: list[ReliabilityBin] = dataclasses.field(default_factory=list)
    reliability_after: list[ReliabilityBin] = dataclasses.field(default_factory=list)
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class CoveragePoint(Record):
    """Answering only when the confidence is at least `threshold`: the share of validation images
    answered (`coverage`) and the share of those answered right (`precision`)."""

    threshold: float
    coverage: float
    precision: float


@dataclasses.dataclass(frozen=True)
class Threshold(Record):
    """The confidence below which the model answers "not sure", chosen on validation for a target precision.

    `reached` is False when no threshold below 1.0 gave the target precision on validation: the
    run then has no usable threshold and every photo gets an answer (`threshold` 1.0 is a
    placeholder nobody applies; `usable` says so).
    """

    target_precision: float = 0.95
    threshold: float = 1.0
    reached: bool = False
    precision: float | None = None  # on validation, above the threshold
    coverage: float = 0.0  # share of validation images answered
    curve: list[CoveragePoint] = dataclasses.field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Whether answers below `threshold` should be marked "not sure" (a reached target below 1.0)."""
        return self.reached and self.threshold < 1.0


@dataclasses.dataclass(frozen=True)
class HeadTrial(Record):
    """One head recipe fitted on the cached features, and how it did on validation at its best epoch."""

    lr: float
    dropout: float
    label_smoothing: float
    class_weight: str  # "none" or "balanced"
    val_macro_f1: float
    val_accuracy: float
    best_epoch: int = 0
    epochs: int = 0  # epochs it trained before early stopping

    def settings(self) -> str:
        """'lr 0.001, dropout 0.2, label smoothing 0.1, class weight none'."""
        return (f"lr {self.lr:g}, dropout {self.dropout:g}, label smoothing {self.label_smoothing:g}, "
                f"class weight {self.class_weight}")


@dataclasses.dataclass(frozen=True)
class ClassWeightChoice(Record):
    """`class_weight="auto"`: the weighting kept, and the best validation macro F1 each one reached."""

    chosen: str  # "none" or "balanced"
    none_val_macro_f1: float
    balanced_val_macro_f1: float

    def describe(self) -> str:
        return (f"Class weighting auto: {self.chosen} kept (best validation macro F1: none "
                f"{self.none_val_macro_f1:.4f}, balanced {self.balanced_val_macro_f1:.4f}).")


@dataclasses.dataclass(frozen=True)
class HeadSearch(Record):
    """The heads fitted on cached features (one per trial) and the one kept (`chosen`, an index)."""

    trials: list[HeadTrial] = dataclasses.field(default_factory=list)
    chosen: int = 0
    seconds: float | None = None
    class_weight: ClassWeightChoice | None = None  # set when both weightings were tried


@dataclasses.dataclass(frozen=True)
class FinetuneDecision(Record):
    """What the fine-tune ended with: validation accuracy after the head, after the fine-tune and, with
    `finetune_result` "average", of the averaged weights; and which weights were kept."""

    head_val_accuracy: float
    finetune_val_accuracy: float
    kept: str  # "average", "finetune" (`finetune_result` "best"), or "head" when the fine-tune did not help
    averaged_val_accuracy: float | None = None  # None: "best", or a run from before averaging

    def describe(self) -> str:
        head, tuned, averaged = self.head_val_accuracy, self.finetune_val_accuracy, self.averaged_val_accuracy
        if self.kept == "average":
            return (f"The fine-tuned weights were averaged with the head's: validation accuracy {averaged:.3f} "
                    f"(head {head:.3f}, fine-tune alone {tuned:.3f}).")
        if self.kept == "head" and averaged is not None:
            return (f"The fine-tune did not help: the average of its weights and the head's is clearly worse on "
                    f"validation (accuracy {averaged:.3f} vs {head:.3f}; fine-tune alone {tuned:.3f}), so the "
                    "head's weights were kept.")
        if self.kept == "head":
            verb = "ended below" if tuned < head else "did not beat"
            return (f"The fine-tune {verb} the head on validation (accuracy {tuned:.3f} vs "
                    f"{head:.3f}), so the head's weights were kept.")
        return (f"Fine-tuned weights kept: validation accuracy {head:.3f} after the head, "
                f"{tuned:.3f} after the fine-tune.")


def describe_cached_augmentation(augment: Sequence[str], views: int) -> str:
    """How the recipe's augmentations `augment` reach a fine-tune on cached activations with `views`
    augmented views per training image: clauses after a colon, or "" when it asks for none."""
    others = [a for a in augment if a != "flip"]
    clauses = ["flip as the mirrored images' activations"] if "flip" in augment else []
    if others and views:
        clauses.append(f"{', '.join(others)} as {views} augmented view{'s' if views > 1 else ''} of each training "
                       "image, drawn once")
    elif others:
        clauses.append(f"{', '.join(others)} not at all (augmented views 0; fine-tune inputs \"pixels\" applies "
                       "every augmentation, slower)")
    return ": " + "; ".join(clauses) if clauses else ""


@dataclasses.dataclass(frozen=True)
class RunSummary(Record):
    """What a finished run produced and how good it is."""

    backbone: str
    weights: str
    dataset: str  # "name vN"
    dataset_id: str
    image_size: int
    eval_split: str  # "test", or "val" when the dataset has no test split
    eval_images: int
    metrics: Metrics
    timings: Timings = dataclasses.field(default_factory=Timings)
    device: str = ""
    device_record: DeviceRecord | None = None  # None: a run from before devices were recorded
    model_path: str = ""
    calibration: Calibration | None = None  # temperature scaling fitted on validation, ECE on eval
    threshold: Threshold | None = None  # the "not sure" threshold chosen on validation
    # The head phase's choice on cached features (None: not searched, e.g. runs before it existed).
    head_search: HeadSearch | None = None
    class_weight: str | None = None  # the weighting the run trained with ("none"/"balanced"); None: not recorded
    finetune: FinetuneDecision | None = None  # None: no fine-tune, or a run from before the decision
    # What the fine-tune trained on: "cached" activations below its layers, or "pixels"; None: no
    # fine-tune, or a run from before it was recorded (pixels).
    finetune_inputs: str | None = None
    # Augmented views per training image the cached fine-tune drew from; None: none (runs before them).
    finetune_views: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe_finetune_inputs(self, augment: Sequence[str] = ()) -> str | None:
        """What the fine-tune trained on, in one sentence, for a recipe with augmentations `augment`
        (None: no fine-tune, or not recorded)."""
        if self.finetune_inputs == "cached":
            return ("The fine-tune trained the top layers on cached activations (the backbone below them ran once "
                    "per image)" + describe_cached_augmentation(augment, self.finetune_views or 0) + ".")
        if self.finetune_inputs == "pixels":
            return f"The fine-tune trained on {'augmented ' if augment else ''}pixels through the whole backbone."
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RunSummary":
        data = dict(data or {})
        # Summaries written before this contract repeated the run's id and status (columns of
        # the run) and kept the feature-cache flag beside the timings.
        data.pop("run_id", None)
        data.pop("status", None)
        if "feature_cache_reused" in data:
            reused = bool(data.pop("feature_cache_reused"))
            timings = dict(data.get("timings") or {})
            timings["features_reused"] = bool(timings.get("features_reused", reused))
            data["timings"] = timings
        return super().from_dict(data)
