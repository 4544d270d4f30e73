"""Home: what is training now, the queue, the Ray cluster (when the worker dispatches to one),
recent runs, the worker, the data home (the device is in the sidebar).

Reads the store only (no TensorFlow import); the live part polls every 2 s.
"""

import streamlit as st

from tlcore.data import cache_budget
from tlcore.errors import InvalidInput
from tlcore.queue import cluster
from tlcore.records import home
from tlcore.records.store import RunStatus
from ui import format as fmt
from ui import frame, sidebar, state, tables

frame.require()

store = state.store()

st.title("Transfer Lab")
st.caption("Fine-tune ImageNet backbones on your own images, watch them train, compare, inspect and demo.")


def cluster_panel(running_names: dict[str, str]) -> None:
    """The cluster the worker dispatches to: nodes, what each trains, how many more runs fit now."""
    status = cluster.cluster_status()
    if status is None:
        return
    st.subheader("Cluster")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Nodes", len(status.nodes))
    c2.metric("CPUs", f"{sum(n.cpus for n in status.nodes):g}")
    c3.metric("GPUs", f"{sum(n.gpus for n in status.nodes):g}")
    c4.metric("Runs that fit now", f"{status.free} of {status.fits}",
              help=f"Each run asks for {status.cpus_per_run:g} CPU and {status.gpus_per_run:g} GPU.")
    st.dataframe([{"node": n.node_id[:8], "host": n.host, "CPUs": n.cpus, "GPUs": n.gpus,
                   "training": ", ".join(running_names.get(r, r) for r in status.runs_on(n.node_id)) or "—"}
                  for n in status.nodes], hide_index=True, key="home.cluster")
    st.caption(f"Ray cluster at `{status.address}`.")


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

    cluster_panel({r.id: r.name for r in running})

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
    frame = fmt.runs_frame(runs, datasets)[["name", "status", "accuracy", "smallest-class recall", "split",
                                            "dataset", "backbone", "duration", "created"]]
    st.dataframe(frame, hide_index=True, key="home.recent", column_config=tables.metric_columns())
    st.page_link("pages/compare.py", label="Compare all runs", icon=":material/compare_arrows:")

st.subheader("Server")
# The device is in the sidebar, which keeps it current: said once, not "checking…" twice.
s1, s2 = st.columns(2)
with s1:
    st.markdown("**Worker**")
    status = sidebar.worker_status()
    sidebar.worker_line(status)
with s2:
    st.markdown("**Data home**")
    st.code(str(home.data_home()), language=None)
    try:
        st.caption(cache_budget.usage().describe())
    except InvalidInput as exc:
        st.warning(str(exc))
