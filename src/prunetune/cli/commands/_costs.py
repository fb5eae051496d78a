"""``--flops/--params/--latency/--profile`` and the cost estimators they need."""

from __future__ import annotations

import argparse

from prunetune.estimators import Target

__all__ = ["add_target_options", "target_from_args"]


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """The target options, each relative (``50%``) or absolute (``20M``, ``2ms``)."""
    group = parser.add_argument_group("target (one or several)")
    group.add_argument("--flops", help="FLOPs (MACs) target, e.g. 50%% or 20M")
    group.add_argument("--params", help="parameter target, e.g. 30%% or 0.3M")
    group.add_argument("--latency", help="latency target, e.g. 2ms (needs --profile)")
    group.add_argument("--profile", help="latency profile written by prunetune profile")


def target_from_args(args: argparse.Namespace) -> Target:
    """The target the options name.

    Raises:
        ValueError: no target given, or a value that cannot be read.
    """
    if args.flops is None and args.params is None and args.latency is None:
        raise ValueError("give a target: --flops, --params and/or --latency (e.g. --flops 50%)")
    return Target.from_options(args.flops, args.params, args.latency)
