"""The worker: one loop that takes queued runs and hands them to an executor.

`python -m tlcore worker` runs `serve_forever`. Each turn of `work` reaps dead or stale runs,
renews the leases of the runs the executor holds (a cancel request found there is passed on),
writes the final status of the runs that ended (`outcome.conclude`), and claims queued runs while
the executor has room. Where a run trains is the executor's business: in this process
(`executors.InProcessExecutor`), in a child per run (`executors.ProcessPerJobExecutor`), or on a
Ray cluster (`cluster.RayExecutor`). SIGTERM/SIGINT stop the loop: the executor stops its runs
between batches, and whatever has not stopped after `SHUTDOWN_GRACE_S` ends cancelled.

The worker holds an exclusive lock on `worker.lock` in the data home for its whole life (so one
data home has one worker) and describes itself in `worker.json`, which `worker_status` reads
without touching the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tlcore.errors import WorkerBusy
from tlcore.queue import leases
from tlcore.queue.executors import PACKAGE_ROOT, InProcessExecutor, ProcessPerJobExecutor, RunExecutor
from tlcore.queue.outcome import Outcome, conclude, error_line
from tlcore.records import home
from tlcore.records.atomic import write_json_atomically
from tlcore.records.store import Run, Store

SHUTDOWN_GRACE_S = 60.0  # how long a stopping worker waits for its runs to stop between batches


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    alive: bool
    pid: int | None
    started_at: float | None
    current_run_id: str | None
    host: str | None = None
    log_path: str | None = None
    cluster: str | None = None  # the Ray address a cluster worker serves; None for a local worker


# ------------------------------------------------------------ the loop


def work(executor: RunExecutor, store: Store | None = None, *, once: bool = False, max_jobs: int | None = None,
         poll_s: float = 1.0, lease_s: float = leases.LEASE_S, shutdown: threading.Event | None = None) -> list[Run]:
    """Take queued runs and train them with `executor` until `shutdown` is set; returns the runs it finished.

    With `once` the loop returns as soon as the executor holds nothing and there is nothing more to
    take: the queue is empty, or `max_jobs` runs were taken.

    Raises:
        WorkerBusy: another live worker already serves this data home.
        InvalidInput: the executor cannot train at all (before any run is claimed).
    """
    store = store or Store()
    shutdown = shutdown or threading.Event()
    me = leases.worker_id()
    finished: list[Run] = []
    taken = 0
    with serving_data_home(store, **executor.described) as info:
        executor.open(store, shutdown)
        beaten_at, current = 0.0, None
        try:
            while not shutdown.is_set():
                try:
                    for dead in leases.reap(store, lease_s):
                        say(f"marked {dead.id} failed: {dead.error}")
                    beaten_at = _keep_leases(executor, store, beaten_at)
                    finished += _conclude_ended(executor, store)
                    while executor.room() > 0 and (max_jobs is None or taken < max_jobs) and not shutdown.is_set():
                        run = leases.claim_next(store, me)
                        if run is None:
                            break
                        taken += 1
                        say(f"training {run.id} ({run.name})")
                        current = _describe_current(info, current, run.id)
                        try:
                            executor.start(run)
                        except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the next may
                            finished.append(conclude(store, run.id, Outcome.from_exception(exc)))
                    finished += _conclude_ended(executor, store)
                    current = _describe_current(info, current, next((r.id for r in executor.held()), None))
                except Exception as exc:  # the store busy or its disk full, the cluster unreachable: try again
                    say(f"could not serve the queue ({error_line(exc)}); retrying in {max(poll_s, 5):.0f} s")
                    shutdown.wait(max(poll_s, 5))
                    continue
                if once and executor.idle() and (max_jobs is not None and taken >= max_jobs or not store.queue()):
                    break
                shutdown.wait(poll_s)
        finally:
            finished += _stop(executor, store)
    return finished


def _keep_leases(executor: RunExecutor, store: Store, beaten_at: float) -> float:
    """Renew the lease of each run the executor holds, at most every `HEARTBEAT_S`; pass cancels on."""
    now = time.monotonic()
    if executor.renews_own_leases or now - beaten_at < leases.HEARTBEAT_S:
        return beaten_at
    for run in executor.held():
        if store.heartbeat(run.id):
            executor.stop_run(run.id)
    return now


def _conclude_ended(executor: RunExecutor, store: Store) -> list[Run]:
    done = []
    for run, outcome in executor.poll():
        done.append(conclude(store, run.id, outcome))
        say(f"{run.id} {done[-1].status.value}" + (f": {done[-1].error}" if done[-1].error else ""))
        keep_caches_in_budget(store)
    return done


def _stop(executor: RunExecutor, store: Store) -> list[Run]:
    """Stop the executor's runs between batches, waiting `SHUTDOWN_GRACE_S` at most, then end the rest."""
    finished = []
    executor.shut_down()
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    beaten_at = 0.0
    while not executor.idle() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a store error must not keep the worker from stopping
            beaten_at = _keep_leases(executor, store, beaten_at)
            finished += _conclude_ended(executor, store)
        time.sleep(0.5)
    for run, outcome in executor.close():
        finished.append(conclude(store, run.id, outcome))
    return finished


def _describe_current(info: dict[str, Any], current: str | None, run_id: str | None) -> str | None:
    if run_id != current:
        _write_worker_json({**info, "current_run_id": run_id})
    return run_id


# ------------------------------------------------------------ the process


def serve_forever(*, cluster: str | None = None, once: bool = False, process_per_job: bool = False,
                  gpus_per_run: float | None = None, cpus_per_run: float | None = None) -> list[Run]:
    """The `python -m tlcore worker` process: SIGTERM/SIGINT stop it after stopping its runs.

    With `cluster` (a Ray address) runs train on that cluster, as many at once as it fits, and `once`
    returns when the queue is empty; otherwise one at a time here (`process_per_job`, or
    `$TLCORE_PROCESS_PER_JOB=1`: each in its own process), and `once` returns after one run.
    """
    if cluster:
        from tlcore.queue.cluster import POLL_S, RayExecutor

        executor: RunExecutor = RayExecutor(cluster, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run)
        return until_signalled(lambda shutdown: work(executor, once=once, shutdown=shutdown, poll_s=POLL_S))
    if process_per_job or os.environ.get("TLCORE_PROCESS_PER_JOB") == "1":
        executor = ProcessPerJobExecutor()
    else:
        executor = InProcessExecutor()
    return until_signalled(lambda shutdown: work(executor, once=once, max_jobs=1 if once else None,
                                                 shutdown=shutdown))


def until_signalled(loop: Callable[[threading.Event], list[Run]]) -> list[Run]:
    """Run `loop(shutdown)`; SIGTERM/SIGINT set `shutdown` so it stops after the current batch."""
    shutdown = threading.Event()

    def _stop(signum, _frame):
        say(f"received {signal.Signals(signum).name}; stopping after the current batch")
        shutdown.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    return loop(shutdown)


def say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [worker] {message}", flush=True)


def keep_caches_in_budget(store: Store) -> None:
    """Prune the caches to `$TLCORE_CACHE_GB` after a run; a bad budget or a failed removal is only said."""
    from tlcore.data import cache_budget

    try:
        pruned = cache_budget.enforce(store)
    except Exception as exc:  # noqa: BLE001 - the queue goes on whatever the caches do
        say(f"could not keep the caches in their budget: {error_line(exc)}")
        return
    if pruned.removed or pruned.kept_for_runs:
        say(f"cache budget: removed {pruned.removed} least recently used cache file(s) ({pruned.freed / 1e9:.2f} GB)"
            + (f"; kept {pruned.kept_for_runs} over the budget that queued runs need" if pruned.kept_for_runs else ""))


# ------------------------------------------------------------ one worker per data home


def _worker_json() -> Path:
    return home.data_home() / "worker.json"


def worker_log_path() -> Path:
    return home.data_home() / "worker.log"


def _write_worker_json(info: dict[str, Any]) -> None:
    write_json_atomically(_worker_json(), info)


def worker_status(store: Store | None = None) -> WorkerStatus:
    """Whether a worker serves this data home now, its pid and the run it is training."""
    _collect_children()
    try:
        info = json.loads(_worker_json().read_text())
    except (OSError, ValueError):
        return WorkerStatus(False, None, None, None, log_path=str(worker_log_path()))
    pid, host = info.get("pid"), info.get("host")
    alive = host == socket.gethostname() and isinstance(pid, int) and leases.pid_alive(pid, info.get("created"))
    return WorkerStatus(
        alive=alive,
        pid=pid,
        started_at=info.get("started_at"),
        current_run_id=info.get("current_run_id") if alive else None,
        host=host,
        log_path=str(worker_log_path()),
        cluster=info.get("cluster") if alive else None,
    )


@contextlib.contextmanager
def serving_data_home(store: Store, **described: Any):
    """Hold the data home's worker lock and describe this worker in `worker.json` while inside.

    Yields the description (pid, host, ...; `described` adds to it).

    Raises:
        WorkerBusy: another live worker already serves this data home.
    """
    lock_file = open(home.data_home() / "worker.lock", "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        status = worker_status(store)
        raise WorkerBusy(f"A worker is already running for {home.data_home()} (pid {status.pid}); "
                         "one worker trains one job at a time. Stop it first or let it take the queue.") from None
    import psutil

    me = leases.worker_id()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
            "created": psutil.Process().create_time(), "current_run_id": None, **described}
    _write_worker_json(info)
    say(f"worker {me} started on {home.data_home()}")
    try:
        yield info
    finally:
        with contextlib.suppress(OSError):
            current = json.loads(_worker_json().read_text())
            if current.get("pid") == os.getpid():
                _worker_json().unlink()
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()
        say(f"worker {me} stopped")


_children: list[subprocess.Popen] = []
_spawn_lock = threading.Lock()


def _collect_children() -> None:
    # Workers this process spawned are its children: poll them so a dead one is reaped by
    # the OS instead of lingering as a zombie that still "exists".
    for proc in list(_children):
        if proc.poll() is not None:
            with contextlib.suppress(ValueError):  # another thread collected it first
                _children.remove(proc)


def start_worker_process(cluster: str | None = None) -> int:
    """Start a detached `python -m tlcore worker` (output to `worker.log`); returns its pid.

    With `cluster` (a Ray address) its runs train on that cluster. A no-op returning the live
    worker's pid if one already serves this data home.
    """
    from tlcore.train import devices

    with _spawn_lock:
        status = worker_status()
        if status.alive:
            return status.pid
        env = devices.worker_environment(dict(os.environ), str(home.data_home()), str(PACKAGE_ROOT))
        env.pop("TLCORE_CLUSTER", None)  # `cluster` alone decides where this worker trains
        with open(worker_log_path(), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tlcore", "worker", *(["--cluster", cluster] if cluster else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=str(home.data_home()), start_new_session=True,
            )
        _children.append(proc)
        # Wait briefly for it to announce itself, so the dashboard shows it alive at once.
        deadline = time.time() + 10
        while time.time() < deadline and proc.poll() is None:
            status = worker_status()
            if status.alive and status.pid == proc.pid:
                break
            time.sleep(0.1)
        return proc.pid
