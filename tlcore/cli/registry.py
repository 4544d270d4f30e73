"""`models` (register, list, show, promote, rollback, alias, policy) and `review` (open, approve,
reject, show, list, report): the model registry and the reviews that gate production."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from tlcore.cli.common import emit, fmt, json_option, table
from tlcore.errors import InvalidInput


def add_commands(sub) -> None:
    models = sub.add_parser("models", help="the model registry: versions, aliases, promotion, rollback")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    register = _action(msub, "register", "register a finished run as a model's next version",
                       ("name", "model name (created with its first version)"), by=True)
    register.add_argument("--run", required=True, help="run id or name")
    _action(msub, "list", "list models with their aliases")
    _action(msub, "show", "a model's versions, aliases, fixed evaluation set and audit trail", ("name", None))
    promote = _action(msub, "promote", "move production to a review's candidate (gate passed and approved)",
                      ("name", None), by=True, reason="why (required with --force; kept in the audit trail)")
    promote.add_argument("--review", required=True, help="review id")
    promote.add_argument("--force", action="store_true", help="promote although the gate failed or nobody approved")
    _action(msub, "rollback", "move production back to the version before its last move", ("name", None), by=True,
            reason="why")
    _action(msub, "alias", "point an alias other than production at a version", ("name", None), ("alias", None),
            ("version", "version number"), by=True, reason="why")
    policy = _action(msub, "policy", "show or set the gate of a model's next reviews", ("name", None))
    policy.add_argument("--non-inferiority-pts", type=float, help="largest loss allowed at 95 %% (default 1)")
    policy.add_argument("--max-class-drop-pts", type=float, help="largest drop of one class's recall (default 5)")
    policy.add_argument("--min-accuracy", type=float, help="minimum accuracy on the fixed set, 0-1 (default none)")

    reviews = sub.add_parser("review", help="open, decide and report reviews of a model's candidate")
    rsub = reviews.add_subparsers(dest="action", metavar="ACTION", required=True)
    ropen = _action(rsub, "open", "judge a run against production on the model's fixed evaluation set",
                    ("name", "model name"), by=True)
    ropen.add_argument("--candidate", required=True, help="run id or name")
    for decision in ("approve", "reject"):
        decide = _action(rsub, decision, f"{decision} an open review (once)", ("review", "review id"))
        decide.add_argument("--by", required=True, help="the reviewer's name")
        decide.add_argument("--comment", default="", help="why")
    _action(rsub, "show", "a review's evidence, gate and decision", ("review", None))
    rlist = _action(rsub, "list", "reviews, newest first")
    rlist.add_argument("name", nargs="?", help="only this model's")
    report = _action(rsub, "report", "write a review as one self-contained HTML file", ("review", None))
    report.add_argument("--out", required=True, help="the .html file to write")


def _action(sub, name: str, help: str, *positionals: tuple[str, str | None], by: bool = False,
            reason: str | None = None) -> argparse.ArgumentParser:
    """Subcommand `name` with its positional arguments, `--by` (who does it) and `--reason` if asked, `--json`."""
    action = sub.add_parser(name, help=help)
    for positional, text in positionals:
        action.add_argument(positional, help=text)
    if by:
        action.add_argument("--by", help="who does it (default: $TLCORE_USER, else the login name)")
    if reason is not None:
        action.add_argument("--reason", default="", help=reason)
    json_option(action)
    return action


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
        emit(args, dataclasses.asdict(v), None if args.json else f"{args.name} v{v.version} is run {v.run_id}.")
    elif args.action == "list":
        models = registry.list_models()
        rows = [[m["name"], m["versions"], ", ".join(f"{a}=v{n}" for a, n in m["aliases"].items()) or "-"]
                for m in models]
        text = (table(["model", "versions", "aliases"], rows) if models else
                "No models yet: `python -m tlcore models register NAME --run RUN`.")
        emit(args, {"models": models}, None if args.json else text)
    elif args.action == "show":
        shown = registry.describe(args.name)
        fixed = shown["eval_set"]
        lines = [f"{args.name}: fixed evaluation set of {fixed['images']} images ({fixed['dataset']}, "
                 f"{fixed['split']} split, {fixed['content_hash'][:12]}); gate policy {shown['policy'] or 'default'}",
                 table(["version", "run", "accuracy", "macro F1", "aliases"],
                        [[f"v{v['version']}", v["run_name"], fmt(v["accuracy"]), fmt(v["macro_f1"]),
                          ", ".join(v["aliases"]) or "-"] for v in shown["versions"]])]
        lines += ["Audit trail:"] + [f"  {_audit_line(e)}" for e in registry.registry().model_audit(args.name)]
        emit(args, shown, None if args.json else "\n".join(lines))
    elif args.action == "promote":
        review = registry.registry().get_review(args.review)
        if review.model != args.name:
            raise InvalidInput(f"Review {review.id} is a review of model {review.model}, not {args.name}.")
        entry = registry.promote(args.review, _by(args), force=args.force, reason=args.reason)
        emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "rollback":
        entry = registry.rollback(args.name, _by(args), args.reason)
        emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "alias":
        entry = registry.set_alias(args.name, args.alias, args.version, _by(args), args.reason)
        emit(args, dataclasses.asdict(entry), None if args.json else _audit_line(entry))
    elif args.action == "policy":
        current = GatePolicy.from_dict(registry.get_model(args.name).policy)
        changes = {k: getattr(args, k) for k in ("non_inferiority_pts", "max_class_drop_pts", "min_accuracy")
                   if getattr(args, k) is not None}
        policy = set_policy(args.name, dataclasses.replace(current, **changes)) if changes else current
        emit(args, policy.to_dict(), None if args.json else str(policy.to_dict()))
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
        text = table(["review", "model", "candidate", "against", "gate", "status"],
                      [[r.id, r.model, f"v{r.candidate_version}",
                        f"v{r.baseline_version}" if r.baseline_version else "-",
                        "passed" if r.gate_passed else "failed", r.status + (", promoted" if r.promoted_at else "")]
                       for r in found]) if found else "No reviews."
        emit(args, {"reviews": [_review_json(r) for r in found]}, None if args.json else text)
        return 0
    else:
        from tlcore.deploy.review_report import write_review_report

        path = write_review_report(args.review, args.out)
        emit(args, {"review_id": args.review, "path": str(path)}, None if args.json else str(path))
        return 0
    emit(args, _review_json(review), None if args.json else "\n".join(_review_lines(review)))
    return 0


COMMANDS = {"models": cmd_models, "review": cmd_review}
