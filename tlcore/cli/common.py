"""What every command shares: `--json`, printing, the store, tables, runs and datasets as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def emit(args, payload: dict[str, Any], text: str | None = None) -> None:
    if text:
        print(text)
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))


def open_store():
    from tlcore.records.store import Store

    return Store()


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def metrics_text(metrics) -> str:
    """Accuracy, macro F1 and the smallest class's recall in one line (and TTA when used)."""
    text = f"accuracy {metrics.accuracy:.4f}, macro F1 {metrics.macro_f1:.4f}"
    if metrics.smallest_class_recall is not None:
        text += f", smallest class ({metrics.smallest_class}) recall {metrics.smallest_class_recall:.4f}"
    return text + (f", with {metrics.tta} TTA" if metrics.tta not in (None, "none") else "")


def run_dict(r) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.id, "name": r.name, "status": r.status.value, "dataset_id": r.dataset_id,
            "backbone": r.backbone, "weights": r.weights, "config": r.config, "created_at": r.created_at,
            "started_at": r.started_at, "finished_at": r.finished_at, "worker": r.worker, "error": r.error,
            "cancel_requested": r.cancel_requested, "progress": r.progress.to_dict(),
            "summary": r.summary.to_dict() if r.summary else {},
            "accuracy": r.accuracy, "tags": r.tags, "note": r.note, "sweep_id": r.sweep_id,
            "executor": r.executor.to_dict() if r.executor else None}


def dataset_dict(d) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "version": d.version, "label": d.label, "source": d.source,
            "classes": d.classes, "counts": d.counts, "num_images": d.num_images, "has_test": d.has_test,
            "created_at": d.created_at}
