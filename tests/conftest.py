"""Shared fixtures: every test gets its own empty data home; one tiny trained run per test process.

The suite runs on two xdist workers, one test module at a time per worker (`--dist loadscope`, set
in pyproject.toml), so a module's fixtures (a Ray cluster, a browser server, a served run) are
built once. Modules known to be long go first, so that the two workers end together.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The two xdist workers already keep both cores busy, so each TensorFlow process (and every worker,
# server or Ray node a test starts: they inherit this) computes on one thread instead of two that
# spin-wait against the other worker's. On 4 training modules over 2 workers: 106.8 s of wall
# against 117.4 s, 7.5 % less CPU. Inter-op threads stay as they are: two replicas on one CPU need two.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


# The slowest modules, longest first (from `--durations`): started first, the short ones fill in around them.
# The first and third go to one worker, the second and fourth to the other.
LONG_MODULES = ("test_e2e_browser.py", "test_bench_smoke.py", "test_cluster.py", "test_gpu_path.py", "test_jobs.py",
                "test_backbones.py", "test_training.py", "test_model_registry.py", "test_app_demo.py")


def pytest_collection_modifyitems(config, items):
    def weight(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=weight)  # stable: tests keep their order inside a module


@pytest.fixture(autouse=True)
def tlcore_home(tmp_path, monkeypatch) -> Path:
    """A fresh `$TLCORE_HOME` per test, so nothing a test writes leaks into another."""
    home = tmp_path / "tlcore_home"
    monkeypatch.setenv("TLCORE_HOME", str(home))
    return home


@pytest.fixture
def store(tlcore_home):
    from tlcore.records.store import Store

    return Store()


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    home: Path
    run_id: str


def _built_once_per_session(tmp_path_factory, worker_id: str, name: str, build) -> TrainedRun:
    """`build(data_home) -> run id`, done once per test session and shared by the xdist workers: the
    first worker to ask trains it (the others wait on a lock), and each worker gets its own copy of
    the data home, since tests write exports and runs into it."""
    own = tmp_path_factory.mktemp(name)
    if worker_id == "master":  # not under xdist
        return TrainedRun(own, build(own))
    shared = tmp_path_factory.getbasetemp().parent  # one folder per session, above each worker's own
    built, done = shared / f"{name}-built", shared / f"{name}-built.run_id"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            done.write_text(build(built))
    shutil.copytree(built, own, dirs_exist_ok=True)
    return TrainedRun(own, done.read_text())


def _train_into(data_home: Path, folder: Path, config) -> str:
    from tlcore.queue import jobs
    from tlcore.records.store import Store

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCORE_HOME", str(data_home))
        run = jobs.run_foreground(config, Store())
    assert run.status.value == "succeeded", run.error
    return run.id


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id) -> TrainedRun:
    """One small real run for the export, serving and dashboard tests: EfficientNet-Lite0 with
    ImageNet weights, head only, 48 px, two colour classes (20 photos each). Trained once per
    session in its own data home; tests point `$TLCORE_HOME` at it (exports made there are reused)."""
    from tests.test_jobs import make_image_folder, tiny

    def build(data_home: Path) -> str:
        folder = make_image_folder(data_home.parent / f"{data_home.name}-colours" / "colours", per_class=20, size=48)
        return _train_into(data_home, folder, tiny(str(folder), weights="imagenet", image_size=48, head_epochs=8,
                                                   lr=0.01))

    return _built_once_per_session(tmp_path_factory, worker_id, "trained_home", build)


@pytest.fixture(scope="session")
def trainval_run(tmp_path_factory, worker_id) -> TrainedRun:
    """One small real run on the commonest folder shape, `train/` and `val/` only: it is evaluated on
    val, so it has no fitted temperature (its calibration.json says why) and no threshold. Like
    `trained_run` (EfficientNet-Lite0, ImageNet weights, head only, 48 px, two colour classes) with
    12 photos per class in train/ and 6 in val/, 4 epochs, in a data home of its own."""
    from tests.test_jobs import make_image_folder, tiny
    from tlcore.records.store import Store

    def build(data_home: Path) -> str:
        folder = data_home.parent / f"{data_home.name}-trainval" / "colours"
        make_image_folder(folder / "train", per_class=12, size=48, seed=1)
        make_image_folder(folder / "val", per_class=6, size=48, seed=2)
        run_id = _train_into(data_home, folder, tiny(str(folder), weights="imagenet", image_size=48, head_epochs=4,
                                                     lr=0.01))
        run = Store(data_home / "store.db").get_run(run_id)
        assert run.summary.eval_split == "val" and run.summary.calibration.temperature is None
        return run_id

    return _built_once_per_session(tmp_path_factory, worker_id, "trainval_home", build)
