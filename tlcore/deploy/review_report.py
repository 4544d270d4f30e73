"""A review as one HTML file that stands alone: mail it, attach it to a ticket, open it offline.

Verdict, gate checks, decision and comment, the metrics of both versions, charts (Plotly's script
inlined once, so no network), the per-class table, and the fixed/broken images as thumbnails in
data URIs. Every piece of text is escaped; nothing is fetched when the file is opened.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from tlcore.records.store import ReviewRecord, Store

THUMBNAIL_PX = 96


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp)) if timestamp else "-"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def thumbnail_data_uri(path: str, size: int = THUMBNAIL_PX) -> str | None:
    """A JPEG thumbnail of the image at `path` as a `data:` URI (None if it cannot be read)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _charts(evidence: dict[str, Any]) -> list[str]:
    import plotly.graph_objects as go
    import plotly.io as pio

    comparison, per_class = evidence.get("comparison"), evidence.get("per_class") or []
    figures = []
    if comparison:
        deltas = go.Figure(go.Scatter(
            x=[100 * comparison["delta"], 100 * comparison["f1_delta"]], y=["accuracy", "macro F1"],
            mode="markers", marker={"size": 12},
            error_x={"type": "data", "symmetric": False,
                     "array": [100 * (comparison["ci_high"] - comparison["delta"]),
                               100 * (comparison["f1_ci_high"] - comparison["f1_delta"])],
                     "arrayminus": [100 * (comparison["delta"] - comparison["ci_low"]),
                                    100 * (comparison["f1_delta"] - comparison["f1_ci_low"])]}))
        deltas.add_vline(x=0, line_dash="dot")
        margin = evidence.get("policy_margin_pts")
        if margin:
            deltas.add_vline(x=-margin, line_color="crimson", annotation_text=f"−{margin:g} pt margin")
        deltas.update_layout(title="Candidate minus production (points, 95 % bootstrap interval)", height=260,
                             margin={"l": 90, "r": 20, "t": 50, "b": 40})
        figures.append(deltas)
    if per_class:
        labels = [row["label"] for row in per_class]
        recall = go.Figure([go.Bar(name="production", x=labels, y=[100 * r["recall_a"] for r in per_class]),
                            go.Bar(name="candidate", x=labels, y=[100 * r["recall_b"] for r in per_class])])
        recall.update_layout(title="Recall per class (%)", barmode="group", height=320,
                             margin={"l": 50, "r": 20, "t": 50, "b": 40})
        figures.append(recall)
    # The first figure carries plotly.js inline; the others reuse it.
    return [pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False, config={"displaylogo": False})
            for i, fig in enumerate(figures)]


def _facts_table(evidence: dict[str, Any]) -> str:
    sides = [("production", evidence.get("baseline")), ("candidate", evidence.get("candidate"))]
    rows = []
    for name, facts in sides:
        if not facts:
            rows.append(f"<tr><td>{name}</td><td colspan='7'>none yet</td></tr>")
            continue
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in (
            name, f"v{facts['version']}", facts["run_name"], _pct(facts["accuracy"]), _num(facts["ece"], ".3f"),
            _num(facts.get("size_mb"), ".1f"), _num(facts.get("latency_ms"), ".1f"), facts["leaked"])) + "</tr>")
    return ("<table><tr><th></th><th>version</th><th>run</th><th>accuracy</th><th>ECE</th><th>size MB</th>"
            "<th>latency ms</th><th>leaked images</th></tr>" + "".join(rows) + "</table>")


def _per_class_table(per_class: list[dict[str, Any]]) -> str:
    if not per_class:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r['label'])}</td><td>{r['support']}</td><td>{_pct(r['recall_a'])}</td>"
        f"<td>{_pct(r['recall_b'])}</td><td class='{'bad' if r['delta'] < 0 else 'good'}'>"
        f"{100 * r['delta']:+.1f}</td></tr>" for r in per_class)
    return ("<h2>Per class</h2><table><tr><th>class</th><th>images</th><th>production recall</th>"
            f"<th>candidate recall</th><th>delta (pts)</th></tr>{rows}</table>")


def _gallery(title: str, images: list[dict[str, Any]]) -> str:
    if not images:
        return f"<h2>{_e(title)}</h2><p>None.</p>"
    cells = []
    for image in images:
        uri = thumbnail_data_uri(image["path"])
        picture = f"<img src='{uri}' alt='{_e(image['source'])}'>" if uri else "<div class='gone'>image gone</div>"
        cells.append(f"<figure>{picture}<figcaption>{_e(image['source'])}<br>true {_e(image['true'])}: "
                     f"{_e(image['pred_a'])} → {_e(image['pred_b'])}</figcaption></figure>")
    return f"<h2>{_e(title)}</h2><div class='gallery'>{''.join(cells)}</div>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.passed{color:#176b2c}.failed{color:#b00020}.good{color:#176b2c}.bad{color:#b00020}
.gallery{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:120px;font-size:12px}
figure img{max-width:96px;max-height:96px}.gone{width:96px;height:96px;background:#eee}
"""


def review_html(review: ReviewRecord, store: Store | None = None) -> str:
    """The whole report of `review` as one HTML string."""
    from tlcore.records.store import ModelTables

    evidence = {**review.evidence, "policy_margin_pts": review.policy.get("non_inferiority_pts")}
    comparison, fixed = evidence.get("comparison"), evidence.get("eval_set", {})
    verdict = "PASSED" if review.gate_passed else "FAILED"
    checks = "".join(f"<li class='{'passed' if c['passed'] else 'failed'}'>{'✔' if c['passed'] else '✘'} "
                     f"{_e(c['name'])}: {_e(c['detail'])}</li>" for c in review.gate.get("checks", []))
    decision = (f"<p><b>{_e(review.status)}</b> by {_e(review.decided_by)} at {_when(review.decided_at)}: "
                f"“{_e(review.comment)}”</p>" if review.decided_by else f"<p><b>{_e(review.status)}</b>: "
                "no reviewer has decided yet.</p>")
    if review.promoted_at:
        decision += f"<p><b>Promoted</b> to production at {_when(review.promoted_at)}.</p>"
    moves = [e for e in ModelTables(store or Store()).model_audit(review.model) if e.review_id == review.id]
    audit = "".join(f"<li>{_when(e.at)}: {_e(e.by)} moved <b>{_e(e.alias)}</b> "
                    f"{'v' + str(e.from_version) if e.from_version else 'unset'} → v{e.to_version} ({_e(e.action)})"
                    f"{': ' + _e(e.reason) if e.reason else ''}</li>" for e in moves)
    summary = (f"<p>{_e(comparison['verdict'])}. McNemar exact p = {comparison['mcnemar_p']:.4g}; "
               f"candidate fixed {comparison['fixed']}, broke {comparison['broken']} of {comparison['n_shared']} "
               "images.</p>" if comparison else "<p>No production version yet: the gate checked leakage and the "
               "minimum accuracy only.</p>")
    body = [
        f"<h1>Review {_e(review.id)} of {_e(review.model)}</h1>",
        f"<p>Candidate v{review.candidate_version} against production "
        f"{'v' + str(review.baseline_version) if review.baseline_version else '(none)'}, opened by "
        f"{_e(review.created_by)} at {_when(review.created_at)}. Fixed evaluation set: {fixed.get('images')} "
        f"images ({_e(fixed.get('dataset'))}, {_e(fixed.get('split'))} split, content hash "
        f"<code>{_e(str(fixed.get('content_hash', ''))[:16])}</code>).</p>",
        f"<h2 class='{verdict.lower()}'>Gate {verdict}</h2><ul>{checks}</ul>",
        f"<p>Policy: {_e(', '.join(f'{k} = {v}' for k, v in review.policy.items()))}</p>",
        "<h2>Decision</h2>", decision, f"<ul>{audit}</ul>" if audit else "",
        "<h2>Evidence</h2>", summary, _facts_table(evidence), *_charts(evidence),
        _per_class_table(evidence.get("per_class") or []),
        _gallery("Images the candidate fixed", evidence.get("fixed_images") or []),
        _gallery("Images the candidate broke", evidence.get("broken_images") or []),
        f"<p><small>Written by Transfer Lab at {_when(time.time())}.</small></p>",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Review {_e(review.id)}: {_e(review.model)} {verdict}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_review_report(review_id: str, out: str | Path, store: Store | None = None) -> Path:
    """Write the report of review `review_id` to `out` (atomically)."""
    from tlcore.records.atomic import write_text_atomically
    from tlcore.records.store import ModelTables

    review = ModelTables(store or Store()).get_review(review_id)
    return write_text_atomically(Path(out), review_html(review, store))
