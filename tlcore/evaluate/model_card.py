"""A run's model card: what the model is for, what it was trained on, how good it is, where it fails.

`build_card` gathers it as one JSON-able dict from the store, the run folder (config, labels,
predictions, calibration and threshold) and the backbone registry; `card_markdown` renders it
for people. The HTTP endpoint serves the dict, exports write both next to the model.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

from tlcore import __version__
from tlcore.evaluate.operating_point import read_operating_point, usable_threshold
from tlcore.records.atomic import write_json_atomically, write_text_atomically
from tlcore.records.run_folder import RunFolder

CARD_VERSION = 1
# Fewer evaluation images than this per class make its row of the table a rough estimate.
FEW_EVAL_IMAGES = 30


def find_run(run_ref: str, store=None):
    """(the stored run, its `RunFolder`) for a run id or name.

    Raises:
        NotFound: no such run.
    """
    from tlcore.records.store import Store

    run = (store or Store()).get_run(run_ref)
    return run, RunFolder(run.id)


FLIP_TTA = ("flip: the SavedModel, TFLite and ONNX files average each image's probabilities with those of its "
            "mirror (width axis flipped) inside the model, as the evaluation did; the .keras file is the single-view "
            "model, so average its outputs on the image and its mirror to get the evaluated answers.")


def preprocessing_facts(backbone: str, image_size: int, labels: list[str], tta: str = "none") -> dict[str, Any]:
    """What a caller must do to the pixels, and what the model does itself: the bundle's
    `preprocessing.json` and the card's input section. `tta`: the run's evaluation TTA, which the
    SavedModel, TFLite and ONNX exports carry inside (`tlcore.deploy.export.answering_model`)."""
    from tlcore.backbones import get_backbone
    from tlcore.backbones.preprocessing import MODES

    mode = get_backbone(backbone).preprocessing
    return {
        "input": {"shape": [None, image_size, image_size, 3], "dtype": "float32", "layout": "NHWC",
                  "channels": "RGB", "range": [0, 255]},
        "resize": (f"Decode, turn upright by EXIF, composite transparency on white, convert to RGB, "
                   f"then resize to {image_size}x{image_size} with bilinear filtering, aspect squashed "
                   "(PIL `Image.resize(..., Image.BILINEAR)`)."),
        "inside_model": {"mode": mode, "description": MODES[mode]},
        "output": {"shape": [None, len(labels)], "dtype": "float32",
                   "meaning": "softmax probabilities, one per label in labels.json order"},
        "labels": list(labels),
        **({"test_time_augmentation": FLIP_TTA} if tta == "flip" else {}),
    }


def build_card(run_ref: str, store=None) -> dict[str, Any]:
    """The model card of a finished run as a JSON-able dict.

    Raises:
        NotFound: no such run, or it has no stored predictions (it did not finish evaluation).
    """
    from tlcore.backbones import get_backbone
    from tlcore.data.manifest import run_entries
    from tlcore.evaluate.evaluation import evaluate_run
    from tlcore.records.store import Store

    store = store or Store()
    run, folder = find_run(run_ref, store)
    dataset = store.get_dataset(run.dataset_id)
    recipe = (folder.spec() or run.spec).recipe
    spec = get_backbone(run.backbone)
    report = evaluate_run(run.id)
    labels = list(report.labels)
    image_size = recipe.image_size or spec.default_size
    counts: dict[str, Counter] = {s: Counter() for s in ("train", "val", "test")}
    for entry in run_entries(dataset, recipe.split, recipe.seed):
        counts[entry.split][entry.label] += 1
    eval_split = run.summary.eval_split if run.summary else ("test" if sum(counts["test"].values()) else "val")
    point = read_operating_point(folder)
    pretrained = run.weights == "imagenet"
    metrics = report.metrics().to_dict()
    return {
        "card_version": CARD_VERSION,
        "model": {
            "run_id": run.id,
            "run_name": run.name,
            "backbone": spec.display_name,
            "backbone_name": spec.name,
            "weights": "ImageNet" if pretrained else "none (random initialisation)",
            "weights_origin": spec.weights_origin if pretrained else None,
            "weights_license": spec.license if pretrained else None,
            "image_size": image_size,
            "preprocessing": preprocessing_facts(spec.name, image_size, labels, folder.tta()),
        },
        "dataset": {
            "id": dataset.id, "name": dataset.name, "version": dataset.version, "label": dataset.label,
            "source": dataset.source, "classes": labels,
            "counts": {s: {label: int(counts[s][label]) for label in labels} for s in counts},
        },
        "recipe": {k: v for k, v in recipe.to_dict().items() if k != "dataset"},
        "evaluation": {
            "split": eval_split,
            "images": int(len(report.predictions)),
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "per_class": metrics["per_class"],
            "confusions": report.top_confusions(10).to_dict("records"),
        },
        # As written in the run folder (None when the run has no file); "probabilities" says what the
        # model's answers are, also for a run without a fitted temperature.
        "calibration": point.written.get(folder.calibration_file.name),
        "threshold": point.written.get(folder.threshold_file.name),
        "probabilities": ("temperature-scaled softmax" if point.temperature is not None
                          else "unscaled softmax"),
        "intended_use": (f"Sorting photos into the {len(labels)} classes of {dataset.label}: "
                         f"{', '.join(labels)}."),
        "limits": _limits(labels, metrics, eval_split, counts, point, pretrained),
        "trained_at": _iso(run.finished_at),
        "created_at": _iso(dt.datetime.now(dt.timezone.utc).timestamp()),
        "transfer_lab_version": __version__,
    }


def _limits(labels, metrics, eval_split, counts, point, pretrained) -> list[str]:
    limits = [f"It knows only {', '.join(labels)}. It was never shown any other kind of photo and "
              "still answers with one of these classes for one."]
    if point.threshold is not None:
        limits.append(f"Answers whose top probability is below {point.threshold:g} are marked "
                      "abstained; treat them as 'none of these'.")
    elif point.declined is not None:
        target = point.declined.target_precision
        limits.append(f"It has no usable abstention threshold: no confidence below 1 reached {target:.0%} "
                      "precision on the validation images, so every photo gets a label, however unsure.")
    else:
        limits.append("It has no abstention threshold: every photo gets a label, however unsure.")
    fewest = min(labels, key=lambda label: metrics["per_class"][label]["support"])
    support = metrics["per_class"][fewest]["support"]
    if support < FEW_EVAL_IMAGES:
        limits.append(f"The {eval_split} figures rest on few images ({fewest}: {support}); "
                      "each can be off by several points.")
    train = sum(counts["train"].values())
    limits.append(f"Trained on {train} photos; photos unlike them (other cameras, lighting, framing, "
                  "subjects) may be classified worse than the figures below.")
    if not pretrained:
        limits.append("The backbone started from random weights (no ImageNet transfer), so it has "
                      "seen nothing but this dataset.")
    return limits


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, for people."""
    model, data, ev = card["model"], card["dataset"], card["evaluation"]
    lines = [f"# Model card: {model['run_name']}", "",
             f"Transfer Lab {card['transfer_lab_version']} · run `{model['run_id']}` · "
             f"trained {card['trained_at'] or 'unknown'} · card made {card['created_at']}", "",
             "## Intended use", "", card["intended_use"], "",
             "## Limits", "", *[f"- {text}" for text in card["limits"]], "",
             "## Model", "",
             f"- Backbone: {model['backbone']} (`{model['backbone_name']}`), weights: {model['weights']}"]
    if model["weights_origin"]:
        lines.append(f"- Weights from {model['weights_origin']}; licence: {model['weights_license']}")
    prep = model["preprocessing"]
    lines += [f"- Input: RGB 0-255 float32, {model['image_size']}x{model['image_size']} px. {prep['resize']}",
              f"- Inside the model: {prep['inside_model']['description']}",
              *([f"- Test-time augmentation: {prep['test_time_augmentation']}"]
                if "test_time_augmentation" in prep else []), "",
              "## Data", "", f"{data['label']} (`{data['id']}`), from {data['source']}", "",
              "| class | " + " | ".join(data["counts"]) + " |",
              "|---|" + "---:|" * len(data["counts"])]
    for label in data["classes"]:
        lines.append(f"| {label} | " + " | ".join(str(data["counts"][s][label]) for s in data["counts"]) + " |")
    recipe = card["recipe"]
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2), "```", "",
              f"## Evaluation ({ev['split']} split, {ev['images']} images)", "",
              f"Accuracy {ev['accuracy']:.1%}, macro F1 {ev['macro_f1']:.1%}.", "",
              "| class | precision | recall | F1 | images |", "|---|---:|---:|---:|---:|"]
    for label, row in ev["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.1%} | {row['recall']:.1%} | {row['f1']:.1%} | "
                     f"{row['support']} |")
    lines += ["", "Most frequent confusions:", ""]
    lines += [f"- {c['true']} taken for {c['pred']}: {c['count']}" for c in ev["confusions"]] or ["- none"]
    lines += ["", "## Calibration and threshold", ""]
    calibration, threshold = card["calibration"] or {}, card["threshold"] or {}
    if calibration.get("temperature") is not None:
        lines.append(f"- Calibration: temperature scaling ({_scalars(calibration)})")
    else:
        reason = f" {calibration['reason']}" if calibration.get("reason") else ""
        lines.append(f"- Calibration: none (unscaled softmax probabilities).{reason}")
    if usable_threshold(threshold):
        lines.append(f"- Threshold: abstains below the threshold ({_scalars(threshold)})")
    elif threshold.get("threshold") is not None:
        lines.append(f"- Threshold: none usable: no confidence below 1 reached the target precision on "
                     f"validation ({_scalars(threshold)}), so it never abstains.")
    else:
        lines.append("- Threshold: none (never abstains).")
    return "\n".join(lines) + "\n"


def _scalars(data: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in data.items() if isinstance(value, (int, float, str)))


def write_card(card: dict[str, Any], markdown_path: Path) -> tuple[Path, Path]:
    """Write `card` as Markdown at `markdown_path` and as JSON beside it (same stem, `.json`)."""
    json_path = markdown_path.with_suffix(".json")
    write_text_atomically(markdown_path, card_markdown(card))
    write_json_atomically(json_path, card, indent=2)
    return markdown_path, json_path
