"""The classifier every run trains and saves: preprocessing, a frozen backbone, pooling, a softmax head.

`build_classifier` assembles it (the layout in docs/ARCHITECTURE.md, "Every saved model") and
returns a `Classifier`, which hands out its parts: the features model (image → pooled
features, what the feature cache holds) and the head on features (features → probabilities,
the classifier's own head weights). Callers ask for a part instead of looking a layer up by
name. `unfreeze_top` opens the backbone's top layers for the fine-tune; `compile_classifier`
is the one compile every phase uses.
"""

from __future__ import annotations

import dataclasses

import keras

from tlcore.backbones.preprocessing import BackbonePreprocessing


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A classifier and its parts; every part shares its weights with `model`."""

    model: keras.Model  # RGB 0-255 in, class probabilities out: what a run saves
    preprocessing: keras.layers.Layer
    backbone: keras.Model  # frozen until `unfreeze_top`; always called with training=False
    pool: keras.layers.GlobalAveragePooling2D
    dropout: keras.layers.Dropout
    head: keras.layers.Dense

    def features_model(self) -> keras.Model:
        """Image → pooled backbone features (before dropout), sharing the classifier's layers."""
        return keras.Model(self.model.input, self.pool.output, name="features")

    def head_on_features(self) -> keras.Model:
        """Pooled features → class probabilities through the classifier's own dropout and head:
        training it trains the classifier's head."""
        features = keras.Input(self.pool.output.shape[1:], name="features")
        return keras.Model(features, self.head(self.dropout(features)), name="head_only")

    def fine_tune_cut(self, n_layers: int) -> FineTuneCut | None:
        """The classifier cut where the fine-tune of the top `n_layers` (`unfreeze_top`) begins: the
        last backbone activation every unfrozen layer depends on only through. Below it nothing
        trains and everything runs in inference mode, so its output for an image never changes.
        None when the backbone is not a functional graph or no single activation separates the two
        parts (then the fine-tune runs on pixels)."""
        base = self.backbone
        top = set(id(layer) for layer in _top_layers(base, n_layers))
        if not top or not getattr(base, "_nodes_by_depth", None):
            return None
        order = list(base.layers)
        first_top = min(i for i, layer in enumerate(order) if id(layer) in top)
        # From the layer just below the first unfrozen one downwards, the first output from which the
        # backbone's output can be computed alone.
        for layer in reversed(order[:first_top]):
            if isinstance(layer, keras.layers.InputLayer) or len(layer._inbound_nodes) != 1:
                continue
            if not _needs_more_than(base.outputs, layer.output):
                upper = keras.Model(layer.output, base.output, name="backbone_top")
                lower = keras.Model(base.input, layer.output, name="backbone_bottom")
                return self._cut(lower, upper, layer.name)
        return None

    def _cut(self, lower: keras.Model, upper: keras.Model, name: str) -> FineTuneCut:
        image = keras.Input(self.model.input.shape[1:], name="image")
        prefix = keras.Model(image, lower(self.preprocessing(image), training=False), name="activations")
        activations = keras.Input(upper.input.shape[1:], name="activations")
        pooled = self.pool(upper(activations, training=False))
        return FineTuneCut(layer=name, prefix=prefix,
                           features=keras.Model(activations, pooled, name="features_on_activations"),
                           top_input=activations, top_output=self.head(self.dropout(pooled)))

    def set_head(self, weights: list, dropout: float) -> None:
        """Give the head `weights` ([kernel, bias]) and its dropout the rate `dropout`."""
        self.head.set_weights(weights)
        self.dropout.rate = dropout


@dataclasses.dataclass(frozen=True, eq=False)
class FineTuneCut:
    """The classifier in two parts at the activation below the fine-tuned layers (`Classifier.fine_tune_cut`);
    every part shares its weights with the classifier."""

    layer: str  # the backbone layer whose output is the cut
    prefix: keras.Model  # RGB 0-255 in, the activation at the cut out: never trains
    features: keras.Model  # activation at the cut -> pooled features (what the feature cache holds)
    top_input: keras.KerasTensor
    top_output: keras.KerasTensor

    def top(self) -> keras.Model:
        """Activation at the cut -> class probabilities: training it trains the fine-tune's layers and
        the head. A new model on each call, so compiling one (for the fine-tune) leaves the next
        (for evaluation) uncompiled."""
        return keras.Model(self.top_input, self.top_output, name="top_on_activations")

    @property
    def activation_shape(self) -> tuple[int, ...]:
        return tuple(self.prefix.output.shape[1:])


def build_classifier(spec, size: int, weights_path: str | None, num_classes: int, dropout: float) -> Classifier:
    """RGB 0-255 in, class probabilities out, preprocessing inside; the backbone frozen."""
    inputs = keras.Input((size, size, 3), name="image")
    preprocessing = BackbonePreprocessing(spec.preprocessing, name="preprocessing")
    x = preprocessing(inputs)
    base = spec.build(size, weights_path)
    base.trainable = False
    # training=False keeps BatchNorm in inference mode even after the top layers are unfrozen.
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D(name="pool")
    head_dropout = keras.layers.Dropout(dropout, name="head_dropout")
    head = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")
    outputs = head(head_dropout(pool(x)))
    model = keras.Model(inputs, outputs, name=f"{spec.name}_classifier")
    return Classifier(model=model, preprocessing=preprocessing, backbone=base, pool=pool, dropout=head_dropout,
                      head=head)


def _needs_more_than(outputs, tensor) -> bool:
    """Whether computing `outputs` needs a model input other than through `tensor` (walking the graph
    back; trying `keras.Model(tensor, outputs)` instead would leave nodes behind when it fails)."""
    stack, seen = list(outputs), set()
    while stack:
        t = stack.pop()
        if t is tensor or id(t) in seen:
            continue
        seen.add(id(t))
        operation, node_index, _ = t._keras_history
        if isinstance(operation, keras.layers.InputLayer):
            return True
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return False


def _top_layers(base, n_layers: int) -> list:
    """The layers `unfreeze_top(base, n_layers)` makes trainable."""
    weighted = [layer for layer in base.layers if layer.weights]
    top = weighted[-n_layers:] if n_layers else []
    return [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]


def unfreeze_top(base, n_layers: int) -> int:
    """Make the top `n_layers` weighted layers of `base` trainable, BatchNorm excluded."""
    base.trainable = True
    top = set(id(layer) for layer in _top_layers(base, n_layers))
    count = 0
    for layer in base.layers:
        layer.trainable = id(layer) in top
        count += layer.trainable
    return count


def compile_classifier(model, learning_rate, *, xla: bool = False, label_smoothing: float = 0.0) -> None:
    """Adam at `learning_rate` (a number or a schedule), sparse cross-entropy (labels smoothed by
    `label_smoothing`) and accuracy, for the classifier, its folded twin or its head on features.

    XLA when `xla` (never over several replicas: `devices.plan` sees to that). Under mixed
    precision a loss-scale optimizer that skips a step on every replica when any replica's
    gradients overflow.
    """
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if model.dtype_policy.name == "mixed_float16":
        optimizer = _ReplicaSafeLossScaleOptimizer(optimizer)
    # Keras 3 compile takes keywords: a positional list would land in the wrong parameter.
    model.compile(
        optimizer=optimizer,
        loss=_SmoothedSparseCrossentropy(label_smoothing) if label_smoothing else
        keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=xla,
    )


# Neither class is registered with Keras, and no saved model refers to them: runs save the
# classifier itself, which is never compiled (its `compile_config` is empty), and every load
# passes compile=False.
class _SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none)."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy"):
        super().__init__(name=name)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        one_hot = keras.ops.one_hot(labels, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)


class _ReplicaSafeLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' loss-scale optimizer, with the inf/NaN check agreed across replicas.

    Under MirroredStrategy Keras checks each replica's own gradients before they are summed:
    one replica can skip the step while the others apply it, so an overflow on one device
    can reach the weights. Here a step is skipped everywhere when any replica saw inf/NaN.
    """

    def check_finite(self, grads):
        import tensorflow as tf

        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return finite
        overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        return tf.equal(overflowed, 0.0)
