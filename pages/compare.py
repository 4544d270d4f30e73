"""Compare: every run in a sortable, filterable table; pick several to overlay their curves, see
metric deltas, a config diff and confusion matrices side by side; tag and note a run. A whole
sweep can be picked: its runs grouped by configuration (mean ± std over seeds, each seed a point).
The selection lives in the URL (`?runs=id1,id2` or `?sweep=id`) so a comparison can be shared.

Reads the store and the runs' predictions only (no TensorFlow import).
"""

import streamlit as st

from tlcore import sweeps
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


sweep_ids = store.sweep_ids()
wanted_sweep = st.query_params.get("sweep")
if wanted_sweep != st.session_state.get("compare.sweep_seen"):
    if wanted_sweep and wanted_sweep not in sweep_ids:
        st.warning(f"The link names a sweep ({wanted_sweep!r}) that is not in this data home.")
    st.session_state["compare.sweep"] = wanted_sweep if wanted_sweep in sweep_ids else None


def take_sweep() -> None:
    """Choosing a sweep selects its runs."""
    chosen_sweep = st.session_state.get("compare.sweep")
    if chosen_sweep:
        st.session_state["compare.runs"] = [r.run_id for r in sweeps.sweep_report(chosen_sweep, store).runs]


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
        "lr": st.column_config.NumberColumn("lr", format="%g"),
        "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
    },
)

sweep = None
if sweep_ids:
    sweep = st.selectbox("Sweep", [None, *sweep_ids], key="compare.sweep", on_change=take_sweep,
                         format_func=lambda i: "— runs chosen one by one —" if i is None else i,
                         help="A sweep's runs, grouped by configuration with mean ± std over seeds.")
    if sweep and st.session_state.get("compare.sweep_seen") != sweep:
        take_sweep()  # a shared ?sweep= link
    st.session_state["compare.sweep_seen"] = sweep
    if sweep:
        st.query_params["sweep"] = sweep
    elif "sweep" in st.query_params:
        del st.query_params["sweep"]

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
st.code(f"{base}?sweep={sweep}" if sweep else f"{base}?runs={','.join(selected)}", language=None)

if sweep:
    st.subheader("Sweep by configuration")
    report = sweeps.sweep_report(sweep, store)
    sweep_metric = st.segmented_control("Sweep metric", ["accuracy", "macro_f1"], key="compare.sweep_metric",
                                        default="accuracy", format_func=lambda m: m.replace("_", " "))
    sweep_metric = sweep_metric or "accuracy"
    st.plotly_chart(charts.sweep_summary([
        {"label": c.label, "mean": getattr(c, f"mean_{sweep_metric}"), "std": getattr(c, f"std_{sweep_metric}"),
         "seeds": [(r.seed, getattr(r, sweep_metric)) for r in c.runs if getattr(r, sweep_metric) is not None]}
        for c in report.configurations], sweep_metric), key="compare.sweep_chart", config={"displayModeBar": False})
    st.dataframe([{"configuration": c.label, "runs": len(c.runs),
                   "finished": sum(r.accuracy is not None for r in c.runs),
                   "accuracy": fmt.mean_std(c.mean_accuracy, c.std_accuracy),
                   "macro F1": fmt.mean_std(c.mean_macro_f1, c.std_macro_f1)} for c in report.configurations],
                 hide_index=True, key="compare.sweep_table")

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
            st.caption(f"macro F1 {fmt.pct(f1v)}{f1_delta} · {fmt.duration(fmt.run_duration(run))}")
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
