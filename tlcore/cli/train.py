"""`train`, `submit`, `lr-find`, `worker`, `cancel` and `resume`: runs started, queued, run and stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading

from tlcore.cli.common import emit, json_option, metrics_text, open_store
from tlcore.cli.recipe_options import config_from_args, explicit_options, train_options
from tlcore.errors import InvalidInput


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="train in the foreground (Ctrl-C cancels)")
    train_options(train)
    submit = sub.add_parser("submit", help="queue a training job for the worker and return at once")
    train_options(submit)
    submit.add_argument("--compare", metavar="COMPARISON",
                        help="queue one run per backbone of a comparison (lite-family: Lite0, Lite1, Lite2) "
                             "instead of one run; --backbone is then ignored")

    lr_find = sub.add_parser("lr-find", help="suggest a learning rate: an exponential LR range test "
                                             "(seconds on cached features for the head)")
    train_options(lr_find)
    lr_find.add_argument("--phase", choices=("head", "finetune"), default="head",
                         help="head (on cached features, default) or finetune (through the top layers, slower)")

    worker = sub.add_parser("worker", help="run queued jobs one at a time (or on a Ray cluster)")
    worker.add_argument("--once", action="store_true",
                        help="run at most one job, then exit (with --cluster: until the queue is empty)")
    worker.add_argument("--process-per-job", action="store_true",
                        help="train each job in its own process, so a finished job returns its GPU memory "
                             "(also: TLCORE_PROCESS_PER_JOB=1)")
    worker.add_argument("--cluster", metavar="ADDRESS",
                        help="dispatch queued runs to a Ray cluster (ray://HEAD:10001, auto, local); "
                             "default $TLCORE_CLUSTER, else train here")
    worker.add_argument("--gpus-per-run", type=float,
                        help="GPUs each run asks for on the cluster (default 1 if it has GPUs, else 0)")
    worker.add_argument("--cpus-per-run", type=float, help="CPUs each run asks for on the cluster (default 1)")

    cancel = sub.add_parser("cancel", help="cancel a queued run, or stop a running one between batches")
    cancel.add_argument("run", help="run id or name")
    json_option(cancel)
    resume = sub.add_parser("resume", help="queue a failed or cancelled run again from its checkpoint")
    resume.add_argument("run", help="run id or name")
    json_option(resume)


def cmd_train(args) -> int:
    from tlcore.queue import jobs

    config = config_from_args(args)
    store = open_store()
    stop = threading.Event()
    interrupted = []

    def on_sigint(_signum, _frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nStopping after the current batch (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        progress = sys.stdout.isatty() and not args.json
        run = jobs.run_foreground(config, store, progress_bar=progress, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    result = run.summary.to_dict() if run.summary else {}
    result.update({"run_id": run.id, "name": run.name, "status": run.status.value,
                   "backbone": run.backbone, "weights": run.weights})
    if run.error:
        result["error"] = run.error
    if not args.json:
        print(_summary_text(run))
    emit(args, result)
    return {"succeeded": 0, "cancelled": 130}.get(run.status.value, 1)


def _summary_text(run) -> str:
    s = run.summary
    if s is None:
        return f"Run {run.name} ({run.id}) {run.status.value}: {run.error}"
    weights = "ImageNet weights" if run.weights == "imagenet" else "no pretrained weights (random init)"
    lines = [f"Run {run.name} ({run.id}) succeeded: {run.backbone}, {weights}.",
             f"  {s.eval_split} {metrics_text(s.metrics)} in {s.timings.total_s or 0:.1f} s",
             f"  model: {s.model_path}"]
    if s.device_record:
        lines.append(f"  trained on {s.device_record.describe()}")
    return "\n".join(lines)


def cmd_submit(args) -> int:
    from tlcore.queue import jobs
    from tlcore.queue.worker import worker_status

    store = open_store()
    if args.compare:
        return _submit_comparison(args, store)
    run = jobs.submit(config_from_args(args), store)
    position = [r.id for r in store.queue()].index(run.id) + 1 if run.status.value == "queued" else None
    status = worker_status(store)
    if not args.json:
        print(run.id)
        print(f"Queued {run.name} (position {position}).", file=sys.stderr)
        if not status.alive:
            print("No worker is running; start one with `python -m tlcore worker`.", file=sys.stderr)
    emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value, "position": position,
                 "worker_alive": status.alive})
    return 0


def _submit_comparison(args, store) -> int:
    """Queue one run per backbone of comparison `args.compare`, explicit options over its preset."""
    import dataclasses

    from tlcore.data.importer import resolve_dataset
    from tlcore.queue import jobs
    from tlcore.records.config import comparison_configs

    options = {k: v for k, v in explicit_options(args).items() if k not in ("backbone", "name")}
    configs = comparison_configs(args.compare, args.data, **options)
    # A folder is imported once, so every run of the comparison trains on the same dataset version.
    dataset = resolve_dataset(args.data, store, seed=configs[0].seed, split=configs[0].split)
    runs = [jobs.submit(dataclasses.replace(config, dataset=dataset.id), store) for config in configs]
    if not args.json:
        for run in runs:
            print(run.id)
        print(f"Queued {len(runs)} runs: {', '.join(f'{r.name} ({r.backbone})' for r in runs)}.", file=sys.stderr)
    emit(args, {"runs": [{"run_id": r.id, "name": r.name, "backbone": r.backbone, "status": r.status.value}
                          for r in runs]})
    return 0


def cmd_lr_find(args) -> int:
    from tlcore.train.lr_finder import find_lr

    config = config_from_args(args)
    finding = find_lr(config, open_store(), phase=args.phase,
                      on_progress=None if args.json else lambda message: print(message + "…", file=sys.stderr))
    which = "head" if args.phase == "head" else "fine-tune"
    text = (f"Suggested {which} learning rate: {finding.suggested_lr:.2g} (loss lowest at {finding.min_loss_lr:.2g}; "
            f"{len(finding.curve)} steps in {finding.seconds:.1f} s). The recipe's: {config.lr:g}"
            + (f" (fine-tune {config.lr * config.finetune_lr_scale:g})." if args.phase == "finetune" else "."))
    emit(args, {**finding.to_dict(), "recipe_lr": config.lr}, None if args.json else text)
    return 0


def cmd_worker(args) -> int:
    from tlcore.queue import worker

    cluster = args.cluster or os.environ.get("TLCORE_CLUSTER")
    if not cluster and (args.gpus_per_run is not None or args.cpus_per_run is not None):
        raise InvalidInput("`--gpus-per-run` and `--cpus-per-run` apply to a cluster: pass --cluster ADDRESS "
                           "(or set TLCORE_CLUSTER). The local worker trains one run at a time with what it has.")
    runs = worker.serve_forever(cluster=cluster, once=args.once, process_per_job=args.process_per_job,
                                gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run)
    failed = [r for r in runs if r.status.value == "failed"]
    return 1 if args.once and failed else 0


def cmd_cancel(args) -> int:
    from tlcore.queue import jobs

    run = jobs.cancel(args.run, open_store())
    state = ("cancelled" if run.status.value == "cancelled"
             else "asked to stop; it stops after the current batch")
    emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value,
                 "cancel_requested": run.cancel_requested},
          None if args.json else f"Run {run.name} ({run.id}) {state}.")
    return 0


def cmd_resume(args) -> int:
    from tlcore.queue import jobs

    run = jobs.resume(args.run, open_store())
    emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value,
                 "resume_from": run.spec.resume_from},
          None if args.json else f"{run.id}\nQueued {run.name}, resuming from {run.spec.resume_from}.")
    return 0


COMMANDS = {"train": cmd_train, "submit": cmd_submit, "lr-find": cmd_lr_find, "worker": cmd_worker,
            "cancel": cmd_cancel, "resume": cmd_resume}
