"""The model registry and its review gate: versions, the fixed evaluation set, the gate's arithmetic, approval,
promotion with its refusals, the audit trail, rollback, and two people racing.

The gate tests build prediction tables directly (the gate reads predictions and nothing else). The flow
tests use a copy of the session's `trained_run` home; a second "candidate" is that run's folder copied
with other predictions, which is what a second run looks like to everything the review reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import pandas as pd
import pytest

from tests.registry_runs import copy_home, copy_run
from tlcore.deploy import model_registry, review
from tlcore.deploy.review import GatePolicy, judge
from tlcore.errors import InvalidInput, NotFound
from tlcore.evaluate.comparison import compare_predictions
from tlcore.evaluate.evaluation import read_predictions, write_predictions
from tlcore.records.config import RunSpec
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import ModelTables, RunStatus, Store

# ----------------------------------------------------------- gate arithmetic


def _table(labels: list[str], preds: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img{i}.png" for i in range(len(labels))], "source": "s", "true": labels,
                         "pred": preds, "confidence": 0.9})


def _gate(truth, base, cand, *, leaked=0, policy=None):
    policy = policy or GatePolicy()
    comparison = compare_predictions(_table(truth, base), _table(truth, cand), sorted(set(truth)))
    accuracy = sum(t == p for t, p in zip(truth, cand)) / len(truth)
    return judge(policy, candidate_accuracy=accuracy, leaked=leaked, eval_images=len(truth), comparison=comparison)


TRUTH = ["a"] * 100 + ["b"] * 100


def _flip(labels, indices):
    other = {"a": "b", "b": "a"}
    return [other[t] if i in indices else t for i, t in enumerate(labels)]


def test_the_gate_passes_a_clearly_better_candidate():
    base = _flip(TRUTH, set(range(0, 30)) | set(range(100, 130)))  # 70 % right
    verdict = _gate(TRUTH, base, TRUTH)
    assert verdict.passed
    assert verdict.reasons[1].startswith("Better than production")


def test_the_gate_passes_a_candidate_that_is_not_worse_than_the_margin():
    # Identical predictions: delta 0 with a zero-width interval, inside the 1-pt margin.
    base = _flip(TRUTH, {0, 100})
    verdict = _gate(TRUTH, base, base)
    assert verdict.passed
    assert "Not worse than production by more than 1 pt" in verdict.reasons[1]


def test_the_gate_fails_a_worse_candidate_and_says_by_how_much():
    cand = _flip(TRUTH, set(range(0, 6)) | set(range(100, 106)))  # 6 pts worse on both classes
    verdict = _gate(TRUTH, TRUTH, cand)
    assert not verdict.passed
    (reason,) = [r for r in verdict.reasons if r.startswith("May be worse")]
    assert "delta −6.0 pts" in reason
    # The same loss is within a 10-point margin (and a 10-point class drop), so a lenient policy passes it.
    assert _gate(TRUTH, TRUTH, cand, policy=GatePolicy(non_inferiority_pts=10, max_class_drop_pts=10)).passed


def test_the_gate_fails_a_leaked_candidate_however_good():
    verdict = _gate(TRUTH, _flip(TRUTH, set(range(50))), TRUTH, leaked=3)
    assert not verdict.passed
    assert verdict.reasons == ["3 of the 200 evaluation images are among the candidate's training images "
                               "(leaked), so its scores on them mean nothing."]


def test_the_gate_fails_a_candidate_whose_class_recall_drops_even_if_overall_better():
    # Class a: 10 images lost (-10 pts of its recall); class b: 40 fixed. Overall +15 pts.
    base = _flip(TRUTH, set(range(100, 140)))
    cand = _flip(TRUTH, set(range(0, 10)))
    verdict = _gate(TRUTH, base, cand)
    assert not verdict.passed
    assert verdict.reasons == ["Recall drops by more than 5 pts for a (−10.0 pts)."]


def test_a_minimum_accuracy_applies_without_production():
    verdict = judge(GatePolicy(min_accuracy=0.9), candidate_accuracy=0.85, leaked=0, eval_images=10, comparison=None)
    assert not verdict.passed and verdict.reasons == ["Accuracy 85.0 % is below the team's minimum of 90.0 %."]
    assert judge(GatePolicy(), candidate_accuracy=0.1, leaked=0, eval_images=10, comparison=None).passed
    with pytest.raises(InvalidInput, match="`min_accuracy` must be between 0 and 1"):
        GatePolicy(min_accuracy=90)


# ------------------------------------------------------------- the flow


@pytest.fixture(scope="module")
def shared_home(trained_run, tmp_path_factory):
    """One copy of the trained run's data home for this module: its models load once (the model cache is
    keyed by file), and each test registers its own model name."""
    return copy_home(trained_run.home, tmp_path_factory.mktemp("registry") / "home")


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("TLCORE_HOME", str(shared_home))
    return shared_home


@pytest.fixture(scope="module")
def twin(shared_home, trained_run):
    """A second run with the trained run's model and predictions (loaded once for the module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLCORE_HOME", str(shared_home))
        return copy_run(trained_run.run_id, "twin")


@pytest.fixture
def name(request):
    """A model name of this test's own."""
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_"))[:60]


def test_register_pins_the_fixed_set_and_numbers_versions(home, trained_run, name, twin):
    v1 = model_registry.register(name, trained_run.run_id, "ana")
    other = twin
    v2 = model_registry.register(name, other, "ben")
    assert (v1.version, v2.version) == (1, 2)
    assert model_registry.register(name, other, "ben").version == 2  # the same run keeps its version
    shown = model_registry.describe(name)
    run = Store().get_run(trained_run.run_id)
    assert shown["eval_set"]["images"] == run.summary.eval_images and shown["eval_set"]["labels"] == ["blue", "red"]
    assert [v["run_id"] for v in shown["versions"]] == [trained_run.run_id, other]
    assert shown["versions"][0]["accuracy"] == run.accuracy and shown["aliases"] == {}


def test_bad_input_gets_one_sentence_and_changes_nothing(home, trained_run, name):
    store = Store()
    with pytest.raises(NotFound, match="No run 'nope'"):
        model_registry.register(name, "nope", "ana")
    with pytest.raises(InvalidInput, match="letters, digits"):
        model_registry.register("no spaces", trained_run.run_id, "ana")
    failed = store.create_run("broken", RunSpec.from_dict({}, dataset_id="ds"))
    store.finish_run(failed.id, RunStatus.FAILED, error="Out of memory.")
    with pytest.raises(InvalidInput, match=r"cannot be a model version: it failed \(Out of memory.\)"):
        model_registry.register(name, failed.id, "ana")
    assert name not in [m.name for m in ModelTables(store).list_models()]
    with pytest.raises(NotFound, match=f"No model named '{name}'"):
        review.open_review(name, trained_run.run_id, "ana")
    model_registry.register(name, trained_run.run_id, "ana")
    with pytest.raises(NotFound, match="No review 'rev-x'"):
        review.decide("rev-x", True, "ana", "")
    with pytest.raises(NotFound, match="No review 'rev-x'"):
        model_registry.promote("rev-x", "ana")
    # A run on another label set.
    three = store.add_dataset("three", "test", ["blue", "green", "red"], {"train": {"green": 1}}, {})
    other = store.create_run("three-classes", RunSpec.from_dict({}, dataset_id=three.id))
    store.finish_run(other.id, RunStatus.SUCCEEDED)
    other = other.id
    with pytest.raises(InvalidInput, match=f"predicts blue, green, red, but model {name} is judged on blue, red"):
        review.open_review(name, other, "ana")
    assert [v.version for v in ModelTables(store).model_versions(name)] == [1]
    assert ModelTables(store).list_reviews(name) == []


def test_review_approve_promote_audit_and_rollback(home, trained_run, name):
    model_registry.register(name, trained_run.run_id, "ana")
    opened = review.open_review(name, trained_run.run_id, "ana")
    assert opened.baseline_version is None and opened.gate_passed
    assert opened.evidence["candidate"]["leaked"] == 0 and opened.evidence["comparison"] is None
    with pytest.raises(InvalidInput, match="is open, not approved, so production stays"):
        model_registry.promote(opened.id, "ana")
    review.decide(opened.id, True, "ben", "first model, fine")
    model_registry.promote(opened.id, "ana")
    with pytest.raises(InvalidInput, match="already promoted"):
        model_registry.promote(opened.id, "ana")

    # A worse candidate (the first 3 evaluation images wrong): the gate fails and promotion is refused.
    worse = copy_run(trained_run.run_id, "worse", wrong=3)
    bad = review.open_review(name, worse, "ana")
    assert not bad.gate_passed and bad.baseline_version == 1
    evidence = bad.evidence
    assert evidence["comparison"]["broken"] == 3 and evidence["comparison"]["fixed"] == 0
    assert len(evidence["broken_images"]) == 3 and evidence["baseline"]["version"] == 1
    assert evidence["candidate"]["size_mb"] > 0 and evidence["candidate"]["latency_ms"] > 0
    assert {row["label"] for row in evidence["per_class"]} == {"blue", "red"}
    review.decide(bad.id, True, "ben", "looks fine to me")
    with pytest.raises(InvalidInput, match=f"Review {bad.id} did not pass its gate .*May be worse"):
        model_registry.promote(bad.id, "ana")
    assert model_registry.version_of(name, "production").version == 1
    with pytest.raises(InvalidInput, match="`--force` needs `--reason`"):
        model_registry.promote(bad.id, "ana", force=True)
    forced = model_registry.promote(bad.id, "cto", force=True, reason="hotfix for the demo")
    assert (forced.from_version, forced.to_version, forced.action) == (1, 2, "force-promote")
    kept = ModelTables(Store()).get_review(bad.id)
    assert kept.status == "approved" and kept.decided_by == "ben" and kept.promoted_at is not None

    back = model_registry.rollback(name, "ana", reason="demo over")
    assert (back.from_version, back.to_version, back.action) == (2, 1, "rollback")
    assert model_registry.version_of(name, "production").run_id == trained_run.run_id

    trail = [(e.alias, e.from_version, e.to_version, e.action, e.by, e.review_id)
             for e in ModelTables(Store()).model_audit(name)]
    assert trail == [("candidate", None, 1, "set", "ana", opened.id),
                     ("production", None, 1, "promote", "ana", opened.id),
                     ("candidate", 1, 2, "set", "ana", bad.id),
                     ("production", 1, 2, "force-promote", "cto", bad.id),
                     ("production", 2, 1, "rollback", "ana", None)]
    entry = ModelTables(Store()).model_audit(name)[3]
    assert entry.reason == "hotfix for the demo" and entry.evidence["approved_by"] == "ben"
    assert entry.evidence["delta"] == pytest.approx(-3 / Store().get_run(trained_run.run_id).summary.eval_images)


def test_a_stale_review_cannot_promote_over_a_newer_production(home, trained_run, name, twin):
    model_registry.register(name, trained_run.run_id, "ana")
    first = review.open_review(name, trained_run.run_id, "ana")
    review.decide(first.id, True, "ben", "")
    model_registry.promote(first.id, "ana")
    # Two reviews of the same candidate, both against v1; the first promoted makes the second stale.
    a = review.open_review(name, twin, "ana")
    b = review.open_review(name, twin, "ana")
    for r in (a, b):
        assert r.gate_passed
        review.decide(r.id, True, "ben", "")
    model_registry.promote(a.id, "ana")
    with pytest.raises(InvalidInput, match=f"Production of {name} is v2 now, not the v1 review .* compared against"):
        model_registry.promote(b.id, "ana")
    assert model_registry.version_of(name, "production").version == 2


def test_two_reviewers_racing_get_one_decision_and_one_sentence(home, trained_run, name):
    model_registry.register(name, trained_run.run_id, "ana")
    opened = review.open_review(name, trained_run.run_id, "ana")
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def decide(who, approve):
        barrier.wait()
        try:
            results[who] = review.decide(opened.id, approve, who, f"{who} says so")
        except InvalidInput as exc:
            results[who] = exc

    threads = [threading.Thread(target=decide, args=(who, who == "ben")) for who in ("ben", "cy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if not isinstance(r, Exception)]
    (loser,) = [r for r in results.values() if isinstance(r, Exception)]
    assert len(winners) == 1
    assert str(loser) == f"Review {opened.id} is already {winners[0].status} by {winners[0].decided_by}; " \
                         "nothing changed."
    assert ModelTables(Store()).get_review(opened.id) == winners[0]


def test_a_candidate_trained_on_the_fixed_set_is_flagged_leaked(home, trained_run, name):
    model_registry.register(name, trained_run.run_id, "ana")
    # Re-split with another seed: some of the fixed test images land in its training split.
    leaky = copy_run(trained_run.run_id, "leaky", config={"split": [0.7, 0.15, 0.15], "seed": 7})
    review.set_policy(name, GatePolicy(non_inferiority_pts=2, min_accuracy=0.5))  # recorded with the review
    opened = review.open_review(name, leaky, "ana")
    assert opened.policy == dataclasses.asdict(GatePolicy(non_inferiority_pts=2, min_accuracy=0.5))
    assert opened.evidence["candidate"]["leaked"] > 0 and not opened.gate_passed
    assert "are among the candidate's training images" in opened.gate["reasons"][0]


def test_a_candidate_is_judged_on_the_fixed_set_even_where_its_own_evaluation_was_elsewhere(home, trained_run, name):
    model_registry.register(name, trained_run.run_id, "ana")
    first = review.open_review(name, trained_run.run_id, "ana")
    review.decide(first.id, True, "ben", "")
    model_registry.promote(first.id, "ana")
    other = copy_run(trained_run.run_id, "evaluated-elsewhere")
    folder = RunFolder(other)
    rows = read_predictions(folder.predictions).to_dict("records")
    write_predictions(folder.predictions, rows[:2])  # its own evaluation covered 2 of the fixed images
    opened = review.open_review(name, other, "ana")
    fixed = model_registry.eval_set(ModelTables(Store()).get_model(name))
    predicted = read_predictions(folder.path / "fixed_set_predictions.jsonl")
    assert len(predicted) == len(fixed.images) - 2
    # Its model is the trained run's: predicted now, it agrees with the trained run's stored predictions.
    assert opened.evidence["comparison"]["n_shared"] == len(fixed.images)
    assert opened.evidence["comparison"]["fixed"] + opened.evidence["comparison"]["broken"] == 0


# ------------------------------------------------------------ serving the alias


def test_serve_follows_production_and_swaps_without_dropping_requests(home, trained_run, name):
    """A real uvicorn server on `--model colours`: while 8 clients keep asking, production moves to v2 (a copy
    whose labels are reversed, so its answers show which model gave them) and back by rollback."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from tests.test_serve import _png, serving

    model_registry.register(name, trained_run.run_id, "ana")
    first = review.open_review(name, trained_run.run_id, "ana")
    review.decide(first.id, True, "ben", "")
    model_registry.promote(first.id, "ana")
    flipped = copy_run(trained_run.run_id, "flipped", reverse_labels=True)
    image = _png(seed=3)
    answers: list[tuple[int, int | None, str | None]] = []
    with serving(None, model=name, poll_s=0.2) as url:
        def ask(_):
            reply = requests.post(f"{url}/v1/predict", files={"file": ("a.png", image, "image/png")}, timeout=60)
            body = reply.json()
            return reply.status_code, body.get("version"), body.get("predictions", [{}])[0].get("label")

        card = requests.get(f"{url}/v1/model", timeout=10).json()
        assert card["serving"] == {"run": trained_run.run_id, "run_name": card["serving"]["run_name"],
                                   "model": name, "version": 1, "alias": "production"}
        with ThreadPoolExecutor(8) as pool:
            answers += pool.map(ask, range(16))
            second = review.open_review(name, flipped, "ana")
            review.decide(second.id, True, "ben", "same weights, fine")
            model_registry.promote(second.id, "ana")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(v == 2 for _, v, _ in answers[-8:]):
                answers += pool.map(ask, range(16))
            answers += pool.map(ask, range(16))
        swapped = requests.get(f"{url}/v1/model", timeout=10).json()["serving"]
        model_registry.rollback(name, "ana", "checking rollback")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and requests.get(f"{url}/v1/model", timeout=10).json()["serving"][
                "version"] != 1:
            time.sleep(0.2)
        back = requests.get(f"{url}/v1/model", timeout=10).json()["serving"]
        last = ask(0)
    print(f"{len(answers)} answers: {sum(v == 1 for _, v, _ in answers)} from v1, "
          f"{sum(v == 2 for _, v, _ in answers)} from v2")
    assert all(status == 200 for status, _, _ in answers)
    labels = {version: {label for _, v, label in answers if v == version} for version in (1, 2)}
    assert len(labels[1]) == 1 and len(labels[2]) == 1 and labels[1] != labels[2]  # each answer whole, from one model
    assert swapped["version"] == 2 and swapped["run"] == flipped
    assert back["version"] == 1 and back["run"] == trained_run.run_id and last[1:] == (1, *labels[1])


def test_cli_models_and_review_with_json_and_one_sentence_errors(home, trained_run, name, capsys, tmp_path):
    from tlcore.cli import main

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("models", "register", name, "--run", trained_run.run_id, "--by", "ana", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["version"] == 1
    code, out, _ = run("review", "open", name, "--candidate", trained_run.run_id, "--by", "ana", "--json")
    opened = json.loads(out.splitlines()[-1])
    assert code == 0 and opened["gate"]["passed"] is True and opened["review_id"].startswith("rev-")
    assert run("models", "promote", name, "--review", opened["review_id"])[2].startswith(
        f"Error: Review {opened['review_id']} is open, not approved")
    assert run("review", "approve", opened["review_id"], "--by", "ben", "--comment", "ok")[0] == 0
    code, _, err = run("review", "reject", opened["review_id"], "--by", "cy")
    assert code == 2 and err == f"Error: Review {opened['review_id']} is already approved by ben; nothing changed.\n"
    assert run("models", "promote", name, "--review", opened["review_id"], "--by", "ana")[0] == 0
    code, _, err = run("models", "promote", name, "--review", opened["review_id"])
    assert code == 2 and "already promoted" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run("models", "show", name, "--json")
    shown = json.loads(out.splitlines()[-1])
    assert shown["aliases"] == {"candidate": 1, "production": 1} and shown["versions"][0]["aliases"] == [
        "candidate", "production"]
    code, out, _ = run("models", "list", "--json")
    assert name in [m["name"] for m in json.loads(out.splitlines()[-1])["models"]]
    for argv, message in [(("models", "show", "nope"), "Error: No model named 'nope'. Known models: "),
                          (("review", "show", "rev-nope"), "Error: No review 'rev-nope'."),
                          (("models", "rollback", name), f"Error: Model {name} has no earlier production"),
                          (("models", "alias", name, "production", "1"), "Error: `production` moves only"),
                          (("serve", "--model", f"{name}@staging", "--port", "1"),
                           f"Error: Model {name} has no alias 'staging'. Its aliases: candidate (v1), production")]:
        code, _, err = run(*argv)
        assert code == 2 and err.startswith(message), err
    code, out, _ = run("review", "report", opened["review_id"], "--out", str(tmp_path / "r.html"), "--json")
    assert code == 0 and (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
