"""Seeding a data home for the dashboard's AppTests: datasets, runs, epochs and run folders
made through the store's own methods, with small real images where a page shows pictures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlcore.records import home
from tlcore.records.config import RunSpec
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Metrics, RunProgress, RunSummary
from tlcore.records.store import Dataset, Run, RunStatus, Store

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
COLORS = {"ants": (200, 60, 40), "bees": (230, 200, 40), "wasps": (60, 60, 200)}


def app(page: str | None = None, timeout: float = 60, **query):
    """An AppTest of the whole app (frame + sidebar) on `page` (e.g. 'pages/compare.py')."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=timeout)
    for key, value in query.items():
        at.query_params[key] = value
    if page:
        at.switch_page(page)
    return at


def image_file(folder: Path, name: str, color=(128, 128, 128), size=(48, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    pixels = np.clip(np.array(color)[None, None] + rng.integers(-30, 30, size[::-1] + (3,)), 0, 255)
    path = folder / name
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def dataset(store: Store, name: str = "insects", classes=("ants", "bees", "wasps"), per_class: int = 4,
            report: dict | None = None) -> Dataset:
    """A dataset with real image files in blobs/ and a manifest (train + val + test)."""
    from tlcore.data.manifest import ManifestEntry, write_manifest

    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    entries = []
    blobs = home.blobs_dir() / name
    for label in classes:
        for i in range(per_class):
            split = "train" if i < per_class - 2 else ("val" if i == per_class - 2 else "test")
            path = image_file(blobs, f"{label}_{i}.png", COLORS.get(label, (120, 120, 120)))
            counts[split][label] = counts[split].get(label, 0) + 1
            entries.append(ManifestEntry(path=path, label=label, split=split, sha256=f"{label}{i}",
                                         source=f"{label}/{label}_{i}.png", width=48, height=40))
    report = report if report is not None else {
        "counts": counts,
        "skipped": [{"file": "ants/broken.jpg", "reason": "corrupt", "message": "The file is truncated."}],
        "warnings": ["Class 'wasps' has only 4 images; 20 or more per class train better."],
    }
    ds = store.add_dataset(name, f"upload:{name}.zip", list(classes), counts, report)
    write_manifest(ds.id, entries)
    return ds


def run(store: Store, ds: Dataset, name: str, status: RunStatus = RunStatus.SUCCEEDED, *,
        accuracy: float = 0.8, epochs: int = 4, backbone: str = "efficientnet_lite0",
        predictions: bool = True, config: dict | None = None, error: str | None = None,
        tags: list[str] | None = None, progress: dict | None = None, sweep_id: str | None = None) -> Run:
    """A run with `epochs` logged epochs; succeeded runs get a run folder with predictions."""
    cfg = {"dataset": ds.id, "backbone": backbone, "weights": "imagenet", "image_size": 224,
           "head_epochs": epochs, "finetune_epochs": 0, "lr": 0.001, "batch_size": 32, "seed": 0,
           "augment": []}
    cfg.update(config or {})
    r = store.create_run(name, RunSpec.from_dict(cfg, dataset_id=ds.id, sweep_id=sweep_id))
    for step in range(1, epochs + 1):
        f = step / epochs
        store.log_epoch(r.id, "head", step, step, {
            "loss": 1.2 - 0.8 * f * accuracy, "accuracy": 0.4 + 0.5 * f * accuracy,
            "val_loss": 1.3 - 0.8 * f * accuracy, "val_accuracy": 0.35 + (accuracy - 0.35) * f})
    now = time.time()
    if status is not RunStatus.QUEUED:
        store.start_run(r.id, "seed:1", at=now - 60)
    if status.is_terminal:
        summary = RunSummary(
            backbone=backbone, weights="imagenet", dataset=ds.label, dataset_id=ds.id, image_size=224,
            eval_split="val", eval_images=8,
            metrics=Metrics(accuracy=accuracy, macro_f1=accuracy - 0.05)) if status is RunStatus.SUCCEEDED else None
        store.finish_run(r.id, status, error=error, summary=summary, at=now)
    if tags:
        store.annotate(r.id, tags, "")
    if progress:
        store.heartbeat(r.id, RunProgress.from_dict(progress))
    if status == RunStatus.SUCCEEDED and predictions:
        write_predictions(r.id, ds)
    return store.get_run(r.id)


def write_predictions(run_id: str, ds: Dataset) -> Path:
    """labels.json, config.json and predictions.jsonl: ants are often taken for bees."""
    from tlcore.data.manifest import load_manifest

    folder = RunFolder(run_id).created().path
    (folder / "labels.json").write_text(json.dumps(ds.classes))
    (folder / "config.json").write_text(json.dumps({"dataset": ds.id}))
    rows = []
    for i, e in enumerate(load_manifest(ds.id)):
        pred = e.label
        conf = 0.9
        if e.label == "ants" and i % 2 == 0:
            pred, conf = "bees", 0.6 + 0.01 * i
        elif e.label == "wasps" and i % 4 == 0:
            pred, conf = "ants", 0.55
        rows.append({"path": str(e.path), "source": e.source, "true": e.label, "pred": pred,
                     "confidence": conf, "topk": [[pred, conf], [e.label, 1 - conf]]})
    with open(folder / "predictions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def texts(at) -> str:
    """Everything a user reads on the page (markdown, captions, alerts, metrics), one string."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "text", "info", "warning",
                 "error", "success"):
        parts += [str(el.value) for el in getattr(at, kind)]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(parts)


def table(at, column: str):
    """The first table on the page that has `column` (read-only tables carry no key)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"No table with a {column!r} column; tables: "
                         f"{[list(d.value.columns) for d in at.dataframe]}")
