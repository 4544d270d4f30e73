"""ImageNet backbones: the registry (plain data, no Keras) and the model families it names.

Importing the package imports only the registry; a family module (and Keras) is imported when
a backbone is built (`BackboneSpec.build`).
"""

from tlcore.backbones.registry import (  # noqa: F401
    DEFAULT_BACKBONE,
    BackboneSpec,
    WeightsUnavailable,
    get_backbone,
    list_backbones,
    resolve_weights,
)
