"""The ``prunetune`` command line: one subcommand per module in
:mod:`prunetune.cli.commands`.

Errors the user can fix (a ``PrunetuneError`` or a ``ValueError`` from argument checks) print one
line on stderr and exit with code 2, as argparse does for malformed options.
"""

from __future__ import annotations

import argparse
import re
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


_NEGATIVE = re.compile(r"-[0-9.]")


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--flops -5%`` -> ``--flops=-5%``: argparse takes ``-5%`` (or ``-5e-4``) for an option
    and says "expected one argument"; attached, the value reaches its own check and message."""
    items, out, index = list(argv), [], 0
    while index < len(items):
        item = items[index]
        following = items[index + 1] if index + 1 < len(items) else ""
        if item.startswith("--") and "=" not in item and _NEGATIVE.match(following):
            out.append(f"{item}={following}")
            index += 2
        else:
            out.append(item)
            index += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 bad input, 130 / 143 after
    SIGINT / SIGTERM)."""
    parser = build_parser()
    try:
        args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(exit_.code or 0)
    try:
        return int(args.run(args) or 0)
    except (PrunetuneError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"prunetune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a vanished file anywhere: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        print(f"prunetune {args.command}: error: {reason}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a search's SearchInterrupted says what is kept
        print(f"prunetune {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
