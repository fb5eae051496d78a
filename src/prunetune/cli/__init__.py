"""The ``prunetune`` command line: one subcommand per module in
:mod:`prunetune.cli.commands`.

Errors the user can fix (a ``PrunetuneError`` or a ``ValueError`` from argument checks) print one
line on stderr and exit with code 2, as argparse does for malformed options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prunetune.backend.errors import PrunetuneError
from prunetune.cli.commands import COMMANDS

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="prunetune",
        description="Search for pruned CNN architectures under FLOPs, parameter and latency "
        "targets, and export the best subnet.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exit_.code or 0)
    try:
        return int(args.run(args) or 0)
    except (PrunetuneError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"prunetune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunetune {args.command}: interrupted", file=sys.stderr)
        return 130
