"""Sweeps: the CLI queues a grid as one sweep, bad lists queue nothing, results group per configuration."""

from __future__ import annotations

import pytest

from tests.test_cli import last_json, run_cli
from tests.test_jobs import make_image_folder
from tlcore.queue import jobs
from tlcore.records.run_record import Metrics, RunSummary
from tlcore.records.store import RunStatus


@pytest.fixture
def colours(tmp_path, store):
    from tlcore.data.importer import import_dataset

    return import_dataset(make_image_folder(tmp_path / "colours", per_class=4), name="colours", store=store).dataset


def _succeed(store, run_id: str, accuracy: float, macro_f1: float) -> None:
    run = store.get_run(run_id)
    store.finish_run(run_id, RunStatus.SUCCEEDED, summary=RunSummary(
        backbone=run.backbone, weights=run.weights, dataset="colours v1", dataset_id=run.dataset_id, image_size=32,
        eval_split="test", eval_images=2, metrics=Metrics(accuracy=accuracy, macro_f1=macro_f1)))


def test_sweep_queues_the_grid_and_show_gives_mean_and_std_per_configuration(capsys, store, colours):
    code, out, _ = run_cli(capsys, "sweep", "--data", "colours", "--lr", "1e-3,3e-4", "--seeds", "0,1,2",
                           "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--json")
    queued = last_json(out)
    assert code == 0 and queued["sweep_id"].startswith("sweep-") and len(queued["runs"]) == 6
    runs = [store.get_run(run_id) for run_id in queued["runs"]]
    # Named by what varies: short, with the sweep's id for runs of several sweeps.
    assert [r.name for r in runs][:2] == [f"lr=1e-3 · seed 0 ({queued['sweep_id'][-6:]})",
                                          f"lr=1e-3 · seed 1 ({queued['sweep_id'][-6:]})"]
    assert {r.status for r in runs} == {RunStatus.QUEUED} and {r.sweep_id for r in runs} == {queued["sweep_id"]}
    assert sorted((r.config["lr"], r.config["seed"]) for r in runs) == sorted(
        (lr, seed) for lr in (1e-3, 3e-4) for seed in (0, 1, 2))
    assert {r.config["image_size"] for r in runs} == {32}  # a fixed option applies to every run
    by_point = {(r.config["lr"], r.config["seed"]): r.id for r in runs}
    for seed, accuracy in enumerate((0.5, 0.75, 1.0)):
        _succeed(store, by_point[(1e-3, seed)], accuracy, accuracy - 0.1)
    _succeed(store, by_point[(3e-4, 0)], 0.25, 0.2)
    jobs.cancel(by_point[(3e-4, 1)], store)

    code, out, _ = run_cli(capsys, "sweeps", "show", queued["sweep_id"], "--json")
    shown = last_json(out)
    assert code == 0 and shown["sweep_id"] == queued["sweep_id"]
    fast, slow = shown["configurations"]
    assert fast["config"] == {"backbone": "efficientnet_lite0", "lr": 1e-3} and fast["label"] == "lr=1e-3"
    assert [(r["seed"], r["status"], r["accuracy"]) for r in fast["runs"]] == [
        (0, "succeeded", 0.5), (1, "succeeded", 0.75), (2, "succeeded", 1.0)]
    assert fast["mean_accuracy"] == pytest.approx(0.75) and fast["std_accuracy"] == pytest.approx(0.25)
    assert fast["mean_macro_f1"] == pytest.approx(0.65) and fast["std_macro_f1"] == pytest.approx(0.25)
    assert [r["status"] for r in slow["runs"]] == ["succeeded", "cancelled", "queued"]
    assert slow["mean_accuracy"] == 0.25 and slow["std_accuracy"] == 0.0  # only the finished seed counts
    assert {"run_id", "seed", "status", "accuracy", "macro_f1"} == set(fast["runs"][0])

    code, out, _ = run_cli(capsys, "sweeps", "list")
    assert code == 0 and queued["sweep_id"] in out and "0.7500" in out
    code, out, _ = run_cli(capsys, "sweeps", "show", queued["sweep_id"])
    assert "lr=1e-3" in out and "0.7500 ± 0.2500" in out
    code, out, _ = run_cli(capsys, "runs", "show", by_point[(1e-3, 0)])
    assert f"sweep: {queued['sweep_id']}" in out


@pytest.mark.parametrize("argv, message", [
    (["--lr", ""], "`--lr` must be a comma list of one or more values"),
    (["--lr", "1e-3,,3e-4"], "`--lr` must be a comma list of one or more values"),
    (["--lr", "1e-3,fast"], "`--lr` must be a comma list of numbers"),
    (["--seeds", "0,0"], "`--seeds` lists a value twice"),
    (["--lr", "1e-3,2"], "`lr` must be between 0 and 1"),
    (["--backbone", "efficientnet_lite0,resnet9000"], "resnet9000"),
    (["--preset", "turbo"], "`--preset` must be one of"),
])
def test_a_bad_sweep_list_is_one_sentence_and_queues_nothing(capsys, store, colours, argv, message):
    code, _, err = run_cli(capsys, "sweep", "--data", "colours", "--weights", "none", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert store.list_runs() == []
