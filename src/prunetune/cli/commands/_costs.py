"""``--flops/--params/--latency/--profile`` and the cost estimators they need."""

from __future__ import annotations

import argparse
from typing import Any

from prunetune.backend.graph import ChannelGraph
from prunetune.estimators import CostModel, FlopsModel, ParamsModel, Target

__all__ = ["add_target_options", "cost_models", "target_from_args"]


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


def cost_models(graph: ChannelGraph, profile: str | None = None) -> dict[str, CostModel]:
    """FLOPs and params estimators of ``graph``, plus latency when a profile is given."""
    costs: dict[str, Any] = {
        "flops": FlopsModel.from_graph(graph),
        "params": ParamsModel.from_graph(graph),
    }
    if profile:
        from prunetune.estimators import LatencyPredictor, LatencyProfile

        costs["latency_ms"] = LatencyPredictor(LatencyProfile.load(profile), graph)
    return costs
