"""Plotly figure builders. Each takes plain data (lists, dicts, arrays) and returns a Figure;
none reads the store or knows about Streamlit."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
           "#4b5563", "#65a30d"]


def _layout(fig: go.Figure, height: int = 320, legend_y: float = 1.02, top: int = 50,
            **kwargs: Any) -> go.Figure:
    # Legend top right, titles top left: they never overlap.
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=top, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=legend_y, xanchor="right", x=1),
                      **kwargs)
    return fig


def run_curves(epochs: Sequence[Mapping[str, Any]], phase_boundary: int | None = None) -> go.Figure:
    """Loss and accuracy (train solid, val dashed) against step, side by side.

    `epochs`: dicts with `step`, `phase` and `metrics` (loss, accuracy, val_loss, val_accuracy).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"), horizontal_spacing=0.08)
    steps = [e["step"] for e in epochs]
    for col, metric in ((1, "loss"), (2, "accuracy")):
        for split, dash, color in (("train", "solid", PALETTE[0]), ("val", "dash", PALETTE[1])):
            key = metric if split == "train" else f"val_{metric}"
            ys = [e["metrics"].get(key) for e in epochs]
            if not any(y is not None for y in ys):
                continue
            fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines+markers", name=split,
                                     legendgroup=split, showlegend=col == 1,
                                     line=dict(dash=dash, color=color)), row=1, col=col)
    if phase_boundary:
        for col in (1, 2):
            fig.add_vline(x=phase_boundary + 0.5, line=dict(color="#9ca3af", dash="dot"), row=1, col=col)
        fig.add_annotation(x=phase_boundary + 0.5, y=1.0, yref="paper", text="fine-tune →",
                           showarrow=False, xanchor="left", font=dict(size=11, color="#6b7280"))
    fig.update_xaxes(title_text="epoch", dtick=1 if len(steps) <= 20 else None)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    return _layout(fig, height=340, legend_y=1.1, top=70)


def overlay_curves(series: Mapping[str, Sequence[Mapping[str, Any]]], metric: str) -> go.Figure:
    """One line per run for `metric` (e.g. `val_accuracy`) against step."""
    fig = go.Figure()
    for i, (name, epochs) in enumerate(series.items()):
        xs = [e["step"] for e in epochs if e["metrics"].get(metric) is not None]
        ys = [e["metrics"][metric] for e in epochs if e["metrics"].get(metric) is not None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=metric.replace("_", " "), xaxis_title="epoch")
    if "accuracy" in metric:
        fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, height=340)


def class_balance(counts: Mapping[str, Mapping[str, int]]) -> go.Figure:
    """Stacked bars: images per class, one colour per split."""
    classes = sorted({c for per in counts.values() for c in per})
    fig = go.Figure()
    for i, split in enumerate(s for s in ("train", "val", "test") if s in counts):
        fig.add_trace(go.Bar(x=classes, y=[counts[split].get(c, 0) for c in classes], name=split,
                             marker_color=PALETTE[i]))
    for split in counts:
        if split not in ("train", "val", "test"):
            fig.add_trace(go.Bar(x=classes, y=[counts[split].get(c, 0) for c in classes], name=split))
    fig.update_layout(barmode="stack", title="Images per class", yaxis_title="images")
    return _layout(fig, height=300)


def confusion_heatmap(matrix: Any, labels: Sequence[str], normalize: bool = False,
                      title: str | None = None, height: int | None = None) -> go.Figure:
    """Rows true, columns predicted. Cell text: counts (and row share when normalized); a long
    `title` wraps.

    Plotly reports no selection on a heatmap, so each cell also has an invisible square marker
    (a scatter point) with `customdata = [true, pred, count]`: clicking a cell selects it."""
    counts = np.asarray(matrix, dtype=float)
    labels = [str(x) for x in labels]
    shown = counts
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    text = [[(f"{int(counts[i, j])}<br>{shown[i, j]:.0%}" if normalize else f"{int(counts[i, j])}")
             for j in range(len(labels))] for i in range(len(labels))]
    custom = [[[labels[i], labels[j], int(counts[i, j])] for j in range(len(labels))]
              for i in range(len(labels))]
    size = height or max(300, min(720, 60 + 46 * len(labels)))
    title_lines = _wrap(title, 44) if title else []
    top = 50 + 18 * max(0, len(title_lines) - 1)
    cell_px = max(8, (size - top - 70) / max(1, len(labels)))  # minus margins, ticks and the axis title
    fig = go.Figure(go.Heatmap(
        z=shown, x=labels, y=labels, text=text, texttemplate="%{text}", hoverinfo="skip",
        colorscale="Blues", showscale=False, xgap=1, ygap=1,
    ))
    cells = [(i, j) for i in range(len(labels)) for j in range(len(labels))]
    invisible = dict(opacity=0)
    fig.add_trace(go.Scatter(
        x=[labels[j] for _, j in cells], y=[labels[i] for i, _ in cells], mode="markers", showlegend=False,
        customdata=[custom[i][j] for i, j in cells],
        marker=dict(symbol="square", size=0.9 * cell_px, color="rgba(0,0,0,0)"),
        selected=dict(marker=invisible), unselected=dict(marker=invisible),
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata[2]} images<extra></extra>",
    ))
    # Fixed ranges: the markers' size would otherwise pad the axes around the cells.
    fig.update_xaxes(title_text="predicted", side="bottom", type="category", range=[-0.5, len(labels) - 0.5])
    fig.update_yaxes(title_text="true", type="category", range=[len(labels) - 0.5, -0.5])
    if title_lines:
        fig.update_layout(title=dict(text="<br>".join(title_lines), font=dict(size=14)))
    return _layout(fig, height=size, top=top)


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most about `width` characters, broken at spaces (a long word stays whole)."""
    import textwrap

    return textwrap.wrap(text, width, break_long_words=False) or [text]


def topk_bar(top_k: Sequence[tuple[str, float]]) -> go.Figure:
    """Horizontal bars, the most likely class on top."""
    labels = [str(label) for label, _ in top_k][::-1]
    probs = [float(p) for _, p in top_k][::-1]
    fig = go.Figure(go.Bar(x=probs, y=labels, orientation="h", text=[f"{p:.1%}" for p in probs],
                           textposition="auto", marker_color=PALETTE[0]))
    fig.update_xaxes(range=[0, 1], tickformat=".0%")
    fig.update_yaxes(type="category")
    return _layout(fig, height=max(200, 60 + 36 * len(labels)))


def sweep_summary(configurations: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> go.Figure:
    """Recipes (a sweep's configurations, or seed groups): mean ± std over seeds as a bar with
    error bars, each seed a point.

    `configurations`: dicts with `label`, `mean`, `std` and `seeds` ([(seed, value), ...], finished seeds only).
    """
    fig = go.Figure()
    labels = [c["label"] for c in configurations]
    fig.add_trace(go.Bar(x=labels, y=[c["mean"] for c in configurations], name=f"mean {metric}",
                         error_y=dict(type="data", array=[c["std"] or 0 for c in configurations], visible=True),
                         marker_color=PALETTE[0], opacity=0.55))
    xs = [c["label"] for c in configurations for _ in c["seeds"]]
    ys = [value for c in configurations for _, value in c["seeds"]]
    text = [f"seed {seed}" for c in configurations for seed, _ in c["seeds"]]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="one seed", text=text,
                             hovertemplate="%{x}<br>%{text}: %{y:.3f}<extra></extra>",
                             marker=dict(color=PALETTE[1], size=9, line=dict(width=1, color="white"))))
    return _layout(fig, height=360, yaxis=dict(title=metric, rangemode="tozero"), xaxis=dict(type="category"))


def reliability_diagram(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]] = ()) -> go.Figure:
    """Accuracy against confidence per bin (dicts with lower, upper, count, accuracy, confidence):
    raw softmax and, when given, after temperature scaling; the diagonal is perfect calibration."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                             line=dict(color="#9ca3af", dash="dot")))
    for i, (name, bins) in enumerate((("raw", before), ("temperature-scaled", after))):
        filled = [b for b in bins if b["count"]]
        if not filled:
            continue
        fig.add_trace(go.Scatter(
            x=[b["confidence"] for b in filled], y=[b["accuracy"] for b in filled], mode="lines+markers",
            name=name, line=dict(color=PALETTE[i]), customdata=[[b["count"]] for b in filled],
            hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata[0]} images<extra></extra>"))
    fig.update_layout(title="Reliability (15 confidence bins)", xaxis_title="confidence", yaxis_title="accuracy")
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, height=360, legend_y=1.1, top=80)


def coverage_curve(points: Sequence[Mapping[str, Any]], threshold: float | None = None) -> go.Figure:
    """Share of images answered against the precision of those answers, one point per confidence
    threshold (dicts with threshold, coverage, precision); the chosen threshold is marked."""
    fig = go.Figure(go.Scatter(
        x=[p["coverage"] for p in points], y=[p["precision"] for p in points], mode="lines", name="validation",
        line=dict(color=PALETTE[0]), customdata=[[p["threshold"]] for p in points],
        hovertemplate="answers %{x:.0%}<br>precision %{y:.1%}<br>at confidence ≥ %{customdata[0]:.3f}<extra></extra>"))
    chosen = [p for p in points if threshold is not None and p["threshold"] >= threshold]
    if chosen:
        last = min(chosen, key=lambda p: p["threshold"])
        fig.add_trace(go.Scatter(x=[last["coverage"]], y=[last["precision"]], mode="markers", name="threshold",
                                 marker=dict(color=PALETTE[1], size=11)))
    fig.update_layout(title="Answered vs right (validation)", xaxis_title="share answered",
                      yaxis_title="precision of answers")
    fig.update_xaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_yaxes(tickformat=".0%")
    return _layout(fig, height=340)


def embedding_map(points: Sequence[Mapping[str, Any]], flagged: Mapping[str, str]) -> go.Figure:
    """The audit's 2-D map: one colour per class, flagged images (`source` -> finding) ringed.

    `points`: dicts with `source`, `label`, `split`, `x`, `y` (the audit's `embedding_map`).
    """
    fig = go.Figure()
    labels = sorted({p["label"] for p in points})
    for i, label in enumerate(labels):
        mine = [p for p in points if p["label"] == label]
        fig.add_trace(go.Scattergl(
            x=[p["x"] for p in mine], y=[p["y"] for p in mine], mode="markers", name=label,
            marker=dict(size=6, color=PALETTE[i % len(PALETTE)], opacity=0.7),
            customdata=[[p["source"], p["split"]] for p in mine],
            hovertemplate="%{customdata[0]} (%{customdata[1]})<extra>" + label + "</extra>"))
    ringed = [p for p in points if p["source"] in flagged]
    if ringed:
        fig.add_trace(go.Scattergl(
            x=[p["x"] for p in ringed], y=[p["y"] for p in ringed], mode="markers", name="flagged",
            marker=dict(size=13, color="rgba(0,0,0,0)", line=dict(color="#111827", width=2)),
            customdata=[[p["source"], flagged[p["source"]]] for p in ringed],
            hovertemplate="%{customdata[0]}: %{customdata[1]}<extra></extra>"))
    fig.update_xaxes(showticklabels=False, title_text=None)
    fig.update_yaxes(showticklabels=False, title_text=None)
    return _layout(fig, height=420)


def lr_finder_curve(curve: Sequence[Sequence[float]], suggested_lr: float) -> go.Figure:
    """The LR range test: smoothed loss against learning rate (log axis), the suggestion marked.

    `curve`: `[lr, loss]` pairs in increasing lr.
    """
    lrs = [point[0] for point in curve]
    losses = [point[1] for point in curve]
    fig = go.Figure(go.Scatter(x=lrs, y=losses, mode="lines", name="loss (smoothed)", line=dict(color=PALETTE[0])))
    at = float(np.interp(np.log(suggested_lr), np.log(lrs), losses))
    fig.add_trace(go.Scatter(x=[suggested_lr], y=[at], mode="markers+text", name="suggested",
                             marker=dict(color=PALETTE[1], size=12, symbol="circle"),
                             text=[f"{suggested_lr:.2g}"], textposition="top center"))
    fig.add_vline(x=suggested_lr, line=dict(color=PALETTE[1], dash="dot"))
    # Past divergence the loss dwarfs the interesting part: clip the view to twice the starting loss.
    top = max(losses[0] * 2, min(losses) * 1.5)
    fig.update_xaxes(type="log", title_text="learning rate")
    fig.update_yaxes(title_text="training loss", range=[min(losses) * 0.9, min(max(losses), top) * 1.05])
    return _layout(fig, height=300)
