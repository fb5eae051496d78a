"""``prunetune estimate``: FLOPs, params and predicted latency of an exported subnet."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from prunetune.backend.export import load_subnet
from prunetune.backend.graph import ChannelGraph
from prunetune.cli.commands._costs import cost_models
from prunetune.estimators import format_metric, format_share


def register(subparsers: Any) -> None:
    """Add the ``estimate`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "estimate",
        help="FLOPs, params and predicted latency of an exported subnet",
        description="Estimate an exported subnet's costs from its spec: exact FLOPs and "
        "parameters, and latency predicted from a profile of the dense model.",
    )
    parser.add_argument("--subnet", required=True, help="export directory (with subnet.json)")
    parser.add_argument("--profile", help="latency profile of the dense model")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the subnet's spec, evaluate each estimator on its widths."""
    loaded = load_subnet(args.subnet)
    assert loaded.spec is not None  # load_subnet always sets it
    dense = loaded.ref.build()
    graph = ChannelGraph.trace(dense, torch.zeros(loaded.input_shape))
    costs = cost_models(graph, args.profile)
    figures = {metric: float(cost.evaluate(loaded.spec.widths)) for metric, cost in costs.items()}
    dense_figures = {
        metric: float(cost.evaluate(graph.dense_widths())) for metric, cost in costs.items()
    }
    if args.json:
        print(json.dumps({**figures, **{f"dense_{k}": v for k, v in dense_figures.items()}}))
        return 0
    for metric, value in figures.items():
        share = format_share(value, dense_figures[metric])
        print(f"{metric}: {format_metric(metric, value)}{share}")
    return 0
