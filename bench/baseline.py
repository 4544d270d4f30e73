"""The baseline: the standard Keras transfer-learning tutorial recipe, on the same images as tlcore.

What the tutorial does, kept as is:
- `keras.utils.image_dataset_from_directory` (tf.io.decode_image + tf.image.resize, bilinear),
  `batch_size`, `shuffle=True, seed=...` for training, then `.prefetch(AUTOTUNE)`;
- the augmentation layers and the frozen backbone INSIDE the model:
  `Input -> RandomFlip/RandomRotation/RandomZoom -> preprocessing -> base(training=False) ->
  GlobalAveragePooling2D -> Dropout -> Dense`;
- `model.fit` for the head (Adam at `lr`), then the top layers unfrozen, recompiled at `lr / 10`
  and `model.fit(..., initial_epoch=head_epochs)` again.

What differs from the tutorial, so both sides see the same data and model:
- The tutorial splits one folder with `validation_split=0.2, subset=...`. Here the train / val /
  test split is tlcore's own (from the dataset manifest): `run.py` materialises one folder of
  symlinks per split (`<split>/<class>/<file>`) and this module calls
  `image_dataset_from_directory` once per split folder. Same files, same labels, same order of
  classes.
- Backbone: EfficientNet-Lite0 with the same offline ImageNet weights and the same
  preprocessing layer tlcore uses (Keras' own downloadable weights are unavailable offline).
- The layers unfrozen for fine-tuning are the same as tlcore's (`finetune_layers` weighted layers
  from the top, BatchNorm kept frozen), via `tlcore.backbones.classifier.unfreeze_top`, so both fine-tune
  the same parameters. The tutorial's constant lower learning rate is kept (no schedule, no
  early stopping).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


class EpochClock:
    """Records, per epoch: phase, wall seconds of the epoch, time since the job began, metrics."""

    def __init__(self, t0: float):
        import keras

        clock = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock.began = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                now = time.perf_counter()
                clock.records.append({
                    "phase": clock.phase, "epoch": epoch + 1, "seconds": now - clock.began,
                    "elapsed_s": now - clock.t0,
                    **{k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0},
                })

        self.t0, self.phase, self.began = t0, "head", t0
        self.records: list[dict] = []
        self.callback = _Callback()


AUGMENT = ("flip", "rotate", "zoom")


def run_baseline(split_dir: str, labels: list[str], *, size: int, head_epochs: int, finetune_epochs: int,
                 finetune_layers: int, batch_size: int, lr: float, dropout: float, seed: int,
                 eval_split: str, augment: tuple[str, ...] = AUGMENT, head_eval: bool = False) -> dict:
    """Train the tutorial recipe; return timings, per-epoch records and eval metrics.

    `augment`: the tutorial's layers to keep (flip, rotate, zoom). `head_eval`: the eval split's accuracy
    after the head phase too (`head_accuracy`; its seconds count in `head_s`)."""
    t0 = time.perf_counter()
    import keras
    import tensorflow as tf

    from tlcore.backbones import get_backbone, resolve_weights
    from tlcore.backbones.classifier import unfreeze_top
    from tlcore.backbones.preprocessing import BackbonePreprocessing

    keras.utils.set_random_seed(seed)
    timings = {}
    split_dir = Path(split_dir)

    def folder(split, shuffle):
        return keras.utils.image_dataset_from_directory(
            split_dir / split, labels="inferred", label_mode="int", class_names=labels,
            image_size=(size, size), batch_size=batch_size, shuffle=shuffle, seed=seed, verbose=False)

    autotune = tf.data.AUTOTUNE
    train_ds = folder("train", True).prefetch(autotune)
    val_ds = folder("val", False).prefetch(autotune)
    eval_raw = folder(eval_split, False)
    eval_ds = eval_raw.prefetch(autotune)

    spec = get_backbone("efficientnet_lite0")
    weights_path = resolve_weights(spec, "imagenet")
    layers = {"flip": lambda: keras.layers.RandomFlip("horizontal", seed=seed),
              "rotate": lambda: keras.layers.RandomRotation(0.1, seed=seed),
              "zoom": lambda: keras.layers.RandomZoom(0.15, seed=seed)}
    data_augmentation = keras.Sequential([layers[name]() for name in AUGMENT if name in augment],
                                         name="data_augmentation")
    base_model = spec.build(size, weights_path)
    base_model.trainable = False
    inputs = keras.Input(shape=(size, size, 3))
    x = data_augmentation(inputs) if data_augmentation.layers else inputs
    x = BackbonePreprocessing(spec.preprocessing)(x)
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(len(labels), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    timings["setup_s"] = time.perf_counter() - t0

    clock = EpochClock(t0)
    t = time.perf_counter()
    if head_epochs:
        model.fit(train_ds, epochs=head_epochs, validation_data=val_ds, verbose=0, callbacks=[clock.callback])
    head_accuracy = None
    if head_eval:
        y_eval = np.concatenate([y.numpy() for _, y in eval_raw])
        head_accuracy = float((model.predict(eval_ds, verbose=0).argmax(-1) == y_eval).mean())
    timings["head_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if finetune_epochs:
        unfreeze_top(base_model, finetune_layers)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr / 10),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        clock.phase = "finetune"
        model.fit(train_ds, epochs=head_epochs + finetune_epochs, initial_epoch=head_epochs,
                  validation_data=val_ds, verbose=0, callbacks=[clock.callback])
        for r in clock.records:
            if r["phase"] == "finetune":
                r["epoch"] -= head_epochs
    timings["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = model.predict(eval_ds, verbose=0)
    y_true = np.concatenate([y.numpy() for _, y in eval_raw])
    y_pred = probs.argmax(-1)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    # Per image, as tlcore's predictions.jsonl has them (the split folders link to the blobs, whose
    # names are the images' sha256), so `tlcore.evaluate.comparison` can pair the two recipes image by image.
    predictions = [{"path": str(Path(path).resolve()), "true": labels[int(t)], "pred": labels[int(p)],
                    "confidence": float(row[int(p)])}
                   for path, t, p, row in zip(eval_raw.file_paths, y_true, y_pred, probs)]
    return {"timings": timings, "epochs": clock.records, "eval_images": int(len(y_true)),
            "accuracy": float((y_true == y_pred).mean()), "head_accuracy": head_accuracy,
            "macro_f1": macro_f1(y_true, y_pred, len(labels)),
            "predictions": predictions}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in `y_true` (as tlcore.evaluate.evaluation computes it)."""
    scores = []
    for c in range(num_classes):
        support = int((y_true == c).sum())
        if not support:
            continue
        tp = int(((y_true == c) & (y_pred == c)).sum())
        predicted = int((y_pred == c).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))
