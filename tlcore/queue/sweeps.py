"""Sweeps: a grid of recipes × seeds queued as one group, and its results per configuration.

`submit_sweep` validates every configuration of the grid before it queues any, so a bad value
queues nothing; the runs carry the sweep's id (a column of the store). The local worker trains
them one by one; a Ray dispatcher (`tlcore.queue.cluster`) trains as many at once as the cluster fits.
`sweep_report` groups a sweep's runs by configuration (the recipe without its seed) and gives
mean ± standard deviation of test accuracy and macro F1 over the seeds that succeeded.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from typing import Any, Sequence

from tlcore.errors import InvalidInput, NotFound
from tlcore.records.config import PRESETS, TrainConfig, recipe_field_named, recipe_fields, recipe_labels, short_value
from tlcore.records.store import Run, Store, new_id

# Recipe fields a sweep may list several values for: those with one number or word per run.
SWEEPABLE = tuple(f.name for f in recipe_fields() if f.sweepable)
# Fields that never tell two configurations apart.
_NOT_CONFIGURATION = ("seed", "name", "resume_from", "sweep_id")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    run_id: str
    seed: int
    status: str
    accuracy: float | None
    macro_f1: float | None


@dataclasses.dataclass(frozen=True)
class SweepConfiguration:
    """One recipe of a sweep (its backbone and what differs from the others) and its runs over the seeds."""

    config: dict[str, Any]
    label: str  # what differs from the sweep's other configurations, e.g. "lr=3e-4"
    runs: list[SweepRun]
    mean_accuracy: float | None  # over the runs that succeeded; None when none did
    std_accuracy: float | None  # sample standard deviation; 0.0 with one run
    mean_macro_f1: float | None
    std_macro_f1: float | None


@dataclasses.dataclass(frozen=True)
class SweepReport:
    sweep_id: str
    dataset_id: str
    created_at: float
    configurations: list[SweepConfiguration]

    @property
    def runs(self) -> list[SweepRun]:
        return [run for c in self.configurations for run in c.runs]

    def run_names(self) -> dict[str, str]:
        """Each run named by what varies in the sweep, e.g. "lr=3e-4 · seed 1" (whatever its stored name)."""
        return {r.run_id: f"{c.label} · seed {r.seed}" for c in self.configurations for r in c.runs}

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `sweeps show --json`: sweep_id and configurations (config, runs, mean/std)."""
        return {"sweep_id": self.sweep_id, "dataset_id": self.dataset_id, "created_at": self.created_at,
                "configurations": [dataclasses.asdict(c) for c in self.configurations]}


@dataclasses.dataclass(frozen=True)
class QueuedSweep:
    sweep_id: str
    runs: list[Run]


def parse_values(option: str, text: str) -> list:
    """The comma list `text` given for recipe field `option`, each value of the field's type.

    Raises:
        InvalidInput: an empty list, an empty item or a value of the wrong type.
    """
    if option not in (*SWEEPABLE, "seed"):
        raise InvalidInput(f"`{_flag(option)}` cannot be swept; sweepable options are "
                           f"{', '.join('--' + k.replace('_', '-') for k in SWEEPABLE)} and --seeds.")
    field = recipe_field_named(option)
    items = [item.strip() for item in str(text).split(",")]
    if not text or not str(text).strip() or any(not item for item in items):
        raise InvalidInput(f"`{_flag(option)}` must be a comma list of one or more values, "
                           f"such as 1,2. Received: {text!r}")
    try:
        return [field.parse(item) for item in items]
    except InvalidInput:
        raise InvalidInput(f"`{_flag(option)}` must be a comma list of "
                           f"{'numbers' if field.kind is not str else 'names'}. Received: {text!r}") from None


def _flag(option: str) -> str:
    return "--seeds" if option == "seed" else "--" + option.replace("_", "-")


def grid(swept: dict[str, Sequence], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every combination of the swept values, each with every seed (seeds vary fastest)."""
    keys = list(swept)
    return [{**dict(zip(keys, values)), "seed": seed}
            for values in itertools.product(*(swept[k] for k in keys)) for seed in seeds]


def submit_sweep(dataset: str, swept: dict[str, Sequence], seeds: Sequence[int], *,
                 preset: str | None = None, fixed: dict[str, Any] | None = None,
                 store: Store | None = None) -> QueuedSweep:
    """Queue the grid `swept` × `seeds` on `dataset` as one sweep; returns its id and runs.

    `fixed` holds recipe fields with one value (over `preset`, if given). Every configuration
    is checked before the first is queued.

    Raises:
        InvalidInput: an unknown preset, an empty list, a repeated value or a recipe value the
            recipe refuses (the message names it); nothing is queued then.
    """
    from tlcore.data.importer import resolve_dataset
    from tlcore.queue import jobs

    store = store or Store()
    if preset is not None and preset not in PRESETS:
        raise InvalidInput(f"`--preset` must be one of {', '.join(PRESETS)}. Received: preset={preset!r}")
    seeds = list(seeds)
    for option, values in {**swept, "seed": seeds}.items():
        if not values:
            raise InvalidInput(f"`{_flag(option)}` must list at least one value. Received: none.")
        if len(set(values)) != len(values):
            raise InvalidInput(f"`{_flag(option)}` lists a value twice. Received: "
                               f"{','.join(map(str, values))}")
    base = {**(PRESETS[preset] if preset else {}), **(fixed or {})}
    resolved = resolve_dataset(dataset, store, seed=seeds[0], split=base.get("split"))
    sweep_id = new_id("sweep")
    prepared = []
    for point in grid(swept, seeds):
        config = TrainConfig(dataset=resolved.id, **{**base, **point, "name": None})
        prepared.append((point, jobs.prepare(config, store, sweep_id=sweep_id)[0]))
    runs = []
    for point, spec in prepared:
        varied = [f"{k}={short_value(v)}" for k, v in point.items() if k != "seed" and len(swept[k]) > 1]
        name = f"{' · '.join(varied) or resolved.name} · seed {point['seed']} ({sweep_id[-6:]})"
        named = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, name=name))
        runs.append(store.create_run(name, named))
    return QueuedSweep(sweep_id, runs)


def sweep_report(sweep_id: str, store: Store | None = None) -> SweepReport:
    """A sweep's runs grouped by configuration, with mean ± std of accuracy and macro F1.

    Raises:
        NotFound: no sweep by that id.
    """
    store = store or Store()
    runs = list(reversed(store.list_runs(sweep_id=sweep_id)))
    if not runs:
        known = ", ".join(store.sweep_ids()[:10]) or "none yet"
        raise NotFound(f"No sweep {sweep_id!r}. Known sweeps: {known}.")
    recipes = [{k: v for k, v in r.spec.recipe.to_dict().items() if k not in _NOT_CONFIGURATION} for r in runs]
    varying = [k for k in recipes[0] if any(recipe.get(k) != recipes[0][k] for recipe in recipes)]
    shown = ["backbone"] + [k for k in varying if k != "backbone"]
    groups: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run, recipe in zip(runs, recipes):
        key = repr(sorted((k, repr(v)) for k, v in recipe.items()))
        groups.setdefault(key, ({k: recipe.get(k) for k in shown}, []))[1].append(run)
    labels = recipe_labels([config for config, _ in groups.values()])
    return SweepReport(sweep_id, runs[0].dataset_id, runs[0].created_at,
                       [_configuration(config, label, members)
                        for (config, members), label in zip(groups.values(), labels)])


def _configuration(config: dict[str, Any], label: str, runs: list[Run]) -> SweepConfiguration:
    accuracy = [r.accuracy for r in runs if r.accuracy is not None]
    macro_f1 = [r.macro_f1 for r in runs if r.macro_f1 is not None]
    return SweepConfiguration(
        config=config, label=label,
        runs=[SweepRun(r.id, r.spec.recipe.seed, r.status.value, r.accuracy, r.macro_f1) for r in runs],
        mean_accuracy=_mean(accuracy), std_accuracy=_std(accuracy),
        mean_macro_f1=_mean(macro_f1), std_macro_f1=_std(macro_f1),
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def list_sweeps(store: Store | None = None) -> list[SweepReport]:
    """Every sweep, newest first."""
    store = store or Store()
    return [sweep_report(sweep_id, store) for sweep_id in store.sweep_ids()]
