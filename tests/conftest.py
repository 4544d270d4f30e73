"""Shared fixtures: every test gets its own empty data home; one tiny trained run per test process.

The suite runs on two xdist workers, one test module at a time per worker (`--dist loadscope`, set
in pyproject.toml), so a module's fixtures (a Ray cluster, a browser server, a served run) are
built once. Modules known to be long go first, so that the two workers end together.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One small real run for the export, serving and dashboard tests: EfficientNet-Lite0 with
    ImageNet weights, head only, 48 px, two colour classes (20 photos each). Trained once per
    session in its own data home; tests point `$TLCORE_HOME` at it (exports made there are reused)."""
    from tests.test_jobs import make_image_folder, tiny
    from tlcore.queue import jobs
    from tlcore.records.store import Store

    data_home = tmp_path_factory.mktemp("trained_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCORE_HOME", str(data_home))
        folder = make_image_folder(tmp_path_factory.mktemp("colours") / "colours", per_class=20, size=48)
        run = jobs.run_foreground(tiny(str(folder), weights="imagenet", image_size=48, head_epochs=8, lr=0.01),
                                  Store())
    assert run.status.value == "succeeded", run.error
    return TrainedRun(data_home, run.id)


@pytest.fixture(scope="session")
def trainval_run(tmp_path_factory) -> TrainedRun:
    """One small real run on the commonest folder shape, `train/` and `val/` only: it is evaluated on
    val, so it has no fitted temperature (its calibration.json says why) and no threshold. Like
    `trained_run` (EfficientNet-Lite0, ImageNet weights, head only, 48 px, two colour classes) with
    12 photos per class in train/ and 6 in val/, 4 epochs, in a data home of its own."""
    from tests.test_jobs import make_image_folder, tiny
    from tlcore.queue import jobs
    from tlcore.records.store import Store

    data_home = tmp_path_factory.mktemp("trainval_home")
    folder = tmp_path_factory.mktemp("trainval") / "colours"
    make_image_folder(folder / "train", per_class=12, size=48, seed=1)
    make_image_folder(folder / "val", per_class=6, size=48, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCORE_HOME", str(data_home))
        run = jobs.run_foreground(tiny(str(folder), weights="imagenet", image_size=48, head_epochs=4, lr=0.01),
                                  Store())
    assert run.status.value == "succeeded", run.error
    assert run.summary.eval_split == "val" and run.summary.calibration.temperature is None
    return TrainedRun(data_home, run.id)
