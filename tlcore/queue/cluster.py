"""The queue on a Ray cluster: a dispatcher that trains each queued run as a Ray task.

`python -m tlcore worker --cluster ADDRESS` runs `serve_forever` on the host that owns the data
home. It claims queued runs and starts each as the task `train_on_node`, with a resource request
(one GPU per run when the cluster has GPUs, else CPUs), as many at once as the cluster fits.

No filesystem is shared, and nothing the size of the dataset travels as one object. A run's task
gets references: the run and dataset records, the manifest (content hashes, labels, splits), a
downloaded backbone weights file and, for a resumed run, its checkpoint. On the node the task
fetches the image files its node lacks by content hash, in shards, from a `BlobServer` actor on
the dispatcher's node (which reads the data home's blob store; or from a folder every node mounts,
`$TLCORE_SHARED_BLOBS`, when a team has one), into a persistent node-local
cache (`$TLCORE_NODE_CACHE`, default `~/.tlcore-node`) whose blobs, pixel and feature caches
later runs and sweeps reuse. It trains in a private data home over that cache with
`training.execute_run`, reporting through a `RunSink` that pushes log lines, epochs, progress and
each checkpoint to a `RunChannel` actor on the dispatcher's node.

The dispatcher prepares each claimed run in a thread (its loop never blocks on it) and renews
the lease of every run it holds. It drains the channel into the store (it alone writes the
store); a checkpoint is acknowledged to the node only once it is written on the dispatcher's
disk. When the task returns, the dispatcher writes the run folder's files (model, labels,
predictions, checkpoint, TensorBoard logs) into the run folder here. A cancel is passed back
through the channel's answer to the next heartbeat, so the run stops between batches; a lost
node or killed task fails the run with the node named, keeping its epochs and the last durable
checkpoint, which `resume` continues from. A dispatcher that starts finds the runs a previous one
left running (their tasks died with it) and fails them saying so.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from tlcore.backbones import get_backbone, resolve_weights
from tlcore.data.manifest import ManifestEntry, load_manifest
from tlcore.errors import InvalidInput, RunCancelled, plain_message
from tlcore.queue import jobs
from tlcore.records import home
from tlcore.records.atomic import write_bytes_atomically, write_json_atomically, write_text_atomically
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Executor, RunProgress, RunSummary
from tlcore.records.store import Dataset, EpochRecord, Run, RunStatus, Store

POLL_S = 0.5
CLUSTER_FILE = "cluster.json"  # the dispatcher's view of the cluster, for the dashboard


# ----------------------------------------------------------- what travels


SHARD_FILES = 256  # image files asked for in one request to the blob server
SHARD_BYTES = 64 * 2**20  # at most this many bytes of them in one answer
CHECKPOINT_ACK_S = 300.0  # how long a node waits for the dispatcher to confirm a checkpoint is on its disk


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """Everything a run needs on a node: references to its images (the manifest), never their bytes."""

    run: Run
    dataset: Dataset
    entries: list[ManifestEntry]
    weights_file: tuple[str, bytes] | None  # (file name, bytes) of downloaded backbone weights
    resume_files: dict[str, bytes]  # checkpoint files of the run this one resumes
    resume_epochs: list[EpochRecord]
    cpus: float
    gpus: float


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What a task sends back: its final status and the run folder's files."""

    status: RunStatus
    summary: dict[str, Any] | None
    error: str | None
    trace: str | None
    files: dict[str, bytes]


# ----------------------------------------------------------- on the node


class ChannelSink:
    """A `RunSink` that reports to the dispatcher's `RunChannel` actor."""

    def __init__(self, channel, run_id: str):
        self.channel, self.run_id = channel, run_id
        self.checkpoints_sent = 0

    def log(self, message: str) -> None:
        self.channel.push.remote(self.run_id, "log", message)

    def log_epoch(self, phase: str, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.channel.push.remote(self.run_id, "epoch", (phase, epoch, step, metrics))

    def heartbeat(self, progress: RunProgress) -> bool:
        import ray

        return ray.get(self.channel.heartbeat.remote(self.run_id, progress.to_dict()))

    def checkpoint_saved(self, folder: RunFolder) -> None:
        """Send the checkpoint and wait until the dispatcher says it is written on its disk.

        Raises:
            RuntimeError: no confirmation within `CHECKPOINT_ACK_S` (the dispatcher is stuck).
        """
        import ray

        checkpoint = folder.checkpoint()
        self.checkpoints_sent += 1
        state = folder.checkpoint_training_state  # optimizer and early stopping (fine-tune only)
        ray.get(self.channel.push.remote(self.run_id, "checkpoint", (
            self.checkpoints_sent, checkpoint.phase, checkpoint.epoch, checkpoint.weights.read_bytes(),
            state.read_bytes() if checkpoint.phase == "finetune" and state.is_file() else None)))
        deadline = time.monotonic() + CHECKPOINT_ACK_S
        while ray.get(self.channel.durable.remote(self.run_id)) < self.checkpoints_sent:
            if time.monotonic() > deadline:
                raise RuntimeError(f"The dispatcher did not confirm the checkpoint of {checkpoint.phase} epoch "
                                   f"{checkpoint.epoch} within {CHECKPOINT_ACK_S:.0f} s.")
            time.sleep(0.1)


def node_cache_dir() -> Path:
    """This node's persistent cache (image files by content, pixel and feature caches, weights)."""
    path = Path(os.environ.get("TLCORE_NODE_CACHE") or "~/.tlcore-node").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Fetched:
    """What a node fetched for a run's manifest."""

    images: int  # files fetched
    total: int  # files the manifest names
    bytes: int
    shards: int
    source: str

    def describe(self) -> str:
        return (f"Fetched {self.images} of {self.total} images ({self.bytes / 1e6:.1f} MB in {self.shards} "
                f"shards) from {self.source}; {self.total - self.images} were already on this node.")


SHARED_BLOBS = "TLCORE_SHARED_BLOBS"  # a folder every node mounts, in the data home's blobs/ layout


def blob_source(server) -> tuple[Callable[[list[str]], dict[str, bytes]], str]:
    """Where this node gets image files: `$TLCORE_SHARED_BLOBS` when a team has a shared folder, else the
    dispatcher's `BlobServer` actor `server`. Returns (names -> {name: bytes} for a shard, its description)."""
    shared = os.environ.get(SHARED_BLOBS)
    if shared:
        return BlobServer(shared).shard, f"the shared folder {shared}"
    import ray

    return (lambda names: ray.get(server.shard.remote(names))), "the dispatcher"


def fetch_blobs(entries: list[ManifestEntry], source: Callable[[list[str]], dict[str, bytes]], blobs: Path,
                described_as: str) -> Fetched:
    """Copy the image files of `entries` that `blobs` lacks from `source` (see `blob_source`), shard by shard.

    Raises:
        RuntimeError: the source lacks a file, or sent bytes that do not match their content hash.
    """
    names = {e.sha256: e.path.name for e in entries}
    missing = [sha for sha, name in names.items() if not (blobs / sha[:2] / name).is_file()]
    total_bytes, shards, remaining = 0, 0, list(missing)
    while remaining:
        shard = source([names[sha] for sha in remaining[:SHARD_FILES]])
        if not shard:
            raise RuntimeError(f"{described_as[0].upper() + described_as[1:]} has no file for image {remaining[0]}.")
        for name, data in shard.items():
            sha = name.split(".")[0]
            if hashlib.sha256(data).hexdigest() != sha:
                raise RuntimeError(f"Image {name} arrived damaged from {described_as} (its content hash does not "
                                   "match).")
            (blobs / sha[:2]).mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(blobs / sha[:2] / name, data, mode=0o444)
            total_bytes += len(data)
        shards += 1
        got = {name.split(".")[0] for name in shard}
        remaining = [sha for sha in remaining if sha not in got]
    return Fetched(len(missing), len(names), total_bytes, shards, described_as)


def train_on_node(inputs: RunInputs, blob_server, channel) -> RunOutcome:
    """The Ray task: train `inputs.run` in a private data home over this node's cache; return its outcome."""
    import ray

    run = inputs.run
    private = Path(tempfile.mkdtemp(prefix="tlcore-ray-"))
    previous_home = os.environ.get("TLCORE_HOME")
    os.environ["TLCORE_HOME"] = str(private)
    try:
        channel.push.remote(run.id, "started", Executor(
            kind="ray", host=socket.gethostname(), node_id=ray.get_runtime_context().get_node_id(),
            gpus=len(ray.get_gpu_ids()), cpus=inputs.cpus, began_at=time.time()).to_dict())
        summary, status, error, trace = None, RunStatus.SUCCEEDED, None, None
        originals: dict[str, str] = {}
        try:
            from tlcore.train import devices, training

            devices.declare_process("ray_task")
            sink = ChannelSink(channel, run.id)
            store, originals = _lay_out_inputs(inputs, blob_server, sink)
            summary = training.execute_run(run.id, store, sink=sink)
        except RunCancelled as exc:
            status, error = RunStatus.CANCELLED, str(exc)
        except Exception as exc:  # noqa: BLE001 - the dispatcher records every way out
            status, error = RunStatus.FAILED, jobs.error_line(exc)
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        folder = RunFolder(run.id)
        _restore_paths(folder.predictions, originals)
        files = {str(p.relative_to(folder.path)): p.read_bytes()
                 for p in sorted(folder.path.rglob("*")) if p.is_file()}
        # Calls from one caller run in order: once this returns, every event above is in the channel.
        ray.get(channel.push.remote(run.id, "returning", None))
        return RunOutcome(status, summary.to_dict() if summary else None, error, trace, files)
    finally:
        if previous_home is None:
            os.environ.pop("TLCORE_HOME", None)
        else:
            os.environ["TLCORE_HOME"] = previous_home
        shutil.rmtree(private, ignore_errors=True)
        jobs.release_models()


def remote_training(cpus: float, gpus: float):
    """`train_on_node` as a Ray task asking for `cpus` CPUs and `gpus` GPUs, never retried
    (a retry would train from scratch; `resume` continues from the last checkpoint instead)."""
    import ray

    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(train_on_node)


def _lay_out_inputs(inputs: RunInputs, blob_server, sink: ChannelSink) -> tuple[Store, dict[str, str]]:
    """The run's data home: store rows, the manifest over this node's blobs (fetching those it lacks),
    weights; its blobs, caches and weights folders are the node cache's, kept after the run.

    Returns the store and {path on this node: path on the dispatcher} for each image.
    """
    from tlcore.data.manifest import write_manifest

    run, dataset = inputs.run, inputs.dataset
    shared = node_cache_dir()
    for folder in ("blobs", "cache", "weights"):
        (shared / folder).mkdir(exist_ok=True)
        (home.data_home() / folder).symlink_to(shared / folder, target_is_directory=True)
    store = Store()
    store.add_dataset(dataset.name, dataset.source, dataset.classes, dataset.counts, dataset.report,
                      dataset_id=dataset.id)
    store.create_run(run.name, run.spec, status=RunStatus.RUNNING, run_id=run.id)
    blobs = home.blobs_dir()
    source, described_as = blob_source(blob_server)
    sink.log(fetch_blobs(inputs.entries, source, blobs, described_as).describe())
    here = [dataclasses.replace(e, path=blobs / e.sha256[:2] / e.path.name) for e in inputs.entries]
    write_manifest(dataset.id, here)
    if inputs.weights_file is not None:
        name, data = inputs.weights_file
        write_bytes_atomically(home.weights_dir() / name, data)
    resume_from = run.spec.resume_from
    if resume_from:
        folder = RunFolder(resume_from).created()
        for name, data in inputs.resume_files.items():
            write_bytes_atomically(folder.path / name, data)
        for e in inputs.resume_epochs:
            store.log_epoch(resume_from, e.phase, e.epoch, e.step, e.metrics)
    return store, {str(mine.path): str(theirs.path) for mine, theirs in zip(here, inputs.entries)}


def _restore_paths(predictions: Path, originals: dict[str, str]) -> None:
    # Predictions name each image by its path; the dispatcher's readers need the paths of its data home.
    if not predictions.is_file() or not originals:
        return
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = originals.get(row.get("path"), row.get("path"))
    write_text_atomically(predictions, "".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------ blob server

_BLOB_NAME = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9]{1,8}$")


class BlobServer:
    """An actor on the dispatcher's node that hands out image files of the data home's blob store."""

    def __init__(self, blobs: str):
        self.blobs = Path(blobs)

    def shard(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of the first of `names` that fit in `SHARD_BYTES` (at least one); unknown names are left out."""
        out, size = {}, 0
        for name in names:
            if not _BLOB_NAME.match(name):
                continue
            path = self.blobs / name[:2] / name
            if not path.is_file():
                continue
            if out and size + path.stat().st_size > SHARD_BYTES:
                break
            out[name] = path.read_bytes()
            size += len(out[name])
        return out


# ------------------------------------------------------------ the channel


class RunChannel:
    """Events from running tasks, held until the dispatcher drains them; cancel requests back.

    A plain (non-async) actor runs its calls one at a time in the order each caller sent them,
    so a run's log lines, epochs and checkpoints arrive in order.
    """

    def __init__(self):
        self.events: list[tuple[str, str, Any]] = []
        self.cancelled: set[str] = set()
        self.written: dict[str, int] = {}  # run id -> checkpoints written on the dispatcher's disk

    def push(self, run_id: str, kind: str, payload: Any) -> None:
        self.events.append((run_id, kind, payload))

    def heartbeat(self, run_id: str, progress: dict[str, Any]) -> bool:
        self.events.append((run_id, "progress", progress))
        return run_id in self.cancelled

    def cancel(self, run_id: str) -> None:
        self.cancelled.add(run_id)

    def acknowledge(self, run_id: str, sequence: int) -> None:
        """The dispatcher wrote checkpoint `sequence` of `run_id` on its disk."""
        self.written[run_id] = max(sequence, self.written.get(run_id, 0))

    def durable(self, run_id: str) -> int:
        """How many of `run_id`'s checkpoints are written on the dispatcher's disk."""
        return self.written.get(run_id, 0)

    def drain(self) -> list[tuple[str, str, Any]]:
        events, self.events = self.events, []
        return events


# ------------------------------------------------------------ the dispatcher


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    host: str
    cpus: float
    gpus: float

    def fits(self, cpus: float, gpus: float) -> int:
        """How many runs asking for `cpus` CPUs and `gpus` GPUs this node holds at once."""
        counts = [math.floor(have / need + 1e-9) for have, need in ((self.cpus, cpus), (self.gpus, gpus)) if need > 0]
        return min(counts) if counts else 0


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    """The dispatcher's view of its cluster, as the dashboard shows it."""

    address: str
    nodes: list[Node]
    cpus_per_run: float
    gpus_per_run: float
    running: dict[str, str]  # run id -> node id
    updated_at: float

    @property
    def fits(self) -> int:
        """Runs the cluster trains at once."""
        return sum(node.fits(self.cpus_per_run, self.gpus_per_run) for node in self.nodes)

    @property
    def free(self) -> int:
        return max(0, self.fits - len(self.running))

    def runs_on(self, node_id: str) -> list[str]:
        return [run_id for run_id, node in self.running.items() if node == node_id]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClusterStatus":
        return cls(**{**data, "nodes": [Node(**n) for n in data["nodes"]]})


def cluster_status() -> ClusterStatus | None:
    """The cluster the live dispatcher of this data home serves, or None (no cluster worker)."""
    if jobs.worker_status().cluster is None:
        return None
    try:
        return ClusterStatus.from_dict(json.loads((home.data_home() / CLUSTER_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (`ray://host:10001`, `host:6379`, `auto` or `local`).

    Raises:
        InvalidInput: nothing answers at that address.
    """
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"Could not join a Ray cluster at {address!r}: {plain_message(exc)[:300]}. Start one "
                           "with `ray start --head` and pass its address (ray://HEAD:10001). "
                           "The queued runs stay queued.") from None


def _check_reachable(address: str) -> None:
    # ray.init waits minutes for an address where nothing listens; a plain TCP connect says so at once.
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"`--cluster` must be a Ray address such as ray://HEAD:10001, HEAD:6379, auto or "
                           f"local. Received: cluster={address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise InvalidInput(f"No Ray cluster answers at {address} ({exc.strerror or exc}). Start one with "
                           "`ray start --head` on the head machine (and `ray start --address HEAD:6379` on the "
                           "others), then pass ray://HEAD:10001. The queued runs stay queued.") from None


def alive_nodes() -> list[Node]:
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerHostname") or n.get("NodeManagerAddress", "?"),
                 float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def plan_resources(nodes: list[Node], gpus_per_run: float | None, cpus_per_run: float | None) -> tuple[float, float]:
    """(cpus, gpus) each run asks for: one GPU when the cluster has GPUs, else one CPU, unless given.

    Raises:
        InvalidInput: a negative request, GPUs asked of a cluster without any, or a request no
            node can hold.
    """
    has_gpus = any(n.gpus > 0 for n in nodes)
    gpus = (1.0 if has_gpus else 0.0) if gpus_per_run is None else float(gpus_per_run)
    cpus = 1.0 if cpus_per_run is None else float(cpus_per_run)
    if gpus < 0 or cpus < 0 or gpus + cpus == 0:
        raise InvalidInput(f"`--gpus-per-run` and `--cpus-per-run` must be 0 or more, not both 0. "
                           f"Received: gpus_per_run={gpus:g}, cpus_per_run={cpus:g}")
    if gpus > 0 and not has_gpus:
        raise InvalidInput(f"Each run asks for {gpus:g} GPU but the cluster's {len(nodes)} node(s) have no GPU "
                           f"({sum(n.cpus for n in nodes):g} CPUs). Pass --gpus-per-run 0 to train on CPUs, or "
                           "add a GPU node. The queued runs stay queued.")
    if not any(n.fits(cpus, gpus) for n in nodes):
        raise InvalidInput(f"No node of the cluster has {cpus:g} CPUs and {gpus:g} GPUs free for one run (nodes: "
                           + ", ".join(f"{n.host} {n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
                           + "). Ask for less with --cpus-per-run / --gpus-per-run. The queued runs stay queued.")
    return cpus, gpus


def check_nodes_can_train(nodes: list[Node]) -> None:
    """Every node can import Transfer Lab and TensorFlow.

    Raises:
        InvalidInput: the nodes that cannot, and what to install there.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_import_probe())
    refs = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
            for node in nodes}
    lacking = {node: ray.get(ref, timeout=300) for node, ref in refs.items()}
    lacking = {node: missing for node, missing in lacking.items() if missing}
    if lacking:
        raise InvalidInput(
            "Some cluster nodes cannot train: " + "; ".join(
                f"node {node.node_id[:8]} ({node.host}) cannot import {', '.join(missing)}"
                for node, missing in lacking.items())
            + ". Install Transfer Lab there (`pip install -r requirements-cluster.txt` and the tlcore package on "
              "PYTHONPATH) and restart its `ray start`. The queued runs stay queued.")


def _import_probe():
    # Defined inside a function so Ray ships it by value: it runs on a node without tlcore.
    def missing_modules() -> list[str]:
        import importlib.util

        return [name for name in ("tlcore", "tensorflow", "keras") if importlib.util.find_spec(name) is None]

    return missing_modules


@dataclasses.dataclass
class _InFlight:
    run: Run
    executor: Executor | None = None
    cancel_sent: bool = False


def fail_orphaned_runs(store: Store) -> list[Run]:
    """Fail the runs a previous dispatcher of this data home left running: their tasks ended with it.

    Called while holding the data home's worker lock, so no live worker owns them. Each keeps its
    epochs and the last checkpoint written here, and its error says whether `resume` can continue it.
    """
    failed = []
    for run in store.list_runs({RunStatus.RUNNING}):
        reason = (f"The dispatcher that sent it to the cluster ({run.worker}) stopped, and its task on the "
                  f"cluster ended with it. {_what_is_kept(run.id)}")
        store.log(run.id, f"Run failed: {reason}")
        failed.append(jobs.record_end(store, run.id, RunStatus.FAILED, error=reason))
    return failed


def _what_is_kept(run_id: str) -> str:
    checkpoint = RunFolder(run_id).checkpoint()
    if checkpoint is None:
        return "Its epochs are kept; no checkpoint reached this machine, so submit it again."
    return (f"Its epochs and its last checkpoint written here ({checkpoint.phase} epoch {checkpoint.epoch}) are "
            f"kept: `python -m tlcore resume {run_id}` continues it.")


def write_checkpoint(channel, run_id: str, payload: tuple[int, str, int, bytes, bytes | None]) -> None:
    """Write a checkpoint a task sent (weights, and the fine-tune's optimizer and early-stopping state)
    into the run folder here, then tell the task it is durable."""
    sequence, phase, epoch, weights, state = payload
    folder = RunFolder(run_id).created()
    if state is not None:
        write_bytes_atomically(folder.checkpoint_training_state, state)
    write_bytes_atomically(folder.checkpoint_weights, weights)
    folder.write_checkpoint_state(phase, epoch)
    channel.acknowledge.remote(run_id, sequence)


class Dispatcher:
    """Claims queued runs and trains them as Ray tasks, as many at once as the cluster fits."""

    def __init__(self, address: str, store: Store, *, gpus_per_run: float | None = None,
                 cpus_per_run: float | None = None, lease_s: float = jobs.LEASE_S):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.address, self.store, self.lease_s = address, store, lease_s
        connect(address)
        nodes = alive_nodes()
        self.cpus, self.gpus = plan_resources(nodes, gpus_per_run, cpus_per_run)
        check_nodes_can_train(nodes)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # The channel and the blob server live on the dispatcher's node, so losing any other node
        # loses no events, and the blob server reads this data home's files.
        self.channel = ray.remote(num_cpus=0)(RunChannel).options(scheduling_strategy=here).remote()
        self.blobs = ray.remote(num_cpus=0, max_concurrency=4)(BlobServer).options(
            scheduling_strategy=here).remote(str(home.blobs_dir()))
        self.task = remote_training(self.cpus, self.gpus)
        self.me = jobs.worker_id()
        self.flights: dict[Any, _InFlight] = {}  # task ref -> run
        self.preparing: dict[concurrent.futures.Future, Run] = {}  # runs claimed, their inputs being read
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="prepare")
        self.beaten_at = 0.0
        self.finished: list[Run] = []
        self.shutdown_reason: str | None = None

    # one turn of the loop: leases renewed, events in, cancels out, finished tasks recorded, free slots filled

    def turn(self) -> None:
        import ray

        self.keep_leases()
        for dead in jobs.reap(self.store, self.lease_s):
            jobs.say(f"marked {dead.id} failed: {dead.error}")
        self.pump()
        self.pass_cancels()
        if self.flights:
            ready, _ = ray.wait(list(self.flights), num_returns=len(self.flights), timeout=0)
            if ready:
                self.pump()
            for ref in ready:
                self.finish(ref)
        self.launch_prepared()
        self.fill()
        self.write_status()

    def capacity(self) -> int:
        """Runs the cluster's live nodes hold at once."""
        return sum(n.fits(self.cpus, self.gpus) for n in alive_nodes())

    def idle(self) -> bool:
        return not self.flights and not self.preparing and not self.store.queue()

    def keep_leases(self) -> None:
        """Renew the lease of every run this dispatcher holds: being prepared or training (alive as far as
        Ray knows; a lost task is noticed by `ray.wait`, not by its lease)."""
        now = time.monotonic()
        if now - self.beaten_at < jobs.HEARTBEAT_S:
            return
        for run in [*self.preparing.values(), *(f.run for f in self.flights.values())]:
            self.store.heartbeat(run.id)
        self.beaten_at = now

    def pump(self) -> None:
        """Write what running tasks reported (log lines, epochs, progress, checkpoints) into the store."""
        import ray

        by_run = {f.run.id: f for f in self.flights.values()}
        for run_id, kind, payload in ray.get(self.channel.drain.remote()):
            flight = by_run.get(run_id)
            if kind == "log":
                self.store.log(run_id, payload)
            elif kind == "epoch":
                self.store.log_epoch(run_id, *payload)
            elif kind == "progress" and flight is not None:
                self.store.heartbeat(run_id, RunProgress.from_dict(payload))
            elif kind == "checkpoint":
                write_checkpoint(self.channel, run_id, payload)
            elif kind == "started" and flight is not None:
                flight.executor = Executor.from_dict(payload)
                self.store.update_run(run_id, executor=flight.executor)
                jobs.say(f"{run_id} training on {flight.executor.describe()}")

    def pass_cancels(self) -> None:
        for flight in self.flights.values():
            run = self.store.get_run(flight.run.id)
            if (run.cancel_requested or self.shutdown_reason) and not flight.cancel_sent:
                self.channel.cancel.remote(run.id)
                flight.cancel_sent = True

    def fill(self) -> None:
        """Claim queued runs while the cluster has room for more; their inputs are read in a thread."""
        if self.shutdown_reason:
            return
        while len(self.flights) + len(self.preparing) < self.capacity():
            run = self.store.claim_next(self.me)
            if run is None:
                break
            self.preparing[self.prepare_pool.submit(self.prepare, run)] = run

    def launch_prepared(self) -> None:
        """Start the task of each run whose inputs are ready; a run whose inputs could not be read fails."""
        for future in [f for f in self.preparing if f.done()]:
            run = self.preparing.pop(future)
            try:
                inputs = future.result()
            except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the next one may
                self.store.log(run.id, "Run failed:\n" + "".join(traceback.format_exception(exc)))
                self.finished.append(jobs.record_end(self.store, run.id, RunStatus.FAILED,
                                                     error=jobs.error_line(exc)))
                continue
            if self.shutdown_reason or self.store.get_run(run.id).cancel_requested:
                reason = self.shutdown_reason or "Cancelled before it started."
                self.finished.append(jobs.record_end(self.store, run.id, RunStatus.CANCELLED, error=reason))
                continue
            ref = self.task.remote(inputs, self.blobs, self.channel)
            self.flights[ref] = _InFlight(run)
            jobs.say(f"dispatched {run.id} ({run.name})")

    def prepare(self, run: Run) -> RunInputs:
        """What `run` needs on a node: the manifest (references to its images, never their bytes), the
        weights file and, for a resumed run, its checkpoint."""
        config = run.spec.recipe
        dataset = self.store.get_dataset(run.dataset_id)
        entries = load_manifest(dataset.id)
        spec = get_backbone(config.backbone)
        shipped = [f"the manifest of {len(entries)} images (the nodes fetch the files they lack)"]
        weights_file = None
        if config.weights == "imagenet" and spec.weights_package is None:
            path = Path(resolve_weights(spec, config.weights))
            weights_file = (path.name, path.read_bytes())
            shipped.append(f"weights {len(weights_file[1]) / 1e6:.1f} MB")
        resume_files, resume_epochs = {}, []
        resume_from = run.spec.resume_from
        if resume_from:
            old = RunFolder(resume_from)
            resume_files = {p.name: p.read_bytes() for p in (old.checkpoint_weights, old.checkpoint_state,
                                                             old.checkpoint_training_state) if p.is_file()}
            resume_epochs = self.store.epochs(resume_from)
            shipped.append(f"checkpoint {sum(map(len, resume_files.values())) / 1e6:.1f} MB")
        self.store.log(run.id, f"Dispatched to the Ray cluster at {self.address} ({self.cpus:g} CPU, "
                               f"{self.gpus:g} GPU); sent " + ", ".join(shipped) + ".")
        return RunInputs(run, dataset, entries, weights_file, resume_files, resume_epochs, self.cpus, self.gpus)

    def finish(self, ref) -> None:
        """Record a returned (or lost) task: its files into the run folder, its final status."""
        import ray

        flight = self.flights.pop(ref)
        run = flight.run
        try:
            outcome: RunOutcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            reason = self.lost_reason(flight, exc)
            self.store.log(run.id, f"Run failed: {reason}\n{plain_message(exc)[:2000]}")
            done = jobs.record_end(self.store, run.id, RunStatus.FAILED, error=reason)
        else:
            folder = RunFolder(run.id).created()
            for name, data in outcome.files.items():
                (folder.path / name).parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomically(folder.path / name, data)
            summary = None
            if outcome.summary is not None:
                summary = dataclasses.replace(RunSummary.from_dict(outcome.summary), model_path=str(folder.model),
                                              dataset=self.store.get_dataset(run.dataset_id).label)
            error = outcome.error
            if outcome.status is RunStatus.CANCELLED:
                if self.shutdown_reason and not self.store.get_run(run.id).cancel_requested:
                    error = self.shutdown_reason
                self.store.log(run.id, f"Run cancelled: {error}")
            elif outcome.trace:
                self.store.log(run.id, "Run failed:\n" + outcome.trace)
            done = jobs.record_end(self.store, run.id, outcome.status, error=error, summary=summary)
        self.finished.append(done)
        jobs.say(f"{done.id} {done.status.value}" + (f": {done.error}" if done.error else ""))
        jobs.keep_caches_in_budget(self.store)

    def lost_reason(self, flight: _InFlight, exc: BaseException) -> str:
        import ray

        ex = flight.executor
        where = f"Ray node {ex.node_id[:8]} ({ex.host})" if ex and ex.node_id else "Its Ray node"
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, ModuleNotFoundError):
            return (f"{where} cannot import {exc.cause.name}: install Transfer Lab there "
                    "(`pip install -r requirements-cluster.txt`). Relaunch the run once it can.")
        what = {
            "NodeDiedError": "the node was lost",
            "WorkerCrashedError": "the process training it died (killed, or its node went away)",
            "TaskCancelledError": "the task was cancelled on the cluster",
            "OutOfMemoryError": "the node ran out of memory",
        }.get(type(exc).__name__, "the task failed")
        return f"{where} stopped training it: {what} ({type(exc).__name__}). {_what_is_kept(flight.run.id)}"

    def write_status(self) -> None:
        status = ClusterStatus(
            address=self.address, nodes=alive_nodes(), cpus_per_run=self.cpus, gpus_per_run=self.gpus,
            running={f.run.id: f.executor.node_id if f.executor else "" for f in self.flights.values()},
            updated_at=time.time())
        write_json_atomically(home.data_home() / CLUSTER_FILE, status.to_dict())

    def stop(self, reason: str, wait_s: float = 60.0) -> None:
        """Cancel every running task (they stop between batches) and record them; then leave the cluster."""
        import ray

        self.shutdown_reason = reason
        deadline = time.monotonic() + wait_s
        while (self.flights or self.preparing) and time.monotonic() < deadline:
            self.turn()
            time.sleep(POLL_S)
        for ref, flight in list(self.flights.items()):
            ray.cancel(ref, force=True)
            self.flights.pop(ref)
            self.finished.append(jobs.record_end(self.store, flight.run.id, RunStatus.CANCELLED, error=reason))
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
        for run in self.preparing.values():
            self.finished.append(jobs.record_end(self.store, run.id, RunStatus.CANCELLED, error=reason))
        (home.data_home() / CLUSTER_FILE).unlink(missing_ok=True)
        ray.shutdown()


def worker_loop(address: str, store: Store | None = None, *, once: bool = False, poll_s: float = POLL_S,
                gpus_per_run: float | None = None, cpus_per_run: float | None = None,
                lease_s: float = jobs.LEASE_S, shutdown: threading.Event | None = None) -> list[Run]:
    """Dispatch queued runs to the Ray cluster at `address` until `shutdown` is set.

    With `once` it returns when the queue is empty and every dispatched run has finished.
    Returns the runs it finished.

    Raises:
        InvalidInput: the cluster cannot be reached or cannot train (before any run is claimed).
        WorkerBusy: another worker already serves this data home.
    """
    store = store or Store()
    shutdown = shutdown or threading.Event()
    with jobs.serving_data_home(store, cluster=address):
        for orphan in fail_orphaned_runs(store):
            jobs.say(f"marked {orphan.id} failed: {orphan.error}")
        dispatcher = Dispatcher(address, store, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
                                lease_s=lease_s)
        jobs.say(f"dispatching to the Ray cluster at {address}: {dispatcher.cpus:g} CPU and "
                 f"{dispatcher.gpus:g} GPU per run, {dispatcher.capacity()} runs at once")
        try:
            while not shutdown.is_set():
                dispatcher.turn()
                if once and dispatcher.idle():
                    break
                shutdown.wait(poll_s)
        finally:
            dispatcher.stop("The worker was shut down; epochs logged so far are kept. Resume the run if it saved "
                            "a checkpoint, or submit it again.")
    return dispatcher.finished


def serve_forever(address: str, *, once: bool = False, gpus_per_run: float | None = None,
                  cpus_per_run: float | None = None) -> list[Run]:
    """`python -m tlcore worker --cluster ADDRESS`: SIGTERM/SIGINT stop it after cancelling its runs."""
    _check_reachable(address)
    return jobs.until_signalled(lambda shutdown: worker_loop(
        address, once=once, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, shutdown=shutdown))
