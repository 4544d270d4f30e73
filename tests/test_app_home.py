"""AppTest: the frame (navigation, sidebar, access gate) and the Home page."""

from __future__ import annotations

import time

import app_seed as seed
import pytest

from tlcore.records.config import RunSpec
from tlcore.records.store import RunStatus


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


def test_empty_home_says_what_to_do_first(store):
    at = seed.app().run()
    assert not at.exception
    text = seed.texts(at)
    assert "No runs yet" in text
    assert "Nothing is training" in text
    assert "Worker:" in text and "stopped" in text
    assert "Pixel and feature caches: 0.00 GB in 0 file(s); no budget (set TLCORE_CACHE_GB" in text
    # The worker can be started from the sidebar.
    assert at.button(key="sidebar.start_worker")


def test_home_shows_training_now_queue_and_recent_runs(store):
    ds = seed.dataset(store)
    for i in range(3):
        seed.run(store, ds, f"done-{i}", accuracy=0.7 + i / 10)
    seed.run(store, ds, "broken", RunStatus.FAILED, error="Out of memory.")
    live = seed.run(store, ds, "live-run", RunStatus.RUNNING, epochs=2, config={"head_epochs": 5},
                    progress={"phase": "head", "epoch": 3, "epochs": 5, "batch": 4, "batches": 8, "eta_s": 75})
    store.create_run("waiting-run", RunSpec.from_dict({"backbone": "vgg16", "head_epochs": 3}, dataset_id=ds.id))

    at = seed.app().run()
    assert not at.exception
    text = seed.texts(at)
    assert "live-run" in text
    assert "ETA: 1 min 15 s" in text
    assert "Runs: 6" in text and "Finished: 3" in text
    assert "Best accuracy: 90.0 %" in text
    assert "queued but the worker is not running" not in text  # something is training
    queue = seed.table(at, "#")
    assert list(queue["name"]) == ["waiting-run"]
    recent = seed.table(at, "accuracy")
    assert {"done-0", "done-2", "broken", "live-run"} <= set(recent["name"])
    assert at.sidebar.progress and live.id  # the sidebar shows the live run's progress


def test_home_shows_the_caches_against_their_budget_and_a_bad_budget_in_a_sentence(store, monkeypatch):
    monkeypatch.setenv("TLCORE_CACHE_GB", "20")
    assert "0.00 GB in 0 file(s) of a 20.00 GB budget (TLCORE_CACHE_GB)" in seed.texts(seed.app().run())
    monkeypatch.setenv("TLCORE_CACHE_GB", "lots")
    at = seed.app().run()
    assert not at.exception and any("must be a number of gigabytes" in w.value for w in at.warning)


def test_queue_without_worker_offers_to_start_it(store):
    ds = seed.dataset(store)
    store.create_run("waiting-run", RunSpec.from_dict({"head_epochs": 3}, dataset_id=ds.id))
    at = seed.app().run()
    assert not at.exception
    assert "queued but the worker is not running" in seed.texts(at)
    assert at.button(key="home.start_worker")


def test_home_with_50_runs_shows_the_best_of_them(store):
    ds = seed.dataset(store)
    for i in range(50):
        seed.run(store, ds, f"run-{i}", accuracy=0.5 + i / 100, predictions=False)
    at = seed.app()
    start = time.perf_counter()
    at.run()
    print(f"Home took {time.perf_counter() - start:.2f} s to run with 50 runs")
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Best accuracy"] == "99.0 %"


def test_password_gate_keeps_strangers_out(store):
    at = seed.app()
    at.secrets["access"] = {"password": "s3cret"}
    at.run()
    assert not at.exception
    assert not at.dataframe and "No runs yet" not in seed.texts(at)
    at.text_input(key="gate.password").input("wrong")
    at.button[0].click()
    at.run()
    assert "not right" in seed.texts(at)
    at.text_input(key="gate.password").input("s3cret")
    at.button[0].click()
    at.run()
    assert not at.exception
    assert "No runs yet" in seed.texts(at)


def test_a_page_run_without_the_frame_still_asks_for_the_password(store):
    # A deep link as the first request after a server start runs pages/*.py on its own.
    seed.run(store, seed.dataset(store), "secret-run")
    at = seed.app("pages/compare.py")
    at.secrets["access"] = {"password": "s3cret"}
    at.run()
    assert not at.exception
    assert at.text_input(key="gate.password") is not None
    assert not at.dataframe and "secret-run" not in seed.texts(at)


def test_a_page_run_without_the_frame_gets_the_sidebar_and_draws_once(store):
    # A deep link as the first request after a server start runs pages/*.py on its own.
    ds = seed.dataset(store)
    seed.run(store, ds, "queued-run", RunStatus.QUEUED)
    at = seed.app("pages/compare.py")
    at.run()
    assert not at.exception
    sidebar = "\n".join(str(el.value) for el in [*at.sidebar.markdown, *at.sidebar.caption])
    assert "Worker:" in sidebar and "1 run(s) queued." in sidebar and "Data home:" in sidebar
    assert [t.value for t in at.title] == ["Compare runs"]


def test_home_shows_the_cluster_and_the_sidebar_says_cluster(store, tlcore_home):
    import json
    import os
    import socket

    from tlcore.queue.cluster import CLUSTER_FILE, ClusterStatus, Node

    ds = seed.dataset(store)
    live = seed.run(store, ds, "on-node-a", RunStatus.RUNNING, progress={"phase": "head", "epoch": 1, "epochs": 5})
    # A dispatcher serving this data home (this process stands in for it) and its view of the cluster.
    (tlcore_home / "worker.json").write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "cluster": "ray://head:10001"}))
    (tlcore_home / CLUSTER_FILE).write_text(json.dumps(ClusterStatus(
        address="ray://head:10001",
        nodes=[Node("aaaa1111bbbb", "gpu-box-1", 16, 2), Node("cccc2222dddd", "gpu-box-2", 16, 2)],
        cpus_per_run=1, gpus_per_run=1, running={live.id: "aaaa1111bbbb"}, updated_at=time.time()).to_dict()))

    at = seed.app().run()
    assert not at.exception
    text = seed.texts(at)
    assert "Nodes: 2" in text and "GPUs: 4" in text and "Runs that fit now: 3 of 4" in text
    nodes = seed.table(at, "node")
    assert list(nodes["host"]) == ["gpu-box-1", "gpu-box-2"] and list(nodes["training"]) == ["on-node-a", "—"]
    assert "cluster" in " ".join(str(m.value) for m in at.sidebar.markdown) and "ray://head:10001" in text
