"""``prunetune estimate``: FLOPs, params and predicted latency of an exported subnet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from prunetune.backend.export import load_subnet
from prunetune.backend.graph import ChannelGraph, match_leaf_modules
from prunetune.cli.commands._common import say
from prunetune.cli.commands._models import add_trust_option
from prunetune.estimators import cost_models, format_metric, format_share


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
    parser.add_argument(
        "--model", help="the package.module:factory the export was pruned from, if not a zoo model"
    )
    add_trust_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the subnet's spec, evaluate each estimator on its widths."""
    loaded = load_subnet(args.subnet, args.model, args.trust_model_code)
    assert loaded.spec is not None  # load_subnet always sets it
    dense = loaded.ref.build()
    example = tuple(torch.zeros(s) for s in loaded.spec.input_shapes)
    leaves = match_leaf_modules(dense, loaded.spec.leaf_modules)
    graph = ChannelGraph.trace(dense, example, leaf_modules=leaves)
    costs = cost_models(graph, args.profile)
    figures = {metric: float(cost.evaluate(loaded.spec.widths)) for metric, cost in costs.items()}
    dense_figures = {
        metric: float(cost.evaluate(graph.dense_widths())) for metric, cost in costs.items()
    }
    if args.json:
        report = {**figures, **{f"dense_{k}": v for k, v in dense_figures.items()}}
        print(json.dumps({**report, "preprocessing": loaded.preprocessing}))
        return 0
    for metric, value in figures.items():
        share = format_share(value, dense_figures[metric])
        label = "latency_ms (predicted)" if metric == "latency_ms" else metric
        print(f"{label}: {format_metric(metric, value)}{share}")
    print(describe_preprocessing(_exported_preprocessing(args.subnet)))
    implausible = implausible_latency(figures, dense_figures)
    if implausible:
        say(implausible)
    return 0


def implausible_latency(figures: dict[str, float], dense: dict[str, float]) -> str | None:
    """A warning when a profile predicts a subnet with fewer FLOPs to be slower than its dense
    model: its tables were measured on a busy machine (a profile whose entries were 1000x off
    called a 47.5%-FLOPs subnet "110% of dense").

    Args:
        figures: the subnet's estimates by metric.
        dense: the dense model's.

    Returns:
        The warning, or ``None`` when the prediction is plausible.
    """
    if "latency_ms" not in figures or figures["flops"] >= dense["flops"]:
        return None
    if figures["latency_ms"] <= dense["latency_ms"]:
        return None
    return (
        f"warning: the profile predicts this subnet, with "
        f"{100 * figures['flops'] / dense['flops']:.1f}% of the FLOPs, slower than the dense "
        "model: its timings do not hold (a busy machine while profiling?); measure it again "
        "with prunetune profile --threads 1 on a quiet machine"
    )


def _exported_preprocessing(directory: str) -> dict[str, Any] | None:
    """The preprocessing as subnet.json records it (for model.pt2 and model.onnx)."""
    record = json.loads((Path(directory) / "subnet.json").read_text())
    value = record.get("preprocessing")
    return value if isinstance(value, dict) else None


def describe_preprocessing(preprocessing: dict[str, Any] | None) -> str:
    """One line: what ``model.pt2`` and ``model.onnx`` expect as input.

    Args:
        preprocessing: the ``preprocessing`` entry of ``subnet.json``.

    Returns:
        The line to print.
    """
    if not preprocessing:
        return (
            "inputs: preprocessing not recorded (the model was not trained by prunetune): "
            "feed what the dense model was trained on"
        )
    shape = "x".join(str(d) for d in preprocessing.get("input_shape", []))
    low, high = preprocessing.get("value_range", [0.0, 1.0])
    mean = ", ".join(f"{v:.4g}" for v in preprocessing.get("mean", []))
    std = ", ".join(f"{v:.4g}" for v in preprocessing.get("std", []))
    scaled = f"{preprocessing.get('channel_order', 'unknown')} pixels scaled to [{low:g}, {high:g}]"
    if preprocessing.get("normalization") == "folded":
        return (
            f"inputs: {shape} {scaled}; model.pt2 and model.onnx normalise them themselves "
            f"(mean [{mean}], std [{std}] folded in); weights.pt expects (x - mean) / std"
        )
    return f"inputs: {shape} {scaled}, then normalised (x - mean) / std: mean [{mean}], std [{std}]"
