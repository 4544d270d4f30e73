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
from typing import Any, TypeVar

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
    model_path: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

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
