"""Jobs: submit a run to the queue, cancel it, resume or retrain it; train one in the foreground.

A run's state lives in the store, never in a process: `submit` writes a queued row and a worker
(`python -m tlcore worker`, see `worker`) takes it. `run_foreground` is the CLI's `train`: a run
created running for this process and trained here, ending the way a worker's runs end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import threading
from pathlib import Path
from typing import Any

from tlcore.backbones import get_backbone
from tlcore.data.importer import resolve_dataset
from tlcore.errors import InvalidInput, TransitionRefused
from tlcore.queue import leases
from tlcore.queue.executors import execute_here
from tlcore.queue.outcome import CANCELLED_BEFORE_START, INTERRUPTED, conclude
from tlcore.queue.worker import start_worker_process as start_worker_process  # the dashboard's "start a worker"
from tlcore.records import home
from tlcore.records.config import RunSpec, TrainConfig
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import Run, RunStatus, Store

# ------------------------------------------------------------------ submit

_submit_lock = threading.Lock()


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
    return _create_run(store, spec, dataset)


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


def _create_run(store: Store, spec: RunSpec, dataset, worker: str | None = None) -> Run:
    # The default name counts existing runs; a file lock (across processes) and a thread lock
    # (flock is per open file, so threads of one process need their own) keep two
    # simultaneous submits from picking the same number.
    with _submit_lock, _file_lock(home.data_home() / "submit.lock"):
        name = spec.recipe.name or _default_name(store, spec.recipe.backbone, dataset.name)
        return store.create_run(name, spec, status=RunStatus.RUNNING if worker else RunStatus.QUEUED,
                                worker=worker)


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
        NotFound: no such run.
        InvalidInput: the run has already finished.
    """
    store = store or Store()
    run = store.get_run(run_ref)
    if run.status.is_terminal:
        raise InvalidInput(f"Run {run.name} ({run.id}) already finished ({run.status.value}); "
                           "only queued or running runs can be cancelled.")
    store.request_cancel(run.id)
    if run.status is RunStatus.QUEUED:
        # A worker that claimed it meanwhile sees the request and ends it the same way.
        with contextlib.suppress(TransitionRefused):
            store.finish_run(run.id, RunStatus.CANCELLED, error=CANCELLED_BEFORE_START, only_if=RunStatus.QUEUED)
    return store.get_run(run.id)


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


# ------------------------------------------------------------ in the foreground


def run_foreground(config: TrainConfig, store: Store | None = None, *, progress_bar: bool = False,
                   stop: threading.Event | None = None) -> Run:
    """Create a run and train it in this process (the CLI's `train`); returns the finished run.

    `stop` (Ctrl-C in the CLI) stops it between batches; it ends cancelled, its epochs kept.
    """
    store = store or Store()
    spec, dataset = prepare(config, store)
    run = _create_run(store, spec, dataset, worker=leases.worker_id())
    outcome = execute_here(run, store, stop=stop or threading.Event(), stop_reason=INTERRUPTED,
                           progress_bar=progress_bar)
    return conclude(store, run.id, outcome)
