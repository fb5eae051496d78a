"""Benchmark the search spaces against one-shot pruning on real data (MNIST test set).

    python scripts/bench_spaces.py --data-dir ../shared/data/mnist-t10k

small_cnn is trained dense on the 8,000-image part of the MNIST test set (validation carved from
it), then pruned to each FLOPs target by uniform one-shot, global-L1 one-shot, and every
registered space; each subnet gets the same finetune and is scored on the 2,000 held-out images.
Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from prunetune.backend.data import load_dataset
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef
from prunetune.backend.pruning import one_shot_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.estimators import FlopsModel, ParamsModel, Target
from prunetune.spaces import SpaceContext, create_space, list_spaces

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"


def main() -> None:
    """Train dense, prune by every method at every target, finetune, score."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--targets", default="50,20", help="FLOPs targets in percent")
    parser.add_argument("--dense-epochs", type=float, default=6)
    parser.add_argument("--finetune-epochs", type=float, default=2)
    parser.add_argument("--space-epochs", type=float, default=1, help="inner epochs of spaces")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", root=args.data_dir, seed=0)
    ref = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    dense = ref.build()
    train(dense, data, TrainConfig(epochs=args.dense_epochs))
    dense_acc = evaluate(dense, data.test)[1]
    example = torch.zeros(1, 1, 28, 28)
    graph = ChannelGraph.trace(dense, example)
    costs = {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}
    scores = channel_importance(dense, graph, "l1")
    inner = {"dsa": "epochs", "dais": "epochs", "ddpnas": "max_epochs", "ratios": None}
    rows: list[dict[str, Any]] = []
    for share in (float(t) for t in args.targets.split(",")):
        budget = Target.parse(f"flops<={share}%").resolve(costs)
        candidates: dict[str, tuple[SubnetSpec, dict[str, torch.Tensor] | None, float]] = {}
        for allocation in ("uniform", "global"):
            started = time.perf_counter()
            widths = one_shot_widths(graph, budget.fits, allocation, scores)
            spec = SubnetSpec.from_widths(graph, ref, widths, scores)
            name = "uniform" if allocation == "uniform" else "global-l1"
            candidates[name] = (spec, None, time.perf_counter() - started)
        for space in list_spaces():
            options: dict[str, Any] = {}
            if inner.get(space):
                integral = space in ("dsa", "ddpnas")
                options[inner[space]] = int(args.space_epochs) if integral else args.space_epochs
            context = SpaceContext(
                model=dense, graph=graph, model_ref=ref, data=data, budget=budget, seed=0
            )
            started = time.perf_counter()
            result = create_space(space, **options).run(context)
            candidates[space] = (result.spec, result.state_dict, time.perf_counter() - started)
        for method, (spec, state, seconds) in candidates.items():
            start = copy.deepcopy(dense)
            if state is not None:
                start.load_state_dict(state)
            pruned = prune_model(start, graph, spec)
            torch.manual_seed(0)
            config = TrainConfig(epochs=args.finetune_epochs, lr=0.01)
            train(pruned, data, config, teacher=dense)
            row = {
                "target": share,
                "method": method,
                "test_acc": round(evaluate(pruned, data.test)[1], 4),
                "flops_pct": round(100 * count_flops(pruned, example) / costs["flops"].dense, 2),
                "search_seconds": round(seconds, 1),
            }
            rows.append(row)
            print(row, flush=True)
    print(f"\ndense small_cnn test accuracy {100 * dense_acc:.2f}%\n")
    print("| FLOPs target | method | test acc | FLOPs kept | search s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['target']:g}% | {row['method']} | {100 * row['test_acc']:.2f}% | "
            f"{row['flops_pct']:.1f}% | {row['search_seconds']} |"
        )
    print(json.dumps({"benchmark": "spaces", "dense_test_acc": dense_acc, "rows": rows}))


if __name__ == "__main__":
    main()
