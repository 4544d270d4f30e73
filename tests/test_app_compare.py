"""AppTest: the Compare page — table, filters, deltas, config diff, matrices, tags/notes, links."""

from __future__ import annotations

import app_seed as seed
import pytest

from tlcore.records.store import RunStatus


@pytest.fixture(autouse=True)
def _no_device_probe(monkeypatch):
    monkeypatch.setenv("TLAB_DEVICE_PROBE", "off")


@pytest.fixture
def runs(store):
    ds = seed.dataset(store)
    a = seed.run(store, ds, "alpha", accuracy=0.70, tags=["baseline"])
    b = seed.run(store, ds, "beta", accuracy=0.85, backbone="vgg16", config={"lr": 0.0001})
    c = seed.run(store, ds, "gamma", RunStatus.FAILED, error="Out of memory.")
    return a, b, c


def test_shared_link_selects_runs_and_shows_deltas_and_diff(store, runs):
    a, b, c = runs
    at = seed.app("pages/compare.py", runs=f"{a.id},{b.id}").run()
    assert not at.exception
    assert at.multiselect(key="compare.runs").value == [a.id, b.id]
    metrics = {m.label: m for m in at.metric}
    assert metrics["alpha"].value == "70.0 %" and metrics["beta"].value == "85.0 %"
    assert metrics["beta"].delta == "+15.0 pts"
    diff = seed.table(at, "alpha")
    assert {"backbone", "lr"} <= set(diff.index)
    assert len(at.get("plotly_chart")) == 3  # curves + two confusion matrices
    assert f"?runs={a.id},{b.id}" in at.code[0].value


def test_filters_narrow_the_table(store, runs):
    at = seed.app("pages/compare.py").run()
    assert len(seed.table(at, "accuracy")) == 3
    at.text_input(key="compare.search").input("vgg").run()
    assert list(seed.table(at, "accuracy")["name"]) == ["beta"]
    at.text_input(key="compare.search").input("").run()
    at.multiselect(key="compare.tag").select("baseline").run()
    assert list(seed.table(at, "accuracy")["name"]) == ["alpha"]
    assert "Choose two or more runs" in seed.texts(at)


def test_failed_run_in_a_comparison_is_explained(store, runs):
    a, b, c = runs
    at = seed.app("pages/compare.py", runs=f"{a.id},{c.id}").run()
    assert not at.exception
    text = seed.texts(at)
    assert "failed: Out of memory." in text
    assert "no saved predictions" in text


def test_tag_and_note_are_saved(store, runs):
    a, b, c = runs
    at = seed.app("pages/compare.py", runs=a.id).run()
    at.multiselect(key=f"compare.tags.{a.id}").select("keeper")
    at.text_area(key=f"compare.note.{a.id}").input("Best so far; try more epochs.")
    at.button[0].click().run()
    assert not at.exception
    saved = store.get_run(a.id)
    assert saved.tags == ["baseline", "keeper"] and saved.note == "Best so far; try more epochs."
    assert "Saved the tags and note of alpha" in seed.texts(at)


def test_unknown_run_in_link_is_reported(store, runs):
    at = seed.app("pages/compare.py", runs="run-nope").run()
    assert not at.exception
    assert "not in this data home" in at.warning[0].value


def test_compare_lists_every_one_of_50_runs_in_its_table(store):
    import time

    ds = seed.dataset(store)
    for i in range(50):
        seed.run(store, ds, f"run-{i}", accuracy=0.5 + i / 100, predictions=False)
    at = seed.app("pages/compare.py")
    start = time.perf_counter()
    at.run()
    print(f"Compare took {time.perf_counter() - start:.2f} s to run with 50 runs")
    assert not at.exception
    assert len(seed.table(at, "accuracy")) == 50


def test_a_shared_sweep_link_groups_its_runs_by_configuration(store):
    import json

    ds = seed.dataset(store)
    # Stored under the long names sweeps used to get: the page names them by what varies.
    runs = [seed.run(store, ds, f"insects backbone=efficientnet_lite0 lr={lr} seed={s} (0e566b)", accuracy=accuracy,
                     config={"lr": lr, "seed": s}, sweep_id="sweep-20261129-1")
            for lr, s, accuracy in ((1e-3, 0, 0.6), (1e-3, 1, 0.8), (1e-4, 0, 0.5), (1e-4, 1, 0.5))]
    at = seed.app("pages/compare.py", sweep="sweep-20261129-1").run()
    assert not at.exception
    assert at.selectbox(key="compare.sweep").value == "sweep-20261129-1"
    assert sorted(at.multiselect(key="compare.runs").value) == sorted(r.id for r in runs)
    grouped = seed.table(at, "configuration")
    assert list(grouped["configuration"]) == ["lr=1e-3", "lr=1e-4"]
    assert list(grouped["accuracy"]) == ["70.0 % ± 14.1", "50.0 % ± 0.0"]
    names = ["lr=1e-3 · seed 0", "lr=1e-3 · seed 1", "lr=1e-4 · seed 0", "lr=1e-4 · seed 1"]
    cards = [m.label for m in at.metric][:4]
    assert cards == names
    # The confusion matrices: in the Metrics' order, titles in full.
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")
              if json.loads(c.proto.spec)["layout"].get("title", {}).get("text") in names]
    assert titles == names
    # The default paired comparison is between the two settings, not two seeds of one.
    pair = at.selectbox(key="compare.pair_a"), at.selectbox(key="compare.pair_b")
    assert [p.format_func(p.value) for p in pair] == ["lr=1e-3 · seed 0", "lr=1e-4 · seed 0"]
    # One number format in the runs table: every metric column in percent.
    table = seed.table(at, "accuracy")
    assert list(table["accuracy"].round(1))[:2] == [50.0, 50.0] and "split" in table.columns
    formats = {name: column["type_config"].get("format") for name, column in
               json.loads(at.dataframe[0].proto.columns).items() if name in ("accuracy", "macro F1",
                                                                              "smallest-class recall")}
    assert formats == dict.fromkeys(("accuracy", "macro F1", "smallest-class recall"), "%.1f %%")
    assert "?sweep=sweep-20261129-1" in at.code[0].value
    chart = at.get("plotly_chart")[0].proto.spec
    assert '"one seed"' in chart  # each seed drawn as a point beside the mean


# ------------------------------------------------------- paired comparison


def _all_right(run_id):
    """Rewrite a seeded run's predictions so that it gets every image right."""
    import json

    from tlcore.records.run_folder import RunFolder

    path = RunFolder(run_id).predictions
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "pred": r["true"], "confidence": 0.95}) + "\n" for r in rows))


class _FakeModel:
    def __init__(self, ref):
        self.ref = ref

    def gradcam(self, rgb):
        import numpy as np

        return np.linspace(0, 1, 16).reshape(4, 4)


def test_paired_comparison_gives_verdict_counts_and_fixed_gallery(store, runs, monkeypatch):
    from ui import state

    a, b, c = runs
    _all_right(b.id)  # beta fixes alpha's 3 mistakes, breaks none: p = 2 / 2**3 = 0.25
    at = seed.app("pages/compare.py", runs=f"{a.id},{b.id}").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="compare.pair_a").value == a.id and at.selectbox(key="compare.pair_b").value == b.id
    verdict = at.info[0].value
    assert verdict.startswith("No clear difference between alpha and beta: +25.0 pts, 95 % CI +")
    assert verdict.endswith("p = 0.250")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Shared images"] == "12" and metrics["Fixed / broken / both wrong"] == "3 / 0 / 0"
    assert [t.label for t in at.tabs] == ["B fixed (3)", "B broke (0)"]
    text = seed.texts(at)
    assert "alpha: bees (60%)" in text and "beta: ants (95%)" in text and "No image was broken." in text
    assert len(at.image) == 3  # the photos, without Grad-CAMs until asked

    calls = []
    monkeypatch.setattr(state, "load_model", lambda ref: calls.append(ref) or _FakeModel(ref))
    at.toggle(key="compare.pair_cams.fixed").set_value(True).run()
    assert not at.exception, at.exception
    assert sorted(set(calls)) == sorted({a.id, b.id}) and len(calls) == 6  # 3 images x 2 runs
    captions = [c for image in at.image for c in image.captions]
    assert captions.count("alpha looked here") == 3 and captions.count("beta looked here") == 3
    assert captions.count("photo") == 3


def test_runs_of_different_classes_are_refused_in_a_sentence(store, runs):
    a, _, _ = runs
    other = seed.dataset(store, name="pets", classes=("cats", "dogs"))
    pets = seed.run(store, other, "pets-run")
    at = seed.app("pages/compare.py", runs=f"{a.id},{pets.id}").run()
    assert not at.exception
    assert any("predict different classes" in w.value for w in at.warning)


def test_a_seed_group_is_one_entry_with_mean_and_std(store):
    ds = seed.dataset(store)
    members = [seed.run(store, ds, f"lite-s{s}", accuracy=acc, config={"seed": s})
               for s, acc in ((0, 0.80), (1, 0.84), (2, 0.88))]
    seed.run(store, ds, "other-recipe", accuracy=0.5, config={"lr": 0.1})
    group = f"seeds:{members[0].id}"
    at = seed.app("pages/compare.py", runs=group).run()
    assert not at.exception, at.exception
    assert at.multiselect(key="compare.runs").value == [group]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["backbone=efficientnet_lite0 · lr=1e-3 · 3 seeds"] == "84.0 % ± 4.0"  # named by its recipe
    assert {"lite-s0", "lite-s1", "lite-s2"} <= set(metrics)  # each seed is also shown
    assert "Seeds" in [h.value for h in at.subheader]
    assert "seeds 0, 1, 2" in seed.texts(at)


def test_select_all_keeps_a_seed_group_without_its_runs_twice(store):
    ds = seed.dataset(store)
    members = [seed.run(store, ds, f"lite-s{s}", accuracy=0.8, config={"seed": s}) for s in (0, 1)]
    other = seed.run(store, ds, "other-recipe", accuracy=0.5, config={"lr": 0.1})
    at = seed.app("pages/compare.py").run()
    assert len(at.multiselect(key="compare.runs").options) == 4  # "Select all" picks the runs and the group
    at.multiselect(key="compare.runs").set_value([*(m.id for m in members), other.id, f"seeds:{members[0].id}"]).run()
    assert not at.exception, at.exception
    assert sorted(at.multiselect(key="compare.runs").value) == sorted([f"seeds:{members[0].id}", other.id])
    cards = [m.label for m in at.metric]
    assert cards.count("lite-s0") == 1 and cards.count("lite-s1") == 1
