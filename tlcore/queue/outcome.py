"""How a run ended, and the one place that turns it into the run's final status.

An executor (in this process, in a child process, on Ray) reports an `Outcome`: succeeded with its
summary, failed with one plain sentence (and the detail for the log), or cancelled (with the
executor's own reason, if it stopped the run itself). `conclude` decides the sentence the user
reads and writes the final status; a run the store already finished (the reaper failed it while
it trained on) keeps its record, and the late end is said in its log.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback

from tlcore.errors import TransitionRefused, plain_message
from tlcore.records.run_record import RunSummary
from tlcore.records.store import Run, RunStatus, Store

CANCELLED_BY_REQUEST = "Cancelled by request; epochs logged so far are kept."
CANCELLED_BEFORE_START = "Cancelled before it started."
WORKER_SHUT_DOWN = ("The worker was shut down; epochs logged so far are kept. Resume the run if it saved a "
                    "checkpoint, or submit it again.")
INTERRUPTED = "Interrupted (Ctrl-C); epochs logged so far are kept."


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an executor saw a run end."""

    status: RunStatus
    error: str | None = None  # failed: the sentence; cancelled: the executor's reason, None if the run was asked
    detail: str | None = None  # for the run's log: a traceback, or what Ray said
    summary: RunSummary | None = None
    started: bool = True  # False: the run was stopped before it trained at all

    @classmethod
    def succeeded(cls, summary: RunSummary) -> "Outcome":
        return cls(RunStatus.SUCCEEDED, summary=summary)

    @classmethod
    def failed(cls, sentence: str, detail: str | None = None) -> "Outcome":
        return cls(RunStatus.FAILED, error=sentence, detail=detail)

    @classmethod
    def cancelled(cls, reason: str | None = None, *, started: bool = True) -> "Outcome":
        return cls(RunStatus.CANCELLED, error=reason, started=started)

    @classmethod
    def from_exception(cls, exc: BaseException) -> "Outcome":
        """A failure: the exception in one line, its traceback for the log."""
        return cls.failed(error_line(exc), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def conclude(store: Store, run_id: str, outcome: Outcome) -> Run:
    """Write the final status of `run_id` from `outcome`; returns the run as stored.

    A cancelled run that was asked to stop says so, whatever the executor thought (a shutdown
    racing a cancel request); otherwise it gives the executor's reason. Never raises for a run
    that already finished; if the store itself fails, says so on stderr and leaves the run to the
    reaper.
    """
    try:
        error = outcome.error
        if outcome.status is RunStatus.CANCELLED:
            asked = store.get_run(run_id).cancel_requested
            if not error or (asked and outcome.started):
                error = CANCELLED_BY_REQUEST
            store.log(run_id, f"Run cancelled: {error}")
        elif outcome.status is RunStatus.FAILED:
            store.log(run_id, f"Run failed: {error}" + (f"\n{outcome.detail}" if outcome.detail else ""))
        try:
            return store.finish_run(run_id, outcome.status, error=error, summary=outcome.summary)
        except TransitionRefused as exc:
            store.log(run_id, f"It ended {outcome.status.value} after all, but too late to count: {exc}")
            return store.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - the store itself failing: the reaper marks the run later
        print(f"[worker] could not record the end of {run_id}: {error_line(exc)}", file=sys.stderr, flush=True)
        return store.get_run(run_id)


def error_line(exc: BaseException) -> str:
    """An exception as one plain line of at most 500 characters, with a hint when memory ran out."""
    text = plain_message(exc)
    if isinstance(exc, MemoryError) or "ResourceExhausted" in type(exc).__name__:
        text += " (out of memory: try a smaller --batch-size or --image-size)"
    return text if len(text) <= 500 else text[:497] + "..."
