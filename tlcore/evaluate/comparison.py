"""Is run B really better than run A? Paired statistics on the evaluation images both runs scored.

Images are matched by content (the sha256 of the file, which names its blob), so two runs scored
on different splits are compared on the images they share. On those, each image is a pair
(A right?, B right?): the accuracy delta gets a paired bootstrap 95 % interval, the discordant
pairs McNemar's exact test, and the images B fixed or broke are listed with both predictions.
Runs whose recipes differ only in the seed are grouped (`seed_groups`) so seed noise is visible.

Pure numpy/pandas (no Keras): the Compare page and `python -m tlcore compare` share it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tlcore.errors import InvalidInput, NotFound
from tlcore.evaluate.evaluation import read_predictions
from tlcore.records.config import recipe_labels
from tlcore.records.run_folder import RunFolder

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Config keys that do not change what a recipe trains: runs that differ only in these are seeds of one recipe.
_NOT_RECIPE = ("seed", "name", "resume_from", "sweep_id")


# ------------------------------------------------------------------ statistics


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value for `fixed` (A wrong, B right) and `broken` (A right, B wrong) pairs.

    Under "no difference" each discordant pair is a fair coin: p = min(1, 2 * P(X <= min(b, c)))
    with X ~ Binomial(b + c, 1/2). No discordant pair gives p = 1.
    """
    n, k = int(fixed) + int(broken), min(int(fixed), int(broken))
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def clearly_worse(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """True when per-image correctness on the same images shows `candidate` worse than `reference`: more
    images that only the reference gets right than only the candidate does, and McNemar's exact test
    says that is not chance (p < `SIGNIFICANCE`)."""
    broken = int(np.sum(reference & ~candidate))
    fixed = int(np.sum(candidate & ~reference))
    return broken > fixed and mcnemar_exact_p(fixed, broken) < SIGNIFICANCE


def bootstrap_counts(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """How often each of `n` items is drawn in each of `resamples` resamples with replacement, `(resamples, n)`."""
    if n < 1:
        raise InvalidInput("A bootstrap needs at least one shared image.")
    if resamples < 1:
        raise InvalidInput(f"`resamples` must be 1 or more. Received: resamples={resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def resampled_accuracy(counts: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Accuracy in each resample (`counts` from `bootstrap_counts`)."""
    return counts @ np.asarray(correct, dtype=np.float64) / counts.sum(axis=1)


def resampled_macro_f1(counts: np.ndarray, true: Sequence[str], pred: Sequence[str],
                       labels: Sequence[str]) -> np.ndarray:
    """Macro F1 in each resample, over the classes present in that resample (as `compute_report` does)."""
    true, pred = np.asarray(true), np.asarray(pred)
    f1_sum = np.zeros(len(counts))
    present = np.zeros(len(counts))
    for label in labels:
        is_true, is_pred = true == label, pred == label
        tp = counts @ (is_true & is_pred)
        fp = counts @ (~is_true & is_pred)
        fn = counts @ (is_true & ~is_pred)
        denominator = 2 * tp + fp + fn
        f1_sum += np.divide(2 * tp, denominator, out=np.zeros(len(counts)), where=denominator > 0)
        present += (tp + fn) > 0
    return f1_sum / np.maximum(present, 1)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` interval of `values` (percentile bootstrap)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def macro_f1(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    """Macro F1 over the classes present in `true` (every image counted once)."""
    return float(resampled_macro_f1(np.ones((1, len(true))), true, pred, labels)[0])


# ---------------------------------------------------------------- comparison


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Run B against run A on the images both scored (`pairs`: one row per shared image)."""

    run_a: str
    run_b: str
    name_a: str
    name_b: str
    labels: list[str]
    pairs: pd.DataFrame  # key, path, source, true, pred_a, confidence_a, pred_b, confidence_b, correct_a, correct_b
    only_a: int  # images only run A scored
    only_b: int
    acc_a: float
    acc_b: float
    ci_low: float  # of delta
    ci_high: float
    f1_a: float
    f1_b: float
    f1_ci_low: float  # of f1_delta
    f1_ci_high: float
    mcnemar_p: float
    resamples: int
    seed: int
    same_recipe: bool = False  # the runs' recipes differ at most in the seed

    @property
    def n_shared(self) -> int:
        return len(self.pairs)

    @property
    def delta(self) -> float:
        """Accuracy of B minus accuracy of A."""
        return self.acc_b - self.acc_a

    @property
    def f1_delta(self) -> float:
        return self.f1_b - self.f1_a

    @property
    def fixed_images(self) -> pd.DataFrame:
        """Images A got wrong and B got right."""
        return self.pairs[~self.pairs["correct_a"] & self.pairs["correct_b"]].reset_index(drop=True)

    @property
    def broken_images(self) -> pd.DataFrame:
        """Images A got right and B got wrong."""
        return self.pairs[self.pairs["correct_a"] & ~self.pairs["correct_b"]].reset_index(drop=True)

    @property
    def fixed(self) -> int:
        return len(self.fixed_images)

    @property
    def broken(self) -> int:
        return len(self.broken_images)

    @property
    def both_wrong(self) -> int:
        return int((~self.pairs["correct_a"] & ~self.pairs["correct_b"]).sum())

    @property
    def significant(self) -> bool:
        """The interval excludes zero and McNemar's test agrees at the 5 % level."""
        return (self.ci_low > 0 or self.ci_high < 0) and self.mcnemar_p < SIGNIFICANCE

    @property
    def verdict(self) -> str:
        """One line for a review: who is better, by how much, how sure; or "no clear difference"."""
        numbers = (f"{_pts(self.delta)}, 95 % CI {_pts(self.ci_low, unit=False)} to {_pts(self.ci_high, unit=False)}, "
                   f"{_p_text(self.mcnemar_p)}")
        if self.significant and self.same_recipe:
            # The test counts the evaluation images as the sample; the seed is another source of
            # variance it does not see. Between seeds of one recipe a difference is that variance.
            lead = (f"{self.name_b} scored higher on these images ({numbers})" if self.delta > 0 else
                    f"{self.name_a} scored higher on these images ({self.name_b} is {numbers})")
            return (f"{lead}, but the two runs share one recipe (at most the seed differs): that is run-to-run "
                    "noise, not a better recipe")
        if self.significant and self.delta > 0:
            return f"{self.name_b} is better: {numbers}"
        if self.significant:
            return f"{self.name_a} is better: {self.name_b} is {numbers}"
        return f"No clear difference between {self.name_a} and {self.name_b}: {numbers}"

    @property
    def coverage_note(self) -> str | None:
        """A sentence when the runs were scored on different images, else None."""
        if not (self.only_a or self.only_b):
            return None
        return (f"The runs were scored on different images: {self.n_shared} are shared and compared here "
                f"({self.only_a} only {self.name_a} scored, {self.only_b} only {self.name_b}).")

    def to_json(self) -> dict[str, Any]:
        """The `compare --json` payload."""
        return {"run_a": self.run_a, "run_b": self.run_b, "n_shared": self.n_shared, "only_a": self.only_a,
                "only_b": self.only_b, "acc_a": self.acc_a, "acc_b": self.acc_b, "delta": self.delta,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "mcnemar_p": self.mcnemar_p,
                "fixed": self.fixed, "broken": self.broken, "both_wrong": self.both_wrong,
                "f1_a": self.f1_a, "f1_b": self.f1_b, "f1_delta": self.f1_delta, "f1_ci_low": self.f1_ci_low,
                "f1_ci_high": self.f1_ci_high, "resamples": self.resamples, "seed": self.seed,
                "same_recipe": self.same_recipe, "verdict": self.verdict}


def _pts(value: float, unit: bool = True) -> str:
    return f"{100 * value:+.1f}".replace("-", "−") + (" pts" if unit else "")


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def compare_predictions(preds_a: pd.DataFrame, preds_b: pd.DataFrame, labels: Sequence[str], *,
                        name_a: str = "A", name_b: str = "B", run_a: str = "", run_b: str = "",
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> PairedComparison:
    """Paired comparison of two prediction tables (rows as in `predictions.jsonl`) on their shared images.

    Defaults to a 2,000-resample bootstrap with seed 0 (the same inputs always give the same interval).
    """
    a, b = _keyed(preds_a), _keyed(preds_b)
    shared = a.merge(b[["key", "pred", "confidence", "true"]], on="key", suffixes=("_a", "_b"))
    if shared.empty:
        raise InvalidInput(f"{name_a} and {name_b} scored no image in common, so they cannot be compared "
                           "image by image. Compare runs evaluated on the same dataset.")
    disagree = shared[shared["true_a"] != shared["true_b"]]
    if len(disagree):
        raise InvalidInput(f"{len(disagree)} shared image(s) have different true labels in {name_a} and {name_b} "
                           "(their datasets label them differently), so the runs cannot be compared on them.")
    pairs = pd.DataFrame({
        "key": shared["key"], "path": shared["path"], "source": shared["source"], "true": shared["true_a"],
        "pred_a": shared["pred_a"], "confidence_a": shared["confidence_a"].astype(float),
        "pred_b": shared["pred_b"], "confidence_b": shared["confidence_b"].astype(float)})
    pairs["correct_a"] = pairs["pred_a"] == pairs["true"]
    pairs["correct_b"] = pairs["pred_b"] == pairs["true"]
    counts = bootstrap_counts(len(pairs), resamples, seed)
    acc_delta = resampled_accuracy(counts, pairs["correct_b"]) - resampled_accuracy(counts, pairs["correct_a"])
    f1_delta = (resampled_macro_f1(counts, pairs["true"], pairs["pred_b"], labels)
                - resampled_macro_f1(counts, pairs["true"], pairs["pred_a"], labels))
    ci_low, ci_high = percentile_interval(acc_delta)
    f1_low, f1_high = percentile_interval(f1_delta)
    fixed = int((~pairs["correct_a"] & pairs["correct_b"]).sum())
    broken = int((pairs["correct_a"] & ~pairs["correct_b"]).sum())
    return PairedComparison(
        run_a=run_a, run_b=run_b, name_a=name_a, name_b=name_b, labels=list(labels), pairs=pairs,
        only_a=len(a) - len(pairs), only_b=len(b) - len(pairs),
        acc_a=float(pairs["correct_a"].mean()), acc_b=float(pairs["correct_b"].mean()),
        ci_low=ci_low, ci_high=ci_high,
        f1_a=macro_f1(pairs["true"], pairs["pred_a"], labels), f1_b=macro_f1(pairs["true"], pairs["pred_b"], labels),
        f1_ci_low=f1_low, f1_ci_high=f1_high, mcnemar_p=mcnemar_exact_p(fixed, broken),
        resamples=resamples, seed=seed)


def compare_runs(ref_a: str, ref_b: str, store=None, *, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> PairedComparison:
    """Paired comparison of run B against run A (ids or names), from their stored predictions.

    Raises:
        NotFound: no such run.
        InvalidInput: the same run twice, a run that has not succeeded or has no predictions,
            different class sets, or no image in common (each a plain sentence).
    """
    from tlcore.records.store import RunStatus, Store

    store = store or Store()
    run_a, run_b = store.get_run(ref_a), store.get_run(ref_b)
    if run_a.id == run_b.id:
        raise InvalidInput(f"Run {run_a.name} was chosen twice; pick two different runs to compare.")
    for run in (run_a, run_b):
        if run.status != RunStatus.SUCCEEDED:
            failed = run.status == RunStatus.FAILED and run.error
            why = f"it failed ({run.error})" if failed else f"it is {run.status.value}"
            raise InvalidInput(f"Run {run.name} cannot be compared: {why}. Only finished runs have predictions.")
    labels_a, labels_b = _labels(run_a), _labels(run_b)
    if set(labels_a) != set(labels_b):
        raise InvalidInput(f"Runs {run_a.name} and {run_b.name} predict different classes "
                           f"({', '.join(labels_a)} vs {', '.join(labels_b)}); a paired comparison needs "
                           "the same classes.")
    comparison = compare_predictions(_predictions(run_a), _predictions(run_b), labels_a, name_a=run_a.name,
                                     name_b=run_b.name, run_a=run_a.id, run_b=run_b.id, resamples=resamples,
                                     seed=seed)
    return dataclasses.replace(comparison, same_recipe=recipe_key(run_a.config) == recipe_key(run_b.config))


def _labels(run) -> list[str]:
    try:
        return RunFolder(run.id).labels()
    except NotFound:
        raise InvalidInput(f"Run {run.name} has no labels file, so there is nothing to compare.") from None


def _predictions(run) -> pd.DataFrame:
    try:
        table = read_predictions(RunFolder(run.id).predictions)
    except NotFound:
        raise InvalidInput(f"Run {run.name} has no saved predictions, so there is nothing to compare. "
                           "It may have finished before predictions were kept; retrain it.") from None
    if table.empty:
        raise InvalidInput(f"Run {run.name} saved no predictions (its evaluation split is empty).")
    return table


def _keyed(predictions: pd.DataFrame) -> pd.DataFrame:
    """`predictions` with a `key` column naming each image by content; one row per image."""
    table = predictions.copy()
    if "source" not in table:
        table["source"] = table["path"]
    table["key"] = [image_key(p) for p in table["path"]]
    return table.drop_duplicates("key").reset_index(drop=True)


def image_key(path: str) -> str:
    """The content hash of an image: its blob's name when it is one, else the sha256 of the file's bytes."""
    p = Path(str(path))
    if _SHA256.match(p.stem):
        return p.stem
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    return str(path)  # a file that is gone: only the same path can match it


# ------------------------------------------------------------------ seeds


@dataclasses.dataclass(frozen=True)
class SeedGroup:
    """Finished runs of one recipe that differ only in their seed."""

    runs: list  # store `Run`s, by seed
    recipe: str = ""  # the recipe's short name among the other groups, e.g. "lr=3e-4"

    @property
    def id(self) -> str:
        """A stable reference for the group: `seeds:` and its first run's id."""
        return f"seeds:{self.runs[0].id}"

    @property
    def seeds(self) -> list[int]:
        return [int(r.config.get("seed", 0)) for r in self.runs]

    @property
    def name(self) -> str:
        if self.recipe:
            return f"{self.recipe} · {len(self.runs)} seeds"
        return f"{self.runs[0].name} and {len(self.runs) - 1} other seed(s)"

    def mean_std(self, metric: str = "accuracy") -> tuple[float, float]:
        """Mean and sample standard deviation of `metric` (accuracy or macro_f1) over the seeds."""
        values = np.array([getattr(r, metric) for r in self.runs], dtype=np.float64)
        return float(values.mean()), float(values.std(ddof=1))


def recipe_key(config: dict[str, Any]) -> str:
    """A run's recipe without its seed and name: equal keys are seeds of one recipe."""
    return json.dumps({k: v for k, v in config.items() if k not in _NOT_RECIPE}, sort_keys=True, default=str)


def seed_groups(runs: Sequence) -> list[SeedGroup]:
    """Groups of two or more finished runs whose recipes differ only in the seed, largest first."""
    by_recipe: dict[str, list] = {}
    for run in runs:
        if run.summary is not None:
            by_recipe.setdefault(recipe_key(run.config), []).append(run)
    seeded = [sorted(members, key=lambda r: (int(r.config.get("seed", 0)), r.created_at))
              for members in by_recipe.values() if len({int(r.config.get("seed", 0)) for r in members}) > 1]
    names = recipe_labels([members[0].config for members in seeded], fallback=("backbone", "lr"))
    groups = [SeedGroup(members, name) for members, name in zip(seeded, names)]
    return sorted(groups, key=lambda g: -len(g.runs))
