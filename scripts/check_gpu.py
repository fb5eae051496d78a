"""Check prunetune on a CUDA GPU in a few minutes: a short search, a prune, a profile, an estimate.

Run it whenever a GPU machine is available (it needs no data: the digits are embedded) and put
its line in docs/gpu.md::

    PYTHONPATH=src python scripts/check_gpu.py [--runs-dir DIR] [--device cuda:0]

It prints one JSON line: the GPU (name, driver, CUDA), the search's figures on the GPU (bf16,
trials sharing it at 0.5 GPU each), the prune, the profile's size and time, and the estimate of
the pruned model's latency against its CUDA-event measurement. Without a GPU it says so on one
line and exits with 2. Budget: under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print one JSON line; 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", help="where the search writes (default: a temp dir)")
    parser.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "check_gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
            "run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="prunetune-gpu-") as scratch:
        print(json.dumps(run_checks(args.runs_dir or scratch, args.device)), flush=True)
    return 0


def run_checks(runs_dir: str, device: str, search: bool = True) -> dict[str, Any]:
    """The four checks on ``device``; their figures as a JSON-ready dict (``search=False``
    leaves the search out: a quick try of the rest, e.g. on the CPU)."""
    import prunetune
    from prunetune.backend.graph import ChannelGraph
    from prunetune.backend.models import create_model
    from prunetune.estimators import LatencyPredictor, measure_latency, profile_model
    from prunetune.estimators._profile import DeviceInfo

    started = time.perf_counter()
    info = DeviceInfo.current(device=device)
    out: dict[str, Any] = {
        "check": "gpu",
        "gpu": info.gpu_name,
        "driver": info.gpu_driver,
        "cuda": info.cuda_version,
        "torch": torch.__version__,
    }
    if search:
        out["search"] = _search(runs_dir, device)

    clock = time.perf_counter()
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=3).eval()
    pruned = prunetune.prune(model, torch.randn(1, 3, 32, 32), "flops<=50%")
    out["prune"] = {
        "seconds": round(time.perf_counter() - clock, 1),
        "flops_share": round(pruned.flops / pruned.dense_flops, 3),
    }

    clock = time.perf_counter()
    graph = ChannelGraph.trace(model, torch.zeros(1, 3, 32, 32))
    profile = profile_model(
        model, graph, batch_size=32, widths_grid=3, repeats=3, calibration_subnets=4,
        device=device,
    )  # fmt: skip
    out["profile"] = {
        "seconds": round(time.perf_counter() - clock, 1),
        "tables": len(profile.tables),
        "dense_ms": round(profile.model_ms or float("nan"), 4),
        "device": profile.device.describe(),
    }

    estimated = float(LatencyPredictor(profile, graph).predict(pruned.spec.widths))
    batch = torch.randn(32, 3, 32, 32, device=device)
    measured = measure_latency(pruned.model.to(device), batch)
    out["estimate"] = {
        "pruned_ms_estimated": round(estimated, 4),
        "pruned_ms_measured": round(measured, 4),
        "error": round(estimated / measured - 1, 3),
    }
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _search(runs_dir: str, device: str) -> dict[str, Any]:
    """A short search on the GPU: bf16, two trials sharing it at a time."""
    import prunetune

    clock = time.perf_counter()
    result = prunetune.run_search(
        "small_cnn", "flops<=50%", data="digits", spaces=("dsa", "ratios"), trials=4,
        name="gpu-check", runs_dir=runs_dir, overwrite=True,
        options={"device": device, "gpus_per_trial": 0.5, "precision": "bf16",
                 "dense_epochs": 3, "finetune_epochs": 2, "score_steps": 50, "inner_epochs": 1},
    )  # fmt: skip
    return {
        "seconds": round(time.perf_counter() - clock, 1),
        "test_acc": round(result.metrics["test_acc"], 4),
        "dense_test_acc": round(result.metrics["dense_test_acc"], 4),
        "flops_share": round(result.metrics["flops"] / result.metrics["dense_flops"], 3),
        "trials": result.counts,
    }


if __name__ == "__main__":
    raise SystemExit(main())
