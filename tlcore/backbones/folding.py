"""Fold frozen BatchNorm layers into the convolution before them, for a faster forward pass.

In inference mode a BatchNorm after a convolution is a fixed per-channel affine map, so it can
be multiplied into the convolution's kernel and bias: the outputs stay the same (up to float
rounding) and every folded pair saves two passes over the feature map. On this project's
2-core CPU that makes EfficientNet-Lite0's forward pass about 1.6x faster (the bench measures it).

The folded model is a runtime twin, never saved: layers that are not folded are shared with the
original (same weights), so training the twin trains the original. Only pairs whose convolution
is frozen are folded, which keeps the layers being fine-tuned exactly as they are.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
from keras import layers

_FOLDABLE = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)


class _FoldedAway(layers.Layer):
    """Stands where a folded BatchNorm was, keeping its name; passes its input through."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def fold_batchnorm(model: keras.Model, *, only_frozen: bool = True) -> keras.Model:
    """A twin of `model` with each conv -> BatchNorm pair folded into one convolution.

    With `only_frozen` (for training), pairs whose convolution is trainable stay as they are;
    without it (for inference), every pair is folded. The twin must be called in inference mode
    for its BatchNorm (`training=False`, as tlcore's classifiers call their backbone). Nested
    functional models are folded too. Returns `model` itself when there is nothing to fold or
    it is not a functional model.
    """
    if not getattr(model, "_nodes_by_depth", None):  # Keras 3 functional graph; else leave it
        return model
    pairs = _foldable_pairs(model, only_frozen)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    folded_nested = {id(layer): fold_batchnorm(layer, only_frozen=only_frozen) for layer in nested}
    if not pairs and all(folded_nested[id(layer)] is layer for layer in nested):
        return model
    dropped = {id(bn) for _, bn in pairs.values()}
    new_convs: dict[int, layers.Layer] = {}

    def clone(layer):
        if id(layer) in folded_nested:
            return folded_nested[id(layer)]
        if id(layer) in dropped:
            return _FoldedAway(name=layer.name)
        if id(layer) in pairs:
            new = layer.__class__.from_config({**layer.get_config(), "use_bias": True, "trainable": False})
            new_convs[id(layer)] = new
            return new
        return layer  # shared: the same weights as in `model`

    twin = keras.models.clone_model(model, clone_function=clone)
    for conv_id, (conv, bn) in pairs.items():
        new_convs[conv_id].set_weights(_folded_weights(conv, bn))
    return twin


def _foldable_pairs(model: keras.Model, only_frozen: bool) -> dict[int, tuple[layers.Layer, layers.Layer]]:
    """{id(conv): (conv, bn)} for each linear conv whose only consumer in `model` is a BatchNorm."""
    nodes = [node for depth_nodes in model._nodes_by_depth.values() for node in depth_nodes]
    uses_of_tensor = collections.Counter(id(t) for node in nodes for t in node.input_tensors)
    uses_of_tensor.update(id(t) for t in model.outputs)
    calls_of_layer = collections.Counter(id(node.operation) for node in nodes)
    pairs = {}
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, layers.BatchNormalization) or len(node.input_tensors) != 1:
            continue
        tensor = node.input_tensors[0]
        conv = tensor._keras_history.operation
        if (isinstance(conv, _FOLDABLE) and not (only_frozen and (conv.trainable or bn.trainable))
                and conv.data_format == "channels_last" and bn.axis in (-1, len(tensor.shape) - 1)
                and conv.activation in (None, keras.activations.linear)
                and uses_of_tensor[id(tensor)] == 1
                and calls_of_layer[id(conv)] == 1 and calls_of_layer[id(bn)] == 1):
            pairs[id(conv)] = (conv, bn)
    return pairs


def _folded_weights(conv, bn) -> list[np.ndarray]:
    """Kernel and bias of `conv` followed by `bn` in inference mode, as one convolution."""
    mean = _numpy(bn.moving_mean)
    gamma = _numpy(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _numpy(bn.beta) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(_numpy(bn.moving_variance) + bn.epsilon)
    bias = _numpy(conv.bias) if conv.use_bias else np.zeros_like(mean)
    folded_bias = (bias - mean) * scale + beta
    if isinstance(conv, layers.SeparableConv2D):
        # Depthwise then pointwise (1, 1, in * multiplier, out): the scale goes on the pointwise.
        dtype = conv.pointwise_kernel.dtype
        return [_numpy(conv.depthwise_kernel).astype(dtype), (_numpy(conv.pointwise_kernel) * scale).astype(dtype),
                folded_bias.astype(dtype)]
    kernel = _numpy(conv.kernel)
    if isinstance(conv, layers.DepthwiseConv2D):
        # Kernel (h, w, in, multiplier); output channel c * multiplier + m.
        kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale  # (h, w, in, out): scale each output channel
    dtype = conv.kernel.dtype
    return [kernel.astype(dtype), folded_bias.astype(dtype)]


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable).astype(np.float64)
