"""Command-line entry point: ``moe-engine <command> [options]``.

Each command lives in its own module under ``moe_engine/commands/`` and exposes

* ``NAME``: the sub-command name (``"generate"``),
* ``HELP``: one line shown by ``moe-engine --help``,
* ``DESCRIPTION``: the longer text shown by ``moe-engine NAME --help``,
* ``add_arguments(parser)``: declares its options (every option has a ``help=``),
* ``run(args) -> int``: does the work and returns the exit code.

Command modules import heavy libraries (torch, transformers, pulp) inside ``run`` so that
``moe-engine --help`` stays fast. Add a command by adding its module name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Module names under moe_engine.commands, in the order --help lists them.
COMMANDS: tuple[str, ...] = (
    "generate",
    "serve",
    "bench",
    "quantize",
    "trace",
    "plan",
    "plan_eval",
    "project",
    "eval_predictors",
    "simulate",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``error: <message> (see <prog> --help)``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UserError(Exception):
    """Bad input from the user: printed as ``error: <message>`` with exit code 2, no traceback."""


def model_path_arg(model: str | None):
    """``--model``: the given checkpoint folder (UserError if missing), or the embedded default model."""
    from pathlib import Path

    if model is None:
        from moe_engine.default_model import default_model_path

        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise UserError(f"--model {path} does not exist")
    return path


def _available_commands() -> list:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f"moe_engine.commands.{name}"))
        except ModuleNotFoundError as exc:  # a command not written yet is simply not listed
            if exc.name != f"moe_engine.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moe-engine",
        description="Run Mixture-of-Experts models with experts offloaded under a hard memory budget.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in _available_commands():
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        if not any("--threads" in a.option_strings for a in p._actions):
            p.add_argument(
                "--threads", type=int, default=None, metavar="N",
                help="torch compute threads (default: half the physical cores; torch's own default of one "
                "per core can slow a machine that other processes also use by 50x or more)",
            )  # fmt: skip
            p.set_defaults(_sets_threads=True)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "_sets_threads", False):
            from moe_engine.runtime.threads import set_threads

            set_threads(args.threads)
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        # Library errors for bad input carry a message that names the problem and the fix.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
