"""Exporting a run's model: the `.keras` file, a TensorFlow SavedModel, or a float32 TFLite file.

Every export takes RGB 0-255 images at the run's image size (preprocessing is inside the
model) and has the run's `labels.json` written next to it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tlcore.atomic import write_atomically, write_bytes_atomically, write_json_atomically
from tlcore.errors import InvalidInput
from tlcore.run_folder import LABELS_FILE, MODEL_FILE, RunFolder

FORMATS = ("keras", "savedmodel", "tflite")
_DEFAULT_NAMES = {"keras": MODEL_FILE, "savedmodel": "savedmodel", "tflite": "model.tflite"}


def export_run(run_id: str, fmt: str, out: str | Path | None = None) -> Path:
    """Export a finished run's model and return where it was written.

    Args:
        run_id: the run's id or name.
        fmt: one of "keras" (a copy of the saved file), "savedmodel" (a folder for TF Serving)
            or "tflite" (float32, for phones and edge devices).
        out: the file (folder for "savedmodel") to write. Defaults to `export/` in the run folder.
            An existing folder receives the default file name inside it.

    Raises:
        ValueError: unknown format.
        KeyError: no such run.
        ModelLoadError: the run has no loadable model.
    """
    fmt = str(fmt).strip().lower()
    if fmt not in FORMATS:
        raise InvalidInput(f"`format` must be one of {', '.join(FORMATS)}. Received: format={fmt!r}")
    from tlcore import inference

    loaded = inference.load_run_model(run_id)  # safe mode; resolves names, checks labels
    source = Path(loaded.path)
    if out is None:
        target = RunFolder(loaded.run_id).export_dir / _DEFAULT_NAMES[fmt]
    else:
        target = Path(out).expanduser()
        if target.is_dir() and fmt != "savedmodel":
            target = target / _DEFAULT_NAMES[fmt]
        elif fmt == "savedmodel" and target.is_dir() and any(target.iterdir()):
            target = target / _DEFAULT_NAMES[fmt]
    if fmt == "keras" and target.suffix != ".keras":
        target = target.with_name(target.name + ".keras")  # Keras loads only `.keras` files
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)

    if fmt == "keras":
        if target != source.resolve():
            write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
    elif fmt == "savedmodel":
        _export_savedmodel(loaded.model, target)
    else:
        _export_tflite(loaded.model, target)
    labels_path = (target / LABELS_FILE) if fmt == "savedmodel" else target.with_name(target.stem + ".labels.json")
    write_json_atomically(labels_path, loaded.labels)
    return target


def _export_savedmodel(model, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".savedmodel-", dir=target.parent))
    try:
        shutil.rmtree(tmp)
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _export_tflite(model, target: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix=".tflite-", dir=target.parent) as tmp:
        saved = Path(tmp) / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = []  # float32, no quantization
        write_bytes_atomically(target, converter.convert())


def default_export_dir(run_id: str) -> Path:
    return RunFolder(run_id).export_dir
