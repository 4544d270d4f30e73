"""A run's full recipe (`TrainConfig`) and what a run is (`RunSpec`: the recipe, the run it resumes, its
sweep), shared by the CLI, the dashboard, the store and the worker; `RunSpec.to_dict` is the one shape a
run's spec is stored in (the store and the run folder's `config.json`).

Each field is declared once, with its default, label, help and allowed values (`recipe_field`);
the CLI's options (`train`, `submit`, `sweep`, `lr-find`), the Train form and the presets'
check are made from these declarations (`recipe_fields`), so a new field is one edit here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

from tlcore.errors import InvalidInput

AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast", "translate")
WEIGHTS = ("imagenet", "none")
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
FINETUNE_RESULTS = ("average", "best")
FINETUNE_INPUTS = ("cached", "pixels")


def recipe_field(default: Any, label: str, help: str, choices: Sequence[str] | None = None,
                 aliases: Sequence[str] = ()) -> Any:
    """A `TrainConfig` field with what the CLI and the form show for it: `label` (the form's),
    `help` (one or two sentences, both), `choices` (the allowed values, if a fixed list) and
    `aliases` (further CLI spellings)."""
    return dataclasses.field(default=default, metadata={
        "label": label, "help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases)})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Defaults are the fast offline recipe (EfficientNet-Lite0, head only)."""

    dataset: str  # dataset id or name
    backbone: str = recipe_field(
        "efficientnet_lite0", "Backbone", "The pretrained network (`python -m tlcore backbones` lists them).")
    weights: str = recipe_field(
        "imagenet", "Weights", "imagenet: start from the ImageNet weights (transfer); none: random initialisation.",
        WEIGHTS)
    image_size: int | None = recipe_field(
        None, "Image size (px)", "Input size in pixels; by default the backbone's own.")
    head_epochs: int = recipe_field(
        20, "Head epochs", "Phase 1: backbone frozen, only the new classifier head trains.")
    finetune_epochs: int = recipe_field(
        0, "Fine-tune epochs", "Phase 2: the top of the backbone trains too, at a lower learning rate.")
    finetune_layers: int = recipe_field(
        20, "Fine-tune depth", "Layers from the top of the backbone unfrozen in phase 2.")
    augment: tuple[str, ...] = recipe_field(
        (), "Augmentation", "Random transforms of training images in the fine-tune phase. A flip also reaches "
                            "the cached head phase: the mirrored images' features are cached too.", AUGMENTATIONS)
    finetune_inputs: str = recipe_field(
        "cached", "Fine-tune inputs",
        "cached: the backbone below the fine-tuned layers never trains, so its output per image is computed once "
        "and cached, and the fine-tune trains the top layers on it, several times faster; a flip still reaches it "
        "(the mirrored images' outputs), rotate, zoom, translate and contrast only as augmented views (see "
        "Augmented views). pixels: every fine-tune epoch runs freshly augmented images through the whole "
        "backbone.", FINETUNE_INPUTS)
    # 0 by default: on the two photo sets measured, 4 views changed one test image in 59 and added a third to
    # the first run's time (BENCHMARKS.md, issue 21).
    finetune_views: int = recipe_field(
        0, "Augmented views (cached fine-tune)",
        "With cached fine-tune inputs, the augmentations besides a flip (rotate, zoom, translate, contrast) reach "
        "the fine-tune as this many augmented views of each training image, whose activations are computed once "
        "and cached; each epoch draws one of an image's plain, mirrored and augmented inputs. 0: a flip only.")
    head_augment: bool = recipe_field(
        False, "Augment in the head phase too (features then cannot be cached; slower)",
        "Augment in phase 1 too; its backbone features can then not be cached.")
    lr: float = recipe_field(
        1e-3, "Learning rate", "The head's learning rate; the fine-tune uses it times the fine-tune LR scale.")
    finetune_lr_scale: float = recipe_field(
        0.1, "Fine-tune LR scale", "The fine-tune's learning rate as a fraction of the head's.")
    # "average" by default: on the four photo sets of bench/defaults.py (six seeds) it scored +1.1, +0.0, +2.2
    # and -0.3 points against the head the "best" rule kept there, never below the fine-tune alone
    # (BENCHMARKS.md, issue 21).
    finetune_result: str = recipe_field(
        "average", "Fine-tune result",
        "What the model ends with after the fine-tune, when there is a validation split apart from the "
        "evaluation split. average: the fine-tuned layers and the head take the mean of their weights after the "
        "head phase and after the fine-tune (weight averaging, as in WiSE-FT), unless validation shows that "
        "clearly worse than the head (McNemar's test), which then stays. best: the fine-tuned weights only when "
        "they end above the head's validation accuracy, else the head's.", FINETUNE_RESULTS)
    batch_size: int = recipe_field(
        32, "Batch size", "Images per training step on each GPU (replica): with 4 GPUs a step sees 4 × this "
                          "many; with batch scope global, the step's images split across the GPUs.")
    batch_scope: str = recipe_field(
        "replica", "Batch size counts", "replica: the batch size is per GPU, the global batch grows with the "
                                        "GPUs; global: the batch size is split across them.", BATCH_SCOPES)
    lr_scaling: str = recipe_field(
        "sqrt", "LR scaling", "How the learning rates follow a global batch larger than the batch size: by the "
                              "square root of the ratio, linearly, or not at all (`TrainConfig.lr_scale`).",
        LR_SCALINGS)
    dropout: float = recipe_field(0.2, "Dropout", "The fraction of features dropped before the classifier head "
                                                  "while it trains (0 to below 1).")
    early_stopping_patience: int = recipe_field(
        3, "Early-stopping patience (epochs)", "Epochs without a better validation score before a phase stops "
                                               "(the best epoch's weights are kept).", aliases=("--patience",))
    seed: int = recipe_field(0, "Seed", "Seeds the initialisation, the batch order and the augmentation.")
    # (train, val, test) fractions to re-split a dataset imported without given splits;
    # None keeps the dataset's own split. Given splits are always kept.
    split: tuple[float, float, float] | None = recipe_field(
        None, "Re-split the dataset (train / val / test)", "Train, val and test fractions to re-split a dataset "
                                                           "imported without given splits, e.g. 0.8,0.1,0.1; a "
                                                           "given layout is always kept.")
    name: str | None = recipe_field(None, "Run name (optional)", "The run's name; one is made when left out.")
    mixed_precision: str = recipe_field(
        "auto", "Mixed precision", "float16 compute with float32 weights. auto: on with a GPU, off on the CPU. "
                                   "The saved model always computes in float32.", SWITCHES)
    xla: str = recipe_field(
        "auto", "XLA compilation", "auto: on with exactly one GPU; off with several (it does not work under "
                                   "MirroredStrategy) and on the CPU.", SWITCHES)
    # "balanced" weighs each class's loss by n / (classes * its count). "auto" without cached features or a
    # validation split apart from the evaluation split trains unweighted.
    class_weight: str = recipe_field(
        "auto", "Class weighting", "auto: the head is fitted both ways on the cached features and the better "
                                   "validation macro F1 is kept (a tie keeps none). balanced: a rare class's images "
                                   "weigh more in the loss (both phases), so a small class is not ignored. none: "
                                   "every image weighs the same.", CLASS_WEIGHTS)
    # The grid is in `tlcore.train.head_search`.
    head_search: str = recipe_field(
        "auto", "Head search", "auto: with a validation split, the head tries a small fixed grid (learning rate, "
                               "dropout, label smoothing, class weighting) on the cached features, keeps the best "
                               "on validation macro F1 and fine-tunes with its settings. off: the recipe's own "
                               "settings only.", HEAD_SEARCH_MODES)
    tta: str = recipe_field(
        "none", "Evaluation TTA", "Test-time augmentation: flip averages each image and its mirror (twice the "
                                  "prediction cost); the Demo and predict then do the same for this run.", TTA_MODES)

    def __post_init__(self):
        for field in recipe_fields():
            value = getattr(self, field.name)
            if field.choices and field.kind is not tuple and value not in field.choices:
                raise InvalidInput(f"`{field.name}` must be one of {', '.join(field.choices)}. "
                                   f"Received: {field.name}={value!r}")
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise InvalidInput(f"`augment` entries must be among {', '.join(AUGMENTATIONS)}. Received: {bad}")
        if self.image_size is not None and not 32 <= self.image_size <= 1024:
            raise InvalidInput(f"`image_size` must be between 32 and 1024. Received: image_size={self.image_size}")
        for field in ("head_epochs", "finetune_epochs", "finetune_layers", "finetune_views", "early_stopping_patience"):
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
        if not 0 < self.lr < 1:
            raise InvalidInput(f"`lr` must be between 0 and 1. Received: lr={self.lr}")
        if not self.finetune_lr_scale > 0:
            raise InvalidInput(f"`finetune_lr_scale` must be above 0. "
                               f"Received: finetune_lr_scale={self.finetune_lr_scale}")
        if not 0 <= self.dropout < 1:
            raise InvalidInput(f"`dropout` must be at least 0 and below 1. Received: dropout={self.dropout}")

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


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a run is, typed, from the form or the CLI through the store to training: its recipe (whose
    `dataset` is the dataset version's id and `backbone` the registry's name), the run whose checkpoint it
    starts from, and the sweep that queued it.

    `to_dict` is its one stored shape, in the store and in the run folder's `config.json`: the recipe's
    fields, `resume_from` and `sweep_id`. `from_dict` reads that and every shape written before it.
    """

    recipe: TrainConfig
    resume_from: str | None = None  # a failed or cancelled run's id
    sweep_id: str | None = None

    @property
    def dataset_id(self) -> str:
        return self.recipe.dataset

    def to_dict(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), "resume_from": self.resume_from, "sweep_id": self.sweep_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, dataset_id: str | None = None,
                  sweep_id: str | None = None) -> "RunSpec":
        """The spec stored as `data`, in any shape a Transfer Lab wrote.

        Earlier shapes: the store held the recipe with `resume_from` only when resumed, and no sweep;
        a run folder's `config.json` added `dataset_id` and the image size the run trained at.
        `dataset_id` and `sweep_id` (the store's columns) win over what `data` says.
        """
        dataset = dataset_id or data.get("dataset_id") or data.get("dataset")
        if not dataset:
            raise InvalidInput("A run spec must name its dataset. Received: no `dataset` or `dataset_id`.")
        recipe = TrainConfig.from_dict({**data, "dataset": dataset})
        return cls(recipe, data.get("resume_from") or None, sweep_id or data.get("sweep_id") or None)


@dataclasses.dataclass(frozen=True)
class RecipeField:
    """One `TrainConfig` field as the CLI and the form see it (made from its declaration).

    `kind` is the value's type: int, float, str, bool, or tuple (a list of names from `choices`,
    `augment`) or "fractions" (three numbers, `split`); `optional` says None is allowed.
    """

    name: str
    kind: Any
    optional: bool
    default: Any
    label: str
    help: str
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]

    @property
    def flag(self) -> str:
        """Its CLI option: `--finetune-lr-scale` for `finetune_lr_scale`."""
        return "--" + self.name.replace("_", "-")

    @property
    def sweepable(self) -> bool:
        """Whether a sweep may list several values (one number or word per run)."""
        return self.kind in (int, float, str) and self.name not in ("name", "seed")

    def parse(self, text: str) -> Any:
        """The value `text` stands for (as typed on the command line or in a form's text box).

        Raises:
            InvalidInput: `text` is not a value of this field's type.
        """
        text = str(text).strip()
        if self.kind is tuple:
            if text.lower() in ("", "none"):
                return ()
            return tuple(item.strip().lower() for item in text.split(",") if item.strip())
        if self.kind == "fractions":
            try:
                parts = tuple(float(item) for item in text.split(","))
            except ValueError:
                parts = ()
            if len(parts) != 3:
                raise InvalidInput(f"`{self.name}` must be three fractions like 0.8,0.1,0.1. Received: {text!r}")
            return parts
        if self.kind is bool:
            if text.lower() not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
                raise InvalidInput(f"`{self.name}` must be on or off. Received: {text!r}")
            return text.lower() in ("true", "on", "yes", "1")
        try:
            return self.kind(text)
        except ValueError:
            raise InvalidInput(f"`{self.name}` must be {_KIND_WORDS[self.kind]}. Received: {text!r}") from None


_KIND_WORDS = {int: "a whole number", float: "a number", str: "a word"}


def _kind(annotation: Any) -> tuple[Any, bool]:
    """(kind, optional) of a field's type annotation."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if optional:
        (annotation,) = [a for a in args if a is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return (tuple if args[-1] is Ellipsis else "fractions"), optional
    return annotation, optional


def recipe_fields() -> tuple[RecipeField, ...]:
    """Every field of the recipe but `dataset`, in declaration order."""
    return _RECIPE_FIELDS


def recipe_field_named(name: str) -> RecipeField:
    """The recipe field `name`.

    Raises:
        InvalidInput: the recipe has no such field.
    """
    for field in _RECIPE_FIELDS:
        if field.name == name:
            return field
    raise InvalidInput(f"The recipe has no field `{name}`; its fields are "
                       f"{', '.join(f.name for f in _RECIPE_FIELDS)}.")


def _describe_fields() -> tuple[RecipeField, ...]:
    hints = typing.get_type_hints(TrainConfig)
    fields = []
    for field in dataclasses.fields(TrainConfig):
        if field.name == "dataset":
            continue
        kind, optional = _kind(hints[field.name])
        meta = field.metadata
        fields.append(RecipeField(field.name, kind, optional, field.default, meta["label"], meta["help"],
                                  meta["choices"], meta["aliases"]))
    return tuple(fields)


_RECIPE_FIELDS = _describe_fields()


PRESETS: dict[str, dict[str, Any]] = {
    "fast-offline": dict(backbone="efficientnet_lite0", weights="imagenet", head_epochs=20,
                         finetune_epochs=0, lr=1e-3, batch_size=32, mixed_precision="auto", xla="auto"),
    "lite0-finetune": dict(backbone="efficientnet_lite0", weights="imagenet", head_epochs=8,
                           finetune_epochs=4, finetune_layers=30, augment=("flip", "rotate", "zoom"),
                           lr=1e-3, batch_size=32, mixed_precision="auto", xla="auto"),
    # The seed project's recipe: VGG16, ImageNet weights, flip/rotate/zoom, Adam 1e-4, float32.
    "seed-vgg16": dict(backbone="vgg16", weights="imagenet", image_size=224, head_epochs=10,
                       finetune_epochs=5, finetune_layers=4, augment=("flip", "rotate", "zoom"),
                       head_augment=True, finetune_inputs="pixels", split=(0.8, 0.1, 0.1), lr=1e-4,
                       finetune_lr_scale=0.1, batch_size=32, mixed_precision="off", xla="auto"),
}


def check_recipe(name: str, values: dict[str, Any]) -> None:
    """Raise InvalidInput when recipe `name` (a preset's values) names a field TrainConfig lacks or a
    value it refuses."""
    unknown = sorted(set(values) - {f.name for f in _RECIPE_FIELDS})
    if unknown:
        raise InvalidInput(f"Recipe {name!r} sets {', '.join(unknown)}, which the recipe does not have.")
    TrainConfig(dataset="-", **values)


for _preset, _values in PRESETS.items():
    check_recipe(_preset, _values)

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
_NOT_NAMED = ("seed", "name", "resume_from", "sweep_id")


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
