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
    """Rows true, columns predicted. Cell text: counts (and row share when normalized).

    Each cell carries `customdata = [true, pred, count]` so a click can name the cell."""
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
    fig = go.Figure(go.Heatmap(
        z=shown, x=labels, y=labels, text=text, texttemplate="%{text}", customdata=custom,
        colorscale="Blues", showscale=False, xgap=1, ygap=1,
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata[2]} images<extra></extra>",
    ))
    fig.update_xaxes(title_text="predicted", side="bottom", type="category")
    fig.update_yaxes(title_text="true", autorange="reversed", type="category")
    size = height or max(300, min(720, 60 + 46 * len(labels)))
    if title:
        fig.update_layout(title=title)
    return _layout(fig, height=size)


def topk_bar(top_k: Sequence[tuple[str, float]]) -> go.Figure:
    """Horizontal bars, the most likely class on top."""
    labels = [str(label) for label, _ in top_k][::-1]
    probs = [float(p) for _, p in top_k][::-1]
    fig = go.Figure(go.Bar(x=probs, y=labels, orientation="h", text=[f"{p:.1%}" for p in probs],
                           textposition="auto", marker_color=PALETTE[0]))
    fig.update_xaxes(range=[0, 1], tickformat=".0%")
    fig.update_yaxes(type="category")
    return _layout(fig, height=max(200, 60 + 36 * len(labels)))


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
