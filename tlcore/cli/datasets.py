"""`datasets` (import, list, builtin, fix), `audit` and `backbones`: what a run trains on."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tlcore.cli.common import dataset_dict, emit, json_option, open_store, run_dict, table
from tlcore.cli.recipe_options import option_type
from tlcore.errors import InvalidInput


def add_commands(sub) -> None:
    from tlcore.records.config import recipe_field_named

    datasets = sub.add_parser("datasets", help="import and list datasets")
    dsub = datasets.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = dsub.add_parser("import", help="import a folder of class folders, a .zip of one, or a built-in dataset")
    imp.add_argument("source", nargs="?", help="folder (one subfolder per class, or train/ val/ [test/]) or .zip")
    imp.add_argument("--builtin", metavar="NAME",
                     help="a built-in dataset made offline instead of SOURCE (`datasets builtin` lists them)")
    imp.add_argument("--name", help="dataset name (default: the folder or zip name, or the built-in's)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    imp.add_argument("--split", type=option_type(recipe_field_named("split")), metavar="F1,F2,F3",
                     help="train,val,test fractions (default 0.7,0.15,0.15)")
    imp.add_argument("--new-version", action="store_true",
                     help="record a new version even if the latest one holds exactly these images")
    json_option(imp)
    json_option(dsub.add_parser("list", help="list datasets"))
    json_option(dsub.add_parser("builtin",
                                help="list the built-in datasets (made offline, `datasets import --builtin`)"))
    fix = dsub.add_parser("fix", help="relabel or exclude images: a new version with a change log")
    fix.add_argument("dataset", help="dataset name, name@version or id")
    fix.add_argument("--relabel", nargs="+", default=[], metavar="SOURCE=LABEL", type=_relabel_arg,
                     help="give an image (its path as the audit lists it) another class")
    fix.add_argument("--exclude", nargs="+", default=[], metavar="SOURCE", help="leave images out")
    fix.add_argument("--reason", default="", help="why, for the change log")
    fix.add_argument("--retrain", metavar="RUN", help="queue a run with this run's recipe on the new version")
    json_option(fix)

    audit = sub.add_parser("audit", help="likely label errors, near-duplicates and outliers of a dataset")
    audit.add_argument("dataset", help="dataset name, name@version or id")
    audit.add_argument("--backbone", default="efficientnet_lite0", help="whose features (default efficientnet_lite0)")
    audit.add_argument("--image-size", type=int, help="input size in px (default: the backbone's)")
    audit.add_argument("--top", type=int, default=20, help="how many of each finding to print (default 20)")
    json_option(audit)

    json_option(sub.add_parser("backbones", help="list backbones and whether their ImageNet weights are here"))


def cmd_datasets(args) -> int:
    actions = {"import": _import, "list": _list, "builtin": _list_builtin, "fix": _fix}
    return actions[args.action](args)


def _list(args) -> int:
    rows = open_store().list_datasets()
    text = "No datasets yet. `python -m tlcore datasets import FOLDER` adds one."
    if rows:
        text = table(["name", "version", "id", "images", "classes", "test split"],
                     [[d.name, d.version, d.id, d.num_images, len(d.classes), "yes" if d.has_test else "no"]
                      for d in rows])
    emit(args, {"datasets": [dataset_dict(d) for d in rows]}, None if args.json else text)
    return 0


def _import(args) -> int:
    store = open_store()
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
        emit(args, {"dataset": dataset_dict(d), "report": report, "unchanged": True},
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
    emit(args, {"dataset": dataset_dict(d), "report": report}, None if args.json else "\n".join(lines))
    return 0


def _list_builtin(args) -> int:
    """The built-in datasets, one line each, and the newest version already imported of each."""
    from tlcore.data.builtin import BUILTIN

    imported: dict[str, str] = {}
    for d in open_store().list_datasets():  # newest first
        imported.setdefault(d.source, d.label)
    rows = [{"name": name, "description": text, "imported": imported.get(f"builtin:{name}")}
            for name, text in BUILTIN.items()]
    lines = [f"{r['name']:<9} {r['description']}" + (f" Imported: {r['imported']}." if r["imported"] else "")
             for r in rows]
    lines.append("`python -m tlcore datasets import --builtin NAME` imports one.")
    emit(args, {"builtin": rows}, None if args.json else "\n".join(lines))
    return 0


def _relabel_arg(text: str) -> tuple[str, str]:
    source, sep, label = text.rpartition("=")
    if not sep or not source or not label:
        raise argparse.ArgumentTypeError(f"expected SOURCE=LABEL, e.g. daisy/1.jpg=tulip. Received: {text!r}")
    return source, label


def _fix(args) -> int:
    from tlcore.data.fixes import fix_dataset

    store = open_store()
    result = fix_dataset(args.dataset, relabel=dict(args.relabel), exclude=args.exclude, reason=args.reason,
                         store=store)
    d = result.dataset
    lines = [f"Created {d.label} ({d.id}) from {result.parent.label}: {len(result.changes)} change(s), "
             f"{d.num_images} images."]
    lines += [f"  {c.action} {c.source}: {c.old_label}" + (f" -> {c.new_label}" if c.new_label else "")
              for c in result.changes[:50]]
    payload: dict[str, Any] = {"dataset": dataset_dict(d), "parent": dataset_dict(result.parent),
                               "changes": [dataclasses.asdict(c) for c in result.changes]}
    if args.retrain:
        from tlcore.queue.jobs import retrain_on

        run = retrain_on(args.retrain, d.id, store)
        payload["run"] = run_dict(run)
        lines.append(f"Queued {run.name} ({run.id}) with the recipe of {args.retrain}; "
                     "`python -m tlcore worker` runs it.")
    emit(args, payload, None if args.json else "\n".join(lines))
    return 0


def cmd_audit(args) -> int:
    from tlcore.evaluate.audit import audit_dataset

    store = open_store()
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
    emit(args, payload, None if args.json else "\n".join(lines))
    return 0


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
    text = table(["name", "size", "prep", "params", "weights now", "top-1", "licence", "origin"],
                  [[r["name"], r["default_size"], r["preprocessing"], f"{r['params_m']:.1f}M",
                    "yes" if r["weights_available"] else "no (downloads on first use)",
                    f"{r['imagenet_top1']:.1%}" if r["imagenet_top1"] else "-", r["license"], r["origin"]]
                   for r in rows])
    emit(args, {"backbones": rows}, None if args.json else text)
    return 0


COMMANDS = {"datasets": cmd_datasets, "audit": cmd_audit, "backbones": cmd_backbones}
