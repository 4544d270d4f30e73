"""AppTest: the Train page — form, presets, launch, the live run, failed runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import app_seed as seed
import pytest

from tlcore.records.store import RunStatus


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch):
    """No device probe and no real worker: starting one is recorded instead."""
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")
    from tlcore.queue import jobs

    started = []
    monkeypatch.setattr(jobs, "start_worker_process", lambda cluster=None: started.append(cluster or 1) or 4242)
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
    assert at.selectbox(key="train.mixed_precision").value == "off"  # the seed recipe trained in float32


def test_precision_xla_and_batch_scope_settings_reach_the_queued_run(store, _no_processes):
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    assert at.selectbox(key="train.batch_size").label == "Batch size per GPU"
    at.selectbox(key="train.xla").select("off")
    at.selectbox(key="train.mixed_precision").select("on")
    at.radio(key="train.batch_scope").set_value("global").run()
    assert at.selectbox(key="train.batch_size").label == "Batch size (global)"
    at.button(key="train.launch").click().run()
    assert not at.exception
    [run] = store.list_runs()
    assert (run.config["xla"], run.config["mixed_precision"], run.config["batch_scope"]) == ("off", "on", "global")


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


def test_a_sweep_launched_from_the_form_queues_the_grid_on_the_cluster_set_in_the_sidebar(store, _no_processes):
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    at.session_state["settings.cluster"] = "ray://head:10001"  # the sidebar's setting
    at.number_input(key="train.head_epochs").set_value(2)
    at.multiselect(key="train.sweep_backbones").set_value(["efficientnet_lite0", "mobilenet_v2"])
    at.text_input(key="train.sweep_lrs").input("1e-3,1e-4")
    at.text_input(key="train.sweep_seeds").input("0,1")
    at.button(key="train.sweep_launch").click().run()
    assert not at.exception
    runs = store.list_runs()
    assert len(runs) == 8 and len({r.sweep_id for r in runs}) == 1 and runs[0].sweep_id
    assert {(r.backbone, r.config["lr"], r.config["seed"]) for r in runs} == {
        (b, lr, s) for b in ("efficientnet_lite0", "mobilenet_v2") for lr in (1e-3, 1e-4) for s in (0, 1)}
    assert {r.config["head_epochs"] for r in runs} == {2}  # the rest of the form applies to every run
    assert f"Queued sweep {runs[0].sweep_id}: 8 runs" in seed.texts(at).replace("**", "")
    assert _no_processes == ["ray://head:10001"]  # the worker starts as the cluster's dispatcher

    at.text_input(key="train.sweep_seeds").input("0,,1")
    at.button(key="train.sweep_launch").click().run()
    assert "Sweep not launched: `--seeds` must be a comma list" in seed.texts(at)
    assert store.count_runs() == 8


def test_the_run_panel_says_where_the_run_trained(store):
    from tlcore.records.run_record import Executor

    ds = seed.dataset(store)
    run = seed.run(store, ds, "on the cluster")
    store.set_executor(run.id, Executor(kind="ray", host="gpu-box-2", node_id="3f2a9c0d1e", gpus=1))
    at = seed.app("pages/train.py", run=run.id, timeout=120).run()
    assert not at.exception
    assert "Ran on: ray on node 3f2a9c0d… (gpu-box-2), 1 GPU" in seed.texts(at)


def test_lr_finder_draws_its_curve_and_use_this_fills_the_form(store, monkeypatch):
    from tlcore.train import devices, lr_finder

    calls = []
    monkeypatch.setattr(devices, "_declared_roles", [])
    monkeypatch.setattr(devices, "_policy", "dashboard: (this test applies nothing)")

    def fake_find_lr(config, store, *, phase):  # the range test itself is tested in test_lr_finder.py
        assert devices.declared_roles() == ("dashboard",)  # capped before it could start TensorFlow
        calls.append((config.backbone, config.class_weight, phase))
        curve = [(lr, 2.0 - 0.1 * i if i < 30 else 9.0) for i, lr in enumerate(lr_finder.learning_rates(1e-6, 1, 40))]
        return lr_finder.LRFinding(phase, 0.0023, 0.023, curve, 1.5)

    monkeypatch.setattr(lr_finder, "find_lr", fake_find_lr)
    seed.dataset(store)
    at = seed.app("pages/train.py", timeout=120).run()
    at.button(key="train.lr_find").click().run()
    assert not at.exception
    assert calls == [("efficientnet_lite0", "auto", "head")]
    assert "Suggested head rate **0.0023**" in seed.texts(at)
    assert at.get("plotly_chart")  # the loss-vs-LR curve
    at.button(key="train.lr_use").click().run()
    assert at.select_slider(key="train.lr").value == pytest.approx(0.0023)
    assert at.selectbox(key="train.preset").value == "custom"
    at.button(key="train.launch").click().run()
    [run] = store.list_runs()
    assert run.config["lr"] == pytest.approx(0.0023)


def test_succeeded_run_shows_the_smallest_class_recall(store):
    from tlcore.records.run_record import ClassMetrics, Metrics, RunSummary

    ds = seed.dataset(store)
    run = seed.run(store, ds, "done", RunStatus.SUCCEEDED)
    per_class = {"ants": ClassMetrics(1.0, 0.9, 0.9, 10), "bees": ClassMetrics(0.8, 0.5, 0.6, 2)}
    store.set_summary(run.id, RunSummary(
        backbone="efficientnet_lite0", weights="imagenet", dataset=ds.label, dataset_id=ds.id, image_size=64,
        eval_split="val", eval_images=12, metrics=Metrics(0.83, 0.75, per_class, "bees", 0.5, tta="flip")))
    at = seed.app("pages/train.py", timeout=120, run=run.id).run()
    assert not at.exception
    recall = next(m for m in at.metric if m.label == "Smallest class recall")
    assert recall.value == "50.0 %"
    assert "Evaluated with flip TTA" in seed.texts(at)
    # Which split the numbers come from: this dataset has no test split.
    assert {m.label: m.value for m in at.metric}["Validation accuracy"] == "83.0 %"
    assert "on the validation split, which also chose the early-stopping epoch" in seed.texts(at)


def test_run_view_shows_the_heads_choice_its_trials_and_a_fine_tune_that_was_not_kept(store):
    import dataclasses

    from tlcore.records.run_record import ClassWeightChoice, FinetuneDecision, HeadSearch, HeadTrial

    ds = seed.dataset(store)
    run = seed.run(store, ds, "searched")
    trials = [HeadTrial(lr=lr, dropout=0.2, label_smoothing=0.0, class_weight=cw, val_macro_f1=f1, val_accuracy=f1,
                        best_epoch=3, epochs=4)
              for lr, cw, f1 in ((1e-3, "none", 0.84), (1e-3, "balanced", 0.81), (3e-3, "none", 0.86))]
    summary = dataclasses.replace(
        store.get_run(run.id).summary, class_weight="none",
        head_search=HeadSearch(trials=trials, chosen=2, seconds=4.2, class_weight=ClassWeightChoice(
            chosen="none", none_val_macro_f1=0.86, balanced_val_macro_f1=0.81)),
        finetune=FinetuneDecision(head_val_accuracy=0.866, finetune_val_accuracy=0.858, kept="head"),
        finetune_inputs="cached")
    store.set_summary(run.id, summary)

    at = seed.app("pages/train.py", run=run.id, timeout=120).run()
    assert not at.exception
    text = seed.texts(at)
    assert "Class weighting auto: none kept (best validation macro F1: none 0.8600, balanced 0.8100)." in text
    assert "so the head's weights were kept" in text
    assert "The fine-tune trained the top layers on cached activations" in text
    table = at.dataframe[0].value
    assert len(table) == 3 and list(table["val macro F1"])[0] == 0.86 and list(table["kept"])[0] == "✓"


WIDGET_KINDS = ("selectbox", "number_input", "checkbox", "radio", "multiselect", "select_slider", "slider",
                "text_input")


def test_every_recipe_field_has_a_widget_and_a_non_default_recipe_reaches_the_queued_run(store, _no_processes):
    from tests.test_cli import other_recipe_values
    from tlcore.records.config import TrainConfig
    from ui import train_form

    ds = seed.dataset(store)
    wanted = TrainConfig(dataset=ds.id, **{name: value for name, (_, value) in other_recipe_values().items()})
    at = seed.app("pages/train.py", timeout=120)
    for key, value in train_form.widget_values(wanted.to_dict()).items():
        at.session_state[key] = value
    at.run()
    assert not at.exception
    drawn = {w.key for kind in WIDGET_KINDS for w in getattr(at, kind)}
    assert set(train_form.widget_keys()) - drawn == set()
    at.button(key="train.launch").click().run()
    assert not at.exception, at.exception
    [run] = store.list_runs()
    assert TrainConfig.from_dict(run.config) == wanted
