"""Jobs: submit a run, the worker that trains queued runs one at a time, cancel, resume.

A run's state lives in the store, never in a process: `submit` writes a queued row, a worker
(`python -m tlcore worker`) claims the oldest one, renews its lease with a heartbeat thread
while `training.execute_run` trains, and writes the final status. A worker that dies stops
beating; `reap` (called by every worker and by readers such as `runs list` and the dashboard)
marks its run failed with the reason written down, and every epoch logged so far stays.

The worker holds an exclusive lock on `worker.lock` in the data home for its whole life (so
one data home has one worker) and describes itself in `worker.json`, which `worker_status`
reads without touching the lock.
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
import traceback
from pathlib import Path
from typing import Any, Callable

from tlcore.backbones import get_backbone
from tlcore.data.importer import resolve_dataset
from tlcore.errors import InvalidInput, RunCancelled, TransitionRefused, WorkerBusy, plain_message
from tlcore.records import home
from tlcore.records.atomic import write_json_atomically
from tlcore.records.config import RunSpec, TrainConfig
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Executor
from tlcore.records.store import Run, RunStatus, Store
from tlcore.train import devices

HEARTBEAT_S = 2.0  # how often a running job renews its lease and looks for a cancel request
LEASE_S = 30.0  # a run whose heartbeat is older than this is marked failed

@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    alive: bool
    pid: int | None
    started_at: float | None
    current_run_id: str | None
    host: str | None = None
    log_path: str | None = None
    cluster: str | None = None  # the Ray address a cluster dispatcher serves; None for the local worker


# ------------------------------------------------------------------ submit

_submit_lock = threading.Lock()
# The folder holding the `tlcore` package, put on a worker's PYTHONPATH.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def submit(config: TrainConfig, store: Store | None = None) -> Run:
    """Queue a training run for the worker and return it (status `queued`).

    `config.dataset` may be a dataset id, a name (`flowers`, `flowers@2`) or a folder / `.zip`
    path, which is imported first. The queued run's config names the dataset by id, so it
    reproduces exactly this dataset version.

    Raises:
        ValueError: the config names an unknown backbone, an image size the backbone cannot
            take, or a dataset that does not exist (or a folder that cannot be imported).
    """
    store = store or Store()
    spec, dataset = prepare(config, store)
    return _create_run(store, spec, dataset, RunStatus.QUEUED)


def prepare(config: TrainConfig, store: Store, sweep_id: str | None = None) -> tuple[RunSpec, Any]:
    """Validate `config` against the registry and resolve its dataset; returns (the run's spec, Dataset).

    The spec's recipe names the backbone by its registry name and the dataset by the version's id.
    """
    if not isinstance(config, TrainConfig):
        raise InvalidInput(f"`config` must be a TrainConfig. Received: {type(config).__name__}")
    spec = get_backbone(config.backbone)
    config.resolved_image_size(spec)
    dataset = resolve_dataset(config.dataset, store, seed=config.seed, split=config.split)
    return RunSpec(dataclasses.replace(config, backbone=spec.name, dataset=dataset.id), sweep_id=sweep_id), dataset


def _create_run(store: Store, spec: RunSpec, dataset, status: RunStatus) -> Run:
    # The default name counts existing runs; a file lock (across processes) and a thread lock
    # (flock is per open file, so threads of one process need their own) keep two
    # simultaneous submits from picking the same number.
    with _submit_lock, _file_lock(home.data_home() / "submit.lock"):
        name = spec.recipe.name or _default_name(store, spec.recipe.backbone, dataset.name)
        return store.create_run(name, spec, status=status)


def _default_name(store: Store, backbone: str, dataset_name: str) -> str:
    prefix = f"{backbone}-{dataset_name}-"
    taken = {r.name for r in store.list_runs()}
    n = 1 + sum(1 for name in taken if name.startswith(prefix) and name[len(prefix):].isdigit())
    while f"{prefix}{n}" in taken:
        n += 1
    return f"{prefix}{n}"


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------ cancel, resume


def cancel(run_ref: str, store: Store | None = None) -> Run:
    """Cancel a queued run now, or ask a running one to stop between batches.

    Raises:
        KeyError: no such run.
        ValueError: the run has already finished.
    """
    store = store or Store()
    run = store.get_run(run_ref)
    if run.status.is_terminal:
        raise InvalidInput(f"Run {run.name} ({run.id}) already finished ({run.status.value}); "
                         "only queued or running runs can be cancelled.")
    return store.request_cancel(run.id)


def resume(run_ref: str, store: Store | None = None) -> Run:
    """Queue a new run with a failed or cancelled run's config, starting from its checkpoint.

    The new run's config carries `resume_from` = the old run's id.

    Raises:
        ValueError: the run did not fail or get cancelled, or left no checkpoint.
    """
    store = store or Store()
    old = store.get_run(run_ref)
    if old.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise InvalidInput(f"Only failed or cancelled runs can be resumed. Received: run {old.name} "
                         f"({old.id}) is {old.status.value}.")
    if RunFolder(old.id).checkpoint() is None:
        raise InvalidInput(f"Run {old.name} ({old.id}) left no checkpoint (it stopped before its first "
                         "epoch finished), so there is nothing to resume; submit it again instead.")
    base = old.name.split(" (resumed")[0]
    name = f"{base} (resumed from {old.id})"
    return store.create_run(name, dataclasses.replace(old.spec, resume_from=old.id, sweep_id=None))


def retrain_on(run_ref: str, dataset_ref: str, store: Store | None = None) -> Run:
    """Queue a run with run `run_ref`'s recipe on another dataset version (a fixed one, say).

    Raises:
        NotFound: no such run or dataset.
        InvalidInput: the dataset is not a version of the run's dataset.
    """
    store = store or Store()
    old = store.get_run(run_ref)
    dataset = store.get_dataset(dataset_ref)
    original = store.get_dataset(old.dataset_id)
    if dataset.name != original.name:
        raise InvalidInput(f"{dataset.label} is not a version of {original.label}, the dataset run {old.name} "
                           "trained on; retrain on one of its versions.")
    return submit(dataclasses.replace(old.spec.recipe, dataset=dataset.id, name=f"{old.name} on {dataset.label}"),
                  store)


# --------------------------------------------------------------- the reaper


def worker_id() -> str:
    """This process as a worker: `hostname:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_worker_alive(worker: str) -> bool:
    """Whether the process behind a `hostname:pid` worker id still runs.

    Workers on other hosts cannot be checked from here and count as alive; their lease
    (heartbeat age) decides instead.
    """
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return _pid_alive(int(pid))


def _pid_alive(pid: int, created: float | None = None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process created later than the one we recorded.
        return created is None or abs(proc.create_time() - created) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def reap(store: Store | None = None, lease_s: float = LEASE_S) -> list[Run]:
    """Mark running runs failed whose worker is gone or whose lease expired; returns them."""
    store = store or Store()
    _collect_children()
    return store.reap_stale(lease_s, is_alive=is_worker_alive)


# ------------------------------------------------------------ running a run


def record_end(store: Store, run_id: str, status: RunStatus, *, error: str | None = None,
               summary=None) -> Run:
    """Finish `run_id` with `status`; if it already finished (a reaper failed it while it trained on),
    keep that record and say in the run's log what the late end was. Returns the run as stored."""
    try:
        return store.finish_run(run_id, status, error=error, summary=summary)
    except TransitionRefused as exc:
        store.log(run_id, f"It ended {status.value} after all, but too late to count: {exc}")
        return store.get_run(run_id)


def error_line(exc: BaseException) -> str:
    text = plain_message(exc)
    if isinstance(exc, MemoryError) or "ResourceExhausted" in type(exc).__name__:
        text += " (out of memory: try a smaller --batch-size or --image-size)"
    return text if len(text) <= 500 else text[:497] + "..."


class _Heartbeat(threading.Thread):
    """Renews a run's lease every `HEARTBEAT_S`; a cancel request sets `stop`."""

    def __init__(self, store: Store, run_id: str, stop: threading.Event):
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.store, self.run_id, self.stop = store, run_id, stop
        self.cancel_requested = threading.Event()
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(HEARTBEAT_S):
            try:
                if self.store.heartbeat(self.run_id):
                    self.cancel_requested.set()
                    self.stop.set()
            except Exception as exc:  # a busy or full disk must not kill the training thread
                print(f"[worker] heartbeat for {self.run_id} failed: {error_line(exc)}",
                      file=sys.stderr, flush=True)

    def finish(self):
        self._done.set()
        self.join(timeout=10)


def execute_claimed(run: Run, store: Store, *, stop: threading.Event | None = None,
                    shutdown: threading.Event | None = None, progress_bar: bool = False,
                    stop_reason: Callable[[], str | None] = lambda: None) -> Run:
    """Train a run that is already `running` for this process and write its final status.

    A heartbeat thread renews the lease; a cancel request (or `stop` being set) stops the run
    between batches and ends it `cancelled`. Any exception ends it `failed` with one plain
    line as its error and the traceback in its log. Returns the finished run.
    """
    stop = stop or threading.Event()
    shutdown = shutdown or threading.Event()
    beat = _Heartbeat(store, run.id, stop)
    if store.get_run(run.id).cancel_requested:
        return record_end(store, run.id, RunStatus.CANCELLED, error="Cancelled before it started.")
    beat.start()
    try:
        from tlcore.train import devices, training

        devices.declare_process("worker")
        store.update_run(run.id, executor=Executor(kind="local", host=socket.gethostname(),
                                                   gpus=len(devices.gpus()), began_at=time.time()))
        summary = training.execute_run(run.id, store,
                                       should_stop=lambda: stop.is_set() or shutdown.is_set(),
                                       progress_bar=progress_bar)
    except BaseException as exc:  # noqa: BLE001 - every way out must leave a final status
        beat.finish()
        cancelled = isinstance(exc, RunCancelled) or (
            isinstance(exc, KeyboardInterrupt) or stop.is_set() or shutdown.is_set())
        if cancelled:
            reason = stop_reason()
            if beat.cancel_requested.is_set() or store.get_run(run.id).cancel_requested or not reason:
                reason = "Cancelled by request; epochs logged so far are kept."
            _safe(store.log, run.id, f"Run cancelled: {reason}")
            finished = _safe(record_end, store, run.id, RunStatus.CANCELLED, error=reason)
        else:
            line = error_line(exc)
            _safe(store.log, run.id, "Run failed:\n" + "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)))
            finished = _safe(record_end, store, run.id, RunStatus.FAILED, error=line)
        if not isinstance(exc, (Exception, KeyboardInterrupt)):
            raise  # SystemExit and friends: recorded as failed above, then let through
        _safe(release_models)
        return finished or store.get_run(run.id)
    beat.finish()
    release_models()
    return record_end(store, run.id, RunStatus.SUCCEEDED, summary=summary)


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


def release_models() -> None:
    # A long-lived worker builds a new graph per run; clearing Keras' global state keeps its
    # memory from creeping up run after run.
    import keras

    keras.backend.clear_session()


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the store itself failing: the reaper marks the run later
        print(f"[worker] could not record the run's end: {error_line(exc)}", file=sys.stderr, flush=True)
        return None


def run_foreground(config: TrainConfig, store: Store | None = None, *, progress_bar: bool = False,
                   stop: threading.Event | None = None) -> Run:
    """Create a run and train it in this process (the CLI's `train`); returns the finished run."""
    store = store or Store()
    spec, dataset = prepare(config, store)
    run = _create_run(store, spec, dataset, RunStatus.RUNNING)
    now = time.time()
    run = store.update_run(run.id, worker=worker_id(), started_at=now, heartbeat_at=now)
    return execute_claimed(run, store, stop=stop, progress_bar=progress_bar,
                           stop_reason=lambda: "Interrupted (Ctrl-C); epochs logged so far are kept.")


# ---------------------------------------------------------------- the worker


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
    alive = host == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid, info.get("created"))
    return WorkerStatus(
        alive=alive,
        pid=pid,
        started_at=info.get("started_at"),
        current_run_id=info.get("current_run_id") if alive else None,
        host=host,
        log_path=str(worker_log_path()),
        cluster=info.get("cluster") if alive else None,
    )


def worker_loop(store: Store | None = None, *, once: bool = False, poll_s: float = 1.0,
                lease_s: float = LEASE_S, shutdown: threading.Event | None = None,
                process_per_job: bool = False) -> list[Run]:
    """Run queued jobs one at a time until `shutdown` is set (or, with `once`, after one job).

    Each turn reaps dead or stale runs, claims the oldest queued run and trains it (with
    `process_per_job`, in a child process that exits after it, so the GPU memory TensorFlow
    holds goes back to the system). With `once` the loop returns after one job, or at once
    when the queue is empty. Returns the runs it finished.

    Raises:
        WorkerBusy: another live worker already serves this data home.
    """
    store = store or Store()
    shutdown = shutdown or threading.Event()
    me = worker_id()
    finished: list[Run] = []
    with serving_data_home(store) as info:
        while not shutdown.is_set():
            try:
                for dead in reap(store, lease_s):
                    say(f"marked {dead.id} failed: {dead.error}")
                run = store.claim_next(me)
            except Exception as exc:  # the store busy or its disk full: wait and try again
                say(f"could not read the queue ({error_line(exc)}); retrying in {max(poll_s, 5):.0f} s")
                shutdown.wait(max(poll_s, 5))
                continue
            if run is None:
                if once:
                    break
                shutdown.wait(poll_s)
                continue
            _write_worker_json({**info, "current_run_id": run.id})
            say(f"training {run.id} ({run.name})")
            if process_per_job:
                done = _execute_in_child(run, store, shutdown)
            else:
                done = execute_claimed(run, store, shutdown=shutdown, stop_reason=lambda: _shutdown_reason(shutdown))
            finished.append(done)
            _write_worker_json(info)
            say(f"{done.id} {done.status.value}" + (f": {done.error}" if done.error else ""))
            keep_caches_in_budget(store)
            if once:
                break
    return finished


@contextlib.contextmanager
def serving_data_home(store: Store, **described: Any):
    """Hold the data home's worker lock and describe this worker in `worker.json` while inside.

    Yields the description (pid, host, ...; `described` adds to it). Only one worker, local
    or cluster dispatcher, serves a data home.

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

    me = worker_id()
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


def _shutdown_reason(shutdown: threading.Event) -> str | None:
    if not shutdown.is_set():
        return None
    return ("The worker was shut down; epochs logged so far are kept. Resume the run if it saved a checkpoint, "
            "or submit it again.")


def _execute_in_child(run: Run, store: Store, shutdown: threading.Event) -> Run:
    """Train a claimed run in a child process (`execute_claimed_in_this_process`); a shutdown
    is passed on as SIGTERM. A child that dies without a final status leaves the run failed."""
    code = f"from tlcore.queue.jobs import execute_claimed_in_this_process as job; job({run.id!r})"
    env = devices.worker_environment(dict(os.environ), str(home.data_home()), _PACKAGE_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
    signalled = False
    while proc.poll() is None:
        if shutdown.is_set() and not signalled:
            proc.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.5)
    finished = store.get_run(run.id)
    if not finished.status.is_terminal:
        finished = record_end(store, run.id, RunStatus.FAILED,
                              error=f"The job process exited with code {proc.returncode} before it finished.")
    return finished


def execute_claimed_in_this_process(run_id: str) -> None:
    """The child side of a process-per-job worker: train the claimed run `run_id` and exit."""
    shutdown = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: shutdown.set())
    store = Store()
    store.log(run_id, f"Training in job process {os.getpid()}; its GPU memory is returned when it exits.")
    execute_claimed(store.get_run(run_id), store, shutdown=shutdown, stop_reason=lambda: _shutdown_reason(shutdown))


def say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [worker] {message}", flush=True)


def serve_forever(once: bool = False, process_per_job: bool = False) -> list[Run]:
    """The `python -m tlcore worker` process: SIGTERM/SIGINT stop it after cancelling its job.

    `process_per_job` (or `$TLCORE_PROCESS_PER_JOB=1`) trains each job in its own process.
    """
    process_per_job = process_per_job or os.environ.get("TLCORE_PROCESS_PER_JOB") == "1"
    return until_signalled(lambda shutdown: worker_loop(once=once, shutdown=shutdown,
                                                        process_per_job=process_per_job))


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

    With `cluster` (a Ray address) it starts the cluster dispatcher instead. A no-op returning
    the live worker's pid if one already serves this data home.
    """
    with _spawn_lock:
        status = worker_status()
        if status.alive:
            return status.pid
        env = devices.worker_environment(dict(os.environ), str(home.data_home()),
                                         _PACKAGE_ROOT)
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
