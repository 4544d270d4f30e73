"""Who holds a run: the queue's order, claiming, the heartbeat lease and the reaper.

A worker claims the oldest queued run (`claim_next`) and holds it by renewing its lease
(`Store.heartbeat`) every `HEARTBEAT_S`. A run whose worker process is gone, or whose lease is
older than `LEASE_S`, is failed by `reap` with the reason written down; every epoch logged so far
stays. Every worker reaps on each turn, and so do readers such as `runs list` and the dashboard.
"""

from __future__ import annotations

import os
import socket
import time

from tlcore.errors import TransitionRefused
from tlcore.records.store import Run, RunStatus, Store

HEARTBEAT_S = 2.0  # how often a held run's lease is renewed (and a cancel request looked for)
LEASE_S = 30.0  # a run whose heartbeat is older than this is marked failed


def worker_id() -> str:
    """This process as a worker: `hostname:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_next(store: Store, worker: str) -> Run | None:
    """Move the oldest queued run to running for `worker` and return it; None if the queue is empty."""
    for run in store.queue():
        try:
            return store.start_run(run.id, worker)
        except TransitionRefused:
            continue  # another worker took it, or it was cancelled, since the queue was read
    return None


def reap(store: Store | None = None, lease_s: float = LEASE_S, now: float | None = None) -> list[Run]:
    """Fail the running runs whose worker is gone or whose lease expired (at `now`); returns them."""
    store = store or Store()
    now = time.time() if now is None else now
    reaped = []
    for run in store.list_runs({RunStatus.RUNNING}):
        reason = _why_stale(run, lease_s, now)
        if reason is None:
            continue
        try:
            reaped.append(store.finish_run(run.id, RunStatus.FAILED, error=reason, only_if=RunStatus.RUNNING))
        except TransitionRefused:
            continue  # it finished since the list was read
    return reaped


def _why_stale(run: Run, lease_s: float, now: float) -> str | None:
    beat = run.heartbeat_at or run.started_at or run.created_at
    if now - beat > lease_s:
        return (f"The worker stopped responding (no heartbeat for {now - beat:.0f} s). "
                "Epochs logged so far are kept; resume or relaunch the run.")
    if run.worker and not is_worker_alive(run.worker):
        return (f"The worker process ({run.worker}) is gone. "
                "Epochs logged so far are kept; resume or relaunch the run.")
    return None


def is_worker_alive(worker: str) -> bool:
    """Whether the process behind a `hostname:pid` worker id still runs.

    Workers on other hosts cannot be checked from here and count as alive; their lease
    (heartbeat age) decides instead.
    """
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return pid_alive(int(pid))


def pid_alive(pid: int, created: float | None = None) -> bool:
    """Whether process `pid` runs (not a zombie) and, given `created`, is the one created then."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process created later than the one we recorded.
        return created is None or abs(proc.create_time() - created) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
