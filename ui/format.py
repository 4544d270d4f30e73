"""Plain-data formatting for the pages: times, durations, progress, run tables."""

from __future__ import annotations

import re
import time
from typing import Any, Iterable

import pandas as pd

from tlcore.records.store import Dataset, Run, RunStatus

# Plain words: they read the same in every browser and font (emoji do not on bare servers).
STATUS_ICON = {s: s.value for s in RunStatus}


def ago(ts: float | None, now: float | None = None) -> str:
    """'12 s ago', '5 min ago', '3 h ago', '2 d ago'; '—' for None."""
    if not ts:
        return "—"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.0f} s ago"
    if delta < 3600:
        return f"{delta / 60:.0f} min ago"
    if delta < 86400:
        return f"{delta / 3600:.0f} h ago"
    return f"{delta / 86400:.0f} d ago"


def file_name(name: str, suffix: str, limit: int = 64) -> str:
    """A download's file name from a run's name: only letters, digits, '.', '-' and '_', the stem
    at most `limit` characters, then `suffix` (e.g. '.keras')."""
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._-")
    return (stem[:limit].rstrip("._-") or "model") + suffix


def duration(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'; '—' for None."""
    if seconds is None:
        return "—"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f} %"


def mean_std(mean: float | None, std: float | None) -> str:
    """A fraction's mean ± std over seeds in percent: `75.0 % ± 25.0`."""
    return "—" if mean is None else f"{pct(mean)} ± {100 * (std or 0):.1f}"


def seed_list(seeds: Iterable[int]) -> str:
    """Seeds as `0, 1, 2`."""
    return ", ".join(str(s) for s in seeds)


def run_duration(run: Run, now: float | None = None) -> float | None:
    if not run.started_at:
        return None
    return (run.finished_at or now or time.time()) - run.started_at


def total_epochs(run: Run) -> int:
    return run.spec.recipe.head_epochs + run.spec.recipe.finetune_epochs


def progress_fraction(run: Run) -> float:
    """How far a run is, 0..1, from its progress (fields a phase does not report are None)."""
    if run.status == RunStatus.SUCCEEDED:
        return 1.0
    p = run.progress
    total = total_epochs(run) or int(p.epochs or 0)
    if not total:
        return 0.0
    # `step` counts the epochs finished so far across both phases.
    if p.step is not None:
        done = p.step
    else:
        offset = run.spec.recipe.head_epochs if p.phase == "finetune" else 0
        done = offset + max(0, int(p.epoch or 0) - 1)
    within = (p.batch or 0) / p.batches if p.batches else 0.0
    return float(min(1.0, max(0.0, (done + within) / total)))


def progress_text(run: Run) -> str:
    """'head phase · epoch 3/10 · batch 12/40 · ETA 1 min 05 s'."""
    p = run.progress
    bits = []
    if p.phase:
        bits.append(f"{p.phase} phase")
    if p.epoch:
        epoch = min(p.epoch, p.epochs) if p.epochs else p.epoch
        bits.append(f"epoch {epoch}/{p.epochs or '?'}")
    if p.batches:
        bits.append(f"batch {p.batch or 0}/{p.batches}")
    if p.message:
        bits.append(p.message)
    if p.eta_s is not None:
        bits.append(f"ETA {duration(p.eta_s)}")
    return " · ".join(bits) or ("waiting for the worker" if run.status == RunStatus.QUEUED else "starting…")


EVAL_SPLIT_NOTE = ("Accuracy and macro F1 are on each run's evaluation split: test, or validation when the "
                   "dataset has no test split (validation also chose the early-stopping epoch).")


def eval_split(run: Run) -> str:
    """The split a finished run's metrics come from, in words: 'test', 'validation (no test split)'."""
    split = run.summary.eval_split if run.summary else ""
    return {"test": "test", "val": "validation (no test split)"}.get(split, split or "—")


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def runs_frame(runs: Iterable[Run], datasets: dict[str, Dataset] | None = None) -> pd.DataFrame:
    """One row per run, the columns the runs tables show; metrics in percent (0-100)."""
    datasets = datasets or {}
    rows = []
    for run in runs:
        ds = datasets.get(run.dataset_id)
        rows.append({
            "name": run.name,
            "status": STATUS_ICON.get(run.status, run.status.value),
            "accuracy": _percent(run.accuracy),
            "macro F1": _percent(run.macro_f1),
            "smallest-class recall": _percent(run.smallest_class_recall),
            "split": run.summary.eval_split if run.summary else None,
            "dataset": ds.label if ds else run.dataset_id,
            "backbone": run.backbone,
            "weights": run.weights,
            "epochs": total_epochs(run),
            "image size": run.spec.recipe.image_size,
            "lr": run.spec.recipe.lr,
            "duration": duration(run_duration(run)),
            "created": pd.Timestamp(run.created_at, unit="s").floor("s"),
            "tags": ", ".join(run.tags),
            "note": run.note,
            "id": run.id,
        })
    columns = ["name", "status", "accuracy", "macro F1", "smallest-class recall", "split", "dataset", "backbone",
               "weights", "epochs", "image size", "lr", "duration", "created", "tags", "note", "id"]
    return pd.DataFrame(rows, columns=columns)


def config_diff(configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Rows: config keys whose values differ between runs; columns: run names."""
    keys = sorted({k for cfg in configs.values() for k in cfg})
    rows = {}
    for key in keys:
        values = [configs[name].get(key) for name in configs]
        shown = [_show(v) for v in values]
        if len(set(shown)) > 1:
            rows[key] = shown
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(configs)) if rows else pd.DataFrame()


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)
