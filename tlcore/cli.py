"""`python -m tlcore ...`: everything the dashboard does, headless.

TensorFlow is imported only by the commands that need it, so `--help`, `runs list` and
`datasets list` answer at once. With `--json` the last line on stdout is one JSON object.
Bad input exits with code 2 and one plain sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Sequence

from tlcore.errors import InvalidInput, TransferLabError, plain_message

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from tlcore.records.config import recipe_field_named

    parser = argparse.ArgumentParser(
        prog="python -m tlcore",
        description="Transfer Lab: import image datasets, fine-tune ImageNet backbones, keep every run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    datasets = sub.add_parser("datasets", help="import and list datasets")
    dsub = datasets.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = dsub.add_parser("import", help="import a folder of class folders, a .zip of one, or a built-in dataset")
    imp.add_argument("source", nargs="?", help="folder (one subfolder per class, or train/ val/ [test/]) or .zip")
    imp.add_argument("--builtin", metavar="NAME",
                     help="a built-in dataset made offline instead of SOURCE (`datasets builtin` lists them)")
    imp.add_argument("--name", help="dataset name (default: the folder or zip name, or the built-in's)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    imp.add_argument("--split", type=_option_type(recipe_field_named("split")), metavar="F1,F2,F3",
                     help="train,val,test fractions (default 0.7,0.15,0.15)")
    imp.add_argument("--new-version", action="store_true",
                     help="record a new version even if the latest one holds exactly these images")
    _json(imp)
    _json(dsub.add_parser("list", help="list datasets"))
    _json(dsub.add_parser("builtin", help="list the built-in datasets (made offline, `datasets import --builtin`)"))
    fix = dsub.add_parser("fix", help="relabel or exclude images: a new version with a change log")
    fix.add_argument("dataset", help="dataset name, name@version or id")
    fix.add_argument("--relabel", nargs="+", default=[], metavar="SOURCE=LABEL", type=_relabel_arg,
                     help="give an image (its path as the audit lists it) another class")
    fix.add_argument("--exclude", nargs="+", default=[], metavar="SOURCE", help="leave images out")
    fix.add_argument("--reason", default="", help="why, for the change log")
    fix.add_argument("--retrain", metavar="RUN", help="queue a run with this run's recipe on the new version")
    _json(fix)

    audit = sub.add_parser("audit", help="likely label errors, near-duplicates and outliers of a dataset")
    audit.add_argument("dataset", help="dataset name, name@version or id")
    audit.add_argument("--backbone", default="efficientnet_lite0", help="whose features (default efficientnet_lite0)")
    audit.add_argument("--image-size", type=int, help="input size in px (default: the backbone's)")
    audit.add_argument("--top", type=int, default=20, help="how many of each finding to print (default 20)")
    _json(audit)

    _json(sub.add_parser("backbones", help="list backbones and whether their ImageNet weights are here"))

    train = sub.add_parser("train", help="train in the foreground (Ctrl-C cancels)")
    _train_options(train)
    submit = sub.add_parser("submit", help="queue a training job for the worker and return at once")
    _train_options(submit)
    submit.add_argument("--compare", metavar="COMPARISON",
                        help="queue one run per backbone of a comparison (lite-family: Lite0, Lite1, Lite2) "
                             "instead of one run; --backbone is then ignored")

    lr_find = sub.add_parser("lr-find", help="suggest a learning rate: an exponential LR range test "
                                             "(seconds on cached features for the head)")
    _train_options(lr_find)
    lr_find.add_argument("--phase", choices=("head", "finetune"), default="head",
                         help="head (on cached features, default) or finetune (through the top layers, slower)")

    sweep = sub.add_parser("sweep", help="queue a grid of recipes x seeds as one sweep")
    _sweep_options(sweep)
    sweeps = sub.add_parser("sweeps", help="list sweeps or show one grouped by configuration")
    ssub = sweeps.add_subparsers(dest="action", metavar="ACTION", required=True)
    _json(ssub.add_parser("list", help="list sweeps, newest first"))
    sshow = ssub.add_parser("show", help="mean and std of accuracy and macro F1 per configuration")
    sshow.add_argument("sweep", help="sweep id")
    _json(sshow)

    worker = sub.add_parser("worker", help="run queued jobs one at a time (or on a Ray cluster)")
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
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
    _json(cancel)
    resume = sub.add_parser("resume", help="queue a failed or cancelled run again from its checkpoint")
    resume.add_argument("run", help="run id or name")
    _json(resume)

    runs = sub.add_parser("runs", help="list runs or show one")
    rsub = runs.add_subparsers(dest="action", metavar="ACTION", required=True)
    rlist = rsub.add_parser("list", help="list runs, newest first")
    rlist.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    _json(rlist)
    show = rsub.add_parser("show", help="a run's config, status, epochs, metrics and log tail")
    show.add_argument("run", help="run id or name")
    _json(show)

    predict = sub.add_parser("predict", help="classify image files with a run's model or the ImageNet model")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run id or name")
    which.add_argument("--model", help="a backbone's own ImageNet classifier: efficientnet_lite0, "
                                       "efficientnet_lite1 or efficientnet_lite2")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5, help="how many classes per image (default 5)")
    _json(predict)

    compare = sub.add_parser("compare", help="paired comparison of run B against run A on their shared images")
    compare.add_argument("run_a", metavar="RUN_A", help="run id or name (the reference)")
    compare.add_argument("run_b", metavar="RUN_B", help="run id or name (the challenger)")
    compare.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    _json(compare)

    export = sub.add_parser("export", help="export a run's model")
    export.add_argument("--run", required=True, help="run id or name")
    export.add_argument("--format", required=True,
                        choices=("keras", "savedmodel", "tflite", "tflite-int8", "onnx", "card", "bundle"))
    export.add_argument("--out", help="file (folder for savedmodel); default: export/ in the run folder")
    _json(export)

    _registry_options(sub)

    serve = sub.add_parser("serve", help="serve a run's model over HTTP (POST /v1/predict, docs at /docs)")
    served = serve.add_mutually_exclusive_group(required=True)
    served.add_argument("--run", help="run id or name")
    served.add_argument("--model", metavar="NAME[@ALIAS]",
                        help="a registered model's alias (default production); follows the alias when it moves")
    serve.add_argument("--poll", type=float, default=2.0,
                       help="with --model: seconds between checks of the alias (default 2)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--token", default=os.environ.get("TLCORE_SERVE_TOKEN"),
                       help="require `Authorization: Bearer TOKEN` (default: $TLCORE_SERVE_TOKEN, else none)")
    return parser


def _registry_options(sub) -> None:
    by = {"default": None, "help": "who does it (default: $TLCORE_USER, else the login name)"}
    models = sub.add_parser("models", help="the model registry: versions, aliases, promotion, rollback")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    register = msub.add_parser("register", help="register a finished run as a model's next version")
    register.add_argument("name", help="model name (created with its first version)")
    register.add_argument("--run", required=True, help="run id or name")
    register.add_argument("--by", **by)
    _json(register)
    _json(msub.add_parser("list", help="list models with their aliases"))
    mshow = msub.add_parser("show", help="a model's versions, aliases, fixed evaluation set and audit trail")
    mshow.add_argument("name")
    _json(mshow)
    promote = msub.add_parser("promote", help="move production to a review's candidate (gate passed and approved)")
    promote.add_argument("name")
    promote.add_argument("--review", required=True, help="review id")
    promote.add_argument("--force", action="store_true", help="promote although the gate failed or nobody approved")
    promote.add_argument("--reason", default="", help="why (required with --force; kept in the audit trail)")
    promote.add_argument("--by", **by)
    _json(promote)
    rollback = msub.add_parser("rollback", help="move production back to the version before its last move")
    rollback.add_argument("name")
    rollback.add_argument("--reason", default="")
    rollback.add_argument("--by", **by)
    _json(rollback)
    alias = msub.add_parser("alias", help="point an alias other than production at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", help="version number")
    alias.add_argument("--reason", default="")
    alias.add_argument("--by", **by)
    _json(alias)
    policy = msub.add_parser("policy", help="show or set the gate of a model's next reviews")
    policy.add_argument("name")
    policy.add_argument("--non-inferiority-pts", type=float, help="largest loss allowed at 95 %% (default 1)")
    policy.add_argument("--max-class-drop-pts", type=float, help="largest drop of one class's recall (default 5)")
    policy.add_argument("--min-accuracy", type=float, help="minimum accuracy on the fixed set, 0-1 (default none)")
    _json(policy)

    reviews = sub.add_parser("review", help="open, decide and report reviews of a model's candidate")
    rsub = reviews.add_subparsers(dest="action", metavar="ACTION", required=True)
    ropen = rsub.add_parser("open", help="judge a run against production on the model's fixed evaluation set")
    ropen.add_argument("name", help="model name")
    ropen.add_argument("--candidate", required=True, help="run id or name")
    ropen.add_argument("--by", **by)
    _json(ropen)
    for action in ("approve", "reject"):
        decide = rsub.add_parser(action, help=f"{action} an open review (once)")
        decide.add_argument("review", help="review id")
        decide.add_argument("--by", required=True, help="the reviewer's name")
        decide.add_argument("--comment", default="", help="why")
        _json(decide)
    rshow = rsub.add_parser("show", help="a review's evidence, gate and decision")
    rshow.add_argument("review")
    _json(rshow)
    rlist = rsub.add_parser("list", help="reviews, newest first")
    rlist.add_argument("name", nargs="?", help="only this model's")
    _json(rlist)
    report = rsub.add_parser("report", help="write a review as one self-contained HTML file")
    report.add_argument("review")
    report.add_argument("--out", required=True, help="the .html file to write")
    _json(report)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATASET_OR_FOLDER",
                   help="dataset name or id, or a folder / .zip to import first")


def _preset_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a named recipe; explicit options override it")


def _train_options(p: argparse.ArgumentParser) -> None:
    """--data, one option per recipe field (`TrainConfig`), --preset and --json."""
    from tlcore.records.config import recipe_fields

    _data_option(p)
    for field in recipe_fields():
        _recipe_option(p, field)
    _preset_option(p)
    _json(p)


def _sweep_options(p: argparse.ArgumentParser) -> None:
    """As `_train_options`, but a field with one number or word per run takes a comma list."""
    from tlcore.records.config import recipe_fields

    _data_option(p)
    for field in recipe_fields():
        if field.name in ("seed", "name"):  # --seeds below; the sweep names its runs
            continue
        if field.sweepable:
            p.add_argument(field.flag, *field.aliases, dest=field.name, metavar="A,B,...",
                           help=_option_help(field) + "; one value or a comma list")
        else:
            _recipe_option(p, field)
    p.add_argument("--seeds", default="0", metavar="S1,S2,...", help="comma list of seeds (default 0)")
    _preset_option(p)
    _json(p)


def _recipe_option(p: argparse.ArgumentParser, field) -> None:
    """Recipe field `field` as an option; left out, it is None (the preset's or TrainConfig's value)."""
    names = (field.flag, *field.aliases)
    if field.kind is bool:
        p.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                       help=_option_help(field))
    elif field.choices and field.kind is str:
        p.add_argument(*names, dest=field.name, choices=field.choices, help=_option_help(field))
    else:
        p.add_argument(*names, dest=field.name, type=_option_type(field), help=_option_help(field),
                       metavar="A,B,..." if field.kind is tuple else "F1,F2,F3" if field.kind == "fractions"
                       else None)


def _option_help(field) -> str:
    text = field.help.rstrip(".").replace("%", "%%")
    if field.kind is tuple:
        text += f" (comma list of {','.join(field.choices)}, or none)"
    elif field.choices and field.kind is not str:
        text += f" (one of {', '.join(field.choices)})"
    if field.default not in (None, ()):
        text += f"; default {field.default}"
    return text


def _option_type(field):
    def parse(text: str):
        try:
            return field.parse(text)
        except InvalidInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = field.name
    return parse


def config_from_args(args: argparse.Namespace):
    """A `TrainConfig` from a preset (if given) overridden by the explicit options."""
    from tlcore.records.config import PRESETS, TrainConfig

    values: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise InvalidInput(f"`--preset` must be one of {', '.join(PRESETS)}. Received: preset={args.preset!r}")
        values.update(PRESETS[args.preset])
    values.update(_explicit_options(args))
    return TrainConfig(dataset=args.data, **values)


def _explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe options given on the command line (those left out are None)."""
    from tlcore.records.config import recipe_fields

    return {f.name: getattr(args, f.name) for f in recipe_fields() if getattr(args, f.name, None) is not None}


# ----------------------------------------------------------------- commands


def _emit(args, payload: dict[str, Any], text: str | None = None) -> None:
    if text:
        print(text)
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))


def _store():
    from tlcore.records.store import Store

    return Store()


def cmd_datasets(args) -> int:
    store = _store()
    if args.action == "fix":
        return cmd_fix(args)
    if args.action == "list":
        rows = store.list_datasets()
        text = "No datasets yet. `python -m tlcore datasets import FOLDER` adds one."
        if rows:
            text = _table(["name", "version", "id", "images", "classes", "test split"],
                          [[d.name, d.version, d.id, d.num_images, len(d.classes), "yes" if d.has_test else "no"]
                           for d in rows])
        _emit(args, {"datasets": [_dataset_dict(d) for d in rows]}, None if args.json else text)
        return 0
    if args.action == "builtin":
        return _list_builtin(args, store)
    kwargs: dict[str, Any] = {"store": store, "seed": args.seed, "new_version": args.new_version}
    if args.split:
        kwargs["split"] = args.split
    if args.builtin:
        from tlcore.data.builtin import BUILTIN, import_builtin

        if args.source:
            raise InvalidInput(f"Give a SOURCE or `--builtin`, not both. Received: {args.source!r} and "
                               f"builtin={args.builtin!r}")
        if args.builtin not in BUILTIN:
            raise InvalidInput(f"`--builtin` must be one of {', '.join(BUILTIN)}. Received: builtin={args.builtin!r}")
        result = import_builtin(args.builtin, dataset_name=args.name, **kwargs)
    elif args.source:
        from tlcore.data.importer import import_dataset

        result = import_dataset(args.source, args.name, **kwargs)
    else:
        raise InvalidInput("`datasets import` needs a SOURCE folder or .zip, or `--builtin NAME` "
                           "(`python -m tlcore datasets builtin` lists them).")
    d, report = result.dataset, result.report
    if result.unchanged:
        _emit(args, {"dataset": _dataset_dict(d), "report": report, "unchanged": True},
              None if args.json else f"No changes: {d.label} ({d.id}) already holds exactly these images. "
                                     "Pass --new-version (or another --seed/--split) for a new version.")
        return 0
    lines = [f"Imported {d.label} ({d.id}): {d.num_images} images, {len(d.classes)} classes."]
    for split, counts in d.counts.items():
        if counts:
            lines.append(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    skipped = report.get("skipped") or []
    if skipped:
        lines.append(f"Skipped {len(skipped)} file(s):")
        lines += [f"  {s.get('file')}: {s.get('message') or s.get('reason')}" for s in skipped[:50]]
        if len(skipped) > 50:
            lines.append(f"  ... and {len(skipped) - 50} more (see --json)")
    lines += [f"Warning: {w}" for w in report.get("warnings") or []]
    _emit(args, {"dataset": _dataset_dict(d), "report": report}, None if args.json else "\n".join(lines))
    return 0


def _list_builtin(args, store) -> int:
    """The built-in datasets, one line each, and the newest version already imported of each."""
    from tlcore.data.builtin import BUILTIN

    imported: dict[str, str] = {}
    for d in store.list_datasets():  # newest first
        imported.setdefault(d.source, d.label)
    rows = [{"name": name, "description": text, "imported": imported.get(f"builtin:{name}")}
            for name, text in BUILTIN.items()]
    lines = [f"{r['name']:<9} {r['description']}" + (f" Imported: {r['imported']}." if r["imported"] else "")
             for r in rows]
    lines.append("`python -m tlcore datasets import --builtin NAME` imports one.")
    _emit(args, {"builtin": rows}, None if args.json else "\n".join(lines))
    return 0


def _relabel_arg(text: str) -> tuple[str, str]:
    source, sep, label = text.rpartition("=")
    if not sep or not source or not label:
        raise argparse.ArgumentTypeError(f"expected SOURCE=LABEL, e.g. daisy/1.jpg=tulip. Received: {text!r}")
    return source, label


def cmd_fix(args) -> int:
    from tlcore.data.fixes import fix_dataset

    store = _store()
    result = fix_dataset(args.dataset, relabel=dict(args.relabel), exclude=args.exclude, reason=args.reason,
                         store=store)
    d = result.dataset
    lines = [f"Created {d.label} ({d.id}) from {result.parent.label}: {len(result.changes)} change(s), "
             f"{d.num_images} images."]
    lines += [f"  {c.action} {c.source}: {c.old_label}" + (f" -> {c.new_label}" if c.new_label else "")
              for c in result.changes[:50]]
    payload: dict[str, Any] = {"dataset": _dataset_dict(d), "parent": _dataset_dict(result.parent),
                               "changes": [dataclasses.asdict(c) for c in result.changes]}
    if args.retrain:
        from tlcore.queue.jobs import retrain_on

        run = retrain_on(args.retrain, d.id, store)
        payload["run"] = _run_dict(run)
        lines.append(f"Queued {run.name} ({run.id}) with the recipe of {args.retrain}; "
                     "`python -m tlcore worker` runs it.")
    _emit(args, payload, None if args.json else "\n".join(lines))
    return 0


def cmd_audit(args) -> int:
    from tlcore.evaluate.audit import audit_dataset

    store = _store()
    report = audit_dataset(args.dataset, args.backbone, store=store, image_size=args.image_size,
                           on_progress=None if args.json else lambda step: print(f"{step}...", flush=True))
    top = args.top
    balance = report.class_balance
    lines = [f"Audit of {report.dataset} with {report.backbone} at {report.image_size} px: {report.images} images "
             f"in {report.timings['total_s']:.1f} s.",
             f"Likely label errors: {len(report.label_issues)}"]
    lines += [f"  {i.source} ({i.split}): given {i.given}, looks like {i.suggested} (score {i.score:.3f})"
              for i in report.label_issues[:top]]
    groups = report.duplicate_groups
    pairs = report.duplicate_pairs if report.duplicate_pairs is not None else len(report.near_duplicates)
    lines.append(f"Near-duplicates: {len(groups)} group(s) of copies ({sum(g.cross_split for g in groups)} across "
                 f"splits: leakage), {pairs} pair(s)")
    lines += [f"  {g.size} images ({', '.join(g.splits)}; {', '.join(g.labels)}), most similar {g.similarity:.3f}: "
              + ", ".join(g.members[:3]) + (" ..." if g.size > 3 else "") for g in groups[:top]]
    lines.append(f"Outliers: {len(report.outliers)}")
    lines += [f"  {o.source} ({o.split}, {o.label}): neighbour similarity {o.score:.3f}" for o in report.outliers[:top]]
    lines.append(f"Classes: largest {balance['largest']} ({balance['per_class'][balance['largest']]}), smallest "
                 f"{balance['smallest']} ({balance['per_class'][balance['smallest']]}), ratio {balance['ratio']}.")
    payload = report.to_dict()
    del payload["embedding_map"]  # thousands of points: the dashboard draws them from the saved audit
    for finding in ("label_issues", "near_duplicates", "duplicate_groups", "outliers"):  # `--top` bounds them
        payload[f"{finding}_total"] = len(payload[finding])
        payload[finding] = payload[finding][:top]
    _emit(args, payload, None if args.json else "\n".join(lines))
    return 0


def _dataset_dict(d) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "version": d.version, "label": d.label, "source": d.source,
            "classes": d.classes, "counts": d.counts, "num_images": d.num_images, "has_test": d.has_test,
            "created_at": d.created_at}


def cmd_backbones(args) -> int:
    from tlcore.backbones import list_backbones

    rows = []
    for spec in list_backbones():
        rows.append({
            "name": spec.name, "display_name": spec.display_name, "default_size": spec.default_size,
            "min_size": spec.min_size, "preprocessing": spec.preprocessing,
            "weights_available": spec.weights_available(), "offline": spec.offline,
            "origin": spec.weights_origin, "license": spec.license, "imagenet_top1": spec.imagenet_top1,
            "params_m": spec.params_m,
        })
    text = _table(["name", "size", "prep", "params", "weights now", "top-1", "licence", "origin"],
                  [[r["name"], r["default_size"], r["preprocessing"], f"{r['params_m']:.1f}M",
                    "yes" if r["weights_available"] else "no (downloads on first use)",
                    f"{r['imagenet_top1']:.1%}" if r["imagenet_top1"] else "-", r["license"], r["origin"]]
                   for r in rows])
    _emit(args, {"backbones": rows}, None if args.json else text)
    return 0


def cmd_submit(args) -> int:
    from tlcore.queue import jobs

    store = _store()
    if args.compare:
        return _submit_comparison(args, store)
    run = jobs.submit(config_from_args(args), store)
    position = [r.id for r in store.queue()].index(run.id) + 1 if run.status.value == "queued" else None
    status = jobs.worker_status(store)
    if not args.json:
        print(run.id)
        print(f"Queued {run.name} (position {position}).", file=sys.stderr)
        if not status.alive:
            print("No worker is running; start one with `python -m tlcore worker`.", file=sys.stderr)
    _emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value, "position": position,
                 "worker_alive": status.alive})
    return 0


def _submit_comparison(args, store) -> int:
    """Queue one run per backbone of comparison `args.compare`, explicit options over its preset."""
    import dataclasses

    from tlcore.data.importer import resolve_dataset
    from tlcore.queue import jobs
    from tlcore.records.config import comparison_configs

    options = {k: v for k, v in _explicit_options(args).items() if k not in ("backbone", "name")}
    configs = comparison_configs(args.compare, args.data, **options)
    # A folder is imported once, so every run of the comparison trains on the same dataset version.
    dataset = resolve_dataset(args.data, store, seed=configs[0].seed, split=configs[0].split)
    runs = [jobs.submit(dataclasses.replace(config, dataset=dataset.id), store) for config in configs]
    if not args.json:
        for run in runs:
            print(run.id)
        print(f"Queued {len(runs)} runs: {', '.join(f'{r.name} ({r.backbone})' for r in runs)}.", file=sys.stderr)
    _emit(args, {"runs": [{"run_id": r.id, "name": r.name, "backbone": r.backbone, "status": r.status.value}
                          for r in runs]})
    return 0


def cmd_lr_find(args) -> int:
    from tlcore.train.lr_finder import find_lr

    config = config_from_args(args)
    finding = find_lr(config, _store(), phase=args.phase,
                      on_progress=None if args.json else lambda message: print(message + "…", file=sys.stderr))
    which = "head" if args.phase == "head" else "fine-tune"
    text = (f"Suggested {which} learning rate: {finding.suggested_lr:.2g} (loss lowest at {finding.min_loss_lr:.2g}; "
            f"{len(finding.curve)} steps in {finding.seconds:.1f} s). The recipe's: {config.lr:g}"
            + (f" (fine-tune {config.lr * config.finetune_lr_scale:g})." if args.phase == "finetune" else "."))
    _emit(args, {**finding.to_dict(), "recipe_lr": config.lr}, None if args.json else text)
    return 0


def cmd_train(args) -> int:
    from tlcore.queue import jobs

    config = config_from_args(args)
    store = _store()
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
    _emit(args, result)
    return {"succeeded": 0, "cancelled": 130}.get(run.status.value, 1)


def _metrics_text(metrics) -> str:
    """Accuracy, macro F1 and the smallest class's recall in one line (and TTA when used)."""
    text = f"accuracy {metrics.accuracy:.4f}, macro F1 {metrics.macro_f1:.4f}"
    if metrics.smallest_class_recall is not None:
        text += f", smallest class ({metrics.smallest_class}) recall {metrics.smallest_class_recall:.4f}"
    return text + (f", with {metrics.tta} TTA" if metrics.tta not in (None, "none") else "")


def _summary_text(run) -> str:
    s = run.summary
    if s is None:
        return f"Run {run.name} ({run.id}) {run.status.value}: {run.error}"
    weights = "ImageNet weights" if run.weights == "imagenet" else "no pretrained weights (random init)"
    lines = [f"Run {run.name} ({run.id}) succeeded: {run.backbone}, {weights}.",
             f"  {s.eval_split} {_metrics_text(s.metrics)} in {s.timings.total_s or 0:.1f} s",
             f"  model: {s.model_path}"]
    if s.device_record:
        lines.append(f"  trained on {s.device_record.describe()}")
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from tlcore.queue.sweeps import parse_values, submit_sweep
    from tlcore.records.config import recipe_field_named

    given = _explicit_options(args)
    swept = {name: parse_values(name, text) for name, text in given.items() if recipe_field_named(name).sweepable}
    fixed = {name: value for name, value in given.items() if name not in swept}
    queued = submit_sweep(args.data, swept, parse_values("seed", args.seeds), preset=args.preset, fixed=fixed,
                          store=_store())
    text = (f"{queued.sweep_id}\nQueued {len(queued.runs)} runs. `python -m tlcore sweeps show "
            f"{queued.sweep_id}` shows their results per configuration.")
    _emit(args, {"sweep_id": queued.sweep_id, "runs": [r.id for r in queued.runs]}, None if args.json else text)
    return 0


def cmd_sweeps(args) -> int:
    from tlcore.queue import jobs, sweeps

    store = _store()
    jobs.reap(store)
    if args.action == "list":
        found = sweeps.list_sweeps(store)
        text = _table(["sweep", "configurations", "runs", "status", "best mean accuracy"],
                      [[s.sweep_id, len(s.configurations), len(s.runs),
                        ", ".join(f"{n} {k}" for k, n in s.status_counts().items()),
                        _fmt(max((c.mean_accuracy for c in s.configurations if c.mean_accuracy is not None),
                                 default=None))] for s in found]
                      ) if found else "No sweeps yet. `python -m tlcore sweep --data D --lr 1e-3,3e-4` queues one."
        _emit(args, {"sweeps": [{"sweep_id": s.sweep_id, "dataset_id": s.dataset_id, "created_at": s.created_at,
                                 "configurations": len(s.configurations), "runs": len(s.runs),
                                 "status": s.status_counts()} for s in found]},
              None if args.json else text)
        return 0
    report = sweeps.sweep_report(args.sweep, store)
    rows = [[c.label, len(c.runs), _mean_std(c.mean_accuracy, c.std_accuracy),
             _mean_std(c.mean_macro_f1, c.std_macro_f1),
             ", ".join(f"{r.seed}:{r.status if r.accuracy is None else f'{r.accuracy:.3f}'}" for r in c.runs)]
            for c in report.configurations]
    text = f"Sweep {report.sweep_id} on {report.dataset_id}\n" + _table(
        ["configuration", "runs", "accuracy", "macro F1", "seed:accuracy"], rows)
    _emit(args, report.to_dict(), None if args.json else text)
    return 0


def _mean_std(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def cmd_worker(args) -> int:
    from tlcore.queue import jobs

    cluster = args.cluster or os.environ.get("TLCORE_CLUSTER")
    if not cluster and (args.gpus_per_run is not None or args.cpus_per_run is not None):
        raise InvalidInput("`--gpus-per-run` and `--cpus-per-run` apply to a cluster: pass --cluster ADDRESS "
                           "(or set TLCORE_CLUSTER). The local worker trains one run at a time with what it has.")
    if cluster:
        from tlcore.queue import cluster as ray_cluster

        runs = ray_cluster.serve_forever(cluster, once=args.once, gpus_per_run=args.gpus_per_run,
                                         cpus_per_run=args.cpus_per_run)
    else:
        runs = jobs.serve_forever(once=args.once, process_per_job=args.process_per_job)
    failed = [r for r in runs if r.status.value == "failed"]
    return 1 if args.once and failed else 0


def cmd_cancel(args) -> int:
    from tlcore.queue import jobs

    run = jobs.cancel(args.run, _store())
    state = ("cancelled" if run.status.value == "cancelled"
             else "asked to stop; it stops after the current batch")
    _emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value,
                 "cancel_requested": run.cancel_requested},
          None if args.json else f"Run {run.name} ({run.id}) {state}.")
    return 0


def cmd_resume(args) -> int:
    from tlcore.queue import jobs

    run = jobs.resume(args.run, _store())
    _emit(args, {"run_id": run.id, "name": run.name, "status": run.status.value,
                 "resume_from": run.config.get("resume_from")},
          None if args.json else f"{run.id}\nQueued {run.name}, resuming from {run.config['resume_from']}.")
    return 0


def cmd_runs(args) -> int:
    from tlcore.queue import jobs

    store = _store()
    jobs.reap(store)  # a dead worker's run shows as failed, not running forever
    if args.action == "list":
        runs = store.list_runs(limit=args.limit)
        text = _table(["id", "name", "status", "backbone", "weights", "accuracy", "created"],
                      [[r.id, r.name, r.status.value, r.backbone, r.weights,
                        f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
                        time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))] for r in runs]
                      ) if runs else "No runs yet. `python -m tlcore train --data FOLDER` starts one."
        _emit(args, {"runs": [_run_dict(r) for r in runs]}, None if args.json else text)
        return 0
    run = store.get_run(args.run)
    epochs = store.epochs(run.id)
    logs = store.logs(run.id, tail=20)
    payload = {**_run_dict(run), "epochs": [
        {"phase": e.phase, "epoch": e.epoch, "step": e.step, "metrics": e.metrics, "at": e.at} for e in epochs],
        "log_tail": [line.message for line in logs], "calibration": _calibration_dict(run)}
    if args.json:
        _emit(args, payload)
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
        lines.append(f"  {run.summary.eval_split} {_metrics_text(run.summary.metrics)}")
        if run.summary.device_record:
            lines.append(f"  trained on {run.summary.device_record.describe()}")
    if run.summary:
        lines += _head_choice_lines(run.summary)
    calibration = run.summary.calibration if run.summary else None
    if calibration and calibration.temperature:
        lines.append(f"  calibrated: temperature {calibration.temperature:.2f} (fitted on {calibration.fitted_on} "
                     f"val images), ECE {_fmt(calibration.ece_before)} -> {_fmt(calibration.ece_after)}")
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
        lines.append(_table(["step", "phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"],
                            [[e.step, e.phase, e.epoch] + [_fmt(e.metrics.get(k)) for k in
                                                          ("loss", "accuracy", "val_loss", "val_accuracy")]
                             for e in epochs]))
    if logs:
        lines.append("log (last lines):")
        lines += [f"  {line.message.splitlines()[0] if line.message else ''}" for line in logs]
    print("\n".join(lines))
    return 0


def _head_choice_lines(summary) -> list[str]:
    """What the head phase chose (search, class weighting auto) and whether the fine-tune was kept."""
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
    return lines


def _run_dict(r) -> dict[str, Any]:
    return {"id": r.id, "run_id": r.id, "name": r.name, "status": r.status.value, "dataset_id": r.dataset_id,
            "backbone": r.backbone, "weights": r.weights, "config": r.config, "created_at": r.created_at,
            "started_at": r.started_at, "finished_at": r.finished_at, "worker": r.worker, "error": r.error,
            "cancel_requested": r.cancel_requested, "progress": r.progress.to_dict(),
            "summary": r.summary.to_dict() if r.summary else {},
            "accuracy": r.accuracy, "tags": r.tags, "note": r.note, "sweep_id": r.sweep_id,
            "executor": r.executor.to_dict() if r.executor else None}


def _calibration_dict(run) -> dict[str, Any] | None:
    """`{temperature, ece_before, ece_after, reason, probabilities}` of a finished run; None before it
    finished (and for runs from before calibration)."""
    calibration = run.summary.calibration if run.summary else None
    if calibration is None:
        return None
    return {"temperature": calibration.temperature, "ece_before": calibration.ece_before,
            "ece_after": calibration.ece_after, "reason": calibration.reason,
            "probabilities": "temperature-scaled softmax" if calibration.temperature else "unscaled softmax"}


def cmd_predict(args) -> int:
    from tlcore.data.images import ImageRejected
    from tlcore.deploy import inference

    if args.top_k < 1:
        raise InvalidInput(f"`--top-k` must be 1 or more. Received: top_k={args.top_k}")
    loaded = inference.load_run_model(args.run) if args.run else inference.load_imagenet_model(args.model)
    threshold = loaded.point.declined
    if threshold is not None and not args.json:
        print(f"No usable \"not sure\" threshold: no confidence below 1 reached {threshold.target_precision:.0%} "
              "precision on validation, so every image gets an answer.", file=sys.stderr)
    results: list[dict[str, Any]] = []
    rejected = 0
    for path in args.images:
        try:
            pred = loaded.predict_files([path], top_k=args.top_k)[0]
        except ImageRejected as exc:
            rejected += 1
            print(f"{path}: {exc}", file=sys.stderr)
            results.append({"file": path, "error": str(exc), "reason": exc.reason})
            continue
        results.append(pred.to_dict())
        if not args.json:
            shown = ", ".join(f"{label} {p:.3f}" + (f" (#{i})" if args.model else "")
                              for i, (label, p) in zip(pred.indices, pred.top_k))
            print(f"{path}: not sure (top guesses: {shown})" if pred.abstained else f"{path}: {shown}")
    _emit(args, {"model": loaded.name, "predictions": results})
    return 2 if rejected else 0


def cmd_compare(args) -> int:
    from tlcore.evaluate.comparison import compare_runs

    c = compare_runs(args.run_a, args.run_b, _store(), resamples=args.resamples, seed=args.seed)
    lines = [c.verdict, c.coverage_note or f"{c.n_shared} shared evaluation images.",
             f"  accuracy {c.acc_a:.4f} -> {c.acc_b:.4f}, macro F1 {c.f1_a:.4f} -> {c.f1_b:.4f} "
             f"(95 % CI of the F1 delta {100 * c.f1_ci_low:+.1f} to {100 * c.f1_ci_high:+.1f} pts)",
             f"  {c.name_b} fixed {c.fixed}, broke {c.broken}; both wrong on {c.both_wrong}; "
             f"McNemar exact p = {c.mcnemar_p:.4g}; bootstrap {c.resamples} resamples, seed {c.seed}"]
    _emit(args, c.to_json(), None if args.json else "\n".join(lines))
    return 0


def cmd_export(args) -> int:
    from tlcore.deploy.export import describe_report, export_run, read_report

    path = export_run(args.run, args.format, args.out)
    report = read_report(path)
    text = "\n".join([str(path), *(describe_report(report) if report else [])])
    _emit(args, {"run": args.run, "format": args.format, "path": str(path), "report": report},
          None if args.json else text)
    return 0


def cmd_serve(args) -> int:
    from tlcore.deploy import serve

    serve.run_server(args.run, model=args.model, poll_s=args.poll, host=args.host, port=args.port,
                     token=args.token)
    return 0


def _by(args) -> str:
    import getpass

    return args.by or os.environ.get("TLCORE_USER") or getpass.getuser()


def _audit_line(entry) -> str:
    moved = f"v{entry.from_version}" if entry.from_version is not None else "unset"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.at))
    return (f"{when}  {entry.by}: {entry.alias} {moved} -> v{entry.to_version} ({entry.action})"
            + (f" review {entry.review_id}" if entry.review_id else "") + (f": {entry.reason}" if entry.reason else ""))


def cmd_models(args) -> int:
    from tlcore.deploy import model_registry as registry
    from tlcore.deploy.review import GatePolicy, set_policy

    if args.action == "register":
        v = registry.register(args.name, args.run, _by(args))
        _emit(args, dataclasses.asdict(v), None if args.json else f"{args.name} v{v.version} is run {v.run_id}.")
    elif args.action == "list":
        models = registry.list_models()
        rows = [[m["name"], m["versions"], ", ".join(f"{a}=v{n}" for a, n in m["aliases"].items()) or "-"]
                for m in models]
        text = (_table(["model", "versions", "aliases"], rows) if models else
                "No models yet: `python -m tlcore models register NAME --run RUN`.")
        _emit(args, {"models": models}, None if args.json else text)
    elif args.action == "show":
        shown = registry.describe(args.name)
        fixed = shown["eval_set"]
        lines = [f"{args.name}: fixed evaluation set of {fixed['images']} images ({fixed['dataset']}, "
                 f"{fixed['split']} split, {fixed['content_hash'][:12]}); gate policy {shown['policy'] or 'default'}",
                 _table(["version", "run", "accuracy", "macro F1", "aliases"],
                        [[f"v{v['version']}", v["run_name"], _fmt(v["accuracy"]), _fmt(v["macro_f1"]),
                          ", ".join(v["aliases"]) or "-"] for v in shown["versions"]])]
        lines += ["Audit trail:"] + [f"  {_audit_line(e)}" for e in registry.registry().model_audit(args.name)]
        _emit(args, shown, None if args.json else "\n".join(lines))
    elif args.action == "promote":
        review = registry.registry().get_review(args.review)
        if review.model != args.name:
            raise InvalidInput(f"Review {review.id} is a review of model {review.model}, not {args.name}.")
        entry = registry.promote(args.review, _by(args), force=args.force, reason=args.reason)
        _emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "rollback":
        entry = registry.rollback(args.name, _by(args), args.reason)
        _emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "alias":
        entry = registry.set_alias(args.name, args.alias, args.version, _by(args), args.reason)
        _emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "policy":
        current = GatePolicy.from_dict(registry.get_model(args.name).policy)
        changes = {k: getattr(args, k) for k in ("non_inferiority_pts", "max_class_drop_pts", "min_accuracy")
                   if getattr(args, k) is not None}
        policy = set_policy(args.name, dataclasses.replace(current, **changes)) if changes else current
        _emit(args, policy.to_dict(), None if args.json else str(policy.to_dict()))
    return 0


def _review_lines(review) -> list[str]:
    evidence, comparison = review.evidence, review.evidence.get("comparison")
    base = f"v{review.baseline_version}" if review.baseline_version else "no production yet"
    lines = [f"Review {review.id}: {review.model} v{review.candidate_version} against {base} on "
             f"{evidence['eval_set']['images']} fixed images; {review.status}"
             + (", promoted" if review.promoted_at else "")
             + (f" by {review.decided_by}" + (f" ({review.comment})" if review.comment else "")
                if review.decided_by else ""),
             f"Gate {'PASSED' if review.gate_passed else 'FAILED'}:"] + [f"  - {r}" for r in review.gate["reasons"]]
    if comparison:
        lines.append(f"  {comparison['verdict']}; macro F1 {100 * comparison['f1_delta']:+.1f} pts "
                     f"({100 * comparison['f1_ci_low']:+.1f} to {100 * comparison['f1_ci_high']:+.1f}); "
                     f"fixed {comparison['fixed']}, broke {comparison['broken']}")
        for row in evidence["per_class"]:
            lines.append(f"  {row['label']}: recall {100 * row['recall_a']:.1f} -> {100 * row['recall_b']:.1f} %")
    for side in ("baseline", "candidate"):
        facts = evidence.get(side)
        if facts:
            lines.append(f"  {side} v{facts['version']} {facts['run_name']}: accuracy {100 * facts['accuracy']:.1f} %, "
                         f"ECE {facts['ece']:.3f}, {_one_decimal(facts['size_mb'])} MB, "
                         f"{_one_decimal(facts['latency_ms'])} ms/image")
    return lines


def _one_decimal(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _review_json(review) -> dict[str, Any]:
    data = dataclasses.asdict(review)
    data["review_id"] = review.id
    return data


def cmd_review(args) -> int:
    from tlcore.deploy import model_registry as registry
    from tlcore.deploy import review as reviews

    if args.action == "open":
        review = reviews.open_review(args.name, args.candidate, _by(args))
    elif args.action in ("approve", "reject"):
        review = reviews.decide(args.review, args.action == "approve", args.by, args.comment)
    elif args.action == "show":
        review = registry.registry().get_review(args.review)
    elif args.action == "list":
        if args.name:
            registry.get_model(args.name)
        found = registry.registry().list_reviews(args.name)
        text = _table(["review", "model", "candidate", "against", "gate", "status"],
                      [[r.id, r.model, f"v{r.candidate_version}",
                        f"v{r.baseline_version}" if r.baseline_version else "-",
                        "passed" if r.gate_passed else "failed", r.status + (", promoted" if r.promoted_at else "")]
                       for r in found]) if found else "No reviews."
        _emit(args, {"reviews": [_review_json(r) for r in found]}, None if args.json else text)
        return 0
    else:
        from tlcore.deploy.review_report import write_review_report

        path = write_review_report(args.review, args.out)
        _emit(args, {"review_id": args.review, "path": str(path)}, None if args.json else str(path))
        return 0
    _emit(args, _review_json(review), None if args.json else "\n".join(_review_lines(review)))
    return 0


COMMANDS = {"datasets": cmd_datasets, "backbones": cmd_backbones, "train": cmd_train, "submit": cmd_submit,
            "lr-find": cmd_lr_find, "sweep": cmd_sweep, "sweeps": cmd_sweeps, "worker": cmd_worker,
            "cancel": cmd_cancel, "resume": cmd_resume, "runs": cmd_runs, "predict": cmd_predict,
            "compare": cmd_compare, "export": cmd_export, "serve": cmd_serve, "audit": cmd_audit,
            "models": cmd_models, "review": cmd_review}


# -------------------------------------------------------------------- helpers


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def is_user_error(exc: BaseException) -> bool:
    """Errors the user can fix: Transfer Lab's own, and files the command was pointed at."""
    return isinstance(exc, (TransferLabError, OSError))


# TensorFlow's C++ start-up lines ("oneDNN custom operations are on", "Could not find cuda
# drivers", "failed call to cuInit") are written before absl logging is set up, so
# TF_CPP_MIN_LOG_LEVEL cannot silence them. Known ones are dropped; every other line passes.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cuda_platform|cuda_executor|cpu_feature_guard|gpu_device)\.cc:\d+\]"
    r"|To enable the following instructions:)")


def quiet_native_startup_logs():
    """Filter known TensorFlow start-up noise out of file descriptor 2; returns a restore function."""
    if os.environ.get("TLCORE_DEBUG"):
        return lambda: None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
    except OSError:
        return lambda: None

    def pump():
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOISE.match(line.decode("utf-8", "replace")):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=2)

    return restore


# Commands that load a model in this process take at most one GPU, capped (`devices.declare_process`);
# `train` and `worker` declare the worker's policy when they train, `serve` the server's.
MODEL_COMMANDS = ("predict", "export", "audit", "lr-find")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in MODEL_COMMANDS:
            from tlcore.train import devices

            devices.declare_process("cli")
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the edge of the program
        if is_user_error(exc):
            print(f"Error: {plain_message(exc)}", file=sys.stderr)
            return 2
        if os.environ.get("TLCORE_DEBUG"):
            raise
        print(f"Internal error: {plain_message(exc)} "
              "Set TLCORE_DEBUG=1 to see the traceback.", file=sys.stderr)
        return 1
