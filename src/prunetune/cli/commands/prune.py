"""``prunetune prune``: one-shot pruning to a target, exported and checked."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from prunetune.api import prune
from prunetune.backend.export import check_export_dir
from prunetune.backend.importance import IMPORTANCE_CRITERIA
from prunetune.backend.pruning import ALLOCATIONS
from prunetune.cli.commands._common import say
from prunetune.cli.commands._costs import add_target_options, target_from_args
from prunetune.cli.commands._models import add_model_options, resolve_model


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
        help="keep pruned widths at multiples of this, e.g. 8: faster kernels (default 1); "
        "groups narrower than it keep their own step, a value above every group is refused",
    )
    parser.add_argument(
        "--dataset",
        help="data for the taylor criterion: digits, mnist, cifar10, imagefolder "
        "or package.module:factory",
    )
    parser.add_argument(
        "--data-dir", help="directory of the mnist/cifar10 files or image folder (taylor only)"
    )
    parser.add_argument(
        "--output",
        help="taylor on a model returning a tuple or dict: the output the loss is taken on, a "
        "dict key or tuple index (default: the first item, or the dict's 'out')",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="export directory to write: new, empty, or an earlier export (else --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even when it holds other files (they are deleted)",
    )
    parser.add_argument(
        "--fold-normalization",
        action="store_true",
        help="build (x - mean) / std into model.pt2 and model.onnx: they take raw pixels in "
        "[0, 1] (needs a checkpoint trained by prunetune, or --dataset)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prune through :func:`prunetune.prune` (the API's path), export, print what was kept."""
    out = check_export_dir(args.out, args.overwrite)
    target = target_from_args(args)
    if args.output is not None and args.importance != "taylor":
        raise ValueError(
            "--output names the output taylor's loss is taken on: add --importance taylor"
        )
    if args.importance == "taylor" and not args.dataset:
        raise ValueError("--importance taylor needs --dataset to take gradients on")
    if args.allocation == "cost" and not args.profile:
        raise ValueError(
            "--allocation cost saves predicted latency: give --profile PROFILE.json "
            "(measure one with prunetune profile)"
        )
    resolved = resolve_model(args)
    batches = None
    preprocessing = resolved.preprocessing
    if args.dataset:
        from prunetune.backend.datasources import DataSource
        from prunetune.backend.training import batches as make_batches

        data = DataSource(args.dataset, root=args.data_dir, workers=0).check()
        preprocessing = preprocessing or data.preprocessing()
        if args.importance == "taylor":
            loader = make_batches(data.train, 64, shuffle=True)
            batches = [batch for _, batch in zip(range(8), loader)]
    result = prune(
        resolved.model,
        resolved.example(),
        target,
        importance=args.importance,
        allocation=args.allocation,
        round_to=args.round_to,
        profile=args.profile,
        batches=batches,
        leaf_modules=resolved.leaf_modules,
        model_ref=resolved.ref,
        base_spec=resolved.spec,
    )
    if resolved.spec is not None:  # pruning an export again: keep the original dense as base
        original = {
            metric: float(resolved.metrics[f"dense_{metric}"])
            for metric in result.costs
            if isinstance(resolved.metrics.get(f"dense_{metric}"), (int, float))
        }
        result = dataclasses.replace(result, original_costs=original or None)
    result.export(
        out,
        progress=say,
        overwrite=args.overwrite,
        preprocessing=preprocessing,
        fold_normalization=args.fold_normalization,
    )
    if args.json:
        summary = {
            "out": str(out),
            "target": str(target),
            "widths": dict(result.spec.widths),
            **result.costs,
            **{f"dense_{m}": v for m, v in result.dense_costs.items()},
        }
        if result.original_costs is not None:
            summary |= {f"input_{m}": v for m, v in result.dense_costs.items()}
            summary |= {f"dense_{m}": v for m, v in result.original_costs.items()}
        print(json.dumps(summary))
    else:
        print(result.summary())
        print(f"exported to {out}")
    return 0


def _output(text: str | None) -> str | int | None:
    """``--output``: a tuple index when it is an integer, else a dict key."""
    if text is not None and text.lstrip("-").isdigit():
        return int(text)
    return text
