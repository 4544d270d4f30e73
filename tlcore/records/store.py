"""The embedded store: datasets, runs, epoch metrics and run logs in one SQLite file (WAL).

Everything above this module sees plain dataclasses; nothing above it knows SQL. Every
public method opens its own short connection, so one `Store` is safe to share across
threads and processes (Streamlit sessions, the worker, the CLI).

The file carries its schema version (`PRAGMA user_version`); opening an older store runs the
migrations in `MIGRATIONS` in order, in one transaction, so a data home made by an earlier
Transfer Lab keeps its datasets and runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from tlcore.errors import NotFound, TransitionRefused
from tlcore.records import home
from tlcore.records.config import RunSpec
from tlcore.records.run_record import Executor, RunProgress, RunSummary


class RunStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

# The statuses a run may move to from each status. A finished run never changes status again, so a
# late "succeeded" cannot overwrite the "failed" a reaper wrote (nor clear its error).
ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: TERMINAL_STATES | {RunStatus.RUNNING},
    RunStatus.RUNNING: TERMINAL_STATES,
    **{status: frozenset() for status in TERMINAL_STATES},
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    version: int
    created_at: float
    source: str
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    num_images: int
    has_test: bool
    report: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


@dataclasses.dataclass(frozen=True)
class Run:
    id: str
    name: str
    status: RunStatus
    dataset_id: str
    backbone: str
    weights: str
    spec: RunSpec  # its recipe, the run it resumes, its sweep
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    worker: str | None
    error: str | None
    cancel_requested: bool
    progress: RunProgress
    summary: RunSummary | None  # once finished successfully
    tags: list[str]
    note: str
    sweep_id: str | None = None  # the sweep that queued this run, if one did
    executor: Executor | None = None  # where it trains or trained, once claimed

    @property
    def config(self) -> dict[str, Any]:
        """The spec as one flat dict (its stored shape): for tables and diffs of recipes."""
        return self.spec.to_dict()

    @property
    def accuracy(self) -> float | None:
        """Accuracy on the evaluation split, once the run succeeded."""
        return self.summary.metrics.accuracy if self.summary else None

    @property
    def macro_f1(self) -> float | None:
        return self.summary.metrics.macro_f1 if self.summary else None

    @property
    def smallest_class_recall(self) -> float | None:
        """Recall of the class with the fewest evaluation images (None for runs recorded before it was)."""
        return self.summary.metrics.smallest_class_recall if self.summary else None


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    run_id: str
    phase: str  # "head" or "finetune"
    epoch: int  # 1-based within the phase
    step: int  # 1-based across phases, the x axis of a run's curves
    metrics: dict[str, float]  # loss, accuracy, val_loss, val_accuracy, lr, seconds
    at: float


@dataclasses.dataclass(frozen=True)
class LogLine:
    run_id: str
    at: float
    message: str


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    has_test INTEGER NOT NULL,
    report TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s.value) for s in RunStatus)})),
    dataset_id TEXT NOT NULL,
    backbone TEXT NOT NULL,
    weights TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    worker TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{{}}',
    summary TEXT NOT NULL DEFAULT '{{}}',
    tags TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, seq);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run_id, id);
"""

def _migrate_1_typed_run_records(db: sqlite3.Connection) -> None:
    """Version 0 (no version) -> 1: progress and summary rewritten in the typed contract."""
    rows = db.execute("SELECT id, progress, summary FROM runs").fetchall()
    for run_id, progress, summary in rows:
        progress = json.loads(progress or "{}")
        summary = json.loads(summary or "{}")
        db.execute(
            "UPDATE runs SET progress = ?, summary = ? WHERE id = ?",
            (json.dumps(RunProgress.from_dict(progress).to_dict()),
             json.dumps(RunSummary.from_dict(summary).to_dict() if summary.get("metrics") else {}), run_id),
        )


def _migrate_2_sweeps_and_executors(db: sqlite3.Connection) -> None:
    """1 -> 2: runs know the sweep that queued them and where they trained."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    if "sweep_id" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN sweep_id TEXT")
    if "executor" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN executor TEXT NOT NULL DEFAULT '{}'")
    db.execute("CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep_id, seq)")


# (version it brings the store to, migration). A store at version N runs every later one in order.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [
    (1, _migrate_1_typed_run_records),
    (2, _migrate_2_sweeps_and_executors),
    (3, lambda db: _migrate_3_model_registry(db)),  # defined with the registry's tables below
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def new_id(prefix: str) -> str:
    """A short, sortable, unique id such as `run-20261129-143000-1a2b3c`."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class Store:
    """Typed access to the SQLite store at `path` (defaults to the data home's `store.db`)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else home.store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"The store {self.path} was written by a newer Transfer Lab (schema version {version}; "
                    f"this one knows up to {SCHEMA_VERSION}). Upgrade Transfer Lab or use another data home.")
            for target, migrate in MIGRATIONS:
                if version < target:
                    migrate(db)
                    db.execute(f"PRAGMA user_version = {int(target)}")

    def schema_version(self) -> int:
        with self._connect() as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # busy_timeout makes readers and the writer wait for each other instead of failing
        # with "database is locked"; WAL lets pages read while a run writes.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---------------------------------------------------------------- datasets

    def add_dataset(
        self,
        name: str,
        source: str,
        classes: list[str],
        counts: dict[str, dict[str, int]],
        report: dict[str, Any],
        dataset_id: str | None = None,
    ) -> Dataset:
        """Record a new immutable dataset version; the version number is the next for `name`."""
        dataset_id = dataset_id or new_id("ds")
        num_images = sum(sum(c.values()) for c in counts.values())
        with self._transaction() as db:
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM datasets WHERE name = ?", (name,)
            ).fetchone()
            db.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset_id,
                    name,
                    version,
                    time.time(),
                    source,
                    json.dumps(classes),
                    json.dumps(counts),
                    num_images,
                    int("test" in counts and sum(counts["test"].values()) > 0),
                    json.dumps(report),
                ),
            )
        return self.get_dataset(dataset_id)

    def get_dataset(self, ref: str) -> Dataset:
        """A dataset by id, by `name` (latest version) or by `name@version` / `name v2`."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM datasets WHERE id = ?", (ref,)).fetchone()
            if row is None:
                name, version = _split_version(ref)
                if version is None:
                    row = db.execute(
                        "SELECT * FROM datasets WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
                    ).fetchone()
                else:
                    row = db.execute(
                        "SELECT * FROM datasets WHERE name = ? AND version = ?", (name, version)
                    ).fetchone()
        if row is None:
            known = ", ".join(d.label for d in self.list_datasets()) or "none yet"
            raise NotFound(f"No dataset named {ref!r}. Known datasets: {known}.")
        return _dataset_from_row(row)

    def list_datasets(self) -> list[Dataset]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM datasets ORDER BY created_at DESC").fetchall()
        return [_dataset_from_row(r) for r in rows]

    # -------------------------------------------------------------------- runs

    def create_run(self, name: str, spec: RunSpec, status: RunStatus = RunStatus.QUEUED,
                   run_id: str | None = None, worker: str | None = None) -> Run:
        """Record run `name` of `spec` (its dataset, backbone, weights and sweep become columns too);
        with `worker`, created running for that worker (its lease starts now)."""
        run_id = run_id or new_id("run")
        recipe = spec.recipe
        now = time.time()
        status = RunStatus(status)
        if worker is not None and status is not RunStatus.RUNNING:
            raise ValueError(f"Only a running run has a worker. Received: status={status.value!r}, worker={worker!r}")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, dataset_id, backbone, weights, config, created_at, sweep_id,"
                " worker, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, status.value, spec.dataset_id, recipe.backbone, recipe.weights,
                 json.dumps(spec.to_dict()), now, spec.sweep_id, worker, *((now, now) if worker else (None, None))),
            )
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ? OR name = ? ORDER BY seq DESC",
                             (run_id, run_id)).fetchone()
        if row is None:
            raise NotFound(f"No run {run_id!r}. `python -m tlcore runs list` shows the runs.")
        return _run_from_row(row)

    def list_runs(self, statuses: set[RunStatus] | None = None, limit: int | None = None,
                  sweep_id: str | None = None) -> list[Run]:
        """Runs, newest first, optionally only those in `statuses` and of sweep `sweep_id`."""
        where, args = [], []
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += [RunStatus(s).value for s in statuses]
        if sweep_id is not None:
            where.append("sweep_id = ?")
            args.append(sweep_id)
        query = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        query += " ORDER BY seq DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return [_run_from_row(r) for r in rows]

    def sweep_ids(self) -> list[str]:
        """Ids of the sweeps that queued runs, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT sweep_id FROM runs WHERE sweep_id IS NOT NULL"
                              " GROUP BY sweep_id ORDER BY MAX(seq) DESC").fetchall()
        return [r[0] for r in rows]

    def count_runs(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def queue(self) -> list[Run]:
        """Queued runs, oldest first."""
        return list(reversed(self.list_runs({RunStatus.QUEUED})))

    # Typed transitions. Each moves a run only from the statuses `ALLOWED_TRANSITIONS` permits, inside
    # one UPDATE, so two processes racing on one run get one winner and the loser a `TransitionRefused`.

    def start_run(self, run_id: str, worker: str, at: float | None = None) -> Run:
        """Move a queued run to running for `worker`; its lease starts now (or at `at`).

        Raises:
            TransitionRefused: the run is no longer queued (another worker took it, or it was cancelled).
        """
        now = time.time() if at is None else at
        return self._move(run_id, RunStatus.RUNNING, {"worker": worker, "started_at": now, "heartbeat_at": now})

    def finish_run(self, run_id: str, status: RunStatus, *, error: str | None = None,
                   summary: RunSummary | None = None, only_if: RunStatus | None = None,
                   at: float | None = None) -> Run:
        """Move a queued or running run (only an `only_if` one, when given) to the final `status`.

        Raises:
            TransitionRefused: the run already finished (a reaper marked it failed, say), or is not
                `only_if`; nothing changes.
        """
        status = RunStatus(status)
        if not status.is_terminal:
            raise ValueError(f"`status` must be a final status ({', '.join(s.value for s in TERMINAL_STATES)}). "
                             f"Received: status={status.value!r}")
        fields: dict[str, Any] = {"finished_at": time.time() if at is None else at, "error": error}
        if summary is not None:
            fields["summary"] = json.dumps(summary.to_dict())
        return self._move(run_id, status, fields, sources={only_if} if only_if else None)

    def _move(self, run_id: str, target: RunStatus, fields: dict[str, Any],
              sources: set[RunStatus] | None = None) -> Run:
        # Column names come from the fixed keys of the callers above, never from a caller's keywords.
        allowed = {s for s, targets in ALLOWED_TRANSITIONS.items() if target in targets}
        if sources is not None:
            allowed &= sources
        sets = ", ".join(f"{column} = ?" for column in ("status", *fields))
        where = "id = ? AND " + (f"status IN ({', '.join('?' * len(allowed))})" if allowed else "0")
        with self._transaction() as db:
            changed = db.execute(f"UPDATE runs SET {sets} WHERE {where}",
                                 (target.value, *fields.values(), run_id, *(s.value for s in allowed))).rowcount
        run = self.get_run(run_id)
        if not changed:
            raise TransitionRefused(
                f"Run {run.name} ({run.id}) is {run.status.value}"
                + (f" ({run.error})" if run.error else "")
                + f"; it cannot become {target.value}, so its record stays as it is.")
        return run

    def heartbeat(self, run_id: str, progress: RunProgress | None = None) -> bool:
        """Renew a run's lease (and record its progress); returns True if a cancel was requested."""
        with self._transaction() as db:
            if progress is None:
                db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (time.time(), run_id))
            else:
                db.execute("UPDATE runs SET heartbeat_at = ?, progress = ? WHERE id = ?",
                           (time.time(), json.dumps(progress.to_dict()), run_id))
            row = db.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def request_cancel(self, run_id: str) -> Run:
        """Record that someone asked `run_id` to stop (what that means is the queue's rule)."""
        return self._set(run_id, "cancel_requested = 1")

    def set_executor(self, run_id: str, executor: Executor) -> Run:
        """Where the run trains, once an executor took it."""
        return self._set(run_id, "executor = ?", json.dumps(executor.to_dict()))

    def set_summary(self, run_id: str, summary: RunSummary) -> Run:
        """Replace a finished run's summary (a later calibration, say)."""
        return self._set(run_id, "summary = ?", json.dumps(summary.to_dict()))

    def annotate(self, run_id: str, tags: list[str], note: str) -> Run:
        """The team's tags and note on a run."""
        return self._set(run_id, "tags = ?, note = ?", json.dumps(list(tags)), note)

    def _set(self, run_id: str, assignments: str, *values: Any) -> Run:
        with self._transaction() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values, run_id))
        return self.get_run(run_id)

    # ---------------------------------------------------------- epochs and logs

    def log_epoch(self, run_id: str, phase: str, epoch: int, step: int,
                  metrics: dict[str, float]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO epochs VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, phase, epoch, step, json.dumps(metrics), time.time()),
            )

    def epochs(self, run_id: str) -> list[EpochRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY step", (run_id,)).fetchall()
        return [EpochRecord(r["run_id"], r["phase"], r["epoch"], r["step"], json.loads(r["metrics"]), r["at"])
                for r in rows]

    def log(self, run_id: str, message: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO logs (run_id, at, message) VALUES (?, ?, ?)",
                       (run_id, time.time(), message))

    def logs(self, run_id: str, tail: int | None = None) -> list[LogLine]:
        with self._connect() as db:
            if tail:
                rows = db.execute(
                    "SELECT * FROM (SELECT * FROM logs WHERE run_id = ? ORDER BY id DESC LIMIT ?)"
                    " ORDER BY id", (run_id, tail)).fetchall()
            else:
                rows = db.execute("SELECT * FROM logs WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [LogLine(r["run_id"], r["at"], r["message"]) for r in rows]


def _split_version(ref: str) -> tuple[str, int | None]:
    for sep in ("@", " v"):
        name, found, version = ref.rpartition(sep)
        if found and version.isdigit():
            return name, int(version)
    return ref, None


def _dataset_from_row(row: sqlite3.Row) -> Dataset:
    return Dataset(
        id=row["id"],
        name=row["name"],
        version=row["version"],
        created_at=row["created_at"],
        source=row["source"],
        classes=json.loads(row["classes"]),
        counts=json.loads(row["counts"]),
        num_images=row["num_images"],
        has_test=bool(row["has_test"]),
        report=json.loads(row["report"]),
    )


def _run_from_row(row: sqlite3.Row) -> Run:
    return Run(
        id=row["id"],
        name=row["name"],
        status=RunStatus(row["status"]),
        dataset_id=row["dataset_id"],
        backbone=row["backbone"],
        weights=row["weights"],
        spec=RunSpec.from_dict(json.loads(row["config"]), dataset_id=row["dataset_id"], sweep_id=row["sweep_id"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        heartbeat_at=row["heartbeat_at"],
        worker=row["worker"],
        error=row["error"],
        cancel_requested=bool(row["cancel_requested"]),
        progress=RunProgress.from_dict(json.loads(row["progress"])),
        summary=_summary_or_none(json.loads(row["summary"])),
        tags=json.loads(row["tags"]),
        note=row["note"],
        sweep_id=row["sweep_id"],
        executor=Executor.from_dict(json.loads(row["executor"])) if row["executor"] != "{}" else None,
    )


def _summary_or_none(data: dict[str, Any]) -> RunSummary | None:
    return RunSummary.from_dict(data) if data else None


# ------------------------------------------------------------ model registry
# Named models, their versions (each a run), aliases, reviews and the audit trail of alias moves.
# The checks that must hold at the moment of a change (a review still open, production still where
# the review saw it) are made inside the change's transaction, so two people racing get one winner.

REVIEW_STATES = ("open", "approved", "rejected")

_REGISTRY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    policy TEXT NOT NULL DEFAULT '{{}}',
    eval_set TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS model_versions (
    model TEXT NOT NULL REFERENCES models (name),
    version INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (model, version),
    UNIQUE (model, run_id)
);
CREATE TABLE IF NOT EXISTS model_aliases (
    model TEXT NOT NULL REFERENCES models (name),
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (model, alias)
);
CREATE TABLE IF NOT EXISTS model_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER NOT NULL,
    action TEXT NOT NULL,
    by TEXT NOT NULL,
    at REAL NOT NULL,
    review_id TEXT,
    reason TEXT NOT NULL DEFAULT '',
    evidence TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS model_audit_model ON model_audit (model, id);
CREATE TABLE IF NOT EXISTS reviews (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL REFERENCES models (name),
    candidate_version INTEGER NOT NULL,
    baseline_version INTEGER,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    policy TEXT NOT NULL,
    evidence TEXT NOT NULL,
    gate_passed INTEGER NOT NULL,
    gate TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in REVIEW_STATES)})),
    decided_by TEXT,
    decided_at REAL,
    comment TEXT NOT NULL DEFAULT '',
    promoted_at REAL
);
"""


def _migrate_3_model_registry(db: sqlite3.Connection) -> None:
    """2 -> 3: the model registry (models, versions, aliases, reviews, audit trail)."""
    # Statement by statement: `executescript` would commit the migration's open transaction.
    for statement in _REGISTRY_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    name: str
    created_at: float
    created_by: str
    policy: dict[str, Any]  # the gate policy reviews of this model use
    eval_set: dict[str, Any]  # the fixed evaluation set every version is judged on


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    run_id: str
    created_at: float
    created_by: str


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    id: int
    model: str
    alias: str
    from_version: int | None
    to_version: int
    action: str  # set, promote, force-promote, rollback
    by: str
    at: float
    review_id: str | None
    reason: str
    evidence: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReviewRecord:
    id: str
    model: str
    candidate_version: int
    baseline_version: int | None  # production when the review was opened
    created_at: float
    created_by: str
    policy: dict[str, Any]
    evidence: dict[str, Any]
    gate_passed: bool
    gate: dict[str, Any]
    status: str  # open, approved, rejected
    decided_by: str | None
    decided_at: float | None
    comment: str
    promoted_at: float | None = None  # when production moved to its candidate through it


class RegistryConflict(Exception):
    """A registry change lost a race or found the state changed; `current` is what it found."""

    def __init__(self, current: Any):
        super().__init__(repr(current))
        self.current = current


class ModelTables:
    """The registry's rows in a `Store`'s file: `ModelTables(store).list_models()` and so on."""

    def __init__(self, store: "Store"):
        self._store = store

    def create_model(self, name: str, by: str, policy: dict[str, Any], eval_set: dict[str, Any]) -> ModelRecord:
        with self._store._transaction() as db:
            if db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
                raise RegistryConflict(name)
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)",
                       (name, time.time(), by, json.dumps(policy), json.dumps(eval_set)))
        return self.get_model(name)

    def get_model(self, name: str) -> ModelRecord:
        with self._store._connect() as db:
            row = db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(m.name for m in self.list_models()) or "none yet"
            raise NotFound(f"No model named {name!r}. Known models: {known}.")
        return ModelRecord(row["name"], row["created_at"], row["created_by"], json.loads(row["policy"]),
                           json.loads(row["eval_set"]))

    def list_models(self) -> list[ModelRecord]:
        with self._store._connect() as db:
            rows = db.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [ModelRecord(r["name"], r["created_at"], r["created_by"], json.loads(r["policy"]),
                            json.loads(r["eval_set"])) for r in rows]

    def set_model_policy(self, name: str, policy: dict[str, Any]) -> ModelRecord:
        with self._store._transaction() as db:
            db.execute("UPDATE models SET policy = ? WHERE name = ?", (json.dumps(policy), name))
        return self.get_model(name)

    def add_model_version(self, model: str, run_id: str, by: str) -> ModelVersion:
        """The next version of `model` for `run_id`, or the version it already is."""
        with self._store._transaction() as db:
            row = db.execute("SELECT version FROM model_versions WHERE model = ? AND run_id = ?",
                             (model, run_id)).fetchone()
            if row is None:
                (version,) = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions"
                                        " WHERE model = ?", (model,)).fetchone()
                db.execute("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?)",
                           (model, version, run_id, time.time(), by))
            else:
                version = row[0]
        return self.model_version(model, version)

    def model_version(self, model: str, version: int) -> ModelVersion:
        with self._store._connect() as db:
            row = db.execute("SELECT * FROM model_versions WHERE model = ? AND version = ?",
                             (model, int(version))).fetchone()
        if row is None:
            raise NotFound(f"Model {model} has no version {version}.")
        return ModelVersion(row["model"], row["version"], row["run_id"], row["created_at"], row["created_by"])

    def model_versions(self, model: str) -> list[ModelVersion]:
        with self._store._connect() as db:
            rows = db.execute("SELECT * FROM model_versions WHERE model = ? ORDER BY version",
                              (model,)).fetchall()
        return [ModelVersion(r["model"], r["version"], r["run_id"], r["created_at"], r["created_by"]) for r in rows]

    def model_aliases(self, model: str) -> dict[str, int]:
        with self._store._connect() as db:
            rows = db.execute("SELECT alias, version FROM model_aliases WHERE model = ? ORDER BY alias",
                              (model,)).fetchall()
        return {r["alias"]: r["version"] for r in rows}

    def move_alias(self, model: str, alias: str, to_version: int, *, expected: int | None | str = "any",
                   action: str, by: str, reason: str = "", review_id: str | None = None,
                   evidence: dict[str, Any] | None = None, review_from: tuple[str, ...] = ()) -> AuditEntry:
        """Point `alias` at `to_version` and write the audit entry, in one transaction.

        `expected`: the version the alias must still point at (None: unset), else `RegistryConflict`
        with the current one. `review_from`: the states `review_id` must be in, not yet promoted; it is
        marked promoted (else `RegistryConflict` with `{"status": ..., "promoted_at": ...}`).
        """
        with self._store._transaction() as db:
            row = db.execute("SELECT version FROM model_aliases WHERE model = ? AND alias = ?",
                             (model, alias)).fetchone()
            current = row[0] if row else None
            if expected != "any" and current != expected:
                raise RegistryConflict(current)
            if review_id and review_from:
                changed = db.execute(
                    f"UPDATE reviews SET promoted_at = ? WHERE id = ? AND promoted_at IS NULL AND status IN "
                    f"({', '.join('?' * len(review_from))})", (time.time(), review_id, *review_from)).rowcount
                if not changed:
                    row = db.execute("SELECT status, promoted_at FROM reviews WHERE id = ?", (review_id,)).fetchone()
                    raise RegistryConflict({"status": row[0], "promoted_at": row[1]} if row else None)
            db.execute("INSERT OR REPLACE INTO model_aliases VALUES (?, ?, ?)", (model, alias, int(to_version)))
            cursor = db.execute(
                "INSERT INTO model_audit (model, alias, from_version, to_version, action, by, at, review_id,"
                " reason, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, alias, current, int(to_version), action, by, time.time(), review_id, reason,
                 json.dumps(evidence or {})))
            entry_id = cursor.lastrowid
        return next(e for e in self.model_audit(model) if e.id == entry_id)

    def model_audit(self, model: str) -> list[AuditEntry]:
        """Every alias move of `model`, oldest first."""
        with self._store._connect() as db:
            rows = db.execute("SELECT * FROM model_audit WHERE model = ? ORDER BY id", (model,)).fetchall()
        return [AuditEntry(r["id"], r["model"], r["alias"], r["from_version"], r["to_version"], r["action"],
                           r["by"], r["at"], r["review_id"], r["reason"], json.loads(r["evidence"]))
                for r in rows]

    def add_review(self, model: str, candidate_version: int, baseline_version: int | None, by: str,
                   policy: dict[str, Any], evidence: dict[str, Any], gate: dict[str, Any]) -> ReviewRecord:
        review_id = new_id("rev")
        with self._store._transaction() as db:
            db.execute(
                "INSERT INTO reviews (id, model, candidate_version, baseline_version, created_at, created_by,"
                " policy, evidence, gate_passed, gate, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
                (review_id, model, candidate_version, baseline_version, time.time(), by, json.dumps(policy),
                 json.dumps(evidence), int(bool(gate.get("passed"))), json.dumps(gate)))
        return self.get_review(review_id)

    def get_review(self, review_id: str) -> ReviewRecord:
        with self._store._connect() as db:
            row = db.execute("SELECT * FROM reviews WHERE id = ?", (review_id,)).fetchone()
        if row is None:
            raise NotFound(f"No review {review_id!r}. `python -m tlcore review list MODEL` shows a model's reviews.")
        return _review_from_row(row)

    def list_reviews(self, model: str | None = None) -> list[ReviewRecord]:
        """Reviews, newest first (of `model` when given)."""
        with self._store._connect() as db:
            if model is None:
                rows = db.execute("SELECT * FROM reviews ORDER BY seq DESC").fetchall()
            else:
                rows = db.execute("SELECT * FROM reviews WHERE model = ? ORDER BY seq DESC", (model,)).fetchall()
        return [_review_from_row(r) for r in rows]

    def decide_review(self, review_id: str, status: str, by: str, comment: str) -> ReviewRecord:
        """Approve or reject an open review; `RegistryConflict` with the review as it is if it is not open."""
        with self._store._transaction() as db:
            changed = db.execute(
                "UPDATE reviews SET status = ?, decided_by = ?, decided_at = ?, comment = ?"
                " WHERE id = ? AND status = 'open'", (status, by, time.time(), comment, review_id)).rowcount
        review = self.get_review(review_id)
        if not changed:
            raise RegistryConflict(review)
        return review


def _review_from_row(row: sqlite3.Row) -> ReviewRecord:
    return ReviewRecord(
        id=row["id"], model=row["model"], candidate_version=row["candidate_version"],
        baseline_version=row["baseline_version"], created_at=row["created_at"], created_by=row["created_by"],
        policy=json.loads(row["policy"]), evidence=json.loads(row["evidence"]),
        gate_passed=bool(row["gate_passed"]), gate=json.loads(row["gate"]), status=row["status"],
        decided_by=row["decided_by"], decided_at=row["decided_at"], comment=row["comment"],
        promoted_at=row["promoted_at"])

