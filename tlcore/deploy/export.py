"""Exporting a run's model: `.keras`, SavedModel, TFLite (float32 or int8), ONNX, a model card, a bundle.

Every exported model takes RGB 0-255 images at the run's image size (preprocessing is inside
the model, and so is a run's flip TTA in SavedModel, TFLite and ONNX files) and has the run's
`labels.json` written next to it. ONNX and int8 exports are checked
on the run's evaluation images; what the check found is written beside the file
(`<file>.report.json`, see `read_report`). Exports into the run folder's `export/` are made
once and reused until the model, its predictions or its operating point change, or until
`EXPORT_VERSION` says they were made by code that wrote something else into them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tlcore.errors import InvalidInput, NotFound
from tlcore.records.atomic import write_atomically, write_bytes_atomically, write_json_atomically
from tlcore.records.run_folder import LABELS_FILE, MODEL_FILE, RunFolder


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format. `FORMATS` is the only table of them: the CLI's choices and the Export
    page read it."""

    name: str  # the `--format` value
    title: str  # as the Export page lists it
    file: str  # the default file in the run folder's `export/` (a folder for savedmodel)
    description: str  # what it is for
    download_suffix: str  # a download's file name is the run's name, then this
    check: str | None = None  # what its `<file>.report.json` checks, on the "{split}" images; None: no check
    mime: str = "application/octet-stream"
    with_operating_point: bool = False  # holds the calibration and threshold: made again when they change

    def describe(self, split: str = "evaluation") -> str:
        """What the format is for, and what its export is checked against on the `split` images."""
        return f"{self.description}; {self.check.format(split=split)}" if self.check else self.description


FORMATS = (
    ExportFormat(name="keras", title="Keras", file=MODEL_FILE, download_suffix=".keras",
                 description="the run's `.keras` file, for Keras 3 with Transfer Lab installed"),
    ExportFormat(name="savedmodel", title="SavedModel (zip)", file="savedmodel", download_suffix="-savedmodel.zip",
                 description="for TensorFlow Serving and TensorFlow converters", mime="application/zip"),
    ExportFormat(name="tflite", title="TFLite float32", file="model.tflite", download_suffix=".tflite",
                 description="for phones and edge devices, same answers as Keras"),
    ExportFormat(name="tflite-int8", title="TFLite int8", file="model_int8.tflite", download_suffix="-int8.tflite",
                 description="about 4x smaller, uint8 pixels in",
                 check="accuracy and speed checked on the {split} images"),
    ExportFormat(name="onnx", title="ONNX", file="model.onnx", download_suffix=".onnx",
                 description="for ONNX Runtime in any language", check="checked against Keras on the {split} images"),
    ExportFormat(name="bundle", title="Bundle (zip)", file="bundle.zip", download_suffix="-bundle.zip",
                 description="Keras and ONNX models, labels, preprocessing, calibration and threshold if any, "
                 "and the model card", mime="application/zip", with_operating_point=True),
    ExportFormat(name="card", title="Model card", file="model_card.md", download_suffix="-model-card.md",
                 description="what the model is for, its data, recipe, test metrics and limits (Markdown)",
                 mime="text/markdown", with_operating_point=True),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
_BY_NAME = {f.name: f for f in FORMATS}
_SAVEDMODEL_DOWNLOAD = "savedmodel.zip"  # the SavedModel folder, zipped for a browser
# int8 may lose this many accuracy points against float32 before the export warns.
INT8_TOLERANCE_POINTS = 1.0
# Training images the int8 quantizer sees to choose its value ranges.
REPRESENTATIVE_IMAGES = 100
# Evaluation images timed one by one for the TFLite latency figures.
LATENCY_IMAGES = 50
# Evaluation images decoded at once by the export checks: memory stays flat however large the split.
EVAL_BATCH = 32
# What the files in `export/` hold, by the code that made them; raised when that changes, so that files
# made before are made again (2: a flip-TTA run's SavedModel, TFLite and ONNX files carry the mirror
# average, and its card says so). `export/versions.json` records it per file; files from before it
# existed count as version 1.
EXPORT_VERSION = 2
_VERSIONS_FILE = "versions.json"

Progress = Callable[[float, str], None]  # (fraction done 0-1, what is happening)
_EXPORT_LOCK = threading.RLock()  # re-entrant: int8 and bundle exports make other formats first


def export_run(run_id: str, fmt: str, out: str | Path | None = None, *, progress: Progress | None = None) -> Path:
    """Export a finished run's model and return where it was written.

    Args:
        run_id: the run's id or name.
        fmt: one of `FORMAT_NAMES`: "keras" (a copy of the saved file), "savedmodel" (a folder for
            TF Serving), "tflite" (float32), "tflite-int8" (full-integer, uint8 in and out),
            "onnx", "card" (Markdown and JSON) or "bundle" (a zip of the Keras and ONNX models,
            labels, preprocessing facts, calibration and threshold if any, and the card).
        out: the file (folder for "savedmodel") to write. Defaults to `export/` in the run folder,
            where a file already made from the current model is returned as it is.
            An existing folder receives the default file name inside it.
        progress: called with (fraction done, message) while a long export runs.

    Raises:
        InvalidInput: unknown format.
        NotFound: no such run.
        ModelLoadError: the run has no loadable model.
    """
    from tlcore.deploy import inference

    fmt = _check_format(fmt)
    report = progress or (lambda fraction, message: None)
    folder = inference.run_model_folder(run_id)[0]
    if out is None:
        target = folder.export_dir / _BY_NAME[fmt].file
        if is_fresh(target, folder, fmt):
            report(1.0, "Already exported")
            return target.resolve()
    else:
        target = Path(out).expanduser()
        if target.is_dir() and fmt != "savedmodel":
            target = target / _BY_NAME[fmt].file
        elif fmt == "savedmodel" and target.is_dir() and any(target.iterdir()):
            target = target / _BY_NAME[fmt].file
    if fmt == "keras" and target.suffix != ".keras":
        target = target.with_name(target.name + ".keras")  # Keras loads only `.keras` files
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)

    with _EXPORT_LOCK:  # two callers asking for the same file: the second finds it made
        if out is None and is_fresh(target, folder, fmt):
            return target
        _make(run_id, fmt, folder, target, report)
        if out is None:
            _record_version(folder, fmt)
    report(1.0, "Done")
    return target


def _make(run_id: str, fmt: str, folder: RunFolder, target: Path, report: Progress) -> None:
    from tlcore.deploy import inference

    if fmt == "card":
        from tlcore.evaluate.model_card import build_card, write_card

        write_card(build_card(run_id), target)  # from the store and the run folder: no model needed
        return
    report(0.0, "Loading the model")
    loaded = inference.load_run_model(run_id)  # safe mode; resolves names, checks labels
    if fmt == "keras":
        if target != Path(loaded.path).resolve():
            write_atomically(target, lambda tmp: shutil.copyfile(loaded.path, tmp))
    elif fmt == "savedmodel":
        _export_savedmodel(answering_model(loaded), target)
    elif fmt == "tflite":
        _write_tflite(answering_model(loaded), {target: None})
    elif fmt == "tflite-int8":
        _export_int8(loaded, folder, target, report)
    elif fmt == "onnx":
        _export_onnx(loaded, folder, target, report)
    else:
        _export_bundle(run_id, loaded, folder, target, report)
    if fmt != "bundle":
        _write_labels(target, fmt, loaded.labels)


def answering_model(loaded) -> Any:
    """The model a SavedModel, TFLite or ONNX file holds: the run's model, or for a run evaluated with
    flip TTA that model on the image and on its mirror, probabilities averaged, so the file answers as
    the run's evaluation, the Demo and predict do (at twice the forward cost). The `.keras` file stays
    the single-view model that training saved."""
    if loaded.tta != "flip":
        return loaded.model
    import keras

    image = keras.Input(shape=loaded.model.input_shape[1:], name="image")
    mirrored = keras.ops.flip(image, axis=2)  # left-right: the width axis of (n, h, w, 3)
    averaged = keras.layers.Average(name="flip_tta")([loaded.model(image), loaded.model(mirrored)])
    return keras.Model(image, averaged, name=f"{loaded.model.name}_flip_tta")


def _write_labels(target: Path, fmt: str, labels: list[str]) -> None:
    path = (target / LABELS_FILE) if fmt == "savedmodel" else target.with_name(target.stem + ".labels.json")
    write_json_atomically(path, labels)


def download_file(run_id: str, fmt: str, *, progress: Progress | None = None) -> Path:
    """One file to hand to a browser for `fmt`, made once in the run folder's `export/`.

    The run's own `model.keras` for "keras", a zip of the folder for "savedmodel", the
    default export file otherwise.
    """
    from tlcore.deploy import inference

    fmt = _check_format(fmt)
    if fmt == "keras":
        return inference.run_model_folder(run_id)[0].model
    path = export_run(run_id, fmt, progress=progress)
    if fmt != "savedmodel":
        return path
    archive = path.with_name(_SAVEDMODEL_DOWNLOAD)
    with _EXPORT_LOCK:
        if archive.is_file() and archive.stat().st_mtime >= path.stat().st_mtime:
            return archive
        write_atomically(archive, lambda tmp: _zip(tmp, {Path("savedmodel") / file.relative_to(path): file
                                                         for file in sorted(path.rglob("*")) if file.is_file()}))
    return archive


def cached_download(run_id: str, fmt: str) -> Path | None:
    """The download file for `fmt` if it is already made from the current model, else None."""
    from tlcore.deploy import inference

    fmt = _check_format(fmt)
    folder = inference.run_model_folder(run_id)[0]
    if fmt == "keras":
        return folder.model
    name = _SAVEDMODEL_DOWNLOAD if fmt == "savedmodel" else _BY_NAME[fmt].file
    path = folder.path / "export" / name
    return path if is_fresh(path, folder, fmt) else None


def is_fresh(path: Path, folder: RunFolder, fmt: str) -> bool:
    """True when `path`, an export in `fmt`, exists and is newer than every run file it is made from
    (the model, its labels and predictions; for the card and the bundle also the operating point)."""
    if not path.exists():
        return False
    made = path.stat().st_mtime
    inputs = [folder.model, folder.labels_file, folder.predictions]
    if _BY_NAME[fmt].with_operating_point:
        inputs += [folder.calibration_file, folder.threshold_file]
    if _versions(folder).get(_BY_NAME[fmt].file, 1) != EXPORT_VERSION:
        return False
    return all(not p.exists() or p.stat().st_mtime <= made for p in inputs)


def _versions(folder: RunFolder) -> dict[str, int]:
    """`EXPORT_VERSION` of each file in the run's `export/` when it was made (none recorded: {})."""
    try:
        versions = json.loads((folder.export_dir / _VERSIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return versions if isinstance(versions, dict) else {}


def _record_version(folder: RunFolder, fmt: str) -> None:
    """Record that `fmt`'s default file in `export/` was just made by this `EXPORT_VERSION`."""
    with _EXPORT_LOCK:
        write_json_atomically(folder.export_dir / _VERSIONS_FILE,
                              {**_versions(folder), _BY_NAME[fmt].file: EXPORT_VERSION}, indent=2)


def read_report(path: str | Path) -> dict[str, Any] | None:
    """What the export check found for an exported file (ONNX or int8), or None if it has no
    readable report (none was written, or the file is damaged: the export itself still stands)."""
    try:
        report = json.loads(_report_path(Path(path)).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def describe_report(report: dict[str, Any]) -> list[str]:
    """An export check's findings as plain sentences (the last one the int8 warning, if any).
    A report written by another version that lacks a figure loses only the sentence needing it."""
    split = report.get("eval_split") or "evaluation"
    try:
        if report.get("format") == "onnx":
            return [f"ONNX Runtime agrees with Keras on the top-1 class of {report['top1_agreement']:.1%} of "
                    f"{report['eval_images']} {split} images; largest probability difference "
                    f"{report['max_probability_difference']:.2g}."]
    except (KeyError, TypeError, ValueError):
        return []
    lines = []
    for name in ("int8", "float32"):
        r = report.get(name)
        try:
            lines.append(f"{name}: {split} accuracy {r['accuracy']:.1%}, {r['size_bytes'] / 2**20:.1f} MB, "
                         f"{r['latency_ms_p50']:.2f} ms per image (TFLite interpreter, median).")
        except (KeyError, TypeError, ValueError):
            continue
    return lines + ([f"Warning: {report['warning']}"] if report.get("warning") else [])


def _check_format(fmt: str) -> str:
    fmt = str(fmt).strip().lower()
    if fmt not in _BY_NAME:
        raise InvalidInput(f"`format` must be one of {', '.join(FORMAT_NAMES)}. Received: format={fmt!r}")
    return fmt


def _report_path(path: Path) -> Path:
    return path.with_name(path.name + ".report.json")


# ------------------------------------------------------------------ writing


def _zip(path: Path, members: dict[Path | str, Path | str | bytes]) -> None:
    """Write a zip at `path`: archive name -> a file to copy in, or the member's text or bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, member in members.items():
            if isinstance(member, Path):
                zf.write(member, str(name))
            else:
                zf.writestr(str(name), member)


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


# ------------------------------------------------------------------ the run's images


@dataclasses.dataclass(frozen=True)
class _EvalImages:
    """A run's evaluation images (paths and true labels), decoded batch by batch as evaluation saw them."""

    paths: list[str]
    truth: list[str]
    split: str
    size: int

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self) -> Iterator[np.ndarray]:
        """uint8 `(n, size, size, 3)` batches of at most `EVAL_BATCH` images, in order."""
        for start in range(0, len(self.paths), EVAL_BATCH):
            yield _decode(self.paths[start:start + EVAL_BATCH], self.size)


def _decode(paths: list[str], size: int) -> np.ndarray:
    from tlcore.data.images import load_resized

    return np.stack([load_resized(path, size) for path in paths])


def _eval_set(folder: RunFolder, size: int) -> _EvalImages:
    """The run's evaluation images, as evaluation saw them (decoded only when a batch is asked for)."""
    from tlcore.evaluate.evaluation import read_predictions
    from tlcore.records.store import Store

    rows = read_predictions(folder.predictions)
    try:
        summary = Store().get_run(folder.run_id).summary
    except NotFound:  # a run folder without a stored run
        summary = None
    split = summary.eval_split if summary else None
    return _EvalImages(list(rows["path"]), list(rows["true"]), split or "evaluation", size)


def _representative_pixels(folder: RunFolder, size: int) -> np.ndarray:
    """Up to `REPRESENTATIVE_IMAGES` training images, classes taken in turn, seeded."""
    from tlcore.data.images import load_resized
    from tlcore.data.manifest import run_entries
    from tlcore.records.store import Store

    spec = folder.spec()
    if spec is None:
        raise InvalidInput(f"The run folder {folder.path} has no config.json naming its dataset; int8 "
                           "quantization needs the run's training images. Retrain the run.")
    dataset = Store().get_dataset(spec.dataset_id)
    train = [e for e in run_entries(dataset, spec.recipe.split, spec.recipe.seed) if e.split == "train"]
    rng = np.random.default_rng(0)
    by_class: dict[str, list] = {}
    for entry in train:
        by_class.setdefault(entry.label, []).append(entry)
    queues = [list(rng.permutation(len(group))) for group in by_class.values()]
    groups = list(by_class.values())
    chosen = []
    while len(chosen) < REPRESENTATIVE_IMAGES and any(queues):
        for group, queue in zip(groups, queues):
            if queue and len(chosen) < REPRESENTATIVE_IMAGES:
                chosen.append(group[queue.pop()])
    if not chosen:
        raise InvalidInput(f"The run's dataset {dataset.label} has no training images left to calibrate "
                           "int8 quantization with.")
    return np.stack([load_resized(e.path, size) for e in chosen])


# ------------------------------------------------------------------ TFLite


def _write_tflite(model, targets: dict[Path, np.ndarray | None]) -> None:
    """Write `model` as TFLite files, one per target: float32 when its value is None, else
    full-integer (uint8 in and out) quantized with that representative set of uint8 images.
    The SavedModel the converter reads is exported once for all of them."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix=".tflite-") as tmp:
        saved = Path(tmp) / "savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        for target, representative in targets.items():
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            if representative is None:
                converter.optimizations = []  # float32, no quantization
            else:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = lambda rep=representative: (
                    [image[None].astype("float32")] for image in rep)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.uint8
                converter.inference_output_type = tf.uint8
            write_bytes_atomically(target, converter.convert())


class TFLiteClassifier:
    """A TFLite file run image by image with the TFLite interpreter, quantized or not."""

    def __init__(self, path: str | Path):
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_path=str(path))
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.interpreter.allocate_tensors()

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities for one uint8 `(size, size, 3)` image."""
        x = image[None].astype("float32")
        if self.input["dtype"] != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] != np.float32:
            scale, zero = self.output["quantization"]
            y = (y.astype("float32") - zero) * scale
        return y


def _tflite_scores(paths: list[Path], images: _EvalImages, labels: list[str]) -> list[dict[str, Any]]:
    """For each TFLite file: accuracy over `images`, median latency per image and file size (one decode pass)."""
    models = [TFLiteClassifier(path) for path in paths]
    latencies: list[list[float]] = [[] for _ in paths]
    correct = [0] * len(paths)
    i = 0
    for batch in images.batches():
        for image in batch:
            for m, model in enumerate(models):
                start = time.perf_counter()
                probs = model.probabilities(image)
                if i < LATENCY_IMAGES:
                    latencies[m].append((time.perf_counter() - start) * 1000)
                correct[m] += labels[int(np.argmax(probs))] == images.truth[i]
            i += 1
    return [{"file": path.name, "accuracy": correct[m] / len(images), "size_bytes": path.stat().st_size,
             "latency_ms_p50": float(np.median(latencies[m]))} for m, path in enumerate(paths)]


def int8_warning(float_accuracy: float, int8_accuracy: float, images: int, split: str) -> str | None:
    """A plain warning when int8 loses more than `INT8_TOLERANCE_POINTS` accuracy points, else None."""
    drop = (float_accuracy - int8_accuracy) * 100
    if drop <= INT8_TOLERANCE_POINTS:
        return None
    return (f"The int8 model is {drop:.1f} points less accurate than the float32 model "
            f"({int8_accuracy:.1%} against {float_accuracy:.1%} on {images} {split} images). "
            "Use the float32 TFLite file where accuracy matters.")


def _export_int8(loaded, folder: RunFolder, target: Path, report: Progress) -> None:
    report(0.05, f"Reading up to {REPRESENTATIVE_IMAGES} training images for quantization")
    representative = _representative_pixels(folder, loaded.image_size)
    report(0.1, f"Quantizing to int8 with {len(representative)} training images")
    targets = {target: representative}
    float_path = folder.export_dir / _BY_NAME["tflite"].file  # the float32 model to compare with
    if not is_fresh(float_path, folder, "tflite"):
        targets[float_path] = None
    _write_tflite(answering_model(loaded), targets)
    _write_labels(float_path, "tflite", loaded.labels)
    if float_path in targets:
        _record_version(folder, "tflite")
    report(0.6, "Measuring int8 and float32 accuracy on the evaluation images")
    images = _eval_set(folder, loaded.image_size)
    int8, float32 = _tflite_scores([target, float_path], images, loaded.labels)
    drop = (float32["accuracy"] - int8["accuracy"]) * 100
    write_json_atomically(_report_path(target), {
        "format": "tflite-int8", "eval_split": images.split, "eval_images": len(images),
        "representative_images": len(representative), "int8": int8, "float32": float32,
        "accuracy_drop_points": round(drop, 3), "tolerance_points": INT8_TOLERANCE_POINTS,
        "warning": int8_warning(float32["accuracy"], int8["accuracy"], len(images), images.split),
        "input": "uint8 RGB 0-255", "output": "uint8 probabilities (scale 1/256)",
    }, indent=2)


# ------------------------------------------------------------------ ONNX


def _export_onnx(loaded, folder: RunFolder, target: Path, report: Progress) -> None:
    import onnxruntime
    import tensorflow as tf

    size = loaded.image_size
    report(0.1, "Converting to ONNX")
    model = answering_model(loaded)
    model(np.zeros((1, size, size, 3), "float32"))  # Keras exports only a model that has been called
    spec = tf.TensorSpec((None, size, size, 3), tf.float32, name="image")
    write_atomically(target, lambda tmp: model.export(str(tmp), format="onnx", input_signature=[spec],
                                                      verbose=False))
    report(0.5, "Checking ONNX Runtime against Keras on the evaluation images")
    images = _eval_set(folder, size)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    disagreements, largest_difference = 0, 0.0
    for batch in images.batches():
        x = batch.astype("float32")
        onnx_probs = session.run(None, {name: x})[0]
        keras_probs = np.asarray(model.predict_on_batch(x))
        disagreements += int((onnx_probs.argmax(-1) != keras_probs.argmax(-1)).sum())
        largest_difference = max(largest_difference, float(np.abs(onnx_probs - keras_probs).max()))
    write_json_atomically(_report_path(target), {
        "format": "onnx", "eval_split": images.split, "eval_images": len(images),
        "top1_agreement": 1 - disagreements / len(images), "disagreements": disagreements,
        "max_probability_difference": largest_difference,
        "input": {"name": name, "shape": [None, size, size, 3], "dtype": "float32", "range": "RGB 0-255"},
        "onnxruntime_version": onnxruntime.__version__,
    }, indent=2)


# ------------------------------------------------------------------ bundle


def _export_bundle(run_id: str, loaded, folder: RunFolder, target: Path, report: Progress) -> None:
    from tlcore.evaluate.model_card import build_card, card_markdown
    from tlcore.evaluate.operating_point import read_operating_point

    report(0.05, "Making the ONNX model")
    onnx_path = export_run(run_id, "onnx", progress=lambda f, m: report(0.05 + 0.8 * f, m))
    report(0.9, "Writing the model card and the bundle")
    card = build_card(run_id)
    members: dict[str, Path | str] = {
        MODEL_FILE: Path(loaded.path),
        "model.onnx": onnx_path,
        LABELS_FILE: json.dumps(loaded.labels),
        "preprocessing.json": json.dumps(card["model"]["preprocessing"], indent=2),
        "model_card.md": card_markdown(card),
        "model_card.json": json.dumps(card, indent=2),
    }
    if _report_path(onnx_path).is_file():  # an ONNX file kept from an older version may have none
        members["model.onnx.report.json"] = _report_path(onnx_path)
    point = read_operating_point(folder)
    members.update({name: json.dumps(data, indent=2) for name, data in point.files().items()})
    write_atomically(target, lambda tmp: _zip(tmp, members))
