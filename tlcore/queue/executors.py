"""Where a claimed run trains: in this process, or in a child process per run (Ray's is in `cluster`).

The worker loop (`worker.work`) claims runs, renews the leases of the runs an executor holds,
passes cancel requests on, reaps and concludes; an executor only starts runs, stops them when
asked and reports how each ended as an `Outcome`. Like rq's SimpleWorker and SpawnWorker, the two
here differ only in where a run executes. A run trained here renews its own lease from a heartbeat
thread, since the loop waits for it (in process) or lives in another process (the child).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from tlcore.errors import RunCancelled
from tlcore.queue import leases
from tlcore.queue.outcome import CANCELLED_BEFORE_START, WORKER_SHUT_DOWN, Outcome, error_line
from tlcore.records import home
from tlcore.records.run_record import Executor, RunSummary
from tlcore.records.store import Run, RunStatus, Store

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `tlcore`, put on a child's PYTHONPATH


class RunExecutor(Protocol):
    """What the worker loop needs of an executor."""

    described: dict[str, Any]  # added to the worker's description in `worker.json`
    renews_own_leases: bool  # its runs renew their leases themselves (and see cancel requests there)

    def open(self, store: Store, shutdown: threading.Event) -> None:
        """Get ready to train (join a cluster, say). Raises `InvalidInput` when it cannot train at all."""

    def room(self) -> int:
        """How many more runs it can start now."""

    def start(self, run: Run) -> None:
        """Begin training `run`, which the loop claimed for it."""

    def held(self) -> list[Run]:
        """The runs it holds (started, not yet reported ended)."""

    def stop_run(self, run_id: str) -> None:
        """Someone asked held run `run_id` to stop: stop it between batches (unless `renews_own_leases`)."""

    def poll(self) -> list[tuple[Run, Outcome]]:
        """The runs that ended since the last poll, with how they ended."""

    def idle(self) -> bool:
        """Whether it holds no run."""

    def shut_down(self) -> None:
        """The worker is stopping: stop every run between batches (their outcomes come through `poll`)."""

    def close(self) -> list[tuple[Run, Outcome]]:
        """Stop at once what it still holds (reported cancelled) and release what it uses."""


# ------------------------------------------------------------ training here


class _Heartbeat(threading.Thread):
    """Renews a run's lease every `leases.HEARTBEAT_S`; a cancel request sets `asked`."""

    def __init__(self, store: Store, run_id: str):
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.store, self.run_id = store, run_id
        self.asked = threading.Event()
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(leases.HEARTBEAT_S):
            try:
                if self.store.heartbeat(self.run_id):
                    self.asked.set()
            except Exception as exc:  # a busy or full disk must not kill the training thread
                print(f"[worker] heartbeat for {self.run_id} failed: {error_line(exc)}", file=sys.stderr, flush=True)

    def finish(self):
        self._done.set()
        self.join(timeout=10)


def execute_here(run: Run, store: Store, *, stop: threading.Event, stop_reason: str,
                 progress_bar: bool = False) -> Outcome:
    """Train the claimed `run` in this process, renewing its lease, and return how it ended.

    A cancel request, or `stop` being set (then the run's reason is `stop_reason`), stops it between
    batches. Writes no final status: `outcome.conclude` does.
    """
    if store.get_run(run.id).cancel_requested:
        return Outcome.cancelled(CANCELLED_BEFORE_START, started=False)
    beat = _Heartbeat(store, run.id)
    beat.start()
    try:
        from tlcore.train import devices, training

        devices.declare_process("worker")
        store.set_executor(run.id, Executor(kind="local", host=socket.gethostname(), gpus=len(devices.gpus()),
                                            began_at=time.time()))
        summary = training.execute_run(run.id, store, should_stop=lambda: beat.asked.is_set() or stop.is_set(),
                                       progress_bar=progress_bar)
        return Outcome.succeeded(summary)
    except BaseException as exc:  # noqa: BLE001 - every way out must leave an outcome
        if isinstance(exc, (RunCancelled, KeyboardInterrupt)) or beat.asked.is_set() or stop.is_set():
            return Outcome.cancelled(None if beat.asked.is_set() else stop_reason)
        return Outcome.from_exception(exc)
    finally:
        beat.finish()
        release_models()


def release_models() -> None:
    # A long-lived worker builds a new graph per run; clearing Keras' global state keeps its
    # memory from creeping up run after run.
    try:
        import keras

        keras.backend.clear_session()
    except Exception as exc:  # noqa: BLE001 - a run's end is recorded whatever Keras does
        print(f"[worker] could not clear Keras' session: {error_line(exc)}", file=sys.stderr, flush=True)


class InProcessExecutor:
    """Trains one run at a time in the worker's own process; `start` returns when the run has ended."""

    described: dict[str, Any] = {}
    renews_own_leases = True

    def __init__(self):
        self.ended: list[tuple[Run, Outcome]] = []

    def open(self, store: Store, shutdown: threading.Event) -> None:
        self.store, self.shutdown = store, shutdown

    def room(self) -> int:
        return 0 if self.ended else 1

    def start(self, run: Run) -> None:
        self.ended.append((run, execute_here(run, self.store, stop=self.shutdown, stop_reason=WORKER_SHUT_DOWN)))

    def held(self) -> list[Run]:
        return []  # `start` returns once the run has ended

    def stop_run(self, run_id: str) -> None:
        pass

    def poll(self) -> list[tuple[Run, Outcome]]:
        ended, self.ended = self.ended, []
        return ended

    def idle(self) -> bool:
        return not self.ended

    def shut_down(self) -> None:
        pass

    def close(self) -> list[tuple[Run, Outcome]]:
        return self.poll()


# ------------------------------------------------------------ a process per run


class ProcessPerJobExecutor:
    """Trains each run in a child process that exits after it, so the GPU memory TensorFlow holds goes back
    to the system. A shutdown reaches the child as SIGTERM; a child that dies says so as a failure."""

    described: dict[str, Any] = {}
    renews_own_leases = True

    def __init__(self):
        self.child: tuple[Run, subprocess.Popen, Path] | None = None

    def open(self, store: Store, shutdown: threading.Event) -> None:
        self.store = store

    def room(self) -> int:
        return 0 if self.child else 1

    def start(self, run: Run) -> None:
        from tlcore.train import devices

        outcome_file = Path(tempfile.mkdtemp(prefix="tlcore-job-")) / "outcome.json"
        code = ("from tlcore.queue.executors import execute_in_child as job; "
                f"job({run.id!r}, {str(outcome_file)!r})")
        env = devices.worker_environment(dict(os.environ), str(home.data_home()), str(PACKAGE_ROOT))
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
        self.child = (run, proc, outcome_file)

    def held(self) -> list[Run]:
        return [self.child[0]] if self.child else []

    def stop_run(self, run_id: str) -> None:
        pass

    def poll(self) -> list[tuple[Run, Outcome]]:
        if self.child is None or self.child[1].poll() is None:
            return []
        run, proc, outcome_file = self.child
        self.child = None
        try:
            outcome = _outcome_from_dict(json.loads(outcome_file.read_text()))
        except (OSError, ValueError, KeyError):
            outcome = Outcome.failed(f"The job process exited with code {proc.returncode} before it finished.")
        finally:
            outcome_file.unlink(missing_ok=True)
            outcome_file.parent.rmdir()
        return [(run, outcome)]

    def idle(self) -> bool:
        return self.child is None

    def shut_down(self) -> None:
        if self.child:
            self.child[1].send_signal(signal.SIGTERM)

    def close(self) -> list[tuple[Run, Outcome]]:
        if self.child and self.child[1].poll() is None:
            self.child[1].kill()
            self.child[1].wait()
        return self.poll()


def execute_in_child(run_id: str, outcome_file: str) -> None:
    """The child side of `ProcessPerJobExecutor`: train the claimed run `run_id`, write how it ended to
    `outcome_file` for the worker, and exit."""
    shutdown = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: shutdown.set())
    store = Store()
    store.log(run_id, f"Training in job process {os.getpid()}; its GPU memory is returned when it exits.")
    outcome = execute_here(store.get_run(run_id), store, stop=shutdown, stop_reason=WORKER_SHUT_DOWN)
    Path(outcome_file).write_text(json.dumps(_outcome_to_dict(outcome)))


def _outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    return {"status": outcome.status.value, "error": outcome.error, "detail": outcome.detail,
            "summary": outcome.summary.to_dict() if outcome.summary else None, "started": outcome.started}


def _outcome_from_dict(data: dict[str, Any]) -> Outcome:
    return Outcome(RunStatus(data["status"]), data["error"], data["detail"],
                   RunSummary.from_dict(data["summary"]) if data["summary"] else None, data["started"])
