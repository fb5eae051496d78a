"""How much the C allocator costs a forward pass: time and page faults, per pass.

    python scripts/bench_allocator.py [--model mobilenetv2] [--batch 32] [--steady]
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 python scripts/bench_allocator.py

glibc's malloc maps large blocks (batch-32 activations) fresh and hands freed memory back to
the OS, so a pass can page-fault its activations in again. Run this once as it is and once with
the environment above (or ``--steady``, which calls :func:`prunetune.estimators.steady_allocator`)
to see
what that costs on your machine. Latency profiles are measured in the steady regime.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any

import torch

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef, list_models
from prunetune.backend.pruning import ratio_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.estimators import steady_allocator


def per_pass(model: torch.nn.Module, x: torch.Tensor, passes: int) -> tuple[float, float]:
    """Mean milliseconds and minor page faults per forward pass, after 3 warm-up passes."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for _ in range(passes):
            model(x)
        seconds = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds / passes * 1e3, faults / passes


def main() -> None:
    """Time the dense model and three uniformly pruned widths; print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2", choices=list_models())
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--passes", type=int, default=10, help="timed passes per width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steady", action="store_true", help="call steady_allocator() first")
    args = parser.parse_args()
    if args.batch < 1 or args.passes < 1 or args.threads < 1:
        parser.error("--batch, --passes and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    steady = steady_allocator() if args.steady else False
    ref = ModelRef(args.model, {"num_classes": 10, "in_channels": 3})
    torch.manual_seed(0)
    model = ref.build().eval()
    graph = ChannelGraph.trace(model, torch.zeros(1, 3, 32, 32))
    x = torch.randn(args.batch, 3, 32, 32)
    environment = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"{args.model} batch {args.batch}, steady_allocator: {steady}, env: {environment}")
    rows: list[dict[str, Any]] = []
    for ratio in (1.0, 0.75, 0.5, 0.3):
        spec = SubnetSpec.from_widths(graph, ref, ratio_widths(graph, ratio))
        pruned = prune_model(model, graph, spec).eval()
        ms, faults = per_pass(pruned, x, args.passes)
        rows.append({"keep": ratio, "ms": round(ms, 2), "faults_per_pass": round(faults, 1)})
        print(f"keep {ratio:.2f}: {ms:8.2f} ms per pass, {faults:9.1f} page faults per pass")
    print(json.dumps({"benchmark": "allocator", "model": args.model, "batch": args.batch,
                      "steady": steady, "env": environment, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
