"""`runs` (list, show) and `compare`: what runs did."""

from __future__ import annotations

import json
import time
from typing import Any

from tlcore.cli.common import emit, fmt, json_option, metrics_text, open_store, run_dict, table


def add_commands(sub) -> None:
    runs = sub.add_parser("runs", help="list runs or show one")
    rsub = runs.add_subparsers(dest="action", metavar="ACTION", required=True)
    rlist = rsub.add_parser("list", help="list runs, newest first")
    rlist.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    json_option(rlist)
    show = rsub.add_parser("show", help="a run's config, status, epochs, metrics and log tail")
    show.add_argument("run", help="run id or name")
    json_option(show)

    compare = sub.add_parser("compare", help="paired comparison of run B against run A on their shared images")
    compare.add_argument("run_a", metavar="RUN_A", help="run id or name (the reference)")
    compare.add_argument("run_b", metavar="RUN_B", help="run id or name (the challenger)")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    json_option(compare)


def cmd_runs(args) -> int:
    from tlcore.queue import leases

    store = open_store()
    leases.reap(store)  # a dead worker's run shows as failed, not running forever
    if args.action == "list":
        runs = store.list_runs(limit=args.limit)
        text = table(["id", "name", "status", "backbone", "weights", "accuracy", "created"],
                      [[r.id, r.name, r.status.value, r.backbone, r.weights,
                        f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
                        time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))] for r in runs]
                      ) if runs else "No runs yet. `python -m tlcore train --data FOLDER` starts one."
        emit(args, {"runs": [run_dict(r) for r in runs]}, None if args.json else text)
        return 0
    run = store.get_run(args.run)
    epochs = store.epochs(run.id)
    logs = store.logs(run.id, tail=20)
    payload = {**run_dict(run), "epochs": [
        {"phase": e.phase, "epoch": e.epoch, "step": e.step, "metrics": e.metrics, "at": e.at} for e in epochs],
        "log_tail": [line.message for line in logs], "calibration": _calibration_dict(run)}
    if args.json:
        emit(args, payload)
        return 0
    lines = [f"{run.name} ({run.id}): {run.status.value}",
             f"  dataset {run.dataset_id}, backbone {run.backbone}, weights {run.weights}"]
    if run.executor:
        lines.append(f"  ran on: {run.executor.describe()}")
    if run.sweep_id:
        lines.append(f"  sweep: {run.sweep_id}")
    if run.error:
        lines.append(f"  error: {run.error}")
    if not run.status.is_terminal:
        lines.append(f"  progress: {json.dumps(run.progress.to_dict())}")
    if run.summary:
        lines.append(f"  {run.summary.eval_split} {metrics_text(run.summary.metrics)}")
        if run.summary.device_record:
            lines.append(f"  trained on {run.summary.device_record.describe()}")
    if run.summary:
        lines += _head_choice_lines(run.summary, run.spec.recipe.augment)
    calibration = run.summary.calibration if run.summary else None
    if calibration and calibration.temperature:
        lines.append(f"  calibrated: temperature {calibration.temperature:.2f} (fitted on {calibration.fitted_on} "
                     f"val images), ECE {fmt(calibration.ece_before)} -> {fmt(calibration.ece_after)}")
    elif calibration:
        lines.append("  not calibrated, probabilities are the unscaled softmax"
                     + (f": {calibration.reason}" if calibration.reason else ""))
    threshold = run.summary.threshold if run.summary else None
    if threshold and threshold.usable:
        lines.append(f"  \"not sure\" below confidence {threshold.threshold:.3f} (target precision "
                     f"{threshold.target_precision:.0%}; answers {threshold.coverage:.0%} of val)")
    elif threshold:
        lines.append(f"  no usable \"not sure\" threshold: no confidence below 1 reached "
                     f"{threshold.target_precision:.0%} precision on val, so every image gets an answer")
    if epochs:
        lines.append(table(["step", "phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"],
                            [[e.step, e.phase, e.epoch] + [fmt(e.metrics.get(k)) for k in
                                                          ("loss", "accuracy", "val_loss", "val_accuracy")]
                             for e in epochs]))
    if logs:
        lines.append("log (last lines):")
        lines += [f"  {line.message.splitlines()[0] if line.message else ''}" for line in logs]
    print("\n".join(lines))
    return 0


def _head_choice_lines(summary, augment) -> list[str]:
    """What the head phase chose (search, class weighting auto), whether the fine-tune was kept and what
    it trained on (for a recipe with augmentations `augment`)."""
    lines = []
    search = summary.head_search
    if search and search.trials:
        chosen = search.trials[search.chosen]
        lines.append(f"  head search: {len(search.trials)} trials in {search.seconds or 0:.1f} s; kept "
                     f"{chosen.settings()} (val macro F1 {chosen.val_macro_f1:.4f}, accuracy "
                     f"{chosen.val_accuracy:.4f})")
    if search and search.class_weight:
        lines.append(f"  {search.class_weight.describe()}")
    elif summary.class_weight:
        lines.append(f"  class weighting: {summary.class_weight}")
    if summary.finetune:
        lines.append(f"  fine-tune: {summary.finetune.describe()}")
    if inputs := summary.describe_finetune_inputs(augment):
        lines.append(f"  fine-tune inputs: {inputs}")
    return lines


def _calibration_dict(run) -> dict[str, Any] | None:
    """`{temperature, ece_before, ece_after, reason, probabilities}` of a finished run; None before it
    finished (and for runs from before calibration)."""
    calibration = run.summary.calibration if run.summary else None
    if calibration is None:
        return None
    return {"temperature": calibration.temperature, "ece_before": calibration.ece_before,
            "ece_after": calibration.ece_after, "reason": calibration.reason,
            "probabilities": "temperature-scaled softmax" if calibration.temperature else "unscaled softmax"}


def cmd_compare(args) -> int:
    from tlcore.evaluate.comparison import compare_runs

    c = compare_runs(args.run_a, args.run_b, open_store(), resamples=args.resamples, seed=args.seed)
    lines = [c.verdict, c.coverage_note or f"{c.n_shared} shared evaluation images.",
             f"  accuracy {c.acc_a:.4f} -> {c.acc_b:.4f}, macro F1 {c.f1_a:.4f} -> {c.f1_b:.4f} "
             f"(95 % CI of the F1 delta {100 * c.f1_ci_low:+.1f} to {100 * c.f1_ci_high:+.1f} pts)",
             f"  {c.name_b} fixed {c.fixed}, broke {c.broken}; both wrong on {c.both_wrong}; "
             f"McNemar exact p = {c.mcnemar_p:.4g}; bootstrap {c.resamples} resamples, seed {c.seed}"]
    emit(args, c.to_json(), None if args.json else "\n".join(lines))
    return 0


COMMANDS = {"runs": cmd_runs, "compare": cmd_compare}
