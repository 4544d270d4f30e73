"""AppTest: the Train page — form, presets, launch, the live run, failed runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import app_seed as seed
import pytest

from tlcore.store import RunStatus


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch):
    """No device probe and no real worker: starting one is recorded instead."""
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")
    from tlcore import jobs

    started = []
    monkeypatch.setattr(jobs, "start_worker_process", lambda: started.append(1) or 4242)
    return started


def test_no_dataset_points_to_datasets(store):
    at = seed.app("pages/train.py", timeout=120).run()
    assert not at.exception
    assert "no dataset yet" in seed.texts(at)
    assert at.button(key="train.import_builtin")


def test_train_page_paints_without_importing_tensorflow(store):
    seed.dataset(store)
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, "tests")
        import app_seed as seed
        at = seed.app("pages/train.py", timeout=120).run()
        assert not at.exception, at.exception
        print(json.dumps({"backbones": at.selectbox(key="train.backbone").options,
                          "keras": "keras" in sys.modules, "tensorflow": "tensorflow" in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=seed.ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "EfficientNet-Lite0 · weights offline ✓" in result["backbones"] and len(result["backbones"]) >= 11
    assert not result["keras"] and not result["tensorflow"]


def test_launch_queues_a_run_with_the_form_values_and_starts_the_worker(store, _no_processes):
    ds = seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    assert not at.exception
    assert at.selectbox(key="train.preset").value == "fast-offline"
    at.number_input(key="train.head_epochs").set_value(2)
    at.text_input(key="train.name").input("tiny")
    at.button(key="train.launch").click().run()
    assert not at.exception
    assert "Queued **tiny**" in seed.texts(at) and "Started the worker" in seed.texts(at)
    [run] = store.list_runs()
    assert run.name == "tiny" and run.status == RunStatus.QUEUED
    assert run.config["head_epochs"] == 2 and run.config["backbone"] == "efficientnet_lite0"
    assert run.dataset_id == ds.id
    assert at.query_params["run"] == run.id
    assert _no_processes == [1]
    # The live panel follows the run just launched, with a Cancel button.
    assert at.button(key="train.cancel")
    at.button(key="train.cancel").click().run()
    assert store.get_run(run.id).status == RunStatus.CANCELLED


def test_seed_preset_fills_the_form(store):
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    at.selectbox(key="train.preset").select("seed-vgg16").run()
    assert not at.exception
    assert at.selectbox(key="train.backbone").value == "vgg16"
    assert at.number_input(key="train.image_size").value == 224
    assert at.multiselect(key="train.augment").value == ["flip", "rotate", "zoom"]
    assert at.checkbox(key="train.resplit").value is True
    assert at.number_input(key="train.split_train").value == 80
    assert at.select_slider(key="train.lr").value == pytest.approx(1e-4)


def test_bad_form_values_are_explained(store):
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    at.number_input(key="train.head_epochs").set_value(0)
    at.number_input(key="train.finetune_epochs").set_value(0)
    at.button(key="train.launch").click().run()
    assert not at.exception
    assert "Not launched" in at.error[0].value and "epochs" in at.error[0].value
    assert store.list_runs() == []


def test_running_run_shows_progress_eta_and_curves(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "live", RunStatus.RUNNING, epochs=3, config={"head_epochs": 6},
                   progress={"phase": "head", "epoch": 4, "epochs": 6, "batch": 2, "batches": 4,
                             "eta_s": 30, "step": 3})
    store.log(run.id, "head epoch 3/6: loss 0.5")
    at = seed.app("pages/train.py", timeout=120, run=run.id).run()
    assert not at.exception
    bar = at.main.progress[0]
    assert "epoch 4/6" in bar.text and "batch 2/4" in bar.text and "ETA 30 s" in bar.text
    assert bar.value == round(100 * (3 + 0.5) / 6)
    assert "3 epoch(s) logged" in seed.texts(at)
    assert len(at.get("plotly_chart")) == 1


def test_failed_run_says_why(store):
    ds = seed.dataset(store)
    run = seed.run(store, ds, "broken", RunStatus.FAILED, error="ImageNet weights for VGG16 could not be downloaded.")
    at = seed.app("pages/train.py", timeout=120, run=run.id).run()
    assert not at.exception
    assert "This run failed: ImageNet weights for VGG16" in at.error[0].value
    at.button(key="train.resume").click().run()
    assert not at.exception
    assert "left no checkpoint" in seed.texts(at)


def test_lr_finder_draws_its_curve_and_use_this_fills_the_form(store, monkeypatch):
    from tlcore import lr_finder

    calls = []

    def fake_find_lr(config, store, *, phase):  # the range test itself is tested in test_lr_finder.py
        calls.append((config.backbone, config.class_weight, phase))
        curve = [(lr, 2.0 - 0.1 * i if i < 30 else 9.0) for i, lr in enumerate(lr_finder.learning_rates(1e-6, 1, 40))]
        return lr_finder.LRFinding(phase, 0.0023, 0.023, curve, 1.5)

    monkeypatch.setattr(lr_finder, "find_lr", fake_find_lr)
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    at.button(key="train.lr_find").click().run()
    assert not at.exception
    assert calls == [("efficientnet_lite0", "balanced", "head")]
    assert "Suggested head rate **0.0023**" in seed.texts(at)
    assert at.get("plotly_chart")  # the loss-vs-LR curve
    at.button(key="train.lr_use").click().run()
    assert at.select_slider(key="train.lr").value == pytest.approx(0.0023)
    assert at.selectbox(key="train.preset").value == "custom"
    at.button(key="train.launch").click().run()
    [run] = store.list_runs()
    assert run.config["lr"] == pytest.approx(0.0023)


def test_succeeded_run_shows_the_smallest_class_recall(store):
    from tlcore.run_record import ClassMetrics, Metrics, RunSummary

    ds = seed.dataset(store)
    run = seed.run(store, ds, "done", RunStatus.SUCCEEDED)
    per_class = {"ants": ClassMetrics(1.0, 0.9, 0.9, 10), "bees": ClassMetrics(0.8, 0.5, 0.6, 2)}
    store.update_run(run.id, summary=RunSummary(
        backbone="efficientnet_lite0", weights="imagenet", dataset=ds.label, dataset_id=ds.id, image_size=64,
        eval_split="val", eval_images=12, metrics=Metrics(0.83, 0.75, per_class, "bees", 0.5, tta="flip")))
    at = seed.app("pages/train.py", timeout=120, run=run.id).run()
    assert not at.exception
    recall = next(m for m in at.metric if m.label == "Smallest class recall")
    assert recall.value == "50.0 %"
    assert "Evaluated with flip TTA" in seed.texts(at)
