"""``prunetune inspect``: a model's channel groups, dense costs and what cannot be pruned."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunetune.cli.commands._costs import cost_models
from prunetune.cli.commands._models import add_model_options, resolve_model
from prunetune.estimators import format_metric


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
    """Trace and print."""
    resolved = resolve_model(args)
    graph = resolved.trace()
    costs = cost_models(graph, args.profile)
    dense = graph.dense_widths()
    figures = {metric: float(cost.evaluate(dense)) for metric, cost in costs.items()}
    groups: list[dict[str, Any]] = [
        {
            "name": g.name,
            "size": g.size,
            "prunable": g.prunable,
            "step": g.step,
            "members": sorted({m.module for m in g.members}),
            **({"reason": g.reason} if g.reason else {}),
        }
        for g in graph.groups
    ]
    if args.json:
        report = {
            "model": resolved.ref.to_dict(),
            "input_shape": list(resolved.input_shape),
            **figures,
            "groups": groups,
            "unprunable": dict(graph.unprunable),
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {resolved.ref.name}, input {'x'.join(map(str, resolved.input_shape))}")
    for metric, value in figures.items():
        print(f"  {metric}: {format_metric(metric, value)}")
    print(f"{len(graph.prunable_groups)} prunable channel groups:")
    width = max(len(g["name"]) for g in groups)
    for group in groups:
        if group["prunable"]:
            members = ", ".join(group["members"])
            step = f" (step {group['step']})" if group["step"] > 1 else ""
            print(f"  {group['name']:<{width}}  {group['size']:>5}{step}  {members}")
    if graph.unprunable:
        print("kept whole:")
        for name, reason in graph.unprunable.items():
            print(f"  {name}: {reason}")
    return 0
