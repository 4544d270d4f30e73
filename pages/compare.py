"""Compare: every run in a sortable, filterable table; pick several to overlay their curves, see
metric deltas, a paired comparison of two of them (is the difference real?), seed groups, a config
diff and confusion matrices side by side; tag and note a run. A group of runs that differ only in
their seed can be picked as one entry, and a whole sweep: its runs grouped by configuration (mean ±
std over seeds, each seed a point). The selection lives in the URL (`?runs=id1,seeds:id2` or
`?sweep=id`) so a comparison can be shared.

Reads the store and the runs' predictions only; TensorFlow is imported only when the fixed/broken
gallery is asked for its Grad-CAMs.
"""

import dataclasses
from pathlib import Path

import numpy as np
import streamlit as st

from tlcore.data.images import open_image
from tlcore.errors import InvalidInput
from tlcore.evaluate.comparison import recipe_key, seed_groups
from tlcore.queue import sweeps
from ui import charts, frame, images, state, tables
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
groups = {g.id: g for g in seed_groups(runs)}
frame = fmt.runs_frame(runs, datasets)

# ----------------------------------------------------------- selection & URL

def url_runs() -> list[str]:
    raw = st.query_params.get_all("runs")
    ids = [i.strip() for part in raw for i in part.split(",") if i.strip()]
    return list(dict.fromkeys(ids))


wanted = url_runs()
if ",".join(wanted) != st.session_state.get("compare.url_seen"):
    unknown = [i for i in wanted if i not in by_id and i not in groups]
    if unknown:
        st.warning(f"The link names {len(unknown)} run(s) that are not in this data home: {', '.join(unknown)}.")
    st.session_state["compare.runs"] = [i for i in wanted if i in by_id or i in groups]


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


def tidy_selection() -> None:
    """A seed group stands for its runs: choosing both ("Select all") keeps the group only."""
    chosen_refs = st.session_state.get("compare.runs") or []
    covered = {r.id for ref in chosen_refs if ref in groups for r in groups[ref].runs}
    st.session_state["compare.runs"] = [ref for ref in chosen_refs if ref in groups or ref not in covered]


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
        **tables.metric_columns(),
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



# A chosen sweep's runs are named by what varies in it ("lr=3e-4 · seed 1"), whatever their stored names.
names = {r.id: r.name for r in runs}
if sweep:
    names.update(sweeps.sweep_report(sweep, store).run_names())


def entry_label(ref: str) -> str:
    if ref in groups:
        mean, std = groups[ref].mean_std()
        return f"{groups[ref].name} (seeds {fmt.seed_list(groups[ref].seeds)}: {fmt.mean_std(mean, std)})"
    return f"{names[ref]} ({fmt.pct(by_id[ref].accuracy)})"


selected = st.multiselect("Runs to compare", list(by_id) + list(groups), key="compare.runs",
                          format_func=entry_label, on_change=tidy_selection,
                          placeholder="Tick rows above or choose runs here (or a group of seeds)")
if selected:
    st.query_params["runs"] = ",".join(selected)
elif "runs" in st.query_params:
    del st.query_params["runs"]
st.session_state["compare.url_seen"] = ",".join(selected)

if not selected:
    st.info("Choose two or more runs to compare them.")
    st.stop()

# A seed group stands for its runs: their curves, recipes and matrices; its metrics as mean ± std.
chosen_groups = [groups[i] for i in selected if i in groups]
chosen_ids = list(dict.fromkeys(r.id for i in selected for r in (groups[i].runs if i in groups else [by_id[i]])))
chosen = [by_id[i] for i in chosen_ids]
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
st.caption(fmt.EVAL_SPLIT_NOTE)
if chosen_groups:
    cols = st.columns(min(4, len(chosen_groups)))
    for col, group in zip(cols * len(chosen_groups), chosen_groups):
        acc, acc_std = group.mean_std("accuracy")
        f1, f1_std = group.mean_std("macro_f1")
        with col.container(border=True):
            st.metric(group.name, fmt.mean_std(acc, acc_std),
                      help="Mean ± standard deviation of the runs of one recipe that differ only in the seed.")
            st.caption(f"macro F1 {fmt.mean_std(f1, f1_std)} · seeds {fmt.seed_list(group.seeds)}")
baseline = chosen[0]
st.caption(f"Deltas are against **{names[baseline.id]}**, the first run chosen.")
for start in range(0, len(chosen), 4):
    cols = st.columns(4)
    for col, run in zip(cols, chosen[start:start + 4]):
        acc, f1v = run.accuracy, run.macro_f1
        base_acc, base_f1 = baseline.accuracy, baseline.macro_f1
        delta = None
        if run is not baseline and acc is not None and base_acc is not None:
            delta = f"{100 * (acc - base_acc):+.1f} pts"
        with col.container(border=True):
            st.metric(names[run.id], fmt.pct(acc), delta=delta,
                      help=f"{run.name} · {run.backbone} · {fmt.STATUS_ICON[run.status]}")
            f1_delta = (f" ({100 * (f1v - base_f1):+.1f} pts)"
                        if run is not baseline and f1v is not None and base_f1 is not None else "")
            st.caption(f"accuracy on {fmt.eval_split(run)} · macro F1 {fmt.pct(f1v)}{f1_delta} · smallest-class recall "
                       f"{fmt.pct(run.smallest_class_recall)} · {fmt.duration(fmt.run_duration(run))}")
            if run.status.value == "failed":
                st.caption(f":red[failed: {run.error or 'no reason recorded'}]")

# ---------------------------------------------------------- paired comparison

GALLERY_LIMIT = 6
GALLERY_SIDE = 384  # px: Grad-CAMs are drawn over the photo at most this large


def paired_gallery(comparison, table, kind: str) -> None:
    """Images B fixed or broke: each with both runs' predictions, and their Grad-CAMs when asked."""
    if table.empty:
        st.caption(f"No image was {kind}.")
        return
    cams = st.toggle("Grad-CAMs of both runs (loads the two models)", key=f"compare.pair_cams.{kind}")
    rows = table.head(GALLERY_LIMIT).to_dict("records")
    if len(table) > len(rows):
        st.caption(f"The first {len(rows)} of {len(table)}.")
    for row in rows:
        path = Path(str(row["path"]))
        cols = st.columns([1, 1, 1, 2] if cams else [1, 4])
        cols[-1].markdown(f"**{row['source']}**  \ntrue **{row['true']}**  \n"
                          f"{names[comparison.run_a]}: {row['pred_a']} ({row['confidence_a']:.0%})  \n"
                          f"{names[comparison.run_b]}: {row['pred_b']} ({row['confidence_b']:.0%})")
        if not path.is_file():
            cols[0].caption("(image missing)")
            continue
        if not cams:
            cols[0].image(str(path), width="stretch")
            continue
        photo = open_image(path)
        photo.thumbnail((GALLERY_SIDE, GALLERY_SIDE))
        rgb = np.asarray(photo)
        cols[0].image(rgb, caption="photo", width="stretch")
        for col, run_id, name in ((cols[1], comparison.run_a, names[comparison.run_a]),
                                  (cols[2], comparison.run_b, names[comparison.run_b])):
            try:
                heat = state.load_model(run_id).gradcam(rgb)
                col.image(images.overlay(rgb, heat), caption=f"{name} looked here", width="stretch")
            except Exception as exc:  # noqa: BLE001 - the predictions above still stand
                col.caption(f"No Grad-CAM for {name}: {exc}")


st.subheader("Paired comparison")
pairable = [r.id for r in chosen if r.status.value == "succeeded"]
if len(pairable) < 2:
    st.caption("Choose two finished runs to see whether one is really better, image by image.")
else:
    state.keep_choice("compare.pair_a", pairable)
    # By default B is the first run of another recipe than A's: two settings, not two seeds of one.
    recipe_a = recipe_key(by_id[st.session_state["compare.pair_a"]].config)
    other_recipe = [i for i in pairable if recipe_key(by_id[i].config) != recipe_a]
    state.keep_choice("compare.pair_b", pairable, default=(other_recipe or pairable[1:])[0])
    pa, pb = st.columns(2)
    run_a = pa.selectbox("A (reference)", pairable, key="compare.pair_a", format_func=names.get)
    run_b = pb.selectbox("B (challenger)", pairable, key="compare.pair_b", format_func=names.get)
    try:
        comparison = dataclasses.replace(state.paired_comparison(run_a, run_b), name_a=names[run_a],
                                         name_b=names[run_b])
    except InvalidInput as exc:
        st.warning(str(exc))
    else:
        show = st.success if comparison.significant else st.info
        show(comparison.verdict)
        st.caption(comparison.coverage_note or
                   f"On the {comparison.n_shared} evaluation images both runs scored; 95 % interval of the accuracy "
                   f"delta from a paired bootstrap ({comparison.resamples} resamples, seed {comparison.seed}); "
                   "p from McNemar's exact test on the images only one run got right.")
        p1, p2, p3, p4 = st.columns(4)
        p1.metric("Shared images", comparison.n_shared)
        p2.metric(f"Accuracy of B (A: {fmt.pct(comparison.acc_a)})", fmt.pct(comparison.acc_b),
                  delta=f"{100 * comparison.delta:+.1f} pts")
        p3.metric(f"Macro F1 of B (A: {fmt.pct(comparison.f1_a)})", fmt.pct(comparison.f1_b),
                  delta=f"{100 * comparison.f1_delta:+.1f} pts",
                  help=f"95 % CI of the delta {100 * comparison.f1_ci_low:+.1f} to "
                       f"{100 * comparison.f1_ci_high:+.1f} pts")
        p4.metric("Fixed / broken / both wrong", f"{comparison.fixed} / {comparison.broken} / {comparison.both_wrong}")
        fixed_tab, broken_tab = st.tabs([f"B fixed ({comparison.fixed})", f"B broke ({comparison.broken})"])
        with fixed_tab:
            paired_gallery(comparison, comparison.fixed_images, "fixed")
        with broken_tab:
            paired_gallery(comparison, comparison.broken_images, "broken")

# -------------------------------------------------------------------- seeds

shown_groups = sorted((g for g in groups.values() if set(r.id for r in g.runs) & set(chosen_ids)),
                      key=lambda g: min(chosen_ids.index(r.id) for r in g.runs if r.id in chosen_ids))  # Metrics' order
if shown_groups:
    st.subheader("Seeds")
    st.caption("Runs whose recipes differ only in the seed: the spread between seeds is the noise any "
               "difference between recipes has to beat.")
    st.plotly_chart(charts.sweep_summary([
        {"label": g.name, "mean": g.mean_std()[0], "std": g.mean_std()[1],
         "seeds": [(s, r.accuracy) for s, r in zip(g.seeds, g.runs)]} for g in shown_groups]),
                    key="compare.seeds", config={"displayModeBar": False})

# ------------------------------------------------------------------- curves

st.subheader("Curves")
metric = st.segmented_control("Metric", ["val_accuracy", "val_loss", "accuracy", "loss"], key="compare.metric",
                              default="val_accuracy", format_func=lambda m: m.replace("_", " "))
series = {}
for run in chosen:
    epochs = store.epochs(run.id)
    series[names[run.id]] = [{"step": e.step, "phase": e.phase, "metrics": e.metrics} for e in epochs]
if any(series.values()):
    st.plotly_chart(charts.overlay_curves(series, metric or "val_accuracy"), key="compare.curves",
                    config={"displayModeBar": False})
else:
    st.caption("None of these runs logged an epoch yet.")

# --------------------------------------------------------------- config diff

st.subheader("Config differences")
diff = fmt.config_diff({names[r.id]: r.config for r in chosen})
if len(chosen) < 2:
    st.caption("Choose a second run to see how the recipes differ.")
elif diff.empty:
    st.success("These runs share the same recipe.")
else:
    st.dataframe(diff, key="compare.diff")

# -------------------------------------------------------- confusion matrices

st.subheader("Confusion matrices")
normalize = st.toggle("Show row percentages", key="compare.normalize")
PER_ROW = 3  # row by row, so they read in the order of the Metrics above
for start in range(0, len(chosen), PER_ROW):
    for col, run in zip(st.columns(PER_ROW), chosen[start:start + PER_ROW]):
        with col:
            try:
                report = state.eval_report(run.id)
            except state.NoEvaluation as exc:
                st.markdown(f"**{names[run.id]}**")
                st.caption(str(exc))
                continue
            st.plotly_chart(charts.confusion_heatmap(report.confusion, report.labels, normalize,
                                                     title=names[run.id], height=360),
                            key=f"compare.cm.{run.id}", config={"displayModeBar": False})

# ------------------------------------------------------------ tags and notes

st.subheader("Tag and note")
state.keep_choice("compare.note_run", chosen_ids)
target = st.selectbox("Run", chosen_ids, key="compare.note_run", format_func=names.get)
run = by_id[target]
with st.form(f"compare.note_form.{target}"):
    new_tags = st.multiselect("Tags", sorted(set(all_tags) | set(run.tags)), default=run.tags,
                              accept_new_options=True, key=f"compare.tags.{target}",
                              placeholder="add a tag, e.g. baseline")
    note = st.text_area("Note for the team", value=run.note, key=f"compare.note.{target}")
    if st.form_submit_button("Save", type="primary"):
        clean = sorted({t.strip() for t in new_tags if t and t.strip()})
        store.annotate(run.id, clean, note.strip())
        st.session_state["compare.saved"] = run.name
        st.rerun()
saved = st.session_state.pop("compare.saved", None)
if saved:
    st.success(f"Saved the tags and note of {saved}.")
