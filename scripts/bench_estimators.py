"""Benchmark the estimators: FLOPs exactness and speed, latency prediction, accuracy proxy.

    python scripts/bench_estimators.py [--quick] [--threads T] [--parts flops,latency,proxy]
                                       [--models resnet56,mobilenetv2] [--batches 1,32]

1. FLOPs: for every zoo model (1x3x32x32), random specs counted by our estimator and by
   FlopCounterMode on the physically pruned model (mismatches, goal 0), and the per-candidate
   speed ratio of the vectorised estimator against pruning and counting (goal >= 1000x).
2. Latency: ResNet-56 and MobileNetV2 at batch 1 and 32, profiled on this machine (tables, the
   dense model and 12 pruned calibration subnets, as `prunetune profile` does), then predicted vs
   measured on held-out random subnets, of random sizes and of near-equal size: median absolute
   % error, share within 5% / 10%, Kendall tau (goal >= 90% within 10%, tau >= 0.9). Each set
   is measured in two interleaved rounds; the tau of one round against the other
   (``repeat_kendall_tau``) is how well the measurements rank themselves. The dense model and
   the calibration subnets are timed again, spread through the same rounds: their ratio to the
   profile's own times (``calibration_drift``) shows how far the machine moved since profiling,
   and the figures are given twice, with the profile's calibration and ``recalibrated`` to
   those fresh times (what ``prunetune profile --recalibrate`` does).
3. Proxy: Kendall tau between the BN-recalibrated proxy and accuracy after a short finetune, for
   random subnets of small_cnn on digits at the same FLOPs.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import zlib
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from prunetune.backend.data import load_dataset
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef, list_models
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.estimators import (
    FlopsModel,
    LatencyPredictor,
    ParamsModel,
    Target,
    cpu_channel_block,
    measure_latencies,
    profile_model,
    proxy_accuracy,
    steady_allocator,
)


def random_widths(
    graph: ChannelGraph, rng: np.random.Generator, low: float = 0.1
) -> dict[str, int]:
    """Independent random keep ratios in [low, 1] per group, rounded to each group's step."""
    widths = {}
    for group in graph.prunable_groups:
        width = int(rng.uniform(low, 1.0) * group.size) // group.step * group.step
        widths[group.name] = min(group.size, max(group.min_width, width))
    return widths


def bench_flops(specs: int, rng: np.random.Generator) -> dict[str, Any]:
    """Exactness against FlopCounterMode and per-candidate speed, every zoo model."""
    mismatches, checked, ratios = 0, 0, {}
    for name in list_models():
        ref = ModelRef(name, {"num_classes": 10, "in_channels": 3})
        model = ref.build().eval()
        example = torch.zeros(1, 3, 32, 32)
        graph = ChannelGraph.trace(model, example)
        flops = FlopsModel.from_graph(graph)
        build_seconds = []
        for _ in range(specs):
            spec = SubnetSpec.from_widths(graph, ref, random_widths(graph, rng))
            started = time.perf_counter()
            measured = count_flops(prune_model(model, graph, spec), example)
            build_seconds.append(time.perf_counter() - started)
            mismatches += int(flops.evaluate(spec.widths) != measured)
            checked += 1
        batch = np.stack(
            [[random_widths(graph, rng)[g] for g in flops.groups] for _ in range(10_000)]
        )
        started = time.perf_counter()
        flops.evaluate(batch)
        ours = (time.perf_counter() - started) / len(batch)
        ratios[name] = float(np.median(build_seconds)) / ours
        print(f"flops {name}: {specs} specs checked, {ratios[name]:,.0f}x faster per candidate")
    return {"flops_mismatches": mismatches, "flops_checked": checked,
            "flops_speedup_min": min(ratios.values()), "flops_speedup": ratios}  # fmt: skip


def spread_widths(graph: ChannelGraph, rng: np.random.Generator) -> dict[str, int]:
    """A random subnet of random size: an overall keep ratio in [0.2, 1], each group's ratio
    within +-30% of it, so held-out subnets span small to dense models."""
    scale = rng.uniform(0.2, 1.0)
    widths = {}
    for group in graph.prunable_groups:
        ratio = min(1.0, scale * rng.uniform(0.7, 1.3))
        width = round(ratio * group.size / group.step) * group.step
        widths[group.name] = min(group.size, max(group.min_width, width))
    return widths


def latency_figures(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Median absolute % error, share within 5% and 10%, and Kendall tau."""
    error = np.abs(predicted / measured - 1.0)
    return {
        "median_abs_pct_error": round(100 * float(np.median(error)), 2),
        "within_5pct": round(float((error <= 0.05).mean()), 3),
        "within_10pct": round(float((error <= 0.10).mean()), 3),
        "kendall_tau": round(float(kendalltau(predicted, measured).statistic), 3),
    }


def interleaved(
    models: list[torch.nn.Module], first: int, x: torch.Tensor, repeats: int, forward: bool
) -> np.ndarray:
    """One round of latencies of ``models``, its ``first`` models spread evenly among the rest
    (in reverse order when not ``forward``); returned in the order given."""
    keys = [(i + 0.5) / first for i in range(first)]
    keys += [(i + 0.5) / (len(models) - first) for i in range(len(models) - first)]
    order = np.argsort(keys, kind="stable")
    if not forward:
        order = order[::-1]
    times = np.empty(len(models))
    times[order] = measure_latencies([models[i] for i in order], x, rounds=1, repeats=repeats)
    return times


def held_out_figures(
    predictor: LatencyPredictor,
    held_out: dict[str, list[dict[str, int]]],
    rounds: list[np.ndarray],
    start: int,
) -> dict[str, Any]:
    """Figures of each held-out set (measured from index ``start`` of both rounds, set after
    set) and of all of them, against the better of the two rounds."""
    measured = np.minimum(*rounds)
    figures: dict[str, Any] = {}
    predicted_all = []
    end = start
    for kind, widths in held_out.items():
        part = slice(end, end + len(widths))
        end += len(widths)
        predicted = predictor.predict(np.stack([[w[g] for g in predictor.groups] for w in widths]))
        predicted_all.append(predicted)
        figures[kind] = latency_figures(predicted, measured[part])
        figures[kind]["repeat_kendall_tau"] = round(
            float(kendalltau(rounds[0][part], rounds[1][part]).statistic), 3
        )
    figures.update(latency_figures(np.concatenate(predicted_all), measured[start:end]))
    return figures


def bench_latency(
    name: str, batch: int, subnets: int, grid: int, repeats: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Profile (tables, the dense model and 12 calibration subnets), then predict held-out
    subnets of two kinds: random sizes (``spread``) and independent per-group ratios, which
    all land near the same size (``same_size``, the harder ranking)."""
    ref = ModelRef(name, {"num_classes": 10, "in_channels": 3})
    torch.manual_seed(0)
    model = ref.build().eval()
    graph = ChannelGraph.trace(model, torch.zeros(1, 3, 32, 32))
    started = time.perf_counter()
    profile = profile_model(
        model, graph, batch, widths_grid=grid, repeats=repeats, statistic="min", model_id=name
    )
    profile_seconds = time.perf_counter() - started
    predictor = LatencyPredictor(profile, graph)
    x = torch.randn(batch, 3, 32, 32)
    held_out = {
        "spread": [spread_widths(graph, rng) for _ in range(subnets)],
        "same_size": [random_widths(graph, rng, 0.2) for _ in range(subnets)],
    }
    # the dense model and the profile's calibration subnets are timed again in the same rounds
    # as the held-out subnets: a fresh calibration (``recalibrated``), and how far whole models
    # have drifted since profiling (``calibration_drift``, measured now / in the profile)
    assert profile.model_ms is not None
    calibration = [({}, profile.model_ms), *profile.calibration]
    widths = [w for w, _ in calibration] + [w for kind in held_out.values() for w in kind]
    pruned = [
        prune_model(model, graph, SubnetSpec.from_widths(graph, ref, w)).eval() if w else model
        for w in widths
    ]
    # two interleaved rounds, kept apart: how well one round ranks the other bounds what any
    # predictor can show against these measurements. The calibration models are spread evenly
    # through each round, so a slow spell does not fall on them alone.
    rounds = [
        interleaved(pruned, len(calibration), x, repeats, spread_first)
        for spread_first in (True, False)
    ]
    now = np.minimum(*rounds)
    refreshed = LatencyPredictor(profile, graph)
    refreshed.calibrate(list(zip([w for w, _ in calibration], now, strict=False)))
    figures: dict[str, Any] = {
        "model": name,
        "batch": batch,
        "subnets": subnets,
        "calibration_drift": round(
            float(np.median(now[: len(calibration)] / [ms for _, ms in calibration])), 3
        ),
    }
    start = len(calibration)
    figures.update(held_out_figures(predictor, held_out, rounds, start))
    figures["recalibrated"] = held_out_figures(refreshed, held_out, rounds, start)
    figures["dense_ms"] = round(profile.model_ms, 3)
    figures["calibration"] = {
        "scale": round(predictor.calibration.scale, 4),
        "overhead_ms": round(predictor.calibration.overhead_ms, 4),
        "exponent": round(predictor.calibration.exponent, 4),
        "points": predictor.calibration.points,
    }
    figures["recalibrated"]["calibration"] = {
        "scale": round(refreshed.calibration.scale, 4),
        "exponent": round(refreshed.calibration.exponent, 4),
    }
    figures["profile_seconds"] = round(profile_seconds, 1)
    print(f"latency {name} batch {batch}: {figures}", flush=True)
    return figures


def bench_proxy(subnets: int, rng: np.random.Generator) -> dict[str, Any]:
    """Kendall tau of the BN-recalibrated proxy against accuracy after a short finetune."""
    data = load_dataset("digits", seed=0)
    ref = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    model = ref.build()
    train(model, data, TrainConfig(epochs=10))
    graph = ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))
    costs = {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}
    budget = Target.parse("flops<=30%").resolve(costs)
    proxies, finetuned, raw = [], [], []
    while len(proxies) < subnets:
        widths = random_widths(graph, rng, 0.05)
        if not budget.fits(widths) or budget.utilisation(widths) < 0.85:
            continue  # same FLOPs: 85-100% of the budget
        pruned = prune_model(model, graph, SubnetSpec.from_widths(graph, ref, widths))
        raw.append(evaluate(pruned, data.val)[1])
        proxies.append(proxy_accuracy(pruned, data.train, data.val))
        train(pruned, data, TrainConfig(epochs=1, lr=0.01))
        finetuned.append(evaluate(pruned, data.val)[1])
    figures = {
        "subnets": subnets,
        "proxy_kendall_tau": round(float(kendalltau(proxies, finetuned).statistic), 3),
        "no_recalibration_kendall_tau": round(float(kendalltau(raw, finetuned).statistic), 3),
    }
    print(f"proxy: {figures}")
    return figures


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main() -> None:
    """Run the three benchmarks and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer specs and subnets")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--parts",
        type=_names,
        default=["flops", "latency", "proxy"],
        help="comma-separated parts to run (default: all three)",
    )
    parser.add_argument(
        "--models",
        type=_names,
        default=["resnet56", "mobilenetv2"],
        help="zoo models of the latency part",
    )
    parser.add_argument(
        "--batches", type=_names, default=["1", "32"], help="batch sizes of the latency part"
    )
    args = parser.parse_args()
    unknown = set(args.parts) - {"flops", "latency", "proxy"}
    if unknown or not all(b.isdigit() and int(b) > 0 for b in args.batches):
        parser.error(
            f"--parts takes flops, latency, proxy (got {sorted(unknown)}); "
            "--batches takes positive integers"
        )
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "estimators",
        "threads": args.threads,
        "allocator": "steady" if steady_allocator() else "system",
        "channel_block": cpu_channel_block(),
    }
    if "flops" in args.parts:
        results.update(bench_flops(10 if args.quick else 50, rng))
    if "latency" in args.parts:
        results["latency"] = [
            bench_latency(
                name,
                int(batch),
                10 if args.quick else 30,
                7,
                5 if args.quick else 7,
                np.random.default_rng([zlib.crc32(name.encode()), int(batch)]),
            )
            for name in args.models
            for batch in args.batches
        ]
    if "proxy" in args.parts:
        results.update(bench_proxy(8 if args.quick else 20, rng))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["machine"] = f"{platform.machine()} {platform.processor()}".strip()
    results["torch"] = torch.__version__
    print(json.dumps(results))


if __name__ == "__main__":
    main()
