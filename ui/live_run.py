"""The Train page's run view: pick a run (following `?run=`), and its status, metrics, curves and log,
polled every two seconds while it is queued or running."""

from __future__ import annotations

import streamlit as st

from tlcore.queue import jobs
from tlcore.records.store import RunStatus
from ui import charts, sidebar, state
from ui import format as fmt


def draw(store) -> None:
    """The run picker and the chosen run's panel."""
    st.subheader("Run")
    recent = store.list_runs(limit=50)
    if not recent:
        st.info("No runs yet. Choose a dataset and a preset, then press **Train**.")
        return
    by_run = {r.id: r for r in recent}
    wanted = st.query_params.get("run")
    if wanted and wanted not in by_run:
        try:
            extra = store.get_run(wanted)
            by_run[extra.id] = extra
            wanted = extra.id
        except KeyError:
            st.warning(f"The link names a run ({wanted!r}) that is not in this data home.")
            wanted = None
    # A new ?run= (a shared link, a page link, a refresh) chooses the run shown.
    if wanted and wanted != st.session_state.get("train.url_seen"):
        st.session_state["train.watch"] = wanted
    active = [r for r in recent if r.status in (RunStatus.RUNNING, RunStatus.QUEUED)]
    state.keep_choice("train.watch", by_run, default=(active[-1] if active else recent[0]).id)
    # Names only: Streamlit keeps showing a keyed selectbox's old label when its text changes,
    # so a status in the label would read "running" after the run finished (shown below instead).
    watch = st.selectbox("Watch run", list(by_run), key="train.watch", format_func=lambda i: by_run[i].name)
    st.query_params["run"] = watch
    st.session_state["train.url_seen"] = watch
    if by_run[watch].status.is_terminal:
        _static_panel(watch)
    else:
        _live_panel(watch)


def _run_panel(run_id: str, live: bool = False) -> None:
    store = state.store()
    try:
        run = store.get_run(run_id)
    except KeyError:
        st.warning(f"There is no run {run_id!r} in this data home.")
        return
    if live and run.status.is_terminal:
        st.rerun()  # the whole page: stop polling, show the finished run and its new status
    st.markdown(f"**{run.name}** · {fmt.STATUS_ICON[run.status]} · {run.backbone} · "
                f"created {fmt.ago(run.created_at)}")
    if run.executor:
        st.caption(f"Ran on: {run.executor.describe()}" if run.status.is_terminal
                   else f"Running on: {run.executor.describe()}")
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        st.progress(fmt.progress_fraction(run), text=fmt.progress_text(run))
        c1, c2 = st.columns([1, 3])
        if run.cancel_requested:
            c2.caption("Cancel requested: the worker stops after the current batch.")
        elif c1.button("Cancel", key="train.cancel", icon=":material/stop:"):
            try:
                jobs.cancel(run.id, store=store)
            except (KeyError, ValueError) as exc:
                st.warning(str(exc))
            st.rerun(scope="fragment")
        status = sidebar.worker_status()
        if run.status == RunStatus.QUEUED and status is not None and not status.alive:
            st.warning("This run waits for the worker, which is not running.")
            sidebar.start_worker("train.start_worker")
    elif run.status == RunStatus.SUCCEEDED:
        # Two by two: four metrics in this half of the page cut their labels and values off.
        m1, m2 = st.columns(2)
        m3, m4 = st.columns(2)
        on_val = run.summary.eval_split == "val"
        m1.metric("Validation accuracy" if on_val else "Test accuracy", fmt.pct(run.accuracy))
        m2.metric("Macro F1", fmt.pct(run.macro_f1))
        metrics = run.summary.metrics
        m3.metric("Smallest class recall", fmt.pct(metrics.smallest_class_recall),
                  help=f"Recall of {metrics.smallest_class}, the class with the fewest evaluation images"
                  if metrics.smallest_class else "Not recorded for this run")
        m4.metric("Took", fmt.duration(fmt.run_duration(run)))
        if on_val:
            st.caption("The dataset has no test split, so these are on the validation split, which also chose "
                       "the early-stopping epoch: expect new photos to score a little lower.")
        if metrics.tta != "none":
            st.caption(f"Evaluated with {metrics.tta} TTA; the Demo and predict use it too.")
        if run.summary.device_record:
            st.caption(f"Trained on {run.summary.device_record.describe()}.")
        _head_choice(run.summary, run.spec.recipe.augment)
        l1, l2 = st.columns(2)
        l1.page_link("pages/errors.py", label="See its errors", icon=":material/error:", query_params={"run": run.id})
        l2.page_link("pages/demo.py", label="Try it in the demo", icon=":material/photo_camera:",
                     query_params={"run": run.id})
    elif run.status == RunStatus.FAILED:
        st.error(f"This run failed: {run.error or 'no reason was recorded.'}")
        if st.button("Resume from its last checkpoint", key="train.resume"):
            try:
                new = jobs.resume(run.id, store=store)
            except (KeyError, ValueError) as exc:
                st.warning(str(exc))
            else:
                st.session_state["train.watch"] = new.id
                st.query_params["run"] = new.id
                st.rerun()
    else:
        st.warning(f"This run was cancelled. {run.error or ''}")

    epochs = store.epochs(run.id)
    if epochs:
        records = [{"step": e.step, "phase": e.phase, "metrics": e.metrics} for e in epochs]
        head = sum(1 for e in epochs if e.phase == "head")
        boundary = head if 0 < head < len(epochs) else None
        st.plotly_chart(charts.run_curves(records, boundary), key="train.curves",
                        config={"displayModeBar": False})
        st.caption(f"{len(epochs)} epoch(s) logged.")
    elif not run.status.is_terminal:
        st.caption("Curves appear here after the first epoch.")
    logs = store.logs(run.id, tail=8)
    if logs:
        with st.expander("Log (last lines)", expanded=run.status == RunStatus.FAILED):
            st.code("\n".join(line.message for line in logs), language=None)


def _head_choice(summary, augment) -> None:
    """What the head chose on the cached features (class weighting, search trials), whether the
    fine-tune was kept and what it trained on (for a recipe with augmentations `augment`)."""
    search = summary.head_search
    if search and search.class_weight:
        st.caption(search.class_weight.describe())
    elif summary.class_weight:
        st.caption(f"Class weighting: {summary.class_weight}.")
    if summary.finetune:
        caption = st.warning if summary.finetune.kept == "head" else st.caption
        caption(summary.finetune.describe())
    if inputs := summary.describe_finetune_inputs(augment):
        st.caption(inputs)
    if search and len(search.trials) > 2:
        chosen = search.trials[search.chosen]
        with st.expander(f"Head search: {len(search.trials)} trials, kept {chosen.settings()}"):
            st.dataframe(
                [{"kept": "✓" if k == search.chosen else "", "lr": t.lr, "dropout": t.dropout,
                  "label smoothing": t.label_smoothing, "class weight": t.class_weight,
                  "val macro F1": round(t.val_macro_f1, 4), "val accuracy": round(t.val_accuracy, 4),
                  "best epoch": t.best_epoch, "epochs": t.epochs}
                 for k, t in sorted(enumerate(search.trials), key=lambda kt: -kt[1].val_macro_f1)],
                hide_index=True, key="train.head_trials")
            st.caption(f"All trials trained at once on the cached features in {search.seconds or 0:.1f} s; the "
                       "weaker half stopped after every few epochs, each trial also on its own early stop. "
                       "The fine-tune continued with the kept settings.")


@st.fragment(run_every=2)
def _live_panel(run_id: str) -> None:
    _run_panel(run_id, live=True)


_static_panel = st.fragment(_run_panel)
