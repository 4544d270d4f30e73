"""`python -m tlcore ...`: everything the dashboard does, headless.

One module per command group (`datasets`, `train`, `sweeps`, `runs`, `deploy`, `registry`), each
with its `add_commands(sub)` and `COMMANDS`; the recipe's options come from `TrainConfig`'s
field declarations (`recipe_options`). TensorFlow is imported only by the commands that need it,
so `--help`, `runs list` and `datasets list` answer at once. With `--json` the last line on
stdout is one JSON object. Bad input exits with code 2 and one plain sentence on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from tlcore.cli import datasets, deploy, registry, runs, sweeps, train
from tlcore.cli.native_logs import quiet_native_startup_logs
from tlcore.cli.recipe_options import config_from_args
from tlcore.errors import TransferLabError, plain_message

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["build_parser", "config_from_args", "main", "quiet_native_startup_logs"]

GROUPS = (datasets, train, sweeps, runs, deploy, registry)  # in the order `--help` lists them
COMMANDS = {name: command for group in GROUPS for name, command in group.COMMANDS.items()}
# Commands that load a model in this process take at most one GPU, capped (`devices.declare_process`);
# `train` and `worker` declare the worker's policy when they train, `serve` the server's.
MODEL_COMMANDS = ("predict", "export", "audit", "lr-find")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tlcore",
        description="Transfer Lab: import image datasets, fine-tune ImageNet backbones, keep every run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Errors the user can fix: Transfer Lab's own, and files the command was pointed at."""
    return isinstance(exc, (TransferLabError, OSError))


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

