"""`sweep` (queue a grid of recipes × seeds) and `sweeps` (list them, show one per configuration)."""

from __future__ import annotations

from tlcore.cli.common import emit, fmt, json_option, open_store, table
from tlcore.cli.recipe_options import explicit_options, sweep_options


def add_commands(sub) -> None:
    sweep = sub.add_parser("sweep", help="queue a grid of recipes x seeds as one sweep")
    sweep_options(sweep)
    sweeps = sub.add_parser("sweeps", help="list sweeps or show one grouped by configuration")
    ssub = sweeps.add_subparsers(dest="action", metavar="ACTION", required=True)
    json_option(ssub.add_parser("list", help="list sweeps, newest first"))
    sshow = ssub.add_parser("show", help="mean and std of accuracy and macro F1 per configuration")
    sshow.add_argument("sweep", help="sweep id")
    json_option(sshow)


def cmd_sweep(args) -> int:
    from tlcore.queue.sweeps import parse_values, submit_sweep
    from tlcore.records.config import recipe_field_named

    given = explicit_options(args)
    swept = {name: parse_values(name, text) for name, text in given.items() if recipe_field_named(name).sweepable}
    fixed = {name: value for name, value in given.items() if name not in swept}
    queued = submit_sweep(args.data, swept, parse_values("seed", args.seeds), preset=args.preset, fixed=fixed,
                          store=open_store())
    text = (f"{queued.sweep_id}\nQueued {len(queued.runs)} runs. `python -m tlcore sweeps show "
            f"{queued.sweep_id}` shows their results per configuration.")
    emit(args, {"sweep_id": queued.sweep_id, "runs": [r.id for r in queued.runs]}, None if args.json else text)
    return 0


def cmd_sweeps(args) -> int:
    from tlcore.queue import leases, sweeps

    store = open_store()
    leases.reap(store)
    if args.action == "list":
        found = sweeps.list_sweeps(store)
        text = table(["sweep", "configurations", "runs", "status", "best mean accuracy"],
                      [[s.sweep_id, len(s.configurations), len(s.runs),
                        ", ".join(f"{n} {k}" for k, n in s.status_counts().items()),
                        fmt(max((c.mean_accuracy for c in s.configurations if c.mean_accuracy is not None),
                                 default=None))] for s in found]
                      ) if found else "No sweeps yet. `python -m tlcore sweep --data D --lr 1e-3,3e-4` queues one."
        emit(args, {"sweeps": [{"sweep_id": s.sweep_id, "dataset_id": s.dataset_id, "created_at": s.created_at,
                                 "configurations": len(s.configurations), "runs": len(s.runs),
                                 "status": s.status_counts()} for s in found]},
              None if args.json else text)
        return 0
    report = sweeps.sweep_report(args.sweep, store)
    rows = [[c.label, len(c.runs), _mean_std(c.mean_accuracy, c.std_accuracy),
             _mean_std(c.mean_macro_f1, c.std_macro_f1),
             ", ".join(f"{r.seed}:{r.status if r.accuracy is None else f'{r.accuracy:.3f}'}" for r in c.runs)]
            for c in report.configurations]
    text = f"Sweep {report.sweep_id} on {report.dataset_id}\n" + table(
        ["configuration", "runs", "accuracy", "macro F1", "seed:accuracy"], rows)
    emit(args, report.to_dict(), None if args.json else text)
    return 0


def _mean_std(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


COMMANDS = {"sweep": cmd_sweep, "sweeps": cmd_sweeps}
