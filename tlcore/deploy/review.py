"""A review: should a model's candidate version replace production? Evidence on the fixed set, a gate, a verdict.

The evidence is the paired comparison (`tlcore.evaluate.comparison`) of the candidate against the current
`production` version on the model's fixed evaluation set, each side's predictions on exactly those
images (a run's own stored predictions where they cover them, the rest predicted now), plus
per-class recall deltas, calibration (ECE of the confidences), model size and latency. The gate
(`GatePolicy`, per model, recorded with each review) reads that evidence: better, or not worse than
`non_inferiority_pts` at 95 % (the interval's lower bound), no class's recall down by more than
`max_class_drop_pts`, no evaluation image among the candidate's training images, and an optional
minimum accuracy. Reviewers approve or reject once; `model_registry.promote` acts on the result.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pandas as pd

from tlcore.deploy import model_registry
from tlcore.deploy.model_registry import CANDIDATE, PRODUCTION, EvalSet
from tlcore.errors import InvalidInput, NotFound
from tlcore.evaluate.calibration import expected_calibration_error
from tlcore.evaluate.comparison import PairedComparison, compare_predictions, image_key
from tlcore.evaluate.evaluation import read_predictions
from tlcore.records.run_folder import RunFolder
from tlcore.records.store import RegistryConflict, ReviewRecord, Run, Store

# Fixed/broken images kept with a review (the report shows them as thumbnails).
EXAMPLES_KEPT = 24
_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """What a candidate must show to be promoted. Defaults: not worse by more than 1 pt at 95 %, no class's
    recall down by more than 5 pts, no leakage, no minimum accuracy."""

    non_inferiority_pts: float = 1.0
    max_class_drop_pts: float = 5.0
    min_accuracy: float | None = None  # 0..1

    def __post_init__(self):
        for field in ("non_inferiority_pts", "max_class_drop_pts"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise InvalidInput(f"`{field}` must be between 0 and 100 points. Received: {field}={value!r}")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise InvalidInput(f"`min_accuracy` must be between 0 and 1. Received: min_accuracy={self.min_accuracy}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "GatePolicy":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str  # one sentence


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """Why it failed (the failing checks), or why it passed (every check)."""
        failing = [c.detail for c in self.checks if not c.passed]
        return failing or [c.detail for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "checks": [dataclasses.asdict(c) for c in self.checks]}


def _pts(value: float) -> str:
    return f"{100 * value:+.1f} pts".replace("-", "−")


def per_class_recall(comparison: PairedComparison) -> list[dict[str, Any]]:
    """Recall of each class for A (baseline) and B (candidate) on the shared images, and the delta."""
    pairs = comparison.pairs
    rows = []
    for label in comparison.labels:
        mine = pairs[pairs["true"] == label]
        if mine.empty:
            continue
        a, b = float(mine["correct_a"].mean()), float(mine["correct_b"].mean())
        rows.append({"label": label, "support": len(mine), "recall_a": a, "recall_b": b, "delta": b - a})
    return rows


def judge(policy: GatePolicy, *, candidate_accuracy: float, leaked: int, eval_images: int,
          comparison: PairedComparison | None) -> GateVerdict:
    """The gate's verdict on the evidence (`comparison` None: no production version to compare with)."""
    checks = [Check("leakage", leaked == 0,
                    "No evaluation image is among the candidate's training images." if leaked == 0 else
                    f"{leaked} of the {eval_images} evaluation images are among the candidate's training images "
                    "(leaked), so its scores on them mean nothing.")]
    if comparison is not None:
        margin = policy.non_inferiority_pts / 100
        if comparison.significant and comparison.delta > 0:
            checks.append(Check("accuracy", True, f"Better than production: {comparison.verdict}."))
        elif comparison.ci_low > -margin:
            checks.append(Check("accuracy", True,
                                f"Not worse than production by more than {policy.non_inferiority_pts:g} pt at "
                                f"95 % (delta {_pts(comparison.delta)}, lower bound {_pts(comparison.ci_low)})."))
        else:
            checks.append(Check("accuracy", False,
                                f"May be worse than production by more than {policy.non_inferiority_pts:g} pt: "
                                f"delta {_pts(comparison.delta)}, 95 % lower bound {_pts(comparison.ci_low)}."))
        drops = [r for r in per_class_recall(comparison) if -r["delta"] > policy.max_class_drop_pts / 100 + 1e-12]
        checks.append(Check(
            "per-class recall", not drops,
            f"No class's recall drops by more than {policy.max_class_drop_pts:g} pts." if not drops else
            "Recall drops by more than {:g} pts for {}.".format(
                policy.max_class_drop_pts, ", ".join(f"{r['label']} ({_pts(r['delta'])})" for r in drops))))
    if policy.min_accuracy is not None:
        ok = candidate_accuracy >= policy.min_accuracy
        checks.append(Check("minimum accuracy", ok,
                            f"Accuracy {100 * candidate_accuracy:.1f} % is {'at or above' if ok else 'below'} the "
                            f"team's minimum of {100 * policy.min_accuracy:.1f} %."))
    return GateVerdict(checks)


# --------------------------------------------------------------- evidence


def fixed_set_predictions(run: Run, fixed: EvalSet) -> pd.DataFrame:
    """`run`'s predictions (rows as in `predictions.jsonl`) on exactly the fixed set's images, labelled by it.

    Images the run's own evaluation scored are taken from its predictions; the others are predicted now
    with its saved model (and kept beside its predictions, so the next review reads them).
    """
    folder = RunFolder(run.id)
    known: dict[str, dict[str, Any]] = {}
    for path in (folder.predictions, folder.path / "fixed_set_predictions.jsonl"):
        try:
            table = read_predictions(path)
        except NotFound:
            continue
        for row in table.to_dict("records"):
            known.setdefault(image_key(row["path"]), row)
    keys = [image_key(image.path) for image in fixed.images]  # as the predictions' paths are keyed
    missing = [image for image, key in zip(fixed.images, keys) if key not in known]
    if missing:
        predicted = _predict(run, missing)
        from tlcore.evaluate.evaluation import write_predictions

        extra = folder.path / "fixed_set_predictions.jsonl"
        try:
            earlier = read_predictions(extra).to_dict("records")
        except NotFound:
            earlier = []
        write_predictions(extra, earlier + predicted)
        known.update({image_key(image.path): row for image, row in zip(missing, predicted)})
    rows = [{**known[key], "path": image.path, "source": image.source, "true": image.label}
            for image, key in zip(fixed.images, keys)]
    return pd.DataFrame(rows)


def _predict(run: Run, images: list) -> list[dict[str, Any]]:
    from tlcore.data.images import load_resized
    from tlcore.deploy import inference

    loaded = inference.load_run_model(run.id)
    rows = []
    for start in range(0, len(images), inference.PREDICT_BATCH):
        chunk = images[start:start + inference.PREDICT_BATCH]
        probs = loaded.probabilities(np.stack([load_resized(i.path, loaded.image_size) for i in chunk]))
        for image, p in zip(chunk, probs):
            order = np.argsort(-p, kind="stable")[:_TOP_K]
            rows.append({"path": image.path, "source": image.source, "true": image.label,
                         "pred": loaded.labels[order[0]], "confidence": float(p[order[0]]),
                         "topk": [[loaded.labels[i], float(p[i])] for i in order]})
    return rows


def version_facts(run: Run, predictions: pd.DataFrame, fixed: EvalSet, version: int,
                  store: Store) -> dict[str, Any]:
    """Accuracy, ECE, size, latency and leakage of one version on the fixed set."""
    correct = (predictions["pred"] == predictions["true"]).to_numpy()
    folder = RunFolder(run.id)
    leaked = len(model_registry.training_keys(run, store) & fixed.keys)
    return {"version": version, "run_id": run.id, "run_name": run.name, "backbone": run.backbone,
            "image_size": run.summary.image_size if run.summary else None,
            "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(predictions["confidence"].to_numpy(dtype=float), correct),
            "size_mb": folder.model.stat().st_size / 2**20 if folder.model.is_file() else None,
            "latency_ms": measure_latency_ms(run), "leaked": leaked}


def measure_latency_ms(run: Run, repeats: int = 5) -> float | None:
    """Median milliseconds of one image through the run's model on this machine (None without a model)."""
    if not RunFolder(run.id).has_model():
        return None
    from tlcore.deploy import inference
    from tlcore.errors import ModelLoadError

    try:
        loaded = inference.load_run_model(run.id)
    except (ModelLoadError, OSError):
        return None
    loaded.warm_up()
    blank = np.zeros((1, loaded.image_size, loaded.image_size, 3), np.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded.probabilities(blank)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def _examples(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"path": r["path"], "source": r["source"], "true": r["true"], "pred_a": r["pred_a"],
             "pred_b": r["pred_b"]} for r in frame.head(EXAMPLES_KEPT).to_dict("records")]


def gather_evidence(model_name: str, candidate: Run, candidate_version: int, store: Store,
                    policy: GatePolicy) -> tuple[dict[str, Any], GateVerdict, int | None]:
    """The evidence for `candidate` against the current production, its gate verdict, and production's version."""
    tables = model_registry.registry(store)
    fixed = model_registry.eval_set(tables.get_model(model_name))
    candidate_rows = fixed_set_predictions(candidate, fixed)
    facts_b = version_facts(candidate, candidate_rows, fixed, candidate_version, store)
    production = tables.model_aliases(model_name).get(PRODUCTION)
    comparison, facts_a = None, None
    if production is not None:
        base = tables.model_version(model_name, production)
        base_run = store.get_run(base.run_id)
        base_rows = fixed_set_predictions(base_run, fixed)
        facts_a = version_facts(base_run, base_rows, fixed, production, store)
        comparison = compare_predictions(base_rows, candidate_rows, fixed.labels,
                                         name_a=f"v{production} ({base_run.name})",
                                         name_b=f"v{candidate_version} ({candidate.name})",
                                         run_a=base_run.id, run_b=candidate.id)
    verdict = judge(policy, candidate_accuracy=facts_b["accuracy"], leaked=facts_b["leaked"],
                    eval_images=len(fixed.images), comparison=comparison)
    evidence = {
        "eval_set": {"dataset": fixed.dataset, "split": fixed.split, "images": len(fixed.images),
                     "content_hash": fixed.content_hash, "labels": fixed.labels},
        "candidate": facts_b, "baseline": facts_a,
        "comparison": comparison.to_json() if comparison else None,
        "per_class": per_class_recall(comparison) if comparison else [],
        "fixed_images": _examples(comparison.fixed_images) if comparison else [],
        "broken_images": _examples(comparison.broken_images) if comparison else [],
    }
    return evidence, verdict, production


def open_review(model_name: str, candidate_ref: str, by: str, store: Store | None = None) -> ReviewRecord:
    """Open a review of run `candidate_ref` (registered as the model's next version if it is not one yet)
    against production, with the model's gate policy; the `candidate` alias moves to it.

    Raises:
        NotFound: no such model or run.
        InvalidInput: a run that did not succeed, on other classes, or already production.
    """
    store = store or Store()
    tables = model_registry.registry(store)
    model = tables.get_model(model_name)
    candidate = model_registry.finished_run(candidate_ref, store)
    model_registry.check_classes(model, candidate, store)
    aliases = tables.model_aliases(model_name)
    registered = {v.run_id: v.version for v in tables.model_versions(model_name)}
    if candidate.id in registered and aliases.get(PRODUCTION) == registered[candidate.id]:
        raise InvalidInput(f"Run {candidate.name} is v{registered[candidate.id]}, already production of "
                           f"{model_name}; review another run.")
    policy = GatePolicy.from_dict(model.policy)
    # The evidence first, so a candidate that cannot be judged (say its model is gone) is not registered.
    expected = registered.get(candidate.id) or max(registered.values(), default=0) + 1
    evidence, verdict, production = gather_evidence(model_name, candidate, expected, store, policy)
    version = model_registry.register(model_name, candidate.id, by, store).version
    if version != expected:  # someone registered another run meanwhile: the evidence names the version
        evidence, verdict, production = gather_evidence(model_name, candidate, version, store, policy)
    review = tables.add_review(model_name, version, production, by, policy.to_dict(), evidence, verdict.to_dict())
    if aliases.get(CANDIDATE) != version:
        tables.move_alias(model_name, CANDIDATE, version, action="set", by=by, review_id=review.id,
                          reason="review opened")
    return review


def decide(review_id: str, approve: bool, by: str, comment: str, store: Store | None = None) -> ReviewRecord:
    """Approve or reject an open review, once: the second of two racing reviewers gets a sentence."""
    if not by.strip():
        raise InvalidInput("A decision needs the reviewer's name (`--by NAME`, or sign in on the page).")
    tables = model_registry.registry(store)
    tables.get_review(review_id)
    try:
        return tables.decide_review(review_id, "approved" if approve else "rejected", by.strip(), comment.strip())
    except RegistryConflict as conflict:
        review = conflict.current
        who = f" by {review.decided_by}" if review.decided_by else ""
        raise InvalidInput(f"Review {review.id} is already {review.status}{who}; nothing changed.") from None


def set_policy(model_name: str, policy: GatePolicy, store: Store | None = None) -> GatePolicy:
    """Make `policy` the gate of the model's next reviews (each review keeps the policy it was judged by)."""
    tables = model_registry.registry(store)
    tables.get_model(model_name)
    tables.set_model_policy(model_name, policy.to_dict())
    return policy
