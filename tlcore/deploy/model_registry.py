"""Named models: numbered versions (each a finished run), aliases, and the audit trail of every alias move.

A model's first registered version pins its fixed evaluation set: the evaluation split (test, else
val) of that run's dataset version, each image by content hash. Every later version is judged on
exactly those images (`tlcore.deploy.review`). `production` moves only through `promote` (a review that
passed its gate and was approved, or `force` with a reason) and `rollback`; every move is an
`AuditEntry` (who, when, which review, the evidence in brief). The state checks of a move run in
the store's transaction, so of two people racing one wins and the other gets a sentence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from tlcore.data.manifest import run_entries
from tlcore.errors import InvalidInput, NotFound
from tlcore.records.store import (
    AuditEntry,
    ModelRecord,
    ModelTables,
    ModelVersion,
    RegistryConflict,
    ReviewRecord,
    Run,
    RunStatus,
    Store,
)

PRODUCTION = "production"
CANDIDATE = "candidate"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class EvalImage:
    sha256: str
    path: str
    label: str
    source: str


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The images every version of a model is judged on, pinned by content."""

    dataset_id: str
    dataset: str  # its label, "flowers v1"
    split: str
    labels: list[str]
    images: list[EvalImage]

    @property
    def content_hash(self) -> str:
        """sha256 over the images' sorted content hashes and labels: the same set, the same hash."""
        digest = hashlib.sha256()
        for image in sorted(self.images, key=lambda i: i.sha256):
            digest.update(f"{image.sha256}:{image.label}\n".encode())
        return digest.hexdigest()

    @property
    def keys(self) -> set[str]:
        return {image.sha256 for image in self.images}

    def to_dict(self) -> dict[str, Any]:
        return {"dataset_id": self.dataset_id, "dataset": self.dataset, "split": self.split, "labels": self.labels,
                "content_hash": self.content_hash, "images": [dataclasses.asdict(i) for i in self.images]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSet":
        return cls(data["dataset_id"], data["dataset"], data["split"], list(data["labels"]),
                   [EvalImage(**i) for i in data["images"]])


def registry(store: Store | None = None) -> ModelTables:
    return ModelTables(store or Store())


def finished_run(run_ref: str, store: Store | None = None) -> Run:
    """A run that succeeded, or one sentence why it cannot be a model version."""
    run = (store or Store()).get_run(run_ref)
    if run.status != RunStatus.SUCCEEDED:
        failed = run.status == RunStatus.FAILED and run.error
        why = f"it failed ({run.error})" if failed else f"it is {run.status.value}"
        raise InvalidInput(f"Run {run.name} cannot be a model version: {why}. Only a finished run can.")
    return run


def run_split_entries(run: Run, store: Store | None = None):
    """The manifest entries of `run`'s dataset with the splits it trained on."""
    store = store or Store()
    config = run.spec.recipe
    return run_entries(store.get_dataset(run.dataset_id), config.split, config.seed)


def eval_set_of(run: Run, store: Store | None = None) -> EvalSet:
    """The images `run` was evaluated on (test split, else val) as a fixed evaluation set."""
    store = store or Store()
    entries = run_split_entries(run, store)
    split = "test" if any(e.split == "test" for e in entries) else "val"
    images = [EvalImage(e.sha256, str(e.path), e.label, e.source) for e in entries if e.split == split]
    if not images:
        raise InvalidInput(f"Run {run.name}'s dataset has no test or val images to judge versions on.")
    dataset = store.get_dataset(run.dataset_id)
    return EvalSet(dataset.id, dataset.label, split, sorted(dataset.classes), images)


def training_keys(run: Run, store: Store | None = None) -> set[str]:
    """Content hashes of the images `run` trained on."""
    return {e.sha256 for e in run_split_entries(run, store) if e.split == "train"}


def check_name(name: str, what: str = "model name") -> str:
    if not _NAME.match(name or ""):
        raise InvalidInput(f"A {what} is letters, digits, `.`, `_` or `-` (up to 64, starting with a letter or "
                           f"digit). Received: {name!r}")
    return name


def register(name: str, run_ref: str, by: str, store: Store | None = None) -> ModelVersion:
    """Register finished run `run_ref` as the next version of model `name` (created with its first version,
    whose evaluation split becomes the model's fixed evaluation set). A run already registered keeps
    its version.

    Raises:
        NotFound: no such run.
        InvalidInput: a bad name, a run that did not succeed, a run on another set of classes.
    """
    store = store or Store()
    tables = registry(store)
    check_name(name)
    run = finished_run(run_ref, store)
    try:
        model = tables.get_model(name)
    except NotFound:
        try:
            model = tables.create_model(name, by, {}, eval_set_of(run, store).to_dict())
        except RegistryConflict:  # registered by someone else a moment ago
            model = tables.get_model(name)
    check_classes(model, run, store)
    return tables.add_model_version(name, run.id, by)


def check_classes(model: ModelRecord, run: Run, store: Store | None = None) -> None:
    """One sentence if `run` predicts other classes than the ones `model` is judged on."""
    labels = EvalSet.from_dict(model.eval_set).labels
    classes = sorted((store or Store()).get_dataset(run.dataset_id).classes)
    if classes != labels:
        raise InvalidInput(f"Run {run.name} predicts {', '.join(classes)}, but model {model.name} is judged on "
                           f"{', '.join(labels)}; register it under another model name.")


def get_model(name: str, store: Store | None = None) -> ModelRecord:
    return registry(store).get_model(name)


def eval_set(model: ModelRecord) -> EvalSet:
    return EvalSet.from_dict(model.eval_set)


def version_of(name: str, ref: str | int, store: Store | None = None) -> ModelVersion:
    """A version of model `name` by number (`3`, `v3`) or alias (`production`).

    Raises:
        NotFound: no such model, version or alias (the sentence lists the aliases).
    """
    tables = registry(store)
    tables.get_model(name)
    text = str(ref).strip()
    if text.lstrip("v").isdigit():
        return tables.model_version(name, int(text.lstrip("v")))
    aliases = tables.model_aliases(name)
    if text not in aliases:
        known = ", ".join(f"{a} (v{v})" for a, v in aliases.items()) or "none yet"
        raise NotFound(f"Model {name} has no alias {text!r}. Its aliases: {known}.")
    return tables.model_version(name, aliases[text])


def resolve(ref: str, store: Store | None = None) -> ModelVersion:
    """`NAME@ALIAS` or `NAME@VERSION` (`NAME` alone: its production version)."""
    name, _, alias = ref.partition("@")
    return version_of(name, alias or PRODUCTION, store)


def set_alias(name: str, alias: str, version: int, by: str, reason: str = "",
              store: Store | None = None) -> AuditEntry:
    """Point `alias` of model `name` at `version` (any alias but `production`, which only a review moves)."""
    check_name(alias, "alias")
    if alias == PRODUCTION:
        raise InvalidInput("`production` moves only through `models promote` (a passed, approved review) "
                           "or `models rollback`.")
    tables = registry(store)
    target = version_of(name, version, store)
    return tables.move_alias(name, alias, target.version, action="set", by=by, reason=reason)


def promote(review_id: str, by: str, *, force: bool = False, reason: str = "",
            store: Store | None = None) -> AuditEntry:
    """Move `production` to the review's candidate: only if the gate passed and the review is approved,
    or with `force` and a `reason` (both recorded).

    Raises:
        NotFound: no such review.
        InvalidInput: the refusal, in one sentence (gate failed, not approved, already promoted,
            production moved since the review was opened).
    """
    tables = registry(store)
    review = tables.get_review(review_id)
    if review.promoted_at is not None:
        raise InvalidInput(f"Review {review.id} was already promoted (v{review.candidate_version} of {review.model}); "
                           "nothing changed.")
    if force and not reason.strip():
        raise InvalidInput("`--force` needs `--reason`: say why the gate or the approval is overridden.")
    if not force:
        if not review.gate_passed:
            raise InvalidInput(f"Review {review.id} did not pass its gate ({'; '.join(gate_failures(review))}), "
                               "so production stays; fix the candidate or use --force --reason.")
        if review.status != "approved":
            raise InvalidInput(f"Review {review.id} is {review.status}, not approved, so production stays; "
                               "a reviewer approves it first.")
    evidence = evidence_brief(review)
    try:
        return tables.move_alias(
            review.model, PRODUCTION, review.candidate_version, expected=review.baseline_version,
            action="force-promote" if force else "promote", by=by, reason=reason, review_id=review.id,
            evidence=evidence, review_from=("open", "approved", "rejected") if force else ("approved",))
    except RegistryConflict as conflict:
        if isinstance(conflict.current, dict):
            now = "promoted" if conflict.current["promoted_at"] else conflict.current["status"]
            raise InvalidInput(f"Review {review.id} was {now} by someone else meanwhile, so this promotion "
                               "did nothing.") from None
        now = f"v{conflict.current}" if conflict.current is not None else "unset"
        raise InvalidInput(f"Production of {review.model} is {now} now, not the "
                           f"v{review.baseline_version} review {review.id} compared against; open a new review "
                           "against the current production. Nothing changed.") from None


def rollback(name: str, by: str, reason: str = "", store: Store | None = None) -> AuditEntry:
    """Move `production` back to the version it pointed at before its last move."""
    tables = registry(store)
    tables.get_model(name)
    moves = [e for e in tables.model_audit(name) if e.alias == PRODUCTION]
    if not moves or moves[-1].from_version is None:
        raise InvalidInput(f"Model {name} has no earlier production version to roll back to.")
    last = moves[-1]
    try:
        return tables.move_alias(name, PRODUCTION, last.from_version, expected=last.to_version,
                                 action="rollback", by=by, reason=reason,
                                 evidence={"rolled_back_version": last.to_version})
    except RegistryConflict:
        raise InvalidInput(f"Production of {name} moved while rolling back; look at `models show {name}` "
                           "and try again. Nothing changed.") from None


def gate_failures(review: ReviewRecord) -> list[str]:
    return [c["detail"] for c in review.gate.get("checks", []) if not c.get("passed")]


def evidence_brief(review: ReviewRecord) -> dict[str, Any]:
    """What an audit entry keeps of a review's evidence."""
    comparison = review.evidence.get("comparison") or {}
    return {"review": review.id, "gate_passed": review.gate_passed, "approved_by": review.decided_by,
            "accuracy": review.evidence.get("candidate", {}).get("accuracy"),
            "delta": comparison.get("delta"), "ci_low": comparison.get("ci_low"),
            "ci_high": comparison.get("ci_high"), "mcnemar_p": comparison.get("mcnemar_p"),
            "eval_set": review.evidence.get("eval_set", {}).get("content_hash")}


def describe(name: str, store: Store | None = None) -> dict[str, Any]:
    """`models show`: the model, its versions with their runs' metrics and aliases, the audit trail."""
    store = store or Store()
    tables = registry(store)
    model = tables.get_model(name)
    aliases = tables.model_aliases(name)
    fixed = eval_set(model)
    versions = []
    for v in tables.model_versions(name):
        run = store.get_run(v.run_id)
        versions.append({"version": v.version, "run_id": run.id, "run_name": run.name, "accuracy": run.accuracy,
                         "macro_f1": run.macro_f1, "registered_by": v.created_by, "registered_at": v.created_at,
                         "aliases": [a for a, n in aliases.items() if n == v.version]})
    return {"name": name, "created_by": model.created_by, "created_at": model.created_at,
            "policy": model.policy, "aliases": aliases, "versions": versions,
            "eval_set": {"dataset": fixed.dataset, "split": fixed.split, "images": len(fixed.images),
                         "labels": fixed.labels, "content_hash": fixed.content_hash},
            "audit": [dataclasses.asdict(e) for e in tables.model_audit(name)]}


def list_models(store: Store | None = None) -> list[dict[str, Any]]:
    """`models list`: each model with its versions count and aliases."""
    tables = registry(store)
    return [{"name": m.name, "versions": len(tables.model_versions(m.name)), "aliases": tables.model_aliases(m.name)}
            for m in tables.list_models()]
