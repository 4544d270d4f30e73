"""The queue on a Ray cluster: `RayExecutor`, the worker's executor that trains each run as a Ray task.

`python -m tlcore worker --cluster ADDRESS` runs the worker loop (`worker.work`) on the host that
owns the data home with this executor (the dispatcher): each claimed run starts as the task
`train_on_node`, with a resource request (one GPU per run when the cluster has GPUs, else CPUs),
as many at once as the cluster fits.

No filesystem is shared, and nothing the size of the dataset travels as one object. A run's task
gets references: the run and dataset records, the manifest (content hashes, labels, splits), a
downloaded backbone weights file and, for a resumed run, its checkpoint. On the node the task
fetches the image files its node lacks by content hash, in shards: from a `BlobServer` actor on
the dispatcher's node, which reads the data home's blob store; through ray:// (the dispatcher is
then outside the cluster) from the dispatcher itself, by way of a `BlobRelay` actor on the head;
or from a store every node reads, `$TLCORE_SHARED_BLOBS`, when a team has one (a folder they
mount, or an fsspec URL such as s3://bucket/blobs). They go into a persistent node-local cache
(`$TLCORE_NODE_CACHE`, default `~/.tlcore-node`) whose blobs, pixel and feature caches later
runs and sweeps reuse. It trains in a private data home over that cache with
`training.execute_run`, reporting through a `RunSink` that pushes log lines, epochs, progress and
each checkpoint to a `RunChannel` actor on the dispatcher's node. With `$TLCORE_NODE_CACHE_GB`
set, each task removes the node cache's least recently used files (`cache_budget.prune`) until it
fits before it fetches, again before a shard would take it over, and when it ends; never one a live
task on that node trains on (each notes its images in the cache's running/ folder while it runs).

The dispatcher prepares each claimed run in a thread (the loop never blocks on it); the loop
renews the lease of every run it holds. It drains the channel into the store (it alone writes the
store); a checkpoint is acknowledged to the node only once it is written on the dispatcher's
disk. When the task returns, the dispatcher writes the run folder's files (model, labels,
predictions, checkpoint, TensorBoard logs) into the run folder here, and the loop concludes the
run from the task's `Outcome`. A cancel is passed back
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
from pathlib import Path
from typing import Any, Callable

from tlcore.backbones import get_backbone, resolve_weights
from tlcore.data import cache_budget
from tlcore.data.manifest import ManifestEntry, load_manifest
from tlcore.errors import InvalidInput, RunCancelled, plain_message
from tlcore.queue.executors import release_models
from tlcore.queue.outcome import CANCELLED_BEFORE_START, WORKER_SHUT_DOWN, Outcome, conclude, error_line
from tlcore.queue.worker import say, worker_status
from tlcore.records import home
from tlcore.records.atomic import write_bytes_atomically, write_json_atomically, write_text_atomically
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Executor, RunProgress
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
class TaskResult:
    """What a task sends back: how the run ended there, and the run folder's files."""

    outcome: Outcome
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
        # The fine-tune's optimizer and early-stopping state, and the head's weights it is chosen against.
        extras = [folder.checkpoint_training_state, folder.checkpoint_head]
        ray.get(self.channel.push.remote(self.run_id, "checkpoint", (
            self.checkpoints_sent, checkpoint.phase, checkpoint.epoch, checkpoint.weights.read_bytes(),
            *(p.read_bytes() if checkpoint.phase == "finetune" and p.is_file() else None for p in extras))))
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


NODE_CACHE_BUDGET = "TLCORE_NODE_CACHE_GB"  # bounds a node cache's image files, pixel and feature caches


def _running_file(run_id: str) -> Path:
    return node_cache_dir() / "running" / f"{run_id}.json"


def register_running(run_id: str, entries: list[ManifestEntry]) -> None:
    """Note in the node cache that this process trains on `entries`: the budget never removes them meanwhile."""
    note = _running_file(run_id)
    note.parent.mkdir(exist_ok=True)
    write_json_atomically(note, {"pid": os.getpid(), "images": [e.sha256 for e in entries]})


def images_needed_on_node(cache: Path) -> set[str]:
    """Content hashes of the images the node's live tasks train on (a task that died no longer counts)."""
    needed: set[str] = set()
    for path in (cache / "running").glob("*.json"):
        try:
            note = json.loads(path.read_text())
            os.kill(note["pid"], 0)
        except ProcessLookupError:
            continue
        except PermissionError:  # alive, run by another user
            pass
        except (OSError, ValueError, KeyError, TypeError):
            continue
        needed.update(note["images"])
    return needed


def _node_cache_items(cache: Path) -> list[cache_budget.Cached]:
    """Everything the node cache's budget may remove: its pixel and feature cache files, its image files."""
    items = cache_budget.cache_files(cache / "cache")
    for blob in (cache / "blobs").glob("*/*.*"):
        try:
            stat = blob.stat()
        except FileNotFoundError:
            continue
        items.append(cache_budget.Cached((blob,), stat.st_size, stat.st_mtime, lambda sha=blob.stem: [sha]))
    return items


def keep_node_cache_in_budget() -> cache_budget.Pruned | None:
    """Remove the node cache's least recently used image files and cache files until it fits
    `$TLCORE_NODE_CACHE_GB`, never one a live task on this node trains on. None without a budget."""
    budget = cache_budget.budget_bytes(NODE_CACHE_BUDGET)
    if budget is None:
        return None
    cache = node_cache_dir()
    return cache_budget.prune(_node_cache_items(cache), budget, lambda: images_needed_on_node(cache))


class NodeCacheRoom:
    """Keeps the node cache in `$TLCORE_NODE_CACHE_GB` while a fetch adds image files to it.

    `make(incoming)` is called before the fetch (0 bytes) and before each shard is written: the first
    call, and any that would take the cache over its budget, look at the cache and remove its least
    recently used files to leave room for the shard (the budget's rule: never a file a live task on
    this node trains on, this run's own images included) and for `SLACK` of the budget more, so a
    long fetch looks at the cache once per tenth of the budget it writes, not once per shard.
    Between looks it counts the bytes written (another task's writes meanwhile show at the next
    look, or when a run ends); once what is left is all in use, it stops looking. A bad budget or a
    failed removal never stops the fetch: `problem` says what went wrong.
    """

    SLACK = 0.1

    def __init__(self):
        self.used: int | None = None  # bytes in the node cache at the last look, plus those written since
        self.removed = self.freed = self.kept_for_runs = 0
        self.all_in_use = False
        self.problem: str | None = None

    def make(self, incoming: int) -> None:
        if self.problem is not None:
            return
        try:
            budget = cache_budget.budget_bytes(NODE_CACHE_BUDGET)
            if budget is None:
                return
            if self.used is None or (self.used + incoming > budget and not self.all_in_use):
                self._look(budget, incoming)
            self.used += incoming
        except Exception as exc:  # noqa: BLE001 - the budget must never cost a run its images
            self.problem = error_line(exc)

    def _look(self, budget: int, incoming: int) -> None:
        cache = node_cache_dir()
        items = _node_cache_items(cache)
        self.used = sum(item.bytes for item in items)
        if self.used + incoming <= budget:
            return
        target = max(0, budget - incoming - int(budget * self.SLACK))
        pruned = cache_budget.prune(items, target, lambda: images_needed_on_node(cache))
        self.used -= pruned.freed
        self.removed, self.freed = self.removed + pruned.removed, self.freed + pruned.freed
        self.kept_for_runs = pruned.kept_for_runs
        self.all_in_use = self.used > target

    def describe(self) -> str | None:
        """A log line for what it did, or None when there is nothing to say."""
        if self.problem is not None:
            return f"Could not keep this node's cache in its budget: {self.problem}"
        if self.removed or self.kept_for_runs:
            return _pruned_line(cache_budget.Pruned(self.removed, self.freed, self.kept_for_runs)) + \
                " to make room for this run's images"
        return None


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


SHARED_BLOBS = "TLCORE_SHARED_BLOBS"  # a store every node reads, in the data home's blobs/ layout: path or URL


def blob_source(server) -> tuple[Callable[[list[str]], dict[str, bytes]], str]:
    """Where this node gets image files: `$TLCORE_SHARED_BLOBS` when a team has a shared store (a folder
    every node mounts, or an fsspec URL such as s3://bucket/blobs), else the dispatcher's `BlobServer`
    actor `server`. Returns (names -> {name: bytes} for a shard, its description).

    Raises:
        InvalidInput: the URL's filesystem package is not installed here, or the store cannot be read.
    """
    shared = os.environ.get(SHARED_BLOBS)
    if shared and "://" in shared:
        return UrlBlobStore(shared).shard, f"the shared store {shared}"
    if shared:
        return BlobServer(shared).shard, f"the shared folder {shared}"
    import ray

    return (lambda names: ray.get(server.shard.remote(names))), "the dispatcher"


def fetch_blobs(entries: list[ManifestEntry], source: Callable[[list[str]], dict[str, bytes]], blobs: Path,
                described_as: str, make_room: Callable[[int], None] = lambda incoming: None) -> Fetched:
    """Copy the image files of `entries` that `blobs` lacks from `source` (see `blob_source`), shard by shard.

    `make_room(bytes)` is called before the fetch (with 0) and before each shard is written (with its
    size): `NodeCacheRoom.make` keeps the node cache in its budget.

    Raises:
        RuntimeError: the source lacks a file, or sent bytes that do not match their content hash.
    """
    names = {e.sha256: e.path.name for e in entries}
    missing = [sha for sha, name in names.items() if not _touch(blobs / sha[:2] / name)]
    total_bytes, shards, remaining = 0, 0, list(missing)
    make_room(0)
    while remaining:
        shard = source([names[sha] for sha in remaining[:SHARD_FILES]])
        if not shard:
            raise RuntimeError(f"{described_as[0].upper() + described_as[1:]} has no file for image {remaining[0]}.")
        make_room(sum(len(data) for data in shard.values()))
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


def _touch(blob: Path) -> bool:
    """Whether `blob` is here; its time becomes now (the node cache's budget removes the oldest first)."""
    try:
        os.utime(blob)
    except FileNotFoundError:
        return False
    return True


def train_on_node(inputs: RunInputs, blob_server, channel) -> TaskResult:
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
        originals: dict[str, str] = {}
        try:
            from tlcore.train import devices, training

            devices.declare_process("ray_task")
            sink = ChannelSink(channel, run.id)
            store, originals = _lay_out_inputs(inputs, blob_server, sink)
            outcome = Outcome.succeeded(training.execute_run(run.id, store, sink=sink))
        except RunCancelled:
            outcome = Outcome.cancelled()
        except Exception as exc:  # noqa: BLE001 - the dispatcher records every way out
            outcome = Outcome.from_exception(exc)
        folder = RunFolder(run.id)
        _restore_paths(folder.predictions, originals)
        files = {str(p.relative_to(folder.path)): p.read_bytes()
                 for p in sorted(folder.path.rglob("*")) if p.is_file()}
        _leave_node_cache_in_budget(channel, run.id)
        # Calls from one caller run in order: once this returns, every event pushed above is in the channel.
        ray.get(channel.flush.remote())
        return TaskResult(outcome, files)
    finally:
        _running_file(run.id).unlink(missing_ok=True)
        if previous_home is None:
            os.environ.pop("TLCORE_HOME", None)
        else:
            os.environ["TLCORE_HOME"] = previous_home
        shutil.rmtree(private, ignore_errors=True)
        release_models()


def _leave_node_cache_in_budget(channel, run_id: str) -> None:
    # The run is trained: whatever the budget does, it is said in the run's log, never a failure.
    _running_file(run_id).unlink(missing_ok=True)  # its images are free to go now, the oldest first
    try:
        pruned = keep_node_cache_in_budget()
    except Exception as exc:  # noqa: BLE001 - a bad budget or a failed removal must not lose the run
        channel.push.remote(run_id, "log", f"Could not keep this node's cache in its budget: {error_line(exc)}")
        return
    if pruned and (pruned.removed or pruned.kept_for_runs):
        channel.push.remote(run_id, "log", _pruned_line(pruned) + ".")


def _pruned_line(pruned: cache_budget.Pruned) -> str:
    return (f"Node cache budget ({NODE_CACHE_BUDGET}): removed {pruned.removed} least recently used file(s) "
            f"({pruned.freed / 1e9:.2f} GB)" + (f"; kept {pruned.kept_for_runs} that runs on this node still need"
                                                if pruned.kept_for_runs else ""))


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
    register_running(run.id, inputs.entries)
    source, described_as = blob_source(blob_server)
    room = NodeCacheRoom()
    fetched = fetch_blobs(inputs.entries, source, blobs, described_as, room.make)
    if pruned := room.describe():
        sink.log(pruned + ".")
    sink.log(fetched.describe())
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


class UrlBlobStore:
    """Image files under an fsspec URL (s3://, gs://, file://, memory://...) in the blobs/ layout, read in
    groups (an object store's filesystem fetches a group's files concurrently)."""

    GROUP = 16  # files asked for at once: a shard overshoots `SHARD_BYTES` by at most one group

    def __init__(self, url: str):
        self.url = url
        unset = f"unset `{SHARED_BLOBS}` to fetch the images from the dispatcher"
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            missing = ("the fsspec package is not installed" if isinstance(exc, ImportError) and exc.name == "fsspec"
                       else str(exc))
            raise InvalidInput(f"This node cannot read the shared store `{SHARED_BLOBS}={url}` ({missing}): "
                               f"install that package on every node, or {unset}.") from None
        try:
            found = self.fs.isdir(self.root)
        except Exception as exc:  # noqa: BLE001 - each filesystem fails its own way (credentials, network...)
            reason = plain_message(exc)[:200]
            raise InvalidInput(f"The shared store `{SHARED_BLOBS}={url}` cannot be reached from this node "
                               f"({reason}): check its address and credentials, or {unset}.") from None
        if not found:
            raise InvalidInput(f"The shared store `{SHARED_BLOBS}={url}` has no folder there: point it at the "
                               f"folder that holds the blobs' two-letter folders, or {unset}.")

    def shard(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of the first of `names` up to about `SHARD_BYTES`; files the store lacks are left out.

        Raises:
            RuntimeError: the store failed to give a file it has (network, permissions).
        """
        names = [name for name in names if _BLOB_NAME.match(name)]
        out, size = {}, 0
        for start in range(0, len(names), self.GROUP):
            if out and size >= SHARD_BYTES:
                break
            paths = [f"{self.root.rstrip('/')}/{name[:2]}/{name}" for name in names[start:start + self.GROUP]]
            for path, data in self.fs.cat(paths, on_error="return").items():
                if isinstance(data, FileNotFoundError):
                    continue
                name = path.rsplit("/", 1)[-1]
                if isinstance(data, BaseException):
                    raise RuntimeError(f"Could not read image {name} from the shared store {self.url}: "
                                       f"{plain_message(data)[:200]}")
                out[name] = data
                size += len(data)
        return out


RELAY_WAIT_S = 300.0  # how long a node waits for the dispatcher to answer a request for image files


class BlobRelay:
    """An actor for a dispatcher connected through ray:// (outside the cluster, so no actor reads its disk):
    it holds the nodes' requests for image files until the dispatcher answers them (`Dispatcher.serve_blobs`),
    one shard at a time. An async actor: a node's waiting request holds no thread."""

    def __init__(self):
        self.asked: list[tuple[int, list[str]]] = []
        self.waiting: dict[int, Any] = {}  # request id -> asyncio future of its shard
        self.last_id = 0

    async def shard(self, names: list[str]) -> dict[str, bytes]:
        import asyncio

        self.last_id += 1
        request = self.last_id
        self.waiting[request] = asyncio.get_running_loop().create_future()
        self.asked.append((request, names))
        try:
            return await asyncio.wait_for(self.waiting[request], RELAY_WAIT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"The dispatcher sent no image files within {RELAY_WAIT_S:.0f} s of asking.") from None
        finally:
            self.waiting.pop(request, None)

    async def requests(self) -> list[tuple[int, list[str]]]:
        asked, self.asked = self.asked, []
        return asked

    async def answer(self, request: int, shard: dict[str, bytes]) -> None:
        future = self.waiting.get(request)
        if future is not None and not future.done():
            future.set_result(shard)


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

    def flush(self) -> None:
        """Nothing: returns once every earlier call of its caller has run."""

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
    if worker_status().cluster is None:
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
    check_reachable(address)
    extra = {}
    if address.startswith("ray://"):
        # Ray puts a driver's working directory on its workers' path, but not a ray:// client's: passed here,
        # nodes with Transfer Lab's checkout in the same place import tlcore either way.
        extra["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join((os.getcwd(), "${PYTHONPATH}"))}}
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False, logging_level="ERROR",
                 **extra)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"Could not join a Ray cluster at {address!r}: {plain_message(exc)[:300]}. Start one "
                           "with `ray start --head` and pass its address (ray://HEAD:10001). "
                           "The queued runs stay queued.") from None


def check_reachable(address: str) -> None:
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
    return [conclude(store, run.id, Outcome.failed(
        f"The dispatcher that sent it to the cluster ({run.worker}) stopped, and its task on the cluster "
        f"ended with it. {_what_is_kept(run.id)}")) for run in store.list_runs({RunStatus.RUNNING})]


def _what_is_kept(run_id: str) -> str:
    checkpoint = RunFolder(run_id).checkpoint()
    if checkpoint is None:
        return "Its epochs are kept; no checkpoint reached this machine, so submit it again."
    return (f"Its epochs and its last checkpoint written here ({checkpoint.phase} epoch {checkpoint.epoch}) are "
            f"kept: `python -m tlcore resume {run_id}` continues it.")


def write_checkpoint(channel, run_id: str,
                     payload: tuple[int, str, int, bytes, bytes | None, bytes | None]) -> None:
    """Write a checkpoint a task sent (weights; in the fine-tune also the optimizer and early-stopping
    state, and the head's weights) into the run folder here, then tell the task it is durable."""
    sequence, phase, epoch, weights, state, head = payload
    folder = RunFolder(run_id).created()
    for path, data in ((folder.checkpoint_training_state, state), (folder.checkpoint_head, head)):
        if data is not None:
            write_bytes_atomically(path, data)
    write_bytes_atomically(folder.checkpoint_weights, weights)
    folder.write_checkpoint_state(phase, epoch)
    channel.acknowledge.remote(run_id, sequence)


class RayExecutor:
    """The worker's executor for a Ray cluster: each claimed run a Ray task, as many at once as the cluster fits.

    A claimed run's inputs are read in a thread (`prepare`), so the worker's loop never waits on them;
    the loop renews the leases of the runs being prepared and trained (a lost task is noticed by
    `ray.wait`, not by its lease). Each `poll` writes what the tasks reported into the store (only
    the dispatcher writes it), records the tasks that returned and starts those whose inputs are ready.
    """

    renews_own_leases = False

    def __init__(self, address: str, *, gpus_per_run: float | None = None, cpus_per_run: float | None = None):
        """Raises `InvalidInput` when nothing answers at `address` (before the worker takes the data home)."""
        check_reachable(address)
        self.address, self.gpus_per_run, self.cpus_per_run = address, gpus_per_run, cpus_per_run
        self.described = {"cluster": address}
        self.flights: dict[Any, _InFlight] = {}  # task ref -> run
        self.preparing: dict[concurrent.futures.Future, Run] = {}  # runs claimed, their inputs being read
        self.shutdown_reason: str | None = None

    def open(self, store: Store, shutdown: threading.Event) -> None:
        """Fail the runs a previous dispatcher left running, join the cluster and check it can train.

        Raises:
            InvalidInput: the cluster cannot be reached or cannot train (before any run is claimed).
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


        self.store = store
        for orphan in fail_orphaned_runs(store):
            say(f"marked {orphan.id} failed: {orphan.error}")
        connect(self.address)
        nodes = alive_nodes()
        self.cpus, self.gpus = plan_resources(nodes, self.gpus_per_run, self.cpus_per_run)
        check_nodes_can_train(nodes)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        # The channel and the blob server live on the dispatcher's node, so losing any other node
        # loses no events, and the blob server reads this data home's files. Through ray:// "here" is
        # the head, not this machine: the nodes' requests for image files then go through a relay
        # actor to this process, which reads them (`serve_blobs`).
        self.channel = ray.remote(num_cpus=0)(RunChannel).options(scheduling_strategy=here).remote()
        self.relayed = ray.util.client.ray.is_connected()
        if self.relayed:
            self.blob_files = BlobServer(str(home.blobs_dir()))
            self.blobs = ray.remote(num_cpus=0)(BlobRelay).options(scheduling_strategy=here).remote()
        else:
            self.blobs = ray.remote(num_cpus=0, max_concurrency=4)(BlobServer).options(
                scheduling_strategy=here).remote(str(home.blobs_dir()))
        self.serving: concurrent.futures.Future | None = None
        self.task = remote_training(self.cpus, self.gpus)
        # Three threads: two read runs' inputs, one answers the nodes' requests for image files through ray://.
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="prepare")
        say(f"dispatching to the Ray cluster at {self.address}: {self.cpus:g} CPU and {self.gpus:g} GPU per run, "
            f"{self.capacity()} runs at once")

    def capacity(self) -> int:
        """Runs the cluster's live nodes hold at once."""
        return sum(n.fits(self.cpus, self.gpus) for n in alive_nodes())

    def room(self) -> int:
        if self.shutdown_reason:
            return 0
        return self.capacity() - len(self.flights) - len(self.preparing)

    def start(self, run: Run) -> None:
        self.preparing[self.prepare_pool.submit(self.prepare, run)] = run

    def held(self) -> list[Run]:
        return [*self.preparing.values(), *(f.run for f in self.flights.values())]

    def stop_run(self, run_id: str) -> None:
        for flight in self.flights.values():
            if flight.run.id == run_id and not flight.cancel_sent:
                self.channel.cancel.remote(run_id)
                flight.cancel_sent = True

    def idle(self) -> bool:
        return not self.flights and not self.preparing

    def poll(self) -> list[tuple[Run, Outcome]]:
        """Events in, returned tasks recorded, prepared runs started; the cluster's view written for the dashboard."""
        import ray

        self.pump()
        ended = []
        if self.flights:
            ready, _ = ray.wait(list(self.flights), num_returns=len(self.flights), timeout=0)
            if ready:
                self.pump()
            ended += [self.finish(ref) for ref in ready]
        ended += self.launch_prepared()
        self.serve_blobs()
        self.write_status()
        return ended

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
                self.store.set_executor(run_id, flight.executor)
                say(f"{run_id} training on {flight.executor.describe()}")

    def serve_blobs(self) -> None:
        """Through ray://, answer the nodes' requests for image files in a thread (one shard in flight at a
        time, so at most one shard is in this process's memory)."""
        if not self.relayed or (self.serving is not None and not self.serving.done()):
            return
        if self.serving is not None and self.serving.exception() is not None:
            say(f"could not send image files to the nodes: {error_line(self.serving.exception())}")
        self.serving = self.prepare_pool.submit(self._answer_requests)

    def _answer_requests(self) -> None:
        import ray

        while asked := ray.get(self.blobs.requests.remote()):
            for request, names in asked:
                ray.get(self.blobs.answer.remote(request, self.blob_files.shard(names)))

    def launch_prepared(self) -> list[tuple[Run, Outcome]]:
        """Start the task of each run whose inputs are ready; a run whose inputs could not be read fails."""

        ended = []
        for future in [f for f in self.preparing if f.done()]:
            run = self.preparing.pop(future)
            try:
                inputs = future.result()
            except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the next one may
                ended.append((run, Outcome.from_exception(exc)))
                continue
            if self.shutdown_reason or self.store.get_run(run.id).cancel_requested:
                ended.append((run, Outcome.cancelled(self.shutdown_reason or CANCELLED_BEFORE_START, started=False)))
                continue
            ref = self.task.remote(inputs, self.blobs, self.channel)
            self.flights[ref] = _InFlight(run)
            say(f"dispatched {run.id} ({run.name})")
        return ended

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
                                                             old.checkpoint_training_state, old.checkpoint_head)
                            if p.is_file()}
            resume_epochs = self.store.epochs(resume_from)
            shipped.append(f"checkpoint {sum(map(len, resume_files.values())) / 1e6:.1f} MB")
        self.store.log(run.id, f"Dispatched to the Ray cluster at {self.address} ({self.cpus:g} CPU, "
                               f"{self.gpus:g} GPU); sent " + ", ".join(shipped) + ".")
        return RunInputs(run, dataset, entries, weights_file, resume_files, resume_epochs, self.cpus, self.gpus)

    def finish(self, ref) -> tuple[Run, Outcome]:
        """A returned (or lost) task: its files into the run folder here, and how it ended."""
        import ray

        flight = self.flights.pop(ref)
        run = flight.run
        try:
            result: TaskResult = ray.get(ref)
        except ray.exceptions.RayError as exc:
            return run, Outcome.failed(self.lost_reason(flight, exc), plain_message(exc)[:2000])
        folder = RunFolder(run.id).created()
        for name, data in result.files.items():
            (folder.path / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(folder.path / name, data)
        outcome = result.outcome
        if outcome.summary is not None:
            outcome = dataclasses.replace(outcome, summary=dataclasses.replace(
                outcome.summary, model_path=str(folder.model), dataset=self.store.get_dataset(run.dataset_id).label))
        if outcome.status is RunStatus.CANCELLED:
            outcome = Outcome.cancelled(self.shutdown_reason)
        return run, outcome

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

    def shut_down(self) -> None:
        """Ask every task to stop between batches; runs still being prepared end cancelled when ready."""
        self.shutdown_reason = WORKER_SHUT_DOWN
        for flight in self.flights.values():
            self.stop_run(flight.run.id)

    def close(self) -> list[tuple[Run, Outcome]]:
        """Cancel the tasks still running and the runs still being prepared; then leave the cluster."""
        import ray

        ended = []
        for ref, flight in list(self.flights.items()):
            ray.cancel(ref, force=True)
            self.flights.pop(ref)
            ended.append((flight.run, Outcome.cancelled(WORKER_SHUT_DOWN)))
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
        ended += [(run, Outcome.cancelled(WORKER_SHUT_DOWN, started=False)) for run in self.preparing.values()]
        self.preparing.clear()
        (home.data_home() / CLUSTER_FILE).unlink(missing_ok=True)
        ray.shutdown()
        return ended
