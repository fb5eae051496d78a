"""``prunetune prune``: one-shot pruning to a target, exported and checked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from prunetune.api import resolve_target
from prunetune.backend.export import export_subnet
from prunetune.backend.importance import IMPORTANCE_CRITERIA, channel_importance
from prunetune.backend.io import check_writable
from prunetune.backend.pruning import ALLOCATIONS, one_shot_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.cli.commands._common import say
from prunetune.cli.commands._costs import add_target_options, cost_models, target_from_args
from prunetune.cli.commands._models import add_model_options, resolve_model
from prunetune.estimators import Target, format_metric, format_share


def register(subparsers: Any) -> None:
    """Add the ``prune`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prune",
        help="one-shot prune a model to a FLOPs/params/latency target and export it",
        description="Prune a model in one shot by channel importance (the baseline every search "
        "must beat) and export the subnet. Without --checkpoint the freshly initialised model "
        "is pruned, which is how architectures are tried out before training.",
    )
    add_model_options(parser)
    add_target_options(parser)
    parser.add_argument(
        "--importance",
        choices=IMPORTANCE_CRITERIA,
        default="l1",
        help="channel importance criterion (taylor needs --dataset)",
    )
    parser.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="global",
        help="uniform: one keep ratio; global: least important channels first (default); "
        "cost: latency-aware, channels first where they save the most predicted latency per "
        "unit of importance (needs --profile)",
    )
    parser.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="keep pruned widths at multiples of this, e.g. 8: faster kernels (default 1)",
    )
    parser.add_argument("--dataset", help="data for the taylor criterion (digits, mnist, cifar10)")
    parser.add_argument("--data-dir", help="directory of the mnist or cifar10 files")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prune, export, print what was kept."""
    out = check_writable(args.out, directory=True)
    target = target_from_args(args)
    if args.importance == "taylor" and not args.dataset:
        raise ValueError("--importance taylor needs --dataset to take gradients on")
    if args.allocation == "cost" and not args.profile:
        raise ValueError(
            "--allocation cost saves predicted latency: give --profile PROFILE.json "
            "(measure one with prunetune profile)"
        )
    resolved = resolve_model(args)
    graph = resolved.trace()
    metric_costs = cost_models(graph, args.profile)
    budget = resolve_target(target, metric_costs, graph, resolved.ref.name)
    batches = None
    if args.importance == "taylor":
        from prunetune.backend.data import TensorLoader, load_dataset

        data = load_dataset(args.dataset, root=args.data_dir)
        loader = TensorLoader(data.train, 64, shuffle=True)
        batches = [batch for _, batch in zip(range(8), loader)]
    scores = channel_importance(resolved.model, graph, args.importance, batches)
    latency = metric_costs["latency_ms"].evaluate if args.allocation == "cost" else None
    widths = one_shot_widths(graph, budget.fits, args.allocation, scores, args.round_to, latency)
    spec = SubnetSpec.from_widths(graph, resolved.ref, widths, scores)
    pruned = prune_model(resolved.model, graph, spec)
    if resolved.spec is not None:
        spec = resolved.spec.compose(spec)
    # every estimator, not only the target's: a latency profile's prediction is shown too
    dense_costs = {m: float(e.evaluate(graph.dense_widths())) for m, e in metric_costs.items()}
    costs = {m: float(e.evaluate(widths)) for m, e in metric_costs.items()}
    export_subnet(
        out,
        pruned,
        spec,
        metrics={f"dense_{m}": float(v) for m, v in dense_costs.items()},
        progress=say,
    )
    summary = {
        "out": str(out),
        "target": str(Target.from_dict(target.to_dict())),
        "widths": widths,
        **{m: float(v) for m, v in costs.items()},
        **{f"dense_{m}": float(v) for m, v in dense_costs.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for metric, value in costs.items():
            dense = float(dense_costs[metric])
            print(
                f"{metric}: {format_metric(metric, dense)} -> {format_metric(metric, float(value))}"
                f"{format_share(float(value), dense)}"
            )
        print(f"exported to {out}")
    return 0
