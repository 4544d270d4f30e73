"""The store's schema version and migrations, and the typed run records it hands out."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time

import pytest

from tlcore.records.config import RunSpec
from tlcore.records.run_record import Executor, Metrics, RunProgress, RunSummary, Timings
from tlcore.records.store import SCHEMA_VERSION, RunStatus, Store

# The tables exactly as a data home made before schema versions had them (user_version 0).
_SCHEMA_V0 = """
CREATE TABLE datasets (id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL,
    created_at REAL NOT NULL, source TEXT NOT NULL, classes TEXT NOT NULL, counts TEXT NOT NULL,
    num_images INTEGER NOT NULL, has_test INTEGER NOT NULL, report TEXT NOT NULL, UNIQUE (name, version));
CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    dataset_id TEXT NOT NULL, backbone TEXT NOT NULL, weights TEXT NOT NULL, config TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, heartbeat_at REAL, worker TEXT, error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, progress TEXT NOT NULL DEFAULT '{}',
    summary TEXT NOT NULL DEFAULT '{}', tags TEXT NOT NULL DEFAULT '[]', note TEXT NOT NULL DEFAULT '');
CREATE TABLE epochs (run_id TEXT NOT NULL, phase TEXT NOT NULL, epoch INTEGER NOT NULL, step INTEGER NOT NULL,
    metrics TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (run_id, step));
CREATE TABLE logs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, at REAL NOT NULL,
    message TEXT NOT NULL);
"""

# A summary as training wrote it before the typed contract.
_LEGACY_SUMMARY = {
    "run_id": "run-old", "status": "succeeded", "backbone": "efficientnet_lite0", "weights": "imagenet",
    "dataset": "bugs v1", "dataset_id": "ds-old", "image_size": 224, "eval_split": "test", "eval_images": 40,
    "metrics": {"accuracy": 0.925, "macro_f1": 0.91,
                "per_class": {"ants": {"precision": 0.9, "recall": 0.95, "f1": 0.92, "support": 20}}},
    "timings": {"pixels_s": 1.5, "features_s": 9.0, "features_reused": 0.0, "head_s": 3.0, "total_s": 15.25},
    "device": "CPU: host CPU", "feature_cache_reused": False, "model_path": "/old/model.keras",
}


def _old_store(path):
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V0)
    db.execute("INSERT INTO datasets VALUES ('ds-old', 'bugs', 1, 1.0, '/data/bugs', '[\"ants\", \"bees\"]',"
               " '{\"train\": {\"ants\": 10}}', 10, 1, '{}')")
    for run_id, status, progress, summary in (
            ("run-old", "succeeded", {}, _LEGACY_SUMMARY),
            ("run-live", "running", {"phase": "head", "epoch": 2, "epochs": 5, "eta_s": 30, "fraction": 0.3}, {}),
            ("run-bad", "failed", {"phase": "preparing", "message": "Decoding images"}, {})):
        db.execute("INSERT INTO runs (id, name, status, dataset_id, backbone, weights, config, created_at,"
                   " progress, summary) VALUES (?, ?, ?, 'ds-old', 'efficientnet_lite0', 'imagenet', '{}', 1.0, ?, ?)",
                   (run_id, run_id, status, json.dumps(progress), json.dumps(summary)))
    db.execute("INSERT INTO epochs VALUES ('run-old', 'head', 1, 1, '{\"loss\": 0.5}', 2.0)")
    db.commit()
    db.close()


def test_an_old_store_is_migrated_and_keeps_every_dataset_run_and_epoch(tmp_path):
    path = tmp_path / "store.db"
    _old_store(path)

    store = Store(path)

    assert store.schema_version() == SCHEMA_VERSION
    assert [d.label for d in store.list_datasets()] == ["bugs v1"]
    old = store.get_run("run-old")
    assert old.status is RunStatus.SUCCEEDED and old.accuracy == 0.925 and old.macro_f1 == 0.91
    assert old.summary.eval_split == "test" and old.summary.metrics.per_class["ants"].support == 20
    assert old.summary.timings.total_s == 15.25 and old.summary.timings.features_reused is False
    assert "run_id" not in old.summary.extra and "feature_cache_reused" not in old.summary.extra
    live = store.get_run("run-live")
    assert live.summary is None and live.progress.epoch == 2 and live.progress.eta_s == 30.0
    assert live.progress.extra == {"fraction": 0.3}  # an unknown key is kept, not dropped
    assert store.get_run("run-bad").progress.message == "Decoding images"
    assert [e.metrics for e in store.epochs("run-old")] == [{"loss": 0.5}]
    # The rewritten rows are already in the new form: opening again changes nothing.
    raw = sqlite3.connect(path).execute("SELECT summary FROM runs WHERE id = 'run-old'").fetchone()[0]
    assert json.loads(raw) == RunSummary.from_dict(_LEGACY_SUMMARY).to_dict()
    assert Store(path).get_run("run-old") == old


def test_a_store_from_a_newer_version_is_refused_with_a_plain_sentence(tmp_path):
    path = tmp_path / "store.db"
    Store(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer Transfer Lab"):
        Store(path)


def test_summary_and_progress_round_trip_through_the_store(store):
    run = store.create_run("r", RunSpec.from_dict({}, dataset_id="ds"))
    summary = RunSummary(backbone="efficientnet_lite0", weights="imagenet", dataset="d v2", dataset_id="ds",
                         image_size=96, eval_split="val", eval_images=12,
                         metrics=Metrics(accuracy=0.75, macro_f1=0.7),
                         timings=Timings(total_s=3.5, features_reused=True), extra={"added_later": [1, 2]})
    store.heartbeat(run.id, RunProgress(phase="finetune", epoch=1, epochs=3, batch=4, batches=9))
    assert store.get_run(run.id).progress == RunProgress(phase="finetune", epoch=1, epochs=3, batch=4, batches=9)
    store.finish_run(run.id, RunStatus.SUCCEEDED, summary=summary)
    assert store.get_run(run.id).summary == summary
    assert RunSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary


def test_what_the_fine_tune_trained_on_names_only_the_augmentations_the_recipe_has():
    summary = RunSummary(backbone="efficientnet_lite0", weights="imagenet", dataset="d v1", dataset_id="ds",
                         image_size=96, eval_split="test", eval_images=12, metrics=Metrics(accuracy=0.75, macro_f1=0.7))
    cached = dataclasses.replace(summary, finetune_inputs="cached")
    assert cached.describe_finetune_inputs(()) == ("The fine-tune trained the top layers on cached activations (the "
                                                   "backbone below them ran once per image).")
    assert cached.describe_finetune_inputs(("flip",)).endswith(": flip as the mirrored images' activations.")
    # A run from before augmented views (none recorded): rotate and zoom never reached its fine-tune.
    both = cached.describe_finetune_inputs(("flip", "rotate", "zoom"))
    assert "flip as the mirrored" in both and "; rotate, zoom not at all (augmented views 0; fine-tune inputs" in both
    viewed = dataclasses.replace(cached, finetune_views=4).describe_finetune_inputs(("flip", "rotate", "zoom"))
    assert viewed.endswith(": flip as the mirrored images' activations; rotate, zoom as 4 augmented views of each "
                           "training image, drawn once.")
    rotate_only = dataclasses.replace(cached, finetune_views=1).describe_finetune_inputs(("rotate",))
    assert rotate_only.endswith("): rotate as 1 augmented view of each training image, drawn once.")
    pixels = dataclasses.replace(summary, finetune_inputs="pixels")
    assert pixels.describe_finetune_inputs(("flip",)) == ("The fine-tune trained on augmented pixels through the "
                                                          "whole backbone.")
    assert pixels.describe_finetune_inputs(()) == "The fine-tune trained on pixels through the whole backbone."
    assert summary.describe_finetune_inputs(("flip",)) is None  # no fine-tune, or a run from before it was recorded


def test_a_version_1_store_gains_sweep_ids_and_executors_and_keeps_its_runs(tmp_path):
    path = tmp_path / "store.db"
    _old_store(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 1")  # the schema as version 1 left it: no sweep_id, no executor
    db.close()

    store = Store(path)

    assert store.schema_version() == SCHEMA_VERSION >= 2
    old = store.get_run("run-old")
    assert old.sweep_id is None and old.executor is None and old.accuracy == 0.925
    assert store.sweep_ids() == []
    swept = store.create_run("s", RunSpec.from_dict({}, dataset_id="ds-old", sweep_id="sweep-1"))
    store.set_executor(swept.id, Executor(kind="ray", host="gpu-box", node_id="abc123", gpus=1))
    assert store.sweep_ids() == ["sweep-1"]
    assert [r.id for r in store.list_runs(sweep_id="sweep-1")] == [swept.id]
    assert store.get_run(swept.id).executor == Executor(kind="ray", host="gpu-box", node_id="abc123", gpus=1)


def test_a_version_2_store_gains_the_model_registry_and_keeps_its_runs(tmp_path):
    from tlcore.records.store import ModelTables

    path = tmp_path / "store.db"
    _old_store(path)
    Store(path)  # up to the current version, then back to how version 2 left it: no registry tables
    db = sqlite3.connect(path)
    for table in ("models", "model_versions", "model_aliases", "model_audit", "reviews"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()

    store = Store(path)

    assert store.schema_version() == SCHEMA_VERSION >= 3
    assert store.get_run("run-old").accuracy == 0.925
    tables = ModelTables(store)
    assert tables.list_models() == []
    tables.create_model("bugs", "ana", {}, {"images": []})
    assert tables.add_model_version("bugs", "run-old", "ana").version == 1
    entry = tables.move_alias("bugs", "production", 1, action="promote", by="ana")
    assert (entry.from_version, entry.to_version) == (None, 1) and tables.model_aliases("bugs") == {"production": 1}


def test_a_run_the_reaper_failed_stays_failed_when_its_late_success_arrives(store):
    from tlcore.errors import InvalidInput, TransitionRefused
    from tlcore.queue import jobs, leases
    from tlcore.queue.outcome import Outcome, conclude

    run = store.create_run("r", RunSpec.from_dict({}, dataset_id="ds"))
    leases.claim_next(store, "dispatcher:1")
    # Its lease ran out while it was being shipped.
    (reaped,) = leases.reap(store, lease_s=30, now=time.time() + 31)
    assert reaped.status is RunStatus.FAILED and "no heartbeat" in reaped.error

    with pytest.raises(TransitionRefused, match="is failed .*cannot become succeeded"):
        store.finish_run(run.id, RunStatus.SUCCEEDED)
    after = conclude(store, run.id, Outcome(RunStatus.SUCCEEDED))
    assert after.status is RunStatus.FAILED and after.error == reaped.error  # the reason is not cleared
    assert "ended succeeded after all" in store.logs(run.id)[-1].message
    with pytest.raises(TransitionRefused):
        store.start_run(run.id, "another-worker:2")
    with pytest.raises(InvalidInput, match="already finished"):
        jobs.cancel(run.id, store)
    assert store.get_run(run.id).status is RunStatus.FAILED and leases.claim_next(store, "another-worker:2") is None


def test_runs_and_run_folders_in_the_previous_shape_read_as_one_typed_spec(store):
    import dataclasses

    from tlcore.records.config import TrainConfig
    from tlcore.records.run_folder import RunFolder

    recipe = TrainConfig(dataset="ds-1", lr=3e-4, augment=("flip",), split=(0.8, 0.1, 0.1), seed=2)
    # As `resume` stored a resumed sweep run before: the flat recipe plus `resume_from`, the sweep in its
    # column only, and precision switches from before they were words.
    old_config = {**recipe.to_dict(), "resume_from": "run-a", "mixed_precision": None, "xla": False}
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO runs (id, name, status, dataset_id, backbone, weights, config, created_at, sweep_id)"
                   " VALUES ('run-old', 'old', 'failed', 'ds-1', 'efficientnet_lite0', 'imagenet', ?, 1.0,"
                   " 'sweep-1')", (json.dumps(old_config),))
    run = store.get_run("run-old")
    expected = RunSpec(dataclasses.replace(recipe, mixed_precision="auto", xla="off"), resume_from="run-a",
                       sweep_id="sweep-1")
    assert run.spec == expected and run.spec.dataset_id == "ds-1"

    # Stored again, a spec has one shape: the recipe's fields, resume_from and sweep_id.
    again = store.create_run("again", run.spec)
    with sqlite3.connect(store.path) as db:
        (raw,) = db.execute("SELECT config FROM runs WHERE id = ?", (again.id,)).fetchone()
    assert json.loads(raw) == expected.to_dict() and store.get_run(again.id).spec == expected
    assert set(json.loads(raw)) == {f.name for f in dataclasses.fields(TrainConfig)} | {"resume_from", "sweep_id"}

    # A run folder's config.json as training wrote it before: the recipe, `dataset_id` and the size it trained at.
    folder = RunFolder("run-old").created()
    assert folder.spec() is None  # no config.json: nothing to read
    folder.config_file.write_text(json.dumps({**recipe.to_dict(), "dataset_id": "ds-1", "image_size": 224}))
    assert folder.spec() == RunSpec(dataclasses.replace(recipe, image_size=224))
    folder.write_spec(expected)
    assert json.loads(folder.config_file.read_text()) == json.loads(raw) and folder.spec() == expected
