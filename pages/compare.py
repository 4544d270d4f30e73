"""Compare: every run in a sortable, filterable table; pick several to overlay their curves, see
metric deltas, a config diff and confusion matrices side by side; tag and note a run.
The selection lives in the URL (`?runs=id1,id2`) so a comparison can be shared.

Reads the store and the runs' predictions only (no TensorFlow import).
"""

import streamlit as st

from ui import charts, frame, state
from ui import format as fmt

frame.require()

store = state.store()

st.title("Compare runs")
runs = store.list_runs()
if not runs:
    st.info("No runs yet. Launch one on the **Train** page; every run shows up here.")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

datasets = {d.id: d for d in store.list_datasets()}
by_id = {r.id: r for r in runs}
frame = fmt.runs_frame(runs, datasets)

# ----------------------------------------------------------- selection & URL

def url_runs() -> list[str]:
    raw = st.query_params.get_all("runs")
    ids = [i.strip() for part in raw for i in part.split(",") if i.strip()]
    return list(dict.fromkeys(ids))


wanted = url_runs()
if ",".join(wanted) != st.session_state.get("compare.url_seen"):
    unknown = [i for i in wanted if i not in by_id]
    if unknown:
        st.warning(f"The link names {len(unknown)} run(s) that are not in this data home: {', '.join(unknown)}.")
    st.session_state["compare.runs"] = [i for i in wanted if i in by_id]


def take_table_selection() -> None:
    ids = st.session_state.get("compare.table_ids") or []
    rows = st.session_state["compare.table"].selection.rows
    if rows:
        st.session_state["compare.runs"] = [ids[i] for i in rows if i < len(ids)]


# ------------------------------------------------------------------ filters

f1, f2, f3, f4 = st.columns([2, 1, 1, 1])
search = f1.text_input("Search name, backbone, tag, note or id", key="compare.search",
                       placeholder="e.g. vgg16 or a tag")
statuses = f2.multiselect("Status", sorted(frame["status"].unique()), key="compare.status")
backbones = f3.multiselect("Backbone", sorted(frame["backbone"].unique()), key="compare.backbone")
all_tags = sorted({t for r in runs for t in r.tags})
tags = f4.multiselect("Tag", all_tags, key="compare.tag")

shown = frame
if search.strip():
    needle = search.strip().lower()
    mask = shown[["name", "note", "id", "tags", "dataset", "backbone"]].apply(
        lambda col: col.astype(str).str.lower().str.contains(needle, regex=False)).any(axis=1)
    shown = shown[mask]
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if backbones:
    shown = shown[shown["backbone"].isin(backbones)]
if tags:
    shown = shown[shown["id"].map(lambda i: bool(set(tags) & set(by_id[i].tags)))]
shown = shown.reset_index(drop=True)

st.caption(f"{len(shown)} of {len(frame)} runs. Click column headers to sort; tick rows to compare them.")
st.session_state["compare.table_ids"] = list(shown["id"])
st.dataframe(
    shown, hide_index=True, key="compare.table", on_select=take_table_selection,
    selection_mode="multi-row",
    column_config={
        "accuracy": st.column_config.ProgressColumn("accuracy", min_value=0, max_value=1, format="percent"),
        "macro F1": st.column_config.NumberColumn("macro F1", format="%.3f"),
        "smallest-class recall": st.column_config.NumberColumn(
            "smallest-class recall", format="%.3f", help="Recall of the class with the fewest evaluation images"),
        "lr": st.column_config.NumberColumn("lr", format="%g"),
        "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
    },
)

selected = st.multiselect("Runs to compare", list(by_id), key="compare.runs",
                          format_func=lambda i: f"{by_id[i].name} ({fmt.pct(by_id[i].accuracy)})",
                          placeholder="Tick rows above or choose runs here")
if selected:
    st.query_params["runs"] = ",".join(selected)
elif "runs" in st.query_params:
    del st.query_params["runs"]
st.session_state["compare.url_seen"] = ",".join(selected)

if not selected:
    st.info("Choose two or more runs to compare them.")
    st.stop()

chosen = [by_id[i] for i in selected]
base = st.context.url.split("?")[0] if st.context.url else ""
st.caption("Share this comparison:")
st.code(f"{base}?runs={','.join(selected)}", language=None)

# ------------------------------------------------------------------ metrics

st.subheader("Metrics")
baseline = chosen[0]
st.caption(f"Deltas are against **{baseline.name}**, the first run chosen.")
for start in range(0, len(chosen), 4):
    cols = st.columns(4)
    for col, run in zip(cols, chosen[start:start + 4]):
        acc, f1v = run.accuracy, run.macro_f1
        base_acc, base_f1 = baseline.accuracy, baseline.macro_f1
        delta = None
        if run is not baseline and acc is not None and base_acc is not None:
            delta = f"{100 * (acc - base_acc):+.1f} pts"
        with col.container(border=True):
            st.metric(run.name, fmt.pct(acc), delta=delta, help=f"{run.backbone} · {fmt.STATUS_ICON[run.status]}")
            f1_delta = (f" ({100 * (f1v - base_f1):+.1f} pts)"
                        if run is not baseline and f1v is not None and base_f1 is not None else "")
            st.caption(f"macro F1 {fmt.pct(f1v)}{f1_delta} · smallest-class recall "
                       f"{fmt.pct(run.smallest_class_recall)} · {fmt.duration(fmt.run_duration(run))}")
            if run.status.value == "failed":
                st.caption(f":red[failed: {run.error or 'no reason recorded'}]")

# ------------------------------------------------------------------- curves

st.subheader("Curves")
metric = st.segmented_control("Metric", ["val_accuracy", "val_loss", "accuracy", "loss"], key="compare.metric",
                              default="val_accuracy", format_func=lambda m: m.replace("_", " "))
series = {}
for run in chosen:
    epochs = store.epochs(run.id)
    series[run.name] = [{"step": e.step, "phase": e.phase, "metrics": e.metrics} for e in epochs]
if any(series.values()):
    st.plotly_chart(charts.overlay_curves(series, metric or "val_accuracy"), key="compare.curves",
                    config={"displayModeBar": False})
else:
    st.caption("None of these runs logged an epoch yet.")

# --------------------------------------------------------------- config diff

st.subheader("Config differences")
diff = fmt.config_diff({r.name: r.config for r in chosen})
if len(chosen) < 2:
    st.caption("Choose a second run to see how the recipes differ.")
elif diff.empty:
    st.success("These runs share the same recipe.")
else:
    st.dataframe(diff, key="compare.diff")

# -------------------------------------------------------- confusion matrices

st.subheader("Confusion matrices")
normalize = st.toggle("Show row percentages", key="compare.normalize")
cols = st.columns(min(3, len(chosen)))
for i, run in enumerate(chosen):
    with cols[i % len(cols)]:
        try:
            report = state.eval_report(run.id)
        except state.NoEvaluation as exc:
            st.markdown(f"**{run.name}**")
            st.caption(str(exc))
            continue
        st.plotly_chart(charts.confusion_heatmap(report.confusion, report.labels, normalize, title=run.name,
                                                 height=360),
                        key=f"compare.cm.{run.id}", config={"displayModeBar": False})

# ------------------------------------------------------------ tags and notes

st.subheader("Tag and note")
target = st.selectbox("Run", selected, key="compare.note_run", format_func=lambda i: by_id[i].name)
run = by_id[target]
with st.form(f"compare.note_form.{target}"):
    new_tags = st.multiselect("Tags", sorted(set(all_tags) | set(run.tags)), default=run.tags,
                              accept_new_options=True, key=f"compare.tags.{target}",
                              placeholder="add a tag, e.g. baseline")
    note = st.text_area("Note for the team", value=run.note, key=f"compare.note.{target}")
    if st.form_submit_button("Save", type="primary"):
        clean = sorted({t.strip() for t in new_tags if t and t.strip()})
        store.update_run(run.id, tags=clean, note=note.strip())
        st.session_state["compare.saved"] = run.name
        st.rerun()
saved = st.session_state.pop("compare.saved", None)
if saved:
    st.success(f"Saved the tags and note of {saved}.")
