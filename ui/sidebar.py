"""The shared sidebar: the worker (start it, here or on a Ray cluster), the job training now, the
device, the data home.

Lives in a fragment that polls the store every few seconds, so every page shows the same
live state without rerunning the page under it.
"""

from __future__ import annotations

import os

import streamlit as st

from tlcore.queue import jobs, leases, worker
from tlcore.records import home
from tlcore.records.store import RunStatus
from ui import format as fmt
from ui import state

POLL_S = 3


def worker_status():
    """`tlcore.queue.worker.worker_status()`, or None when it fails."""
    try:
        return worker.worker_status()
    except Exception:  # noqa: BLE001 - the sidebar must never break a page
        return None


def reap() -> None:
    """Mark runs whose worker died as failed (the engine's reaper; cheap, safe to repeat)."""
    try:
        leases.reap(state.store())
    except Exception:  # noqa: BLE001 - a busy store just means: next poll
        pass


def cluster_setting() -> str | None:
    """The Ray address Start worker dispatches to (the sidebar's setting, else `$TLCORE_CLUSTER`); None: here."""
    value = st.session_state.get("settings.cluster", os.environ.get("TLCORE_CLUSTER", ""))
    return value.strip() or None


def start_worker_process() -> int:
    """Start the worker: the local one, or the dispatcher to the cluster set in the sidebar."""
    return jobs.start_worker_process(cluster=cluster_setting())


def start_worker(key: str) -> None:
    """A 'Start worker' button; starting it is the only thing it does."""
    where = f"dispatches them to the Ray cluster at {cluster_setting()}" if cluster_setting() \
        else "trains queued runs one by one"
    if st.button("Start worker", key=key, type="primary", icon=":material/play_arrow:",
                 help=f"Starts `python -m tlcore worker` in the background; it {where}."):
        try:
            pid = start_worker_process()
        except Exception as exc:  # noqa: BLE001 - shown in words
            st.error(f"The worker did not start: {exc}")
        else:
            st.toast(f"Worker started (pid {pid}).", icon=":material/check:")


def worker_line(status) -> None:
    if status is None:
        st.markdown("**Worker:** unknown")
    elif status.alive and status.cluster:
        st.markdown(f"**Worker:** :green[● running] (pid {status.pid}) · **cluster** `{status.cluster}`")
    elif status.alive:
        current = f" · training `{status.current_run_id}`" if getattr(status, "current_run_id", None) else " · idle"
        st.markdown(f"**Worker:** :green[● running] (pid {status.pid}) · **local**{current}")
    else:
        st.markdown("**Worker:** :red[● stopped] — queued runs wait until it starts.")


@st.fragment(run_every=POLL_S)
def _live() -> None:
    store = state.store()
    reap()
    status = worker_status()
    worker_line(status)
    if status is not None and not status.alive:
        start_worker("sidebar.start_worker")

    running = store.list_runs({RunStatus.RUNNING})
    queued = store.queue()
    for run in running[:2]:
        st.markdown(f"**Training:** {run.name}")
        st.progress(fmt.progress_fraction(run), text=fmt.progress_text(run))
    if not running:
        st.caption("Nothing is training.")
    if queued:
        st.caption(f"{len(queued)} run(s) queued.")
    st.divider()
    st.caption(f"**Device:** {state.device_summary(state.device_probe())}")


def draw() -> None:
    with st.sidebar:
        _live()
        st.session_state.setdefault("settings.cluster", os.environ.get("TLCORE_CLUSTER", ""))
        st.text_input("Ray cluster for Start worker", key="settings.cluster", placeholder="empty: train here",
                      help="A Ray address (ray://HEAD:10001, auto): Start worker then dispatches queued runs "
                           "to that cluster, as many at once as it fits. Empty: one run at a time on this machine.")
        st.caption(f"**Data home:** `{home.data_home()}`")
