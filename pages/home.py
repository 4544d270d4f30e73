"""Home: what is training now, the queue, recent runs, the worker, the device, the data home.

Reads the store only (no TensorFlow import); the live part polls every 2 s.
"""

import streamlit as st

from tlcore import home
from tlcore.store import RunStatus
from ui import format as fmt
from ui import frame, sidebar, state

frame.require()

store = state.store()

st.title("Transfer Lab")
st.caption("Fine-tune ImageNet backbones on your own images, watch them train, compare, inspect and demo.")


@st.fragment(run_every=2)
def training_now() -> None:
    running = store.list_runs({RunStatus.RUNNING})
    queued = store.queue()
    status = sidebar.worker_status()

    st.subheader("Training now")
    if not running:
        if queued and status is not None and not status.alive:
            st.warning(f"{len(queued)} run(s) are queued but the worker is not running. Start it to train them.")
            sidebar.start_worker("home.start_worker")
        else:
            st.info("Nothing is training. Launch a run from the **Train** page.")
    for run in running:
        with st.container(border=True):
            left, right = st.columns([3, 1])
            left.markdown(f"**{run.name}** · {run.backbone} · started {fmt.ago(run.started_at)}")
            left.progress(fmt.progress_fraction(run), text=fmt.progress_text(run))
            eta = run.progress.eta_s
            right.metric("ETA", fmt.duration(eta) if eta is not None else "—")
            left.page_link("pages/train.py", label="Watch live", icon=":material/monitoring:",
                           query_params={"run": run.id})

    st.subheader("Queue")
    if queued:
        st.dataframe(
            [{"#": i + 1, "name": r.name, "backbone": r.backbone, "queued": fmt.ago(r.created_at), "id": r.id}
             for i, r in enumerate(queued)],
            hide_index=True, key="home.queue",
        )
    else:
        st.caption("The queue is empty.")


training_now()

st.subheader("Recent runs")
runs = store.list_runs(limit=10)
finished = store.list_runs({RunStatus.SUCCEEDED})
if not runs:
    st.info("No runs yet. Import a dataset on **Datasets** (the built-in *textures* set works offline), "
            "then press Train on **Train**.")
else:
    best = max(finished, key=lambda r: r.accuracy or -1, default=None)
    c1, c2, c3 = st.columns(3)
    c1.metric("Runs", store.count_runs())
    c2.metric("Finished", len(finished))
    c3.metric("Best accuracy", fmt.pct(best.accuracy) if best else "—",
              help=f"{best.name}" if best else None)
    datasets = {d.id: d for d in store.list_datasets()}
    frame = fmt.runs_frame(runs, datasets)[["name", "status", "accuracy", "smallest-class recall", "dataset",
                                            "backbone", "duration", "created"]]
    st.dataframe(
        frame, hide_index=True, key="home.recent",
        column_config={"accuracy": st.column_config.ProgressColumn("accuracy", min_value=0, max_value=1,
                                                                   format="percent"),
                       "smallest-class recall": st.column_config.NumberColumn(format="%.3f")},
    )
    st.page_link("pages/compare.py", label="Compare all runs", icon=":material/compare_arrows:")

st.subheader("Server")
s1, s2, s3 = st.columns(3)
with s1:
    st.markdown("**Worker**")
    status = sidebar.worker_status()
    sidebar.worker_line(status)
with s2:
    st.markdown("**Device**")
    st.write(state.device_summary(state.device_probe()))
with s3:
    st.markdown("**Data home**")
    st.code(str(home.data_home()), language=None)
