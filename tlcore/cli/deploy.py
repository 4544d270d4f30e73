"""`predict`, `export` and `serve`: a finished run's model put to use."""

from __future__ import annotations

import os
import sys
from typing import Any

from tlcore.cli.common import emit, json_option
from tlcore.deploy.export import FORMAT_NAMES as EXPORT_FORMATS
from tlcore.errors import InvalidInput


def add_commands(sub) -> None:
    predict = sub.add_parser("predict", help="classify image files with a run's model or the ImageNet model")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run id or name")
    which.add_argument("--model", help="a backbone's own ImageNet classifier: efficientnet_lite0, "
                                       "efficientnet_lite1 or efficientnet_lite2")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=int, default=5, help="how many classes per image (default 5)")
    json_option(predict)

    export = sub.add_parser("export", help="export a run's model")
    export.add_argument("--run", required=True, help="run id or name")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", help="file (folder for savedmodel); default: export/ in the run folder")
    json_option(export)

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
    emit(args, {"model": loaded.name, "predictions": results})
    return 2 if rejected else 0


def cmd_export(args) -> int:
    from tlcore.deploy.export import describe_report, export_run, read_report

    path = export_run(args.run, args.format, args.out)
    report = read_report(path)
    text = "\n".join([str(path), *(describe_report(report) if report else [])])
    emit(args, {"run": args.run, "format": args.format, "path": str(path), "report": report},
          None if args.json else text)
    return 0


def cmd_serve(args) -> int:
    from tlcore.deploy import serve

    serve.run_server(args.run, model=args.model, poll_s=args.poll, host=args.host, port=args.port,
                     token=args.token)
    return 0


COMMANDS = {"predict": cmd_predict, "export": cmd_export, "serve": cmd_serve}
