"""Benchmark real CPU speed-ups: every zoo model pruned to 50% and 25% FLOPs against its dense self.

    python scripts/bench_speedup.py [--threads 1] [--out-dir docs]

Each zoo model (1x3x32x32 input, 10 classes, He-initialised: only widths matter here) is pruned
in one shot to each FLOPs target by four methods: uniform width scaling with free widths
(``uniform``) and with widths kept at multiples of 8 (``uniform-r8``, ``prunetune prune
--round-to 8``), and latency-aware allocation, free and aligned (``latency``, ``latency-r8``,
``prunetune prune --allocation cost [--round-to 8] --profile P``): channels go first where they
save the most predicted latency per unit of L1 importance, from a profile measured here at that
batch size. Profiles and subnets are made by those very commands (``prunetune profile
--threads T``, ``prunetune prune ... --out``, loaded back from the export), so the figures are
those of the path the README shows. The dense and pruned
models are timed at batch 1 and 32 on this machine: each model's latency is the fastest of
``--rounds`` interleaved measurements (each the minimum of ``--repeats`` runs), so a slow spell
on a shared machine hits every model alike. Reported per row: latency (measured, and predicted
from the profile), speed-up over dense, FLOPs reduction (dense / pruned FLOPs) and their ratio
(1.0: the FLOPs saving fully turned into speed).
Goal: ResNet-56 at 50% FLOPs at least 1.7x faster at batch 32.

Writes ``bench_speedup.md`` (table) and ``bench_speedup.png`` (speed-up against FLOPs
reduction) to ``--out-dir``, atomically; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.backend.export import load_subnet
from prunetune.backend.io import atomic_write
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef, list_models
from prunetune.cli import main as main_cli
from prunetune.estimators import measure_latencies

INPUT = (3, 32, 32)
METHODS = {
    "uniform": ("uniform", 1),
    "uniform-r8": ("uniform", 8),
    "latency": ("cost", 1),
    "latency-r8": ("cost", 8),
}
"""Method name: allocation and ``round_to`` of its one-shot prune (``cost``: latency-aware)."""


@dataclass
class Case:
    """One zoo model at one batch size, pruned through the command line users run.

    The profile and every pruned subnet come from ``prunetune profile`` and ``prunetune prune``
    themselves (their ``main``), with this benchmark's ``--threads``: the README's latency-aware
    prune and this benchmark are one path. (They differed: the README profiled with all threads
    and the median, this script with 1 thread and the minimum, so a ResNet-56 at 50% FLOPs was
    allocated for another machine state: 1.38x there, 2.06x here.)
    """

    name: str
    dense: nn.Module
    workdir: Path
    profile: Path
    threads: int
    profile_seconds: float

    @classmethod
    def build(cls, name: str, batch: int, threads: int, workdir: Path) -> Case:
        """The model, and its latency profile measured here at ``batch`` by ``prunetune
        profile``."""
        profile = workdir / f"{name}-bs{batch}.json"
        started = time.perf_counter()
        _cli("profile", "--model", name, *_SHAPE, "--batch-size", str(batch),
             "--threads", str(threads), "--out", str(profile))  # fmt: skip
        seconds = time.perf_counter() - started
        ref = ModelRef(name, {"num_classes": 10, "in_channels": INPUT[0]})
        torch.manual_seed(0)  # as prunetune prune builds it
        return cls(name, ref.build().eval(), workdir, profile, threads, seconds)

    def prune(self, target: float, method: str) -> tuple[nn.Module, float]:
        """The dense model pruned in one shot to ``target`` % FLOPs by ``method``, exported by
        ``prunetune prune`` and loaded back; and its predicted latency (ms)."""
        allocation, round_to = METHODS[method]
        out = self.workdir / f"{self.name}-{target:g}-{method}-{self.profile.stem}"
        summary = _cli(
            "prune", "--model", self.name, *_SHAPE, "--flops", f"{target:g}%",
            "--allocation", allocation, "--round-to", str(round_to), "--profile",
            str(self.profile), "--out", str(out), "--overwrite", "--json",
        )  # fmt: skip
        return load_subnet(out).model.eval(), float(summary["latency_ms"])


_SHAPE = ("--input-shape", ",".join(map(str, (1, *INPUT))))


def _cli(*argv: str) -> dict[str, Any]:
    """Run a ``prunetune`` command in this process; its ``--json`` output, if any.

    Raises:
        SystemExit: the command failed (its one-line error is on stderr).
    """
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main_cli(list(argv))
    if code != 0:
        raise SystemExit(f"prunetune {' '.join(argv)} failed with exit code {code}")
    text = output.getvalue().strip()
    return json.loads(text.splitlines()[-1]) if text.startswith("{") else {}


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of one zoo model: every (target, method) at every batch size."""
    example = torch.zeros(1, *INPUT)
    rows = []
    for batch in args.batches:
        case = Case.build(name, batch, args.threads, args.workdir)
        dense_flops = count_flops(case.dense, example)
        pruned = [
            (target, method, *case.prune(target, method))
            for target in args.targets
            for method in METHODS
        ]
        models = [case.dense] + [model for _, _, model, _ in pruned]
        times = measure_latencies(
            models,
            torch.randn(batch, *INPUT),
            rounds=args.rounds,
            repeats=args.repeats,
            threads=args.threads,
        )
        for (target, method, model, predicted), ms in zip(pruned, times[1:], strict=True):
            reduction = dense_flops / count_flops(model, example)
            speedup = float(times[0] / ms)
            rows.append(
                {
                    "model": name,
                    "target": target,
                    "method": method,
                    "batch": batch,
                    "dense_ms": round(float(times[0]), 3),
                    "ms": round(float(ms), 3),
                    "predicted_ms": round(predicted, 3),
                    "speedup": round(speedup, 3),
                    "flops_reduction": round(reduction, 3),
                    "efficiency": round(speedup / reduction, 3),
                    "profile_seconds": round(case.profile_seconds, 1),
                }
            )
            print(
                f"{name} {target:g}% {method} batch {batch}: {ms:.2f} ms vs {times[0]:.2f} ms "
                f"dense, {speedup:.2f}x faster for {reduction:.2f}x fewer FLOPs",
                flush=True,
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | FLOPs target | method | batch | dense ms | pruned ms | predicted ms "
        "| speed-up | FLOPs reduction | speed-up / FLOPs reduction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']:g}% | {r['method']} | {r['batch']} | "
            f"{r['dense_ms']:.2f} | {r['ms']:.2f} | {r['predicted_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['flops_reduction']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speed-up per model and target, one bar per method, one panel per batch size; the FLOPs
    reduction (the speed-up FLOPs alone would promise) as a black tick over each group."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    cases = list(dict.fromkeys((r["model"], r["target"]) for r in rows))
    figure, panels = plt.subplots(len(batches), 1, figsize=(11, 3.6 * len(batches)), squeeze=False)
    width = 0.8 / len(METHODS)
    for panel, batch in zip(panels[:, 0], batches, strict=True):
        for offset, method in enumerate(METHODS):
            chosen = {
                (r["model"], r["target"]): r
                for r in rows
                if r["batch"] == batch and r["method"] == method
            }
            heights = [chosen[c]["speedup"] if c in chosen else 0.0 for c in cases]
            positions = [i - 0.4 + (offset + 0.5) * width for i in range(len(cases))]
            panel.bar(positions, heights, width, label=method)
        for index, case in enumerate(cases):
            ideal = [r["flops_reduction"] for r in rows if (r["model"], r["target"]) == case]
            panel.hlines(min(ideal), index - 0.4, index + 0.4, colors="black", linewidth=1.5)
        panel.set_xticks(range(len(cases)))
        panel.set_xticklabels([f"{m}\n{t:g}% FLOPs" for m, t in cases], fontsize=7)
        panel.set_ylabel("speed-up over dense")
        panel.set_title(f"batch {batch} (black: FLOPs reduction)", fontsize=9)
        panel.grid(axis="y", alpha=0.3)
    panels[0, 0].legend(fontsize=7, ncol=len(METHODS))
    figure.suptitle("Measured CPU speed-up of pruned zoo models (1 thread)")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)


def main() -> int:
    """Prune, time, write the table and plot, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_models()), help="comma-separated")
    parser.add_argument("--targets", default="50,25", help="FLOPs targets in percent")
    parser.add_argument("--batches", default="1,32", help="batch sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args()
    try:
        args.targets = [float(t) for t in args.targets.split(",")]
        args.batches = [int(b) for b in args.batches.split(",")]
        models = [m for m in args.models.split(",") if m]
    except ValueError as exc:
        parser.error(f"--targets and --batches take comma-separated numbers ({exc})")
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; the zoo has {', '.join(list_models())}")
    if not all(0 < t < 100 for t in args.targets) or not all(b > 0 for b in args.batches):
        parser.error("targets must be percentages in (0, 100) and batch sizes positive")
    if args.threads < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--threads, --rounds and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_speedup.") as workdir:
        args.workdir = Path(workdir)
        rows = [row for name in models for row in bench_model(name, args)]
    text = table(rows)
    print(f"\n{text}\n")
    command = "python scripts/bench_speedup.py " + " ".join(sys.argv[1:])
    header = (
        f"`{command.strip()}` ({datetime.date.today()}, {platform.machine()}, "
        f"{args.threads} thread(s), torch {torch.__version__}, "
        f"{time.perf_counter() - started:.0f} s)\n\n"
    )
    atomic_write(args.out_dir / "bench_speedup.md", lambda p: p.write_text(header + text + "\n"))
    plot(rows, args.out_dir / "bench_speedup.png")
    goal = [r for r in rows if r["model"] == "resnet56" and r["target"] == 50 and r["batch"] == 32]
    summary = {
        "benchmark": "speedup",
        "threads": args.threads,
        "resnet56_50pct_batch32_speedup": {r["method"]: r["speedup"] for r in goal},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
