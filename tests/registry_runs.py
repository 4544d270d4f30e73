"""Homes and runs for the registry tests: a copy of the session's trained run's data home, and "second runs"
made by copying its run folder and row with other predictions (what a second run is to a review)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tlcore.evaluate.evaluation import read_predictions, write_predictions
from tlcore.records.config import RunSpec
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import RunStatus, Store


def copy_home(source: Path, dest: Path) -> Path:
    """`source`'s store, datasets and runs under `dest` (the blobs are read where they are)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "store.db", dest / "store.db")
    for folder in ("datasets", "runs"):
        shutil.copytree(source / folder, dest / folder, ignore=shutil.ignore_patterns("export"))
    return dest


def copy_run(run_id: str, name: str, *, wrong: int = 0, config: dict | None = None,
             reverse_labels: bool = False) -> str:
    """A new succeeded run: `run_id`'s folder and row with its first `wrong` evaluation predictions made
    wrong, its recipe changed by `config`; `reverse_labels` makes its model answer the other class."""
    store = Store()
    run = store.get_run(run_id)
    new = store.create_run(name, RunSpec.from_dict({**run.config, **(config or {})}, dataset_id=run.dataset_id))
    shutil.copytree(RunFolder(run_id).path, RunFolder(new.id).path, ignore=shutil.ignore_patterns("export"))
    folder = RunFolder(new.id)
    (folder.path / "fixed_set_predictions.jsonl").unlink(missing_ok=True)
    labels = folder.labels()
    if reverse_labels:
        folder.labels_file.write_text(json.dumps(labels[::-1]))
    rows = read_predictions(folder.predictions).to_dict("records")
    for row in rows[:wrong]:
        row["pred"] = next(label for label in labels if label != row["true"])
    write_predictions(folder.predictions, rows)
    store.finish_run(new.id, RunStatus.SUCCEEDED, summary=run.summary)
    return new.id
