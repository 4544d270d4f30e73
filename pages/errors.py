"""Errors: one run's confusion matrix (click a cell), the gallery of the images it got wrong for
that cell or class (most confident mistakes first), per-class metrics and top confusions.

Everything comes from the run's stored predictions via `tlcore.evaluate.evaluation` (no TensorFlow).
"""

from pathlib import Path

import streamlit as st

from tlcore.records.store import RunStatus
from ui import charts, frame, state, tables
from ui import format as fmt

frame.require()

ANY = "(any)"
store = state.store()

st.title("Errors")
runs = store.list_runs()
finished = [r for r in runs if r.status == RunStatus.SUCCEEDED]
by_id = {r.id: r for r in runs}

wanted = st.query_params.get("run")
if wanted and wanted not in by_id:
    try:
        by_id[wanted] = store.get_run(wanted)
        wanted = by_id[wanted].id
    except KeyError:
        st.warning(f"The link names a run ({wanted!r}) that is not in this data home.")
        wanted = None
choices = [r.id for r in finished]
if wanted and wanted not in choices:
    choices.insert(0, wanted)
if not choices:
    st.info("No finished run yet. When a run finishes, its mistakes can be inspected here.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

run_id = state.run_from_url("errors", choices,
                            lambda i: f"{by_id[i].name} · {fmt.STATUS_ICON[by_id[i].status]} · "
                                      f"{fmt.pct(by_id[i].accuracy)}")
run = by_id[run_id]

if run.status == RunStatus.FAILED:
    st.error(f"This run failed, so it has no predictions to inspect: {run.error or 'no reason was recorded.'}")
    st.stop()
if run.status != RunStatus.SUCCEEDED:
    st.info(f"This run is {run.status.value}; its errors appear here once it finishes.")
    st.stop()
try:
    report = state.eval_report(run.id)
except state.NoEvaluation as exc:
    st.warning(str(exc))
    st.stop()

wrong_all = report.misclassified
m1, m2, m3, m4 = st.columns(4)
m1.metric("Accuracy", fmt.pct(report.accuracy))
m2.metric("Macro F1", fmt.pct(report.macro_f1))
m3.metric("Wrong", f"{len(wrong_all)} of {len(report.predictions)}")
m4.metric("Classes", len(report.labels))

# ------------------------------------------------------- cell / class choice

labels = list(report.labels)
for key in ("errors.true", "errors.pred"):
    if st.session_state.get(key) not in [ANY, *labels]:
        st.session_state[key] = ANY


def pick(true: str | None, pred: str | None) -> None:
    st.session_state["errors.true"] = true if true in labels else ANY
    st.session_state["errors.pred"] = pred if (pred in labels and pred != true) else ANY


def on_cell_click() -> None:
    points = st.session_state["errors.cm"].selection.get("points") or []
    if points:
        point = points[0]
        custom = point.get("customdata")
        if custom:
            pick(str(custom[0]), str(custom[1]))
        else:
            pick(str(point.get("y")), str(point.get("x")))


def on_confusion_click() -> None:
    rows = st.session_state["errors.top"].selection.rows
    table = st.session_state.get("errors.top_rows") or []
    if rows and rows[0] < len(table):
        true, pred = table[rows[0]]
        pick(true, pred)


left, right = st.columns([3, 2], gap="large")
with left:
    normalize = st.toggle("Show row percentages", key="errors.normalize")
    st.plotly_chart(charts.confusion_heatmap(report.confusion, labels, normalize),
                    key="errors.cm", on_select=on_cell_click, selection_mode="points",
                    config={"displayModeBar": False})
    st.caption("Click a cell to see its images; a cell on the diagonal shows every mistake on that class.")
with right:
    st.markdown("**Top confusions**")
    top = report.top_confusions(10)
    if top.empty:
        st.success("No mistakes on the evaluation images.")
    else:
        st.session_state["errors.top_rows"] = list(zip(top["true"], top["pred"]))
        st.dataframe(top, hide_index=True, key="errors.top", on_select=on_confusion_click,
                     selection_mode="single-row")
    st.markdown("**Per class**")
    per_class = report.per_class.reset_index()
    shares = ("precision", "recall", "f1")
    per_class[list(shares)] = 100 * per_class[list(shares)]  # in percent, as every metric on the page
    st.dataframe(per_class, hide_index=True, key="errors.per_class",
                 column_config={c: st.column_config.NumberColumn(c, format=tables.PERCENT) for c in shares})

# -------------------------------------------------------------------- gallery

st.subheader("Wrong images")
c1, c2, c3 = st.columns([2, 2, 1])
true = c1.selectbox("True class", [ANY, *labels], key="errors.true")
pred = c2.selectbox("Predicted as", [ANY, *labels], key="errors.pred")
limit = c3.selectbox("Show", [12, 24, 48, 96], key="errors.limit")
wrong = report.errors_for(None if true == ANY else true, None if pred == ANY else pred)

what = ("all mistakes" if true == ANY and pred == ANY else
        f"true **{true}**" + ("" if pred == ANY else f" predicted as **{pred}**") if true != ANY
        else f"predicted as **{pred}**")
if wrong.empty:
    st.success(f"No wrong images for {what}.")
else:
    st.caption(f"{len(wrong)} wrong image(s) for {what}, the most confident mistakes first.")
    rows = wrong.head(int(limit)).to_dict("records")
    per_row = 6
    for start in range(0, len(rows), per_row):
        cols = st.columns(per_row)
        for col, row in zip(cols, rows[start:start + per_row]):
            path = Path(str(row.get("path") or ""))
            caption = f"{row['true']} → {row['pred']} ({float(row['confidence']):.0%})"
            with col:
                if path.is_file():
                    st.image(str(path), caption=caption, width="stretch")
                else:
                    st.caption(f"(image missing) {caption}")
                st.caption(str(row.get("source") or path.name)[:40])

# ---------------------------------------------------------------- calibration

st.subheader("Can its confidence be trusted?")
calibration = run.summary.calibration if run.summary else None
threshold = run.summary.threshold if run.summary else None
if calibration is None:
    st.caption("This run finished before calibration was recorded; retrain it to see its reliability diagram.")
else:
    split = run.summary.eval_split
    c1, c2, c3 = st.columns(3)
    c1.metric(f"ECE on {split}", fmt.pct(calibration.ece_before, 2),
              help="Expected calibration error (15 bins): the gap between confidence and accuracy, "
                   "weighted by how many predictions fall in each bin. 0 is perfectly calibrated.")
    if calibration.temperature:
        c2.metric("ECE after temperature scaling", fmt.pct(calibration.ece_after, 2),
                  delta=f"{100 * (calibration.ece_after - calibration.ece_before):+.2f} pts", delta_color="inverse")
        c3.metric("Temperature", f"{calibration.temperature:.2f}",
                  help=f"Fitted on {calibration.fitted_on} validation images; predict, the Demo and exports "
                       "divide the model's log-probabilities by it.")
    else:
        st.info(f"Not calibrated: {calibration.reason}")
    left, right = st.columns(2, gap="large")
    with left:
        st.plotly_chart(charts.reliability_diagram([b.to_dict() for b in calibration.reliability_before],
                                                   [b.to_dict() for b in calibration.reliability_after]),
                        key="errors.reliability", config={"displayModeBar": False})
    with right:
        if threshold is None:
            st.caption("No \"not sure\" threshold: it is chosen on a validation split apart from the evaluation "
                       "images, and this run has none.")
        else:
            st.plotly_chart(charts.coverage_curve([p.to_dict() for p in threshold.curve], threshold.threshold),
                            key="errors.coverage", config={"displayModeBar": False})
            if threshold.usable:
                target = fmt.pct(threshold.target_precision, 0)
                st.caption(f"Below confidence **{threshold.threshold:.3f}** the Demo and `predict` answer "
                           f"\"not sure\": on validation that keeps {fmt.pct(threshold.coverage)} of the answers "
                           f"at {fmt.pct(threshold.precision)} precision (target {target}).")
            else:
                st.caption(f"No usable \"not sure\" threshold: no confidence below 1 gives "
                           f"{fmt.pct(threshold.target_precision, 0)} precision on validation, so every photo gets "
                           "an answer; the Demo can try a lower target.")
