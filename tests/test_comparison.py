"""Paired comparison of two runs: statistics against hand-computed cases, matching by image content,
seed groups, and plain sentences for comparisons that cannot be made."""

from __future__ import annotations

import hashlib
import json

import app_seed as seed
import numpy as np
import pandas as pd
import pytest

from tlcore import cli
from tlcore.errors import InvalidInput
from tlcore.evaluate.comparison import (
    bootstrap_counts,
    compare_predictions,
    compare_runs,
    mcnemar_exact_p,
    percentile_interval,
    resampled_accuracy,
    seed_groups,
)
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import RunStatus

LABELS = ["ants", "bees"]


@pytest.mark.parametrize("fixed, broken, expected", [
    (0, 0, 1.0),  # no discordant pair: nothing to test
    (0, 5, 2 / 32),  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (1, 4, 2 * 6 / 32),  # 2 * (1 + 5) / 32 = 0.375
    (8, 2, 2 * 56 / 1024),  # 2 * (1 + 10 + 45) / 1024 = 0.109375
    (3, 3, 1.0),  # 2 * 42 / 64 > 1: capped
    (0, 10, 2 / 1024),
])
def test_mcnemar_exact_p_matches_the_binomial_by_hand(fixed, broken, expected):
    assert mcnemar_exact_p(fixed, broken) == pytest.approx(expected, abs=1e-12)
    assert mcnemar_exact_p(broken, fixed) == pytest.approx(expected, abs=1e-12)  # two-sided


def test_bootstrap_of_two_images_gives_the_hand_computed_interval():
    # A wrong on both, B right on the first only: the resampled delta is (times image 1 drawn) / 2,
    # i.e. 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1], the mean 0.5.
    counts = bootstrap_counts(2, resamples=4000, seed=7)
    delta = resampled_accuracy(counts, [True, False]) - resampled_accuracy(counts, [False, False])
    assert set(np.unique(delta)) == {0.0, 0.5, 1.0}
    assert percentile_interval(delta) == (0.0, 1.0)
    assert delta.mean() == pytest.approx(0.5, abs=0.03)
    assert np.mean(delta == 0.5) == pytest.approx(0.5, abs=0.03)


def _table(true, pred, names=None):
    names = names or [f"/blobs/{hashlib.sha256(str(i).encode()).hexdigest()}.png" for i in range(len(true))]
    return pd.DataFrame({"path": names, "source": [f"img{i}.png" for i in range(len(true))], "true": true,
                         "pred": pred, "confidence": [0.9] * len(true)})


def test_identical_runs_show_no_difference_with_a_zero_interval():
    true = ["ants", "bees"] * 10
    pred = ["ants", "ants"] * 10
    c = compare_predictions(_table(true, pred), _table(true, pred), LABELS)
    assert (c.n_shared, c.delta, c.ci_low, c.ci_high, c.mcnemar_p) == (20, 0.0, 0.0, 0.0, 1.0)
    assert (c.fixed, c.broken, c.both_wrong) == (0, 0, 10)
    assert c.verdict.startswith("No clear difference between A and B: +0.0 pts")


def test_b_fixing_every_error_of_a_is_called_better_with_its_numbers():
    true = ["ants", "bees"] * 10
    a = _table(true, ["ants"] * 20)  # every bee wrong
    b = _table(true, true)
    c = compare_predictions(a, b, LABELS, name_a="head", name_b="finetune")
    assert (c.acc_a, c.acc_b, c.delta) == (0.5, 1.0, 0.5)
    assert (c.fixed, c.broken, c.both_wrong) == (10, 0, 0)
    assert c.mcnemar_p == pytest.approx(2 / 1024)
    assert 0 < c.ci_low <= 0.5 <= c.ci_high <= 1
    assert c.f1_b == 1.0 and c.f1_a == pytest.approx((2 / 3 + 0) / 2)  # ants F1 2/3, bees 0
    assert c.verdict == (f"finetune is better: +50.0 pts, 95 % CI +{100 * c.ci_low:.1f} to +{100 * c.ci_high:.1f}, "
                         "p = 0.002")
    assert list(c.fixed_images["true"]) == ["bees"] * 10 and c.broken_images.empty
    reverse = compare_predictions(b, a, LABELS, name_a="finetune", name_b="head")
    assert reverse.verdict.startswith("finetune is better: head is −50.0 pts")


def test_the_interval_is_seeded():
    rng = np.random.default_rng(0)
    true = list(rng.choice(LABELS, 60))
    a = _table(true, [t if rng.random() < 0.7 else "ants" for t in true])
    b = _table(true, [t if rng.random() < 0.8 else "bees" for t in true])
    first, again = compare_predictions(a, b, LABELS), compare_predictions(a, b, LABELS)
    other = compare_predictions(a, b, LABELS, seed=1)
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.resamples == 2000


def test_runs_scored_on_different_images_are_compared_on_the_shared_ones(tmp_path):
    true = ["ants", "bees", "ants", "bees"]
    files = []
    for i in range(5):  # plain file names: matched by the sha256 of their bytes
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(f"pixels {i}".encode())
        files.append(str(path))
    a = _table(true, true, files[:4])
    copy = tmp_path / "copy_of_photo1.png"
    copy.write_bytes(b"pixels 1")  # the same image under another name
    b = _table(["ants", "bees", "ants", "bees"], ["ants", "ants", "ants", "bees"], [files[0], str(copy), files[4],
                                                                                     files[3]])
    c = compare_predictions(a, b, LABELS)
    assert (c.n_shared, c.only_a, c.only_b) == (3, 1, 1)
    assert c.broken == 1 and c.broken_images.loc[0, "source"] == "img1.png"
    assert "3 are shared" in c.coverage_note


# --------------------------------------------------------------- whole runs


@pytest.fixture
def runs(store):
    ds = seed.dataset(store)
    a = seed.run(store, ds, "alpha", config={"seed": 0})
    b = seed.run(store, ds, "beta", config={"seed": 1})
    return ds, a, b


def test_cli_compare_json_has_the_review_keys(store, runs, capsys):
    _, a, b = runs
    rows = [json.loads(line) for line in RunFolder(b.id).predictions.read_text().splitlines()]
    rows[0]["pred"] = rows[0]["true"] if rows[0]["pred"] != rows[0]["true"] else "wasps"  # B differs on one image
    RunFolder(b.id).predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["compare", a.id, b.id, "--json"]) == 0
    out = capsys.readouterr().out
    payload = json.loads(out.strip().splitlines()[-1])
    assert {"n_shared", "acc_a", "acc_b", "delta", "ci_low", "ci_high", "mcnemar_p", "fixed", "broken",
            "both_wrong"} <= set(payload)
    assert payload["n_shared"] == 12 and payload["fixed"] + payload["broken"] == 1
    assert payload["delta"] == pytest.approx(payload["acc_b"] - payload["acc_a"])
    assert payload["mcnemar_p"] == 1.0
    assert cli.main(["compare", "alpha", "beta"]) == 0
    assert "No clear difference between alpha and beta" in capsys.readouterr().out


def test_bad_comparisons_are_one_sentence(store, runs, capsys):
    ds, a, b = runs
    running = seed.run(store, ds, "gamma", RunStatus.RUNNING)
    bare = seed.run(store, ds, "delta", predictions=False)
    RunFolder(bare.id).created().write_labels(ds.classes)
    other = seed.dataset(store, name="pets", classes=("cats", "dogs"))
    pets = seed.run(store, other, "pets-run")
    cases = [((a.id, a.id), "was chosen twice"), ((a.id, running.id), "it is running"),
             ((a.id, bare.id), "has no saved predictions"), ((a.id, pets.id), "predict different classes")]
    for (x, y), message in cases:
        with pytest.raises(InvalidInput, match=message):
            compare_runs(x, y, store)
    assert cli.main(["compare", a.id, pets.id]) == 2
    err = capsys.readouterr().err
    assert "predict different classes" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_runs_differing_only_in_seed_are_grouped(store, runs):
    ds, a, b = runs
    seed.run(store, ds, "other-lr", config={"seed": 2, "lr": 0.01})
    groups = seed_groups(store.list_runs())
    assert len(groups) == 1
    group = groups[0]
    assert {r.name for r in group.runs} == {"alpha", "beta"} and group.seeds == [0, 1]
    mean, std = group.mean_std("accuracy")
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.0)
    assert group.name == "backbone=efficientnet_lite0 · lr=1e-3 · 2 seeds"  # its recipe, not one member
    seed.run(store, ds, "other-lr-again", config={"seed": 3, "lr": 0.01})
    names = sorted(g.name for g in seed_groups(store.list_runs()))
    assert names == ["lr=0.01 · 2 seeds", "lr=1e-3 · 2 seeds"]  # among other groups: what differs


def test_recipe_values_have_short_names():
    from tlcore.records.config import recipe_labels, short_value

    assert [short_value(v) for v in (0.0003, 1e-3, 0.25, 224, 3e-5, ["flip", "zoom"])] == [
        "3e-4", "1e-3", "0.25", "224", "3e-5", "flip+zoom"]
    assert recipe_labels([{"lr": 3e-4, "seed": 1, "batch_size": 8}, {"lr": 1e-3, "seed": 2, "batch_size": 8}]) == [
        "lr=3e-4", "lr=1e-3"]


def test_a_clear_difference_between_two_seeds_is_called_run_to_run_noise(store, runs):
    _, a, b = runs  # alpha and beta: one recipe, seeds 0 and 1
    rows = [json.loads(line) for line in RunFolder(b.id).predictions.read_text().splitlines()]
    RunFolder(b.id).predictions.write_text("".join(json.dumps({**r, "pred": r["true"]}) + "\n" for r in rows))
    # Widen the evaluation so that fixing alpha's mistakes is clearly more than chance.
    for run in (a, b):
        path = RunFolder(run.id).predictions
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "path": f"{r['path']}.{k}"}) + "\n" for k in range(4) for r in rows))
    c = compare_runs(a.id, b.id, store)
    assert c.same_recipe and c.significant and c.fixed == 12
    assert c.verdict.startswith("beta scored higher on these images (+25.0 pts")
    assert c.verdict.endswith("the two runs share one recipe (at most the seed differs): that is run-to-run noise, "
                              "not a better recipe")
    reverse = compare_runs(b.id, a.id, store)
    assert reverse.verdict.startswith("beta scored higher on these images (alpha is −25.0 pts")
