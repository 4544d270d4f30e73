"""The recipe as command-line options: one per `TrainConfig` field (from its declaration), and
the `TrainConfig` they give over a preset."""

from __future__ import annotations

import argparse
from typing import Any

from tlcore.cli.common import json_option
from tlcore.errors import InvalidInput


def _data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATASET_OR_FOLDER",
                   help="dataset name or id, or a folder / .zip to import first")


def _preset_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a named recipe; explicit options override it")


def train_options(p: argparse.ArgumentParser) -> None:
    """--data, one option per recipe field (`TrainConfig`), --preset and --json."""
    from tlcore.records.config import recipe_fields

    _data_option(p)
    for field in recipe_fields():
        _recipe_option(p, field)
    _preset_option(p)
    json_option(p)


def sweep_options(p: argparse.ArgumentParser) -> None:
    """As `train_options`, but a field with one number or word per run takes a comma list."""
    from tlcore.records.config import recipe_fields

    _data_option(p)
    for field in recipe_fields():
        if field.name in ("seed", "name"):  # --seeds below; the sweep names its runs
            continue
        if field.sweepable:
            p.add_argument(field.flag, *field.aliases, dest=field.name, metavar="A,B,...",
                           help=_option_help(field) + "; one value or a comma list"
                           + (f" of {', '.join(field.choices)}" if field.choices else ""))
        else:
            _recipe_option(p, field)
    p.add_argument("--seeds", default="0", metavar="S1,S2,...", help="comma list of seeds (default 0)")
    _preset_option(p)
    json_option(p)


def _recipe_option(p: argparse.ArgumentParser, field) -> None:
    """Recipe field `field` as an option; left out, it is None (the preset's or TrainConfig's value)."""
    names = (field.flag, *field.aliases)
    if field.kind is bool:
        p.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                       help=_option_help(field))
    elif field.choices and field.kind is str:
        p.add_argument(*names, dest=field.name, choices=field.choices, help=_option_help(field))
    else:
        p.add_argument(*names, dest=field.name, type=option_type(field), help=_option_help(field),
                       metavar="A,B,..." if field.kind is tuple else "F1,F2,F3" if field.kind == "fractions"
                       else None)


def _option_help(field) -> str:
    text = field.help.rstrip(".").replace("%", "%%")
    if field.kind is tuple:
        text += f" (comma list of {','.join(field.choices)}, or none)"
    elif field.choices and field.kind is not str:
        text += f" (one of {', '.join(field.choices)})"
    if field.kind is bool:
        text += f"; default {'on' if field.default else 'off'}"
    elif field.default not in (None, ()):
        text += f"; default {field.default}"
    return text


def option_type(field):
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
    values.update(explicit_options(args))
    return TrainConfig(dataset=args.data, **values)


def explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe options given on the command line (those left out are None)."""
    from tlcore.records.config import recipe_fields

    return {f.name: getattr(args, f.name) for f in recipe_fields() if getattr(args, f.name, None) is not None}
