"""Loading saved models (Keras safe mode only), predicting raw image files, and Grad-CAM.

Pixels are made by `tlcore.data.images` alone (`load_resized`, or `open_image` plus the same
bilinear resize), the way the training cache made them, so a prediction on a raw file is
what evaluation saw. Every saved model takes RGB 0-255: its preprocessing is inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tlcore.errors import InvalidInput, ModelLoadError
from tlcore.evaluate.operating_point import OperatingPoint, read_operating_point
from tlcore.records.run_folder import RunFolder

PREDICT_BATCH = 32
# Batch sizes a forward pass is padded up to: at most six input shapes, so at most six traces (and
# XLA compiles, where XLA is on), all made by `warm_up`; the server's batcher sends any size 1..32.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Prediction:
    top_k: list[tuple[str, float]]  # (label, probability), most likely first
    latency_ms: float  # decode + resize + forward pass, per image
    indices: list[int] = dataclasses.field(default_factory=list)  # class index of each top_k entry
    file: str | None = None
    abstained: bool = False  # below the run's "not sure" threshold: top_k are guesses, not an answer

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def confidence(self) -> float:
        return self.top_k[0][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [{"index": i, "label": label, "prob": p}
                      for i, (label, p) in zip(self.indices, self.top_k)],
            "latency_ms": round(self.latency_ms, 2),
            "abstained": self.abstained,
        }


class LoadedModel:
    """A loaded classifier with its labels. Safe to share across threads (one forward pass at a time).

    `tta="flip"` averages each image's probabilities with its mirror's (twice the forward cost), as
    the run's evaluation did when it was evaluated that way.
    """

    def __init__(self, model, labels: Sequence[str], *, name: str, path: str | None = None,
                 run_id: str | None = None, point: OperatingPoint | None = None, tta: str = "none"):
        from tlcore.backbones.folding import fold_batchnorm
        from tlcore.train.devices import float32_model

        # A run trained in mixed precision before its saved model was made float32 would
        # otherwise predict with float16 convolutions on this (possibly CPU) host.
        model = float32_model(model)
        self.model = model
        # Predictions run on a twin with BatchNorm folded into the convolutions: same outputs, faster.
        self._predictor = fold_batchnorm(model, only_frozen=False)
        # Never XLA when serving ("auto" turns it on with a GPU): a compile per new batch shape
        # would land in a request's latency; the buckets bound the shapes for TensorFlow's traces.
        self._predictor.compile(jit_compile=False)
        self.labels = list(labels)
        self.name = name
        self.path = path
        self.run_id = run_id  # the run it was trained by, None for a plain ImageNet model
        # Fitted on the run's validation split: probabilities are temperature-scaled, and an
        # answer below the threshold is "not sure". Empty for runs without them (and ImageNet).
        self.point = point or OperatingPoint()
        self.tta = tta
        shape = model.input_shape
        self.image_size = int(shape[1]) if shape[1] else 224
        self._lock = threading.Lock()
        outputs = int(model.output_shape[-1])
        if outputs != len(self.labels):
            raise ModelLoadError(f"The model {name} has {outputs} outputs but {len(self.labels)} labels; "
                                 "its labels.json does not belong to it. Re-export the run.")

    @property
    def temperature(self) -> float | None:
        return self.point.temperature

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """The model's raw softmax for a uint8 batch `(n, size, size, 3)` (`calibrated` scales it)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        out = []
        with self._lock:
            for start in range(0, len(images), PREDICT_BATCH):
                batch = images[start:start + PREDICT_BATCH].astype("float32")
                probs = self._forward(batch)
                if self.tta == "flip":
                    probs = (probs + self._forward(np.ascontiguousarray(batch[:, :, ::-1]))) / 2
                out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """`probs` temperature-scaled when the run was calibrated (what `predict_*` answer with)."""
        return self.point.calibrate(probs)

    def abstains(self, confidence: float) -> bool:
        """Whether an answer at `confidence` is below the run's "not sure" threshold."""
        return self.point.abstains(confidence)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """The predictor's softmax for a float32 batch, run padded up to the next of `BATCH_BUCKETS`."""
        from tlcore.backbones.features import pad_batch

        bucket = next(b for b in BATCH_BUCKETS if b >= len(batch))
        return np.asarray(self._predictor.predict_on_batch(pad_batch(batch, bucket)), dtype="float64")[:len(batch)]

    def warm_up(self, buckets: Sequence[int] = (1,)) -> None:
        """Run blank images through the model at each of `buckets` (batch sizes, see `BATCH_BUCKETS`),
        so no prediction of those sizes pays for building a forward pass (a few hundred ms each at
        224 px on a CPU). Defaults to (1,): one photo at a time, as the Demo predicts."""
        for size in buckets:
            self.probabilities(np.zeros((size, self.image_size, self.image_size, 3), np.uint8))

    def _top(self, probs: np.ndarray, top_k: int) -> tuple[list[tuple[str, float]], list[int]]:
        k = max(1, min(int(top_k), len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.labels[i], float(probs[i])) for i in order], [int(i) for i in order]

    def predict_files(self, paths: Sequence[str | os.PathLike], top_k: int = 5) -> list[Prediction]:
        """Top-k predictions for image files, in order.

        Raises:
            ImageRejected: a file is not a usable image (the message names it).
        """
        from tlcore.data.images import load_resized

        _check_top_k(top_k)
        start = time.perf_counter()
        pixels = np.stack([load_resized(p, self.image_size) for p in paths]) if paths else None
        if pixels is None:
            return []
        probs = self.calibrated(self.probabilities(pixels))
        per_image_ms = (time.perf_counter() - start) * 1000 / len(paths)
        preds = []
        for path, p in zip(paths, probs):
            top, idx = self._top(p, top_k)
            preds.append(Prediction(top, per_image_ms, idx, str(path), self.abstains(top[0][1])))
        return preds

    def predict_image(self, image, top_k: int = 5) -> Prediction:
        """Top-k for one image given as a PIL image, its file bytes, or a uint8 array already at size."""
        _check_top_k(top_k)
        start = time.perf_counter()
        pixels = self.pixels(image)
        probs = self.calibrated(self.probabilities(pixels[None]))[0]
        top, idx = self._top(probs, top_k)
        return Prediction(top, (time.perf_counter() - start) * 1000, idx, abstained=self.abstains(top[0][1]))

    def pixels(self, image) -> np.ndarray:
        """The uint8 `(size, size, 3)` pixels the model sees for a PIL image, bytes, a path or an array."""
        return to_pixels(image, self.image_size)


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInput(f"`top_k` must be a positive integer. Received: top_k={top_k!r}")


def to_pixels(image, size: int) -> np.ndarray:
    """Pixels for `image` exactly as `load_resized` makes them from a file."""
    from PIL import Image

    from tlcore.data import images

    if isinstance(image, np.ndarray):
        if image.shape == (size, size, 3) and image.dtype == np.uint8:
            return image
        image = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    if isinstance(image, Image.Image):
        # Through the same door as a file: upright it, encode it losslessly (uncompressed
        # TIFF is quick even for camera-sized photos), then load_resized decodes it, converts
        # it to RGB and resizes it exactly as for training.
        import io

        from PIL import ImageOps

        buf = io.BytesIO()
        ImageOps.exif_transpose(image).save(buf, format="TIFF")
        image = buf.getvalue()
    return images.load_resized(image, size)


# ------------------------------------------------------------------ loading


def _register_custom_objects() -> None:
    # Saved models refer to tlcore's registered layers by name; importing their modules
    # registers them before Keras deserializes anything.
    from tlcore.backbones import preprocessing  # noqa: F401

    try:
        from tlcore.train import training  # noqa: F401 - may register head or schedule objects
    except ImportError:
        pass


def load_model_file(path: str | os.PathLike, *, name: str | None = None):
    """`keras.saving.load_model(path, safe_mode=True)` with failures as `ModelLoadError`."""
    import keras

    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise ModelLoadError(f"No model file at {path}. The run may have failed before saving it; "
                             "check `python -m tlcore runs show RUN`.")
    _register_custom_objects()
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "lambda" in text.lower():
            raise ModelLoadError(
                f"The model {name} contains code (a Lambda layer or a pickled function) and was "
                "refused: models are loaded in Keras safe mode, which never runs code from a model "
                "file. Rebuild it without Lambda layers.") from None
        short = text if len(text) < 200 else text[:197] + "..."
        raise ModelLoadError(f"The model file {path} could not be loaded ({type(exc).__name__}: {short}). "
                             "It may be corrupt or from an incompatible Keras version; retrain or "
                             "re-export it.") from None


def _read_labels(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"No {path.name} next to the model at {path.parent}; the run folder is "
                             "incomplete. Retrain the run.") from None
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); the run folder is damaged.") from None
    if isinstance(data, dict):
        for key in ("labels", "classes", "class_names"):
            if isinstance(data.get(key), list):
                return [str(x) for x in data[key]]
        if all(str(k).isdigit() for k in data):
            return [str(data[k]) for k in sorted(data, key=int)]
        raise ModelLoadError(f"{path} does not hold a list of labels.")
    return [str(x) for x in data]


_CACHE_SIZE = 8  # loaded models kept in memory per process
_cache: dict[tuple[str, float], LoadedModel] = {}
_cache_lock = threading.Lock()


def run_model_folder(run_ref: str, store=None) -> tuple[RunFolder, str]:
    """(the folder holding a run's model, the run's display name) for a run id or name.

    Raises:
        KeyError: no such run.
        ModelLoadError: the run is still going and has no saved model yet.
    """
    folder = RunFolder(str(run_ref))
    if folder.has_model():
        return folder, str(run_ref)
    from tlcore.records.store import Store

    run = (store or Store()).get_run(run_ref)
    folder, name = RunFolder(run.id), f"{run.name} ({run.id})"
    if not folder.has_model() and not run.status.is_terminal:
        raise ModelLoadError(f"Run {name} is {run.status.value} and has no saved model yet; "
                             "wait for it to finish.")
    return folder, name


def load_run_model(run_ref: str, store=None) -> LoadedModel:
    """The saved model of a run (by id or name) with its labels, loaded in safe mode.

    Loaded models are cached per file and modification time; the returned object is shared
    and thread-safe.

    Raises:
        KeyError: no such run.
        ModelLoadError: the run has no loadable model.
    """
    folder, name = run_model_folder(run_ref, store)
    path = folder.model
    key = (str(path), path.stat().st_mtime if path.is_file() else 0.0)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        model = load_model_file(path, name=name)
        loaded = LoadedModel(model, _read_labels(folder.labels_file), name=name, path=str(path),
                             run_id=folder.run_id, point=read_operating_point(folder), tta=folder.tta())
        for stale in [k for k in _cache if k[0] == key[0]]:
            del _cache[stale]  # an older version of the same file
        while len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]  # the oldest loaded
        _cache[key] = loaded
        return loaded


def load_imagenet_model(name: str = "efficientnet_lite0") -> LoadedModel:
    """A backbone's own ImageNet classifier (1000 classes, names offline), RGB 0-255 in."""
    key = ("imagenet:" + name, 0.0)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        from tlcore.backbones import efficientnet_lite, get_backbone

        spec = get_backbone(name)
        if spec.name not in efficientnet_lite.VARIANTS:
            raise InvalidInput(f"`--model` must be one of {', '.join(efficientnet_lite.VARIANTS)} (the backbones "
                             f"whose ImageNet classifier works offline). Received: model={name!r}")
        model = efficientnet_lite.imagenet_classifier(spec.name)
        loaded = LoadedModel(model, imagenet_labels(), name=f"{spec.display_name} (ImageNet)")
        _cache[key] = loaded
        return loaded


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, index order."""
    from tlcore.backbones import imagenet

    return list(imagenet.class_names())


# ----------------------------------------------------------------- Grad-CAM


def gradcam(loaded: LoadedModel, image_uint8: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Where the model looked: a Grad-CAM heatmap in [0, 1], shaped like the image (H, W).

    Uses the last 4-D feature map of the backbone (the nested backbone model's output in a
    Transfer Lab model; the last 4-D layer output otherwise) and the gradient of the class
    score (pre-softmax when the head is a softmax Dense). `class_index` defaults to the
    predicted class.
    """
    import tensorflow as tf
    from PIL import Image

    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InvalidInput(f"`image_uint8` must be an (H, W, 3) RGB array. Received: shape={image.shape}")
    height, width = image.shape[:2]
    pixels = to_pixels(image.astype(np.uint8), loaded.image_size)
    x = tf.convert_to_tensor(pixels[None].astype("float32"))
    with loaded._lock:
        with tf.GradientTape() as tape:
            fmap, scores = _feature_map_and_scores(loaded.model, x, tape)
            if class_index is None:
                class_index = int(tf.argmax(scores[0]))
            if not 0 <= class_index < scores.shape[-1]:
                raise InvalidInput(f"`class_index` must be between 0 and {scores.shape[-1] - 1}. "
                                 f"Received: class_index={class_index}")
            score = scores[:, class_index]
        grads = tape.gradient(score, fmap)
    # A float16 feature map (a mixed-precision backbone) would lose the small gradients.
    fmap, grads = tf.cast(fmap, tf.float32), tf.cast(grads, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))[0].numpy().astype("float64")
    top = cam.max()
    cam = cam / top if top > 0 else np.zeros_like(cam)
    resized = Image.fromarray((cam * 255).astype("float32"), mode="F").resize((width, height), Image.BILINEAR)
    return np.clip(np.asarray(resized, dtype="float32") / 255.0, 0.0, 1.0)


def _feature_map_and_scores(model, x, tape):
    """(last backbone feature map, class scores) for input `x`, the map watched by `tape`.

    A model with nested sub-models (Transfer Lab's layout, or a wrapped ImageNet classifier)
    is walked layer by layer: its outer layers form a chain. Inside a nested classifier, or in
    a flat model, a grad model splits the graph at its last 4-D layer.
    """
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not any(isinstance(layer, keras.Model) for layer in layers):
        return _split(model, x, tape)
    idx = max((i for i, layer in enumerate(layers) if _has_feature_map(layer)), default=None)
    if idx is None:
        raise InvalidInput(f"The model {model.name} has no 4-D feature map; Grad-CAM needs a "
                         "convolutional backbone.")
    h = x
    for layer in layers[:idx]:
        h = layer(h, training=False)
    target, tail = layers[idx], layers[idx + 1:]
    if isinstance(target, keras.Model) and len(target.output.shape) != 4:
        fmap, h = _split(target, h, tape, logits=not tail)  # a classifier nested whole
    else:
        fmap = target(h, training=False)  # the backbone: its output is the feature map
        tape.watch(fmap)
        h = fmap
    for j, layer in enumerate(tail):
        h = _scores(layer, h) if j == len(tail) - 1 else layer(h, training=False)
    return fmap, h


def _has_feature_map(layer) -> bool:
    import keras

    if isinstance(layer, keras.Model):
        return len(layer.output.shape) == 4 or any(_has_feature_map(inner) for inner in layer.layers
                                                   if not isinstance(inner, keras.layers.InputLayer))
    return len(getattr(layer.output, "shape", ())) == 4


def _split(model, x, tape, logits: bool = True):
    """Run a functional `model` on `x` returning (its last 4-D layer output, its scores)."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    conv = [layer for layer in layers if len(getattr(layer.output, "shape", ())) == 4]
    if not conv:
        raise InvalidInput(f"The model {model.name} has no 4-D feature map; Grad-CAM needs a "
                         "convolutional backbone.")
    last = layers[-1]
    softmax_head = logits and isinstance(last, keras.layers.Dense) and \
        getattr(last.activation, "__name__", "") == "softmax"
    grad_model = keras.Model(model.inputs, [conv[-1].output, last.input if softmax_head else model.output])
    fmap, out = grad_model(x, training=False)
    tape.watch(fmap)
    return fmap, (_scores(last, out) if softmax_head else out)


def _scores(last_layer, h):
    """Class scores: the pre-softmax logits of a softmax Dense head, else the layer's output."""
    import keras
    from keras import ops

    if isinstance(last_layer, keras.layers.Dense) and getattr(last_layer.activation, "__name__", "") == "softmax":
        return ops.matmul(ops.cast(h, last_layer.kernel.dtype), last_layer.kernel) + last_layer.bias
    return last_layer(h, training=False)
