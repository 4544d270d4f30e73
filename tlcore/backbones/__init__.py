"""ImageNet backbones: the registry and its model families."""

from tlcore.backbones.registry import (  # noqa: F401
    DEFAULT_BACKBONE,
    BackboneSpec,
    WeightsUnavailable,
    get_backbone,
    list_backbones,
    resolve_weights,
)
