"""The queue on a real two-node Ray cluster (never mocked): concurrency, streaming, artifacts, parity,
images fetched by content into the node cache, durable checkpoints, cancel, a killed node, resume,
a restarted dispatcher, and the plain sentences for a cluster that cannot be used.

One cluster (`ray.cluster_utils.Cluster`, two nodes of 1 CPU), a Ray client server on it and one
dispatcher process joined through it (`python -m tlcore worker --cluster ray://127.0.0.1:PORT`, as
the README says) serve every test of this module, in one data home:
each Ray worker imports TensorFlow once, and a new dispatcher would mean new workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.test_jobs import ROOT, make_image_folder, tiny, wait_for, worker_env
from tlcore.queue import cluster as tlcluster
from tlcore.queue import jobs, leases
from tlcore.records.config import RunSpec
from tlcore.records.run_folder import RunFolder
from tlcore.records.run_record import Executor
from tlcore.records.store import RunStatus, Store

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes of one CPU each on this machine, stopped after the module."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        # The nodes' workers import tlcore only from the dispatcher's working directory (Ray puts a
        # driver's working directory on its workers' path), so a dispatcher started elsewhere meets
        # nodes without the package.
        env.delenv("PYTHONPATH", raising=False)
        env.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        # Both nodes run on this machine, so they share one node cache (as two nodes of one host would).
        env.setenv("TLCORE_NODE_CACHE", str(Path(temp) / "node-cache"))
        started = time.monotonic()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(f"[cluster] two nodes up in {time.monotonic() - started:.1f} s")
        try:
            yield cluster, worker_node, temp
        finally:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster_home")


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client_address(ray_cluster):
    """A Ray client server on the cluster: the dispatcher joins it as the README says, through ray://."""
    cluster, _, temp = ray_cluster
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    log = open(Path(temp) / "client-server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", f"--address={cluster.address}",
                             "--host=127.0.0.1", f"--port={port}", "--mode=specific-server"],
                            cwd=ROOT, env={**os.environ, "RAY_TMPDIR": temp}, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert proc.poll() is None, (Path(temp) / "client-server.log").read_text()[-3000:]
            return _listening(port)

        wait_for(up, 120, "the Ray client server")
        print(f"[cluster] Ray client server up in {time.monotonic() - started:.1f} s")
        yield f"ray://127.0.0.1:{port}"
    finally:
        stop_process(proc, 30)
        log.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def dispatcher(ray_cluster, client_address, shared_home):
    """`python -m tlcore worker --cluster ray://...` on the shared data home, for the whole module."""
    _, _, temp = ray_cluster
    log = open(shared_home / "dispatcher.log", "ab")
    env = {**worker_env(shared_home), "RAY_TMPDIR": temp}
    proc = subprocess.Popen([sys.executable, "-m", "tlcore", "worker", "--cluster", client_address],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc, 120)
        log.close()
        print((shared_home / "dispatcher.log").read_text()[-3000:])


@pytest.fixture
def home(shared_home, monkeypatch, dispatcher):
    """This test in the dispatcher's data home."""
    monkeypatch.setenv("TLCORE_HOME", str(shared_home))
    return shared_home


@pytest.fixture(scope="module")
def colours(shared_home):
    from tlcore.data.importer import import_dataset

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TLCORE_HOME", str(shared_home))
        return import_dataset(make_image_folder(shared_home.parent / "colours", per_class=6),
                              name="colours", store=Store()).dataset


def short(dataset_id: str, seed: int = 0, finetune_epochs: int = 2):
    """ImageNet Lite0 at 32 px: two head epochs on features, then fine-tune epochs (checkpointed)."""
    return tiny(dataset_id, weights="imagenet", seed=seed, head_epochs=2, finetune_epochs=finetune_epochs,
                finetune_layers=3, early_stopping_patience=100)


def watch(store: Store, run_ids: list[str], timeout: float) -> dict[str, bool]:
    """Wait for the runs to finish; for each, whether epochs showed up in the store while it ran."""
    seen_live = {run_id: False for run_id in run_ids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [store.get_run(run_id) for run_id in run_ids]
        for run in runs:
            if run.status is RunStatus.RUNNING and store.epochs(run.id):
                seen_live[run.id] = True
        if all(run.status.is_terminal for run in runs):
            return seen_live
        time.sleep(0.2)
    raise AssertionError(f"runs {run_ids} did not finish in {timeout} s: "
                         f"{[store.get_run(r).status.value for r in run_ids]}")


def predictions(run_id: str) -> list[dict]:
    return [json.loads(line) for line in RunFolder(run_id).predictions.read_text().splitlines()]


def test_a_cluster_that_cannot_train_is_one_sentence_and_the_queue_stays(ray_cluster, tmp_path):
    cluster, _, temp = ray_cluster
    home = tmp_path / "other_home"
    env = {**worker_env(home), "RAY_TMPDIR": temp}
    subprocess.run([sys.executable, "-m", "tlcore", "datasets", "import", str(make_image_folder(tmp_path / "c")),
                    "--name", "c"], env=env, cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "tlcore", "submit", "--data", "c", "--weights", "none"],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    for argv, cwd, message in (
            (["--cluster", "127.0.0.1:9"], ROOT, "No Ray cluster answers at 127.0.0.1:9"),
            (["--cluster", cluster.address, "--gpus-per-run", "1"], ROOT, "the cluster's 2 node(s) have no GPU"),
            (["--cluster", cluster.address, "--cpus-per-run", "4"], ROOT, "No node of the cluster has 4 CPUs"),
            # Started outside the checkout, the dispatcher meets nodes that cannot import tlcore.
            (["--cluster", cluster.address], tmp_path, "cannot import tlcore")):
        out = subprocess.run([sys.executable, "-m", "tlcore", "worker", *argv, "--once"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in out.stderr
    store = Store(home / "store.db")
    assert [r.status for r in store.list_runs()] == [RunStatus.QUEUED]


def test_two_runs_train_at_once_on_two_nodes_and_match_a_local_run(home, colours):
    store = Store()
    first = jobs.submit(short(colours.id, seed=0), store)
    second = jobs.submit(short(colours.id, seed=1), store)
    started = time.monotonic()
    seen_live = watch(store, [first.id, second.id], timeout=600)
    print(f"[cluster] two concurrent runs done in {time.monotonic() - started:.1f} s")
    first, second = store.get_run(first.id), store.get_run(second.id)
    assert first.status is second.status is RunStatus.SUCCEEDED, (first.error, second.error)
    assert seen_live == {first.id: True, second.id: True}  # epochs streamed in while they trained
    assert first.executor.kind == second.executor.kind == "ray"
    assert first.executor.node_id != second.executor.node_id  # one per node...
    assert max(first.executor.began_at, second.executor.began_at) < min(first.finished_at, second.finished_at)
    assert [e.step for e in store.epochs(first.id)] == [1, 2, 3, 4]
    for run in (first, second):
        folder = RunFolder(run.id)
        assert folder.has_model() and folder.labels() == ["blue", "red"] and folder.checkpoint().epoch == 2
        assert any(folder.tensorboard("finetune").rglob("*tfevents*"))
        assert run.summary.model_path == str(folder.model) and run.summary.dataset == "colours v1"
        assert all(Path(row["path"]).is_file() for row in predictions(run.id))  # paths on this host
    for run in (first, second):  # references crossed the cluster; each node fetched the files it lacked
        fetched = [line.message for line in store.logs(run.id) if line.message.startswith("Fetched ")]
        assert len(fetched) == 1 and re.match(r"Fetched \d+ of 12 images .* from the dispatcher", fetched[0]), fetched
        # through ray://, so the files came from the dispatcher's disk by way of the relay actor
        assert any(re.search(r"Dispatched to the Ray cluster at ray://127\.0\.0\.1:\d+ .*sent the manifest of 12 "
                             "images", line.message) for line in store.logs(run.id))
    shown = subprocess.run([sys.executable, "-m", "tlcore", "runs", "show", first.id], env=worker_env(home),
                           cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert f"ran on: ray on node {first.executor.node_id[:8]}" in shown
    assert any("Process device policy: ray_task" in line.message for line in store.logs(first.id))

    # The same recipe and seed trained here by the local worker predicts the same.
    local = jobs.run_foreground(short(colours.id, seed=0), store)
    assert local.status is RunStatus.SUCCEEDED and local.executor.kind == "local", local.error
    for remote_row, local_row in zip(predictions(first.id), predictions(local.id), strict=True):
        assert remote_row["pred"] == local_row["pred"] and remote_row["path"] == local_row["path"]
        assert remote_row["confidence"] == pytest.approx(local_row["confidence"], abs=1e-4)


def node_blobs(ray_cluster) -> Path:
    return Path(ray_cluster[2]) / "node-cache" / "blobs"


def test_a_node_fetches_only_the_images_it_lacks_and_reuses_its_pixel_and_feature_caches(home, colours,
                                                                                        ray_cluster):
    store = Store()
    cached = sorted(node_blobs(ray_cluster).rglob("*.*"))
    assert len(cached) == 12  # the earlier runs fetched the dataset once into the node cache
    for blob in cached[:5]:
        blob.unlink()
    run = jobs.submit(short(colours.id, seed=4, finetune_epochs=0), store)
    watch(store, [run.id], timeout=300)
    run = store.get_run(run.id)
    assert run.status is RunStatus.SUCCEEDED, run.error
    log = [line.message for line in store.logs(run.id)]
    assert any(m.startswith("Fetched 5 of 12 images") and "7 were already on this node" in m for m in log), log
    assert any(m.startswith("Pixel cache: 12 of 12 images") for m in log), log  # decoded by earlier runs
    assert run.summary.timings.features_reused  # and their features too
    assert len(list(node_blobs(ray_cluster).rglob("*.*"))) == 12


def test_a_checkpoint_is_acknowledged_only_once_written_on_the_dispatchers_disk(ray_cluster, tmp_path,
                                                                              monkeypatch):
    import ray

    node_home, dispatcher_home = tmp_path / "node", tmp_path / "dispatcher"
    ray.init(address=ray_cluster[0].address, log_to_driver=False, logging_level="ERROR")
    try:
        channel = ray.remote(num_cpus=0)(tlcluster.RunChannel).remote()
        monkeypatch.setenv("TLCORE_HOME", str(node_home))
        folder = RunFolder("run-ack").created()
        folder.checkpoint_weights.write_bytes(b"weights after epoch 3")
        folder.write_checkpoint_state("finetune", 3)
        sink = tlcluster.ChannelSink(channel, "run-ack")
        sent = threading.Thread(target=sink.checkpoint_saved, args=(folder,))
        sent.start()
        sent.join(timeout=2.0)
        assert sent.is_alive()  # the checkpoint is in the channel, not on the dispatcher's disk: no ack yet

        monkeypatch.setenv("TLCORE_HOME", str(dispatcher_home))
        (event,) = [e for e in ray.get(channel.drain.remote()) if e[1] == "checkpoint"]
        tlcluster.write_checkpoint(channel, "run-ack", event[2])
        sent.join(timeout=30)
        assert not sent.is_alive()
        assert RunFolder("run-ack").checkpoint().epoch == 3
        assert RunFolder("run-ack").checkpoint_weights.read_bytes() == b"weights after epoch 3"
    finally:
        ray.shutdown()


def test_a_restarted_dispatcher_fails_the_runs_it_left_running_and_resume_continues_them(store):
    with_checkpoint = store.create_run("kept", RunSpec.from_dict({"dataset": "ds-1"}))
    without = store.create_run("early", RunSpec.from_dict({"dataset": "ds-1"}))
    for run in (with_checkpoint, without):
        leases.claim_next(store, "old-host:4242")
        store.set_executor(run.id, Executor(kind="ray", host="gpu-1", node_id="abc"))
    folder = RunFolder(with_checkpoint.id).created()
    folder.checkpoint_weights.write_bytes(b"w")
    folder.write_checkpoint_state("finetune", 2)

    failed = {run.id: run for run in tlcluster.fail_orphaned_runs(store)}

    assert {r.status for r in failed.values()} == {RunStatus.FAILED}
    kept = failed[with_checkpoint.id].error
    assert "dispatcher that sent it to the cluster (old-host:4242) stopped" in kept
    assert ("checkpoint written here (finetune epoch 2) are kept: "
            f"`python -m tlcore resume {with_checkpoint.id}` continues it") in kept
    assert "no checkpoint reached this machine, so submit it again" in failed[without.id].error
    resumed = jobs.resume(with_checkpoint.id, store)
    assert resumed.status is RunStatus.QUEUED and resumed.config["resume_from"] == with_checkpoint.id
    assert tlcluster.fail_orphaned_runs(store) == []


def test_cancel_stops_a_ray_run_between_batches_and_keeps_its_epochs(home, colours):
    store = Store()
    run = jobs.submit(short(colours.id, finetune_epochs=500), store)
    wait_for(lambda: len(store.epochs(run.id)) >= 3, 300, "a fine-tune epoch on the cluster")
    jobs.cancel(run.id, store)
    wait_for(lambda: store.get_run(run.id).status.is_terminal, 120, "the run to stop")
    run = store.get_run(run.id)
    assert run.status is RunStatus.CANCELLED and "Cancelled by request" in run.error
    assert len(store.epochs(run.id)) >= 3 and RunFolder(run.id).checkpoint() is not None


def test_a_killed_node_fails_its_run_with_the_node_named_and_resume_continues_it(home, colours, ray_cluster):
    cluster, worker_node, _ = ray_cluster
    store = Store()
    runs = [jobs.submit(short(colours.id, seed=seed, finetune_epochs=epochs), store)
            for seed, epochs in ((2, 500), (3, 500))]

    def both_started():
        current = [store.get_run(r.id) for r in runs]
        return current if all(r.executor for r in current) else None

    runs = wait_for(both_started, 300, "both runs to start")
    doomed = next(r for r in runs if r.executor.node_id == worker_node.node_id)
    survivor = next(r for r in runs if r.id != doomed.id)
    wait_for(lambda: RunFolder(doomed.id).checkpoint() is not None, 300, "a checkpoint to come back")
    cluster.remove_node(worker_node)

    wait_for(lambda: store.get_run(doomed.id).status.is_terminal, leases.LEASE_S + 60, "the lost run to fail")
    doomed = store.get_run(doomed.id)
    assert doomed.status is RunStatus.FAILED and doomed.error.startswith(f"Ray node {worker_node.node_id[:8]}")
    assert "resume" in doomed.error and store.epochs(doomed.id)
    steps = len(store.epochs(survivor.id))
    wait_for(lambda: len(store.epochs(survivor.id)) > steps, 120, "the other run's next epoch")
    assert store.get_run(survivor.id).status is RunStatus.RUNNING  # the other node trains on
    jobs.cancel(survivor.id, store)

    resumed = jobs.resume(doomed.id, store)
    wait_for(lambda: len(store.epochs(resumed.id)) >= 1, 300, "the resumed run's first epoch")
    kept = len(store.epochs(doomed.id))
    assert store.epochs(resumed.id)[0].step == kept + 1  # it continues where the lost run stopped
    jobs.cancel(resumed.id, store)
    wait_for(lambda: store.get_run(resumed.id).status.is_terminal, 120, "the resumed run to stop")


def test_a_node_copies_only_the_images_it_lacks_from_a_shared_folder_and_refuses_damaged_ones(tmp_path,
                                                                                            monkeypatch):
    import hashlib

    from tlcore.data.manifest import ManifestEntry

    shared, node = tmp_path / "shared", tmp_path / "node"
    entries = []
    for i in range(4):
        data = f"image {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        (shared / sha[:2]).mkdir(parents=True, exist_ok=True)
        (shared / sha[:2] / f"{sha}.jpg").write_bytes(data)
        entries.append(ManifestEntry(path=Path("/dispatcher/blobs") / sha[:2] / f"{sha}.jpg", label="a",
                                     split="train", sha256=sha, source=f"a/{i}.jpg", width=32, height=32))
    (node / entries[0].sha256[:2]).mkdir(parents=True)
    (node / entries[0].sha256[:2] / entries[0].path.name).write_bytes(b"image 0")  # already on this node
    monkeypatch.setenv(tlcluster.SHARED_BLOBS, str(shared))

    source, described_as = tlcluster.blob_source(None)
    fetched = tlcluster.fetch_blobs(entries, source, node, described_as)

    assert (fetched.images, fetched.total) == (3, 4)
    assert fetched.describe().startswith(f"Fetched 3 of 4 images (0.0 MB in 1 shards) from the shared folder {shared}")
    assert all((node / e.sha256[:2] / e.path.name).read_bytes() == f"image {i}".encode() for i, e in enumerate(entries))
    damaged = shared / entries[1].sha256[:2] / entries[1].path.name
    damaged.write_bytes(b"not image 1")
    (node / entries[1].sha256[:2] / entries[1].path.name).unlink()
    with pytest.raises(RuntimeError, match="arrived damaged from the shared folder"):
        tlcluster.fetch_blobs(entries, source, node, described_as)


def test_a_node_fetches_from_a_shared_store_url_through_fsspec_and_says_when_it_cannot(tmp_path, monkeypatch):
    import hashlib

    import fsspec

    from tlcore.data.manifest import ManifestEntry
    from tlcore.errors import InvalidInput

    store = fsspec.filesystem("memory")
    entries = []
    for i in range(3):
        data = f"image {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.pipe(f"/team-blobs/{sha[:2]}/{sha}.jpg", data)
        entries.append(ManifestEntry(path=Path("/dispatcher/blobs") / sha[:2] / f"{sha}.jpg", label="a",
                                     split="train", sha256=sha, source=f"a/{i}.jpg", width=32, height=32))
    node = tmp_path / "node"
    monkeypatch.setenv(tlcluster.SHARED_BLOBS, "memory://team-blobs")
    try:
        source, described_as = tlcluster.blob_source(None)
        fetched = tlcluster.fetch_blobs(entries, source, node, described_as)
        assert fetched.describe().startswith("Fetched 3 of 3 images (0.0 MB in 1 shards) from the shared store "
                                             "memory://team-blobs")
        assert all((node / e.sha256[:2] / e.path.name).read_bytes() == f"image {i}".encode()
                   for i, e in enumerate(entries))
        store.rm(f"/team-blobs/{entries[2].sha256[:2]}/{entries[2].path.name}")
        (node / entries[2].sha256[:2] / entries[2].path.name).unlink()
        with pytest.raises(RuntimeError, match=f"The shared store memory://team-blobs has no file for image "
                                               f"{entries[2].sha256}"):
            tlcluster.fetch_blobs(entries, source, node, described_as)
    finally:
        store.rm("/team-blobs", recursive=True)

    # Each way a URL cannot be used is one sentence naming the variable and what to do.
    fsspec.register_implementation("tlmissing", "tl_no_such_package.FileSystem", clobber=True,
                                   errtxt="Install tl-no-such-package to read tlmissing:// URLs")
    for url, said in (("tlmissing://bucket/blobs", "(Install tl-no-such-package to read tlmissing:// URLs): install "
                                                   "that package on every node"),
                      (f"file://{tmp_path}/nowhere", "has no folder there"),
                      ("nosuchscheme://bucket/blobs", "This node cannot read the shared store")):
        monkeypatch.setenv(tlcluster.SHARED_BLOBS, url)
        with pytest.raises(InvalidInput, match=re.escape(said)) as raised:
            tlcluster.blob_source(None)
        assert f"TLCORE_SHARED_BLOBS={url}" in str(raised.value) and "unset `TLCORE_SHARED_BLOBS`" in str(raised.value)


def test_a_node_cache_over_its_budget_loses_its_oldest_files_but_never_what_a_live_task_trains_on(tmp_path,
                                                                                                 monkeypatch):
    from tlcore.data.manifest import ManifestEntry

    cache = tmp_path / "node-cache"
    monkeypatch.setenv("TLCORE_NODE_CACHE", str(cache))
    blobs = {}
    for age, name in enumerate(["oldest", "needed", "left-by-a-dead-task", "newest"]):
        sha = f"{age:x}" * 64
        blobs[name] = cache / "blobs" / sha[:2] / f"{sha}.jpg"
        blobs[name].parent.mkdir(parents=True, exist_ok=True)
        blobs[name].write_bytes(b"x" * 1000)
        os.utime(blobs[name], (1000 + age, 1000 + age))
    features = cache / "cache" / "features-1.npy"
    features.parent.mkdir()
    features.write_bytes(b"f" * 1000)
    features.with_suffix(".keys").write_text(blobs["newest"].stem + "\n")
    os.utime(features.with_suffix(".keys"), (999, 999))  # older than every image, but holds one a task needs

    def entry(name):
        return ManifestEntry(path=blobs[name], label="a", split="train", sha256=blobs[name].stem, source=name,
                             width=32, height=32)

    tlcluster.register_running("run-live", [entry("needed"), entry("newest")])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tlcluster.write_json_atomically(cache / "running" / "run-dead.json",
                                    {"pid": int(dead.stdout), "images": [blobs["left-by-a-dead-task"].stem]})
    monkeypatch.delenv(tlcluster.NODE_CACHE_BUDGET, raising=False)
    assert tlcluster.keep_node_cache_in_budget() is None  # no budget: nothing removed

    monkeypatch.setenv(tlcluster.NODE_CACHE_BUDGET, str(2500 / 1e9))
    pruned = tlcluster.keep_node_cache_in_budget()

    assert (pruned.removed, pruned.kept_for_runs) == (2, 3)  # over the budget still: the rest is in use
    assert not blobs["oldest"].exists() and not blobs["left-by-a-dead-task"].exists()
    assert blobs["needed"].exists() and blobs["newest"].exists() and features.exists()
    # A fetch touches the images already there: in use again, they are the newest.
    fetched = tlcluster.fetch_blobs([entry("needed")], lambda names: {}, cache / "blobs", "the dispatcher")
    assert fetched.images == 0 and blobs["needed"].stat().st_mtime > blobs["newest"].stat().st_mtime


def test_a_node_makes_room_in_its_cache_budget_before_each_shard_it_fetches(tmp_path, monkeypatch):
    import hashlib

    from tlcore.data.manifest import ManifestEntry

    cache, shared = tmp_path / "node-cache", tmp_path / "shared"
    monkeypatch.setenv("TLCORE_NODE_CACHE", str(cache))
    monkeypatch.setenv(tlcluster.SHARED_BLOBS, str(shared))
    monkeypatch.setattr(tlcluster, "SHARD_FILES", 2)

    def blob(folder: Path, data: bytes) -> ManifestEntry:
        sha = hashlib.sha256(data).hexdigest()
        path = folder / sha[:2] / f"{sha}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return ManifestEntry(path=path, label="a", split="train", sha256=sha, source=f"a/{sha[:6]}.jpg",
                             width=32, height=32)

    old = [blob(cache / "blobs", f"old {i}".encode().ljust(1000, b".")) for i in range(4)]  # 4,000 bytes
    for age, e in enumerate(old):
        os.utime(e.path, (1000 + age, 1000 + age))
    new = [blob(shared, f"new {i}".encode().ljust(1000, b".")) for i in range(3)]  # 3,000 bytes to fetch
    tlcluster.register_running("run-fetching", [old[1], *new])  # this run trains on one old image and the new
    monkeypatch.setenv(tlcluster.NODE_CACHE_BUDGET, str(5000 / 1e9))

    def cache_bytes() -> int:
        return sum(p.stat().st_size for p in (cache / "blobs").rglob("*.jpg"))

    source, described_as = tlcluster.blob_source(None)
    sizes_when_asked = []

    def watched(names):
        sizes_when_asked.append(cache_bytes())
        return source(names)

    room = tlcluster.NodeCacheRoom()
    fetched = tlcluster.fetch_blobs(old[1:2] + new, watched, cache / "blobs", described_as, room.make)

    assert (fetched.images, fetched.shards) == (3, 2)
    assert max(sizes_when_asked + [cache_bytes()]) <= 5000  # 7,000 bytes without making room
    assert [e.path.exists() for e in old] == [False, True, False, True]  # the oldest two not in use went
    assert all((cache / "blobs" / e.sha256[:2] / e.path.name).exists() for e in new)
    assert room.describe() == (f"Node cache budget ({tlcluster.NODE_CACHE_BUDGET}): removed 2 least recently used "
                               "file(s) (0.00 GB) to make room for this run's images")

    # A budget it cannot read is said, and the fetch still happens.
    monkeypatch.setenv(tlcluster.NODE_CACHE_BUDGET, "lots")
    (cache / "blobs" / new[0].sha256[:2] / new[0].path.name).unlink()
    room = tlcluster.NodeCacheRoom()
    assert tlcluster.fetch_blobs(new, source, cache / "blobs", described_as, room.make).images == 1
    assert room.describe().startswith("Could not keep this node's cache in its budget: `TLCORE_NODE_CACHE_GB` must be")
