"""The queue on a real two-node Ray cluster (never mocked): concurrency, streaming, artifacts, parity,
cancel, a killed node, resume, and the plain sentences for a cluster that cannot be used.

One cluster (`ray.cluster_utils.Cluster`, two nodes of 1 CPU) and one dispatcher process
(`python -m tlcore worker --cluster ADDRESS`) serve every test of this module, in one data home:
each Ray worker imports TensorFlow once, and a new dispatcher would mean new workers.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_jobs import ROOT, make_image_folder, tiny, wait_for, worker_env
from tlcore import jobs
from tlcore.run_folder import RunFolder
from tlcore.store import RunStatus, Store

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


@pytest.fixture(scope="module")
def dispatcher(ray_cluster, shared_home):
    """`python -m tlcore worker --cluster ADDRESS` on the shared data home, for the whole module."""
    cluster, _, temp = ray_cluster
    log = open(shared_home / "dispatcher.log", "ab")
    env = {**worker_env(shared_home), "RAY_TMPDIR": temp}
    proc = subprocess.Popen([sys.executable, "-m", "tlcore", "worker", "--cluster", cluster.address],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
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

    wait_for(lambda: store.get_run(doomed.id).status.is_terminal, jobs.LEASE_S + 60, "the lost run to fail")
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
