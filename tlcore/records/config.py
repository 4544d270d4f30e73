"""A run's full recipe: one frozen dataclass that the CLI, the dashboard and the worker share.

`config.json` in a run folder is `asdict(TrainConfig)`; it reproduces the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tlcore.errors import InvalidInput

AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast", "translate")
BATCH_SCOPES = ("replica", "global")
# How the learning rate follows the global batch (images per optimizer step) when it differs from
# `batch_size`, the batch the rate was chosen for on one device (see `TrainConfig.lr_scale`).
LR_SCALINGS = ("sqrt", "linear", "none")
SWITCHES = ("auto", "on", "off")  # mixed precision and XLA; the rule for "auto" is in `devices.plan`


def check_switch(name: str, value: str) -> str:
    """`value` if it is one of auto/on/off, else InvalidInput naming `name`."""
    if value not in SWITCHES:
        raise InvalidInput(f"`{name}` must be one of {', '.join(SWITCHES)}. Received: {name}={value!r}")
    return value

CLASS_WEIGHTS = ("auto", "balanced", "none")
HEAD_SEARCH_MODES = ("auto", "off")
TTA_MODES = ("none", "flip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Defaults are the fast offline recipe (EfficientNet-Lite0, head only)."""

    dataset: str  # dataset id or name
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet" or "none"
    image_size: int | None = None  # None: the backbone's default size
    head_epochs: int = 20
    finetune_epochs: int = 0
    finetune_layers: int = 20  # trainable layers from the top of the backbone in phase 2
    augment: tuple[str, ...] = ()  # used by the fine-tune phase (and head phase if head_augment)
    head_augment: bool = False  # augment in phase 1 too: features can then not be cached
    lr: float = 1e-3  # head learning rate; fine-tuning uses lr * finetune_lr_scale
    finetune_lr_scale: float = 0.1
    batch_size: int = 32  # per replica (batch_scope "replica") or split across replicas ("global")
    batch_scope: str = "replica"  # "replica": the global batch grows with the replicas
    lr_scaling: str = "sqrt"  # the rule in `lr_scale`
    dropout: float = 0.2
    early_stopping_patience: int = 3
    seed: int = 0
    # (train, val, test) fractions to re-split a dataset imported without given splits;
    # None keeps the dataset's own split. Given splits are always kept.
    split: tuple[float, float, float] | None = None
    name: str | None = None
    mixed_precision: str = "auto"  # auto, on, off; the rule for auto is in `devices.plan`
    xla: str = "auto"  # auto, on, off
    # "balanced": each class's loss weighted by n / (classes * its count) in both phases, so a
    # small class counts as much as a large one; "none": every image weighs the same; "auto": the
    # head is fitted both ways on the cached features and the better validation macro F1 is kept
    # (ties: none); without cached features or a validation split apart from the evaluation
    # split, "auto" trains unweighted.
    class_weight: str = "auto"
    # "auto": with a validation split (apart from the evaluation split) and cached features, the
    # head fits a small fixed grid (learning rate, dropout, label smoothing, class weighting;
    # `tlcore.train.head_search`) and keeps the best on validation macro F1, and the fine-tune continues
    # with its settings. "off": the recipe's own settings only.
    head_search: str = "auto"
    # Evaluation with test-time augmentation: "flip" averages each image and its mirror (twice
    # the evaluation cost); predict and the Demo then do the same for this run's model.
    tta: str = "none"

    def __post_init__(self):
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise InvalidInput(f"`augment` entries must be among {', '.join(AUGMENTATIONS)}. Received: {bad}")
        if self.weights not in ("imagenet", "none"):
            raise InvalidInput(f"`weights` must be 'imagenet' or 'none'. Received: weights={self.weights!r}")
        if self.image_size is not None and not 32 <= self.image_size <= 1024:
            raise InvalidInput(f"`image_size` must be between 32 and 1024. Received: image_size={self.image_size}")
        for field in ("head_epochs", "finetune_epochs", "finetune_layers"):
            if getattr(self, field) < 0:
                raise InvalidInput(f"`{field}` must be 0 or more. Received: {field}={getattr(self, field)}")
        if self.head_epochs + self.finetune_epochs == 0:
            raise InvalidInput("At least one of `head_epochs` and `finetune_epochs` must be positive.")
        if not 1 <= self.batch_size <= 4096:
            raise InvalidInput(f"`batch_size` must be between 1 and 4096. Received: batch_size={self.batch_size}")
        if self.split is not None and (len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6
                                       or min(self.split) < 0 or self.split[0] == 0):
            raise InvalidInput(f"`split` must be three fractions (train, val, test) summing to 1. "
                             f"Received: split={self.split}")
        if self.batch_scope not in BATCH_SCOPES:
            raise InvalidInput(f"`batch_scope` must be one of {', '.join(BATCH_SCOPES)}. "
                               f"Received: batch_scope={self.batch_scope!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise InvalidInput(f"`lr_scaling` must be one of {', '.join(LR_SCALINGS)}. "
                               f"Received: lr_scaling={self.lr_scaling!r}")
        check_switch("mixed_precision", self.mixed_precision)
        check_switch("xla", self.xla)
        if self.class_weight not in CLASS_WEIGHTS:
            raise InvalidInput(f"`class_weight` must be one of {', '.join(CLASS_WEIGHTS)}. "
                               f"Received: class_weight={self.class_weight!r}")
        if self.head_search not in HEAD_SEARCH_MODES:
            raise InvalidInput(f"`head_search` must be one of {', '.join(HEAD_SEARCH_MODES)}. "
                               f"Received: head_search={self.head_search!r}")
        if self.tta not in TTA_MODES:
            raise InvalidInput(f"`tta` must be one of {', '.join(TTA_MODES)}. Received: tta={self.tta!r}")
        if not 0 < self.lr < 1:
            raise InvalidInput(f"`lr` must be between 0 and 1. Received: lr={self.lr}")

    def batch_sizes(self, replicas: int) -> tuple[int, int]:
        """(per-replica batch, global batch) on `replicas` replicas.

        With batch_scope "replica" the global batch is `batch_size` x `replicas`; with "global"
        it is `batch_size`, split evenly (rounded down to a multiple of `replicas`, at least one
        image per replica).
        """
        if self.batch_scope == "replica":
            return self.batch_size, self.batch_size * replicas
        per_replica = max(1, self.batch_size // replicas)
        return per_replica, per_replica * replicas

    def lr_scale(self, global_batch: int) -> float:
        """The factor both phases' learning rates are multiplied by at `global_batch` images per step.

        The rule: `lr` (and `finetune_lr_scale`) are written for a step of `batch_size` images,
        what one device trains on. When replicas make the step larger (batch_scope "replica":
        k replicas, k times the images), the rate grows with sqrt(k) by default, the scaling
        that keeps Adam's updates comparable (Malladi et al., 2022: "On the SDEs and scaling
        rules for adaptive gradient algorithms"); "linear" multiplies by k (Goyal et al., 2017,
        for SGD; the fine-tune's warm-up over its first tenth of steps is what makes it safe);
        "none" keeps the rate. With batch_scope "global" the step stays `batch_size` (rounded
        down to a multiple of the replicas): the factor is 1 or just below, and a run on k
        devices reproduces the one-device run. One device: always 1.
        """
        ratio = global_batch / self.batch_size
        return {"sqrt": ratio ** 0.5, "linear": ratio, "none": 1.0}[self.lr_scaling]

    def resolved_image_size(self, spec) -> int:
        """The image size this recipe trains `spec` at: `image_size`, or the backbone's default.

        Raises:
            InvalidInput: the size is below what the backbone takes.
        """
        size = self.image_size or spec.default_size
        if size < spec.min_size:
            raise InvalidInput(f"`image_size` must be at least {spec.min_size} for {spec.display_name}. "
                               f"Received: image_size={size}")
        return size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["augment"] = list(self.augment)
        data["split"] = list(self.split) if self.split else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["augment"] = tuple(kwargs.get("augment") or ())
        if kwargs.get("split") is not None:
            kwargs["split"] = tuple(kwargs["split"])
        for switch in ("mixed_precision", "xla"):
            if switch in kwargs and not isinstance(kwargs[switch], str):
                # Configs written before the switches were words: None (auto), True, False.
                kwargs[switch] = {None: "auto", True: "on", False: "off"}[kwargs[switch]]
        return cls(**kwargs)


PRESETS: dict[str, dict[str, Any]] = {
    "fast-offline": dict(backbone="efficientnet_lite0", weights="imagenet", head_epochs=20,
                         finetune_epochs=0, lr=1e-3, batch_size=32, mixed_precision="auto", xla="auto"),
    "lite0-finetune": dict(backbone="efficientnet_lite0", weights="imagenet", head_epochs=8,
                           finetune_epochs=4, finetune_layers=30, augment=("flip", "rotate", "zoom"),
                           lr=1e-3, batch_size=32, mixed_precision="auto", xla="auto"),
    # The seed project's recipe: VGG16, ImageNet weights, flip/rotate/zoom, Adam 1e-4, float32.
    "seed-vgg16": dict(backbone="vgg16", weights="imagenet", image_size=224, head_epochs=10,
                       finetune_epochs=5, finetune_layers=4, augment=("flip", "rotate", "zoom"),
                       head_augment=True, split=(0.8, 0.1, 0.1), lr=1e-4, finetune_lr_scale=0.1, batch_size=32,
                       mixed_precision="off", xla="auto"),
}

# Comparisons: one recipe queued once per backbone, so their runs line up on the Compare page.
COMPARISONS: dict[str, tuple[str, tuple[str, ...]]] = {
    # The three offline backbones, head-only on cached features, each at its own trained size.
    "lite-family": ("fast-offline", ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")),
}


def comparison_configs(name: str, dataset: str, **overrides: Any) -> list[TrainConfig]:
    """The runs of comparison `name` on `dataset`: its preset per backbone, `overrides` on top.

    Raises:
        InvalidInput: `name` is not in `COMPARISONS`.
    """
    if name not in COMPARISONS:
        raise InvalidInput(f"`compare` must be one of {', '.join(COMPARISONS)}. Received: compare={name!r}")
    preset, backbones = COMPARISONS[name]
    return [TrainConfig(dataset=dataset, **{**PRESETS[preset], **overrides, "backbone": backbone})
            for backbone in backbones]


# Recipe fields that never tell two recipes apart in a name.
_NOT_NAMED = ("seed", "name", "resume_from")


def short_value(value: Any) -> str:
    """A recipe value as a short name part: 0.0003 -> '3e-4', 0.25 -> '0.25', 224 -> '224'."""
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            mantissa, exponent = f"{value:.3e}".split("e")
            return f"{float(mantissa):g}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value)) or "none"
    return str(value)


def recipe_labels(configs: Sequence[dict[str, Any]], fallback: Sequence[str] = ("backbone",)) -> list[str]:
    """A short name for each recipe in `configs`: the fields in which they differ, such as
    'lr=3e-4 · batch_size=16' (seed and name left out); the `fallback` fields when none differ."""
    keys = list(dict.fromkeys(k for config in configs for k in config if k not in _NOT_NAMED))
    differing = [k for k in keys if len({repr(config.get(k)) for config in configs}) > 1]
    shown = differing or [k for k in fallback if any(k in config for config in configs)]
    return [" · ".join(f"{k}={short_value(config.get(k))}" for k in shown) for config in configs]
