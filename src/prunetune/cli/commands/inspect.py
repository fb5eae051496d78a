"""``prunetune inspect``: a model's channel groups, dense costs and what cannot be pruned."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunetune import api
from prunetune.cli.commands._models import add_model_options, resolve_model


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="show a model's prunable channel groups, FLOPs and params",
        description="Trace a model and show its coupled channel groups (name, size, member "
        "layers), its dense FLOPs and parameters, and the layers kept whole with the reason.",
    )
    add_model_options(parser)
    parser.add_argument("--profile", help="latency profile: adds the predicted latency")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Trace through :func:`prunetune.inspect` and print."""
    resolved = resolve_model(args)
    found = api.inspect(
        resolved.model,
        resolved.example(),
        profile=args.profile,
        leaf_modules=resolved.leaf_modules,
    )
    if args.json:
        print(json.dumps({"model": resolved.ref.to_dict(), **found.to_dict()}, indent=2))
        return 0
    print(f"model {resolved.ref.name}, {found}")
    return 0
