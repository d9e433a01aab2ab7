"""``python -m patchslim``: the command line.

Each subcommand lives in its own module under ``patchslim/commands/`` exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int``; adding one is one module plus one line in
``COMMANDS``. Errors patchslim raises on purpose (and missing files) end the command with one line on
stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "patchslim.commands.info",
    "patchslim.commands.run",
    "patchslim.commands.train_policy",
    "patchslim.commands.finetune",
    "patchslim.commands.evaluate",
    "patchslim.commands.explain",
    "patchslim.commands.audit",
    "patchslim.commands.benchmark",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m patchslim",
        description="See, measure and audit patch slimming in Vision Transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from patchslim.errors import PatchslimError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except PatchslimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        target = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{target}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_opts(pairs: list[str] | None) -> dict[str, str]:
    """``["r=13", "blocks=3,6,9"]`` -> ``{"r": "13", "blocks": "3,6,9"}`` (values parsed by the method).

    Raises:
        PlanError: a pair without ``=``.
    """
    from patchslim.errors import PlanError

    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PlanError(f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options
