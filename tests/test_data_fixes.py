"""Fixing a dataset: a new immutable version with a change log, retrained with the same recipe, judged."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SHARED_DATASETS

from tlcore import cli
from tlcore.data.fixes import change_log, fix_dataset
from tlcore.data.importer import import_dataset
from tlcore.data.manifest import load_manifest
from tlcore.errors import InvalidInput
from tlcore.evaluate.evaluation import compare_before_after
from tlcore.records.config import RunSpec, TrainConfig
from tlcore.records.store import RunStatus
from tlcore.train.training import execute_run

MISFILED = "val/sunflower/misfiled-daisy.jpg"


@pytest.fixture
def flowers(tmp_path, store):
    """daisy and sunflower, 6 train and 3 val photos each, and one daisy misfiled in val/sunflower."""
    root = tmp_path / "flowers"
    for label in ("daisy", "sunflower"):
        photos = sorted((SHARED_DATASETS / "flowers" / label).iterdir())
        for split, chosen in (("train", photos[:6]), ("val", photos[6:9])):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for photo in chosen:
                shutil.copy(photo, root / split / label / photo.name)
    shutil.copy(sorted((SHARED_DATASETS / "flowers" / "daisy").iterdir())[30], root / MISFILED)
    return import_dataset(root, name="flowers", store=store).dataset


def test_a_fix_is_a_new_version_with_a_change_log_and_the_old_version_is_untouched(store, flowers):
    before = load_manifest(flowers.id)
    excluded = next(e.source for e in before if e.split == "train" and e.label == "daisy")
    result = fix_dataset("flowers", relabel={MISFILED: "daisy"}, exclude=[excluded], reason="audit",
                         author="ana", store=store)

    new = result.dataset
    assert (new.name, new.version, result.parent.id) == ("flowers", 2, flowers.id)
    assert load_manifest(flowers.id) == before
    after = {e.source: e for e in load_manifest(new.id)}
    assert excluded not in after and after[MISFILED].label == "daisy" and after[MISFILED].split == "val"
    assert new.counts == {"train": {"daisy": 5, "sunflower": 6}, "val": {"daisy": 4, "sunflower": 3}}
    log = change_log(store.get_dataset(new.id))
    assert log["parent"] == flowers.id and log["author"] == "ana" and log["reason"] == "audit"
    assert [(c["action"], c["source"], c["old_label"], c["new_label"]) for c in log["changes"]] == [
        ("exclude", excluded, "daisy", None), ("relabel", MISFILED, "sunflower", "daisy")]


@pytest.mark.parametrize("argv, message", [
    (["--relabel", f"{MISFILED}=tulip"], "Unknown class 'tulip' for flowers v1; its classes are daisy, sunflower."),
    (["--exclude", "val/daisy/nope.jpg"], "Not in flowers v1: val/daisy/nope.jpg."),
    (["--relabel", f"{MISFILED}=daisy", "--exclude", MISFILED], "cannot be both relabelled and excluded"),
    (["--relabel", f"{MISFILED}=sunflower"], "Nothing to change in flowers v1"),
])
def test_bad_fixes_are_refused_by_name_and_nothing_is_recorded(store, flowers, capsys, argv, message):
    assert cli.main(["datasets", "fix", "flowers", *argv]) == 2
    assert message in capsys.readouterr().err
    assert [d.label for d in store.list_datasets()] == ["flowers v1"]


def test_excluding_a_whole_class_that_leaves_one_is_refused(store, flowers):
    sunflowers = [e.source for e in load_manifest(flowers.id) if e.label == "sunflower"]
    with pytest.raises(InvalidInput, match="would leave flowers v1 with 1 class"):
        fix_dataset("flowers", exclude=sunflowers, store=store)


def test_retraining_on_the_fixed_version_reuses_features_and_is_judged_on_the_same_images(store, flowers, capsys):
    config = TrainConfig(dataset=flowers.id, image_size=64, batch_size=4, head_epochs=2, seed=3)
    original = store.create_run("original", RunSpec(config), status=RunStatus.RUNNING)
    execute_run(original.id, store)

    assert cli.main(["datasets", "fix", "flowers", "--relabel", f"{MISFILED}=daisy", "--reason", "audit",
                     "--retrain", original.id, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dataset"]["label"] == "flowers v2" and out["changes"][0]["new_label"] == "daisy"
    retrain = store.get_run(out["run"]["id"])
    assert retrain.status == RunStatus.QUEUED and retrain.dataset_id == out["dataset"]["id"]
    same_recipe = {k: v for k, v in retrain.config.items() if k not in ("dataset", "name")}
    assert same_recipe == {k: v for k, v in original.config.items() if k not in ("dataset", "name")}

    store.start_run(retrain.id, "test:1")
    summary = execute_run(retrain.id, store)
    assert summary.timings.features_reused  # same photos, one label changed: no backbone pass

    judged = compare_before_after(original.id, retrain.id, flowers.id, retrain.dataset_id)
    assert judged.images == 7 and judged.relabelled == 1
    row = judged.rows.set_index("source").loc[MISFILED]
    assert (row["label_before"], row["label"]) == ("sunflower", "daisy")
    assert judged.fixed - judged.broken == round((judged.after_accuracy - judged.before_accuracy) * judged.images)
