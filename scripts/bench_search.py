"""Benchmark the full search against one-shot pruning, Torch-Pruning and random search (MNIST).

    python scripts/bench_search.py [--quick] [--data-dir ../shared/data/mnist-t10k]

The defaults take about 35 minutes on 2 CPU cores (dense training is cached for reruns);
``--quick`` checks the whole pipeline in about 3 minutes on tiny settings and writes its table
and plot to the work directory, never to ``docs/``.

Data: the MNIST test set in ``--data-dir``, split once (seed 0) into 8,000 images to learn from
(7,200 train, 800 validation: every search chooses on validation) and 2,000 held-out test images
that only score the final models. Model: the zoo's ResNet-20 (1 input channel, 10 classes),
trained dense once and cached in ``--work-dir`` (``dense.pt``, reused when trained with the same
epochs and seed).

At every FLOPs target (default 50%, 25%, 10% of the dense model) each method yields one pruned
model:

- ``uniform``: every channel group scaled by one common keep ratio (one shot);
- ``global-l1``: channels ranked by L1 norm across all groups (one shot, ours);
- ``torch-pruning``: Torch-Pruning's global magnitude pruner (``GroupMagnitudeImportance(p=1)``,
  final classifier kept), iterative steps until our FLOPs count reaches the target; its FLOPs
  are also counted by our estimator on a trace of its model and checked against FlopCounterMode;
- ``dsa``, ``dais``, ``ddpnas``, ``ratios``: each space alone, run once with its default
  hyper-parameters and the same inner length as one search trial (``--inner-epochs``; DSA and
  DDPNAS count whole epochs, at least one); the subnet starts its finetune from the weights the
  space learned (its ``state_dict``), as in ``bench_spaces.py``;
- ``random-search``: ``run_search`` over the ``ratios`` space with the random sampler;
- ``search``: the full ``run_search`` over every space (TPE), the same trials and settings.

Both searches start from the cached dense checkpoint, run two trials at a time (one CPU and one
torch thread each) and choose their best subnet by their own validation score (``--score-steps``
of distilled finetune per trial). Their wall time is ``run_search``'s whole run. The finetune
budget is the same for every method: the benchmark finetunes every pruned model itself, with one
``TrainConfig`` (``--finetune-epochs`` epochs, lr 0.01, batch 64, seed 0, distilled from the
dense model at weight 0.7, as the search's own final step does). The searches' own final
finetune is cut to 0.01 epochs and ignored; their chosen subnet starts, as the search's own final
step does, from the weights its trial scored (so it carries the trial's ``--score-steps`` of
finetune, part of the search's cost and wall time) and gets the common finetune.

Reported per target and method: test accuracy, FLOPs (FlopCounterMode / 2 on the final model,
and our estimator on its trace), parameters, latency at batch 1 and 32 (median, this machine,
``--threads`` threads) and wall time of pruning (or searching) and finetuning. The table goes to
``docs/bench_search.md``, the plot (test accuracy vs FLOPs kept, one line per method) to
``docs/bench_search.png`` (with ``--quick``: to the work directory); the reading names every
target where the full search does not beat both one-shot baselines and random search. The last
line printed is one JSON object with every figure.

Torch-Pruning is not a dependency of prunetune; install it for the benchmark only:
``.venv/bin/pip install -c constraints.txt torch-pruning``. Without it, ``torch-pruning`` is
skipped (with a note) unless named in ``--methods``, which is then an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from _bench_search_methods import (
    BATCH_SIZE,
    METHODS,
    SEED,
    Bench,
    Pruned,
    Settings,
    prune_by_search,
    prune_locally,
    search_config,
)
from _bench_search_page import page, plot, reading, table
from torch import Tensor, nn

from prunetune.backend.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunetune.backend.data import DatasetSplits, load_dataset
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.io import atomic_write, check_writable
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.estimators import DeviceInfo, FlopsModel, ParamsModel, Target, measure_latencies
from prunetune.search._tuner import startup_trials

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist-t10k"
FINETUNE_LR = 0.01
DISTILL_WEIGHT = 0.7
LATENCY_ROUNDS, LATENCY_REPEATS = 3, 5
# defaults of the full run (about 35 min on 2 cores) and of --quick (a few minutes)
FULL: dict[str, Any] = dict(
    targets="50,25,10", trials=8, dense_epochs=4.0, finetune_epochs=1.0, inner_epochs=0.5,
    score_steps=100,
)  # fmt: skip
QUICK: dict[str, Any] = dict(
    targets="25", trials=2, dense_epochs=0.3, finetune_epochs=0.05, inner_epochs=0.1,
    score_steps=10,
)  # fmt: skip


class BenchError(Exception):
    """Bad input the user must fix: printed in one line, exit code 2."""


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The flags, checked; ``--quick`` picks small defaults that explicit flags override.

    Raises:
        BenchError: unknown methods, bad targets or numbers, torch-pruning named but not
            installed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a check, no docs")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA, help="the MNIST t10k IDX files"
    )
    parser.add_argument("--work-dir", type=Path, help="dense cache and search runs")
    parser.add_argument("--out-dir", type=Path, help="table and plot (default docs/)")
    parser.add_argument("--targets", help=f"FLOPs targets in %% (default {FULL['targets']})")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    for flag, kind, what in (
        ("--trials", int, "trials of each search"),
        ("--dense-epochs", float, "epochs of dense training"),
        ("--finetune-epochs", float, "epochs of the common finetune"),
        ("--inner-epochs", float, "length of one space run (alone or in a trial)"),
        ("--score-steps", int, "steps of a trial's score finetune"),
    ):
        default = FULL[flag[2:].replace("-", "_")]
        parser.add_argument(flag, type=kind, help=f"{what} (default {default:g})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    pick = {key: value if (value := getattr(args, key)) is not None else defaults[key]
            for key in FULL}  # fmt: skip
    for key in ("trials", "dense_epochs", "finetune_epochs", "inner_epochs", "score_steps"):
        if not pick[key] > 0:
            raise BenchError(f"--{key.replace('_', '-')} must be positive, got {pick[key]}")
    if args.threads < 1:
        raise BenchError(f"--threads must be at least 1, got {args.threads}")
    work_dir = args.work_dir or REPO / "runs" / f"bench_search{'_quick' if args.quick else ''}"
    methods, skipped = _methods(args.methods)
    return Settings(
        targets=_targets(str(pick["targets"])),
        methods=methods,
        trials=int(pick["trials"]),
        dense_epochs=float(pick["dense_epochs"]),
        finetune_epochs=float(pick["finetune_epochs"]),
        inner_epochs=float(pick["inner_epochs"]),
        score_steps=int(pick["score_steps"]),
        threads=args.threads,
        quick=args.quick,
        data_dir=args.data_dir.resolve(),
        work_dir=work_dir.resolve(),
        out_dir=(args.out_dir or (work_dir if args.quick else REPO / "docs")).resolve(),
        skipped=skipped,
    )


def _targets(text: str) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise BenchError(f"--targets {text!r} must be percentages like 50,25,10") from None
    if not targets or not all(0 < t < 100 for t in targets):
        raise BenchError(f"--targets {text!r} must be percentages between 0 and 100")
    return targets


def _methods(text: str | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The methods to run, and those skipped (torch-pruning when not installed) with why."""
    named = tuple(m.strip() for m in (text or "").split(",") if m.strip()) or METHODS
    unknown = [m for m in named if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    skipped = {}
    if "torch-pruning" in named and not _has_torch_pruning():
        hint = "not installed: .venv/bin/pip install -c constraints.txt torch-pruning"
        if text:
            raise BenchError(f"method torch-pruning needs Torch-Pruning, {hint}")
        skipped["torch-pruning"] = hint
    return tuple(m for m in named if m not in skipped), skipped


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(settings: Settings, say: Callable[[str], None]) -> Bench:
    """Load the data, train (or reload) the dense model, trace it and score its channels.

    Raises:
        BenchError: the data directory is missing or unreadable, an output directory cannot be
            written, or a target is infeasible.
    """
    try:
        data = load_dataset("mnist", root=settings.data_dir, seed=SEED)
    except PrunetuneError as exc:
        raise BenchError(f"{exc} (pass --data-dir: the MNIST t10k IDX files)") from None
    ref = ModelRef("resnet20", {"num_classes": data.num_classes, "in_channels": data.in_channels})
    example = torch.zeros(data.input_shape(1))
    dense_path = settings.work_dir / "dense.pt"
    try:  # an unwritable output must fail now, not after the run
        check_writable(settings.work_dir, directory=True)
        check_writable(settings.out_dir, directory=True)
    except PrunetuneError as exc:
        raise BenchError(str(exc)) from None
    graph = ChannelGraph.trace(ref.build(), example)
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    for target in settings.targets:  # an infeasible target fails before any training
        try:
            Target.parse(f"flops<={target:g}%").resolve({"flops": flops})
        except (PrunetuneError, ValueError) as exc:
            raise BenchError(str(exc)) from None
    dense, info = dense_model(settings, data, ref, dense_path, say)
    graph = ChannelGraph.trace(dense, example)
    return Bench(
        settings=settings,
        data=data,
        ref=ref,
        dense=dense,
        dense_path=dense_path,
        dense_info=info,
        graph=graph,
        flops=flops,
        params=params,
        scores=channel_importance(dense, graph, "l1"),
        example=example,
    )


def dense_model(
    settings: Settings, data: DatasetSplits, ref: ModelRef, path: Path, say: Callable[[str], None]
) -> tuple[nn.Module, dict[str, float]]:
    """The dense ResNet-20, from the cache when trained with the same epochs and seed."""
    if path.is_file():
        try:
            model, info = load_checkpoint(path, expect=ref)
        except PrunetuneError as exc:
            say(f"dense cache {path} unusable ({exc}); training again")
        else:
            same = (
                info.model == ref
                and info.dataset == data.name
                and info.metrics.get("epochs") == settings.dense_epochs
                and info.metrics.get("seed") == float(SEED)
            )
            if same:
                say(f"dense model from {path}")
                return model, dict(info.metrics)
    say(f"training the dense resnet20 for {settings.dense_epochs:g} epochs")
    torch.manual_seed(SEED)
    model = ref.build()
    started = time.perf_counter()
    config = TrainConfig(epochs=settings.dense_epochs, seed=SEED, distill_weight=0.0)
    train(model, data, config, on_epoch=lambda report: say("  " + report.line()))
    metrics = {
        "epochs": settings.dense_epochs,
        "seed": float(SEED),
        "train_s": time.perf_counter() - started,
        "test_acc": evaluate(model, data.test)[1],
    }
    info = Checkpoint(ref, data.input_shape(1), dataset=data.name, metrics=metrics)
    save_checkpoint(path, model, info)
    return model, metrics


def finetune_config(settings: Settings) -> TrainConfig:
    """The finetune every method gets: the same epochs, schedule, seed and distillation."""
    return TrainConfig(
        epochs=settings.finetune_epochs,
        lr=FINETUNE_LR,
        batch_size=BATCH_SIZE,
        distill_weight=DISTILL_WEIGHT,
        seed=SEED,
    )


def estimated_flops(model: nn.Module, example: Tensor) -> float | None:
    """Our estimator's FLOPs for any model, by tracing it (``None`` if it cannot be traced)."""
    try:
        graph = ChannelGraph.trace(model, example)
    except PrunetuneError:
        return None
    return float(FlopsModel.from_graph(graph).evaluate(graph.dense_widths()))


def measure(bench: Bench, model: nn.Module) -> dict[str, Any]:
    """Test accuracy, FLOPs (counter and estimator) and parameters of a final model."""
    flops = count_flops(model, bench.example)
    estimate = estimated_flops(model, bench.example)
    return {
        "test_acc": round(evaluate(model, bench.data.test)[1], 4),
        "flops": flops,
        "flops_pct": round(100 * flops / bench.flops.dense, 2),
        "flops_estimator": estimate,
        "flops_agree": estimate is not None and round(estimate) == flops,
        "params": count_params(model),
    }


def add_latencies(bench: Bench, rows: list[dict[str, Any]], models: list[nn.Module | None]) -> None:
    """Latency at batch 1 and 32 of every final model (and the dense one, in ``dense_info``).

    All models are measured in turn, ``LATENCY_ROUNDS`` rounds over (``measure_latencies``), so
    a slow spell of the machine hits every method alike; each keeps its fastest run.
    """
    measured = [(row, model) for row, model in zip(rows, models, strict=True) if model]
    for batch in (1, 32):
        example = torch.zeros(batch, *bench.data.image_shape)
        all_models = [bench.dense, *(model for _, model in measured)]
        ms = measure_latencies(
            all_models,
            example,
            rounds=LATENCY_ROUNDS,
            repeats=LATENCY_REPEATS,
            statistic="min",
            threads=bench.settings.threads,
        )
        bench.dense_info[f"latency_bs{batch}_ms"] = round(float(ms[0]), 3)
        for (row, _), value in zip(measured, ms[1:], strict=True):
            row[f"latency_bs{batch}_ms"] = round(float(value), 3)


def finish_row(bench: Bench, pruned: Pruned, say: Callable[[str], None]) -> dict[str, Any]:
    """The common finetune, then the figures, of one pruned model."""
    row: dict[str, Any] = {
        "target": pruned.target,
        "method": pruned.method,
        "prune_s": round(pruned.prune_s, 1),
        "note": pruned.note,
    }
    if pruned.model is None:
        return row
    torch.manual_seed(SEED)
    started = time.perf_counter()
    train(pruned.model, bench.data, finetune_config(bench.settings), teacher=bench.dense)
    row["finetune_s"] = round(time.perf_counter() - started, 1)
    row.update(measure(bench, pruned.model))
    say(
        f"{pruned.target:g}% {pruned.method}: test {100 * row['test_acc']:.2f}% at "
        f"{row['flops_pct']:.1f}% FLOPs, finetuned in {row['finetune_s']:.0f}s"
    )
    return row


def facts(bench: Bench) -> list[str]:
    """The settings and the dense model, one line each, for the page."""
    s, info = bench.settings, bench.dense_info
    latency = (
        f"{info['latency_bs1_ms']:.2f} ms at batch 1, {info['latency_bs32_ms']:.1f} ms at 32"
        if "latency_bs1_ms" in info
        else "latency not measured"
    )
    return [
        f"data: MNIST test set, {len(bench.data.train)} train / {len(bench.data.val)} val / "
        f"{len(bench.data.test)} test (seed {SEED})",
        f"model: resnet20, dense {bench.flops.dense / 1e6:.2f}M FLOPs, "
        f"{bench.params.dense / 1e6:.3f}M params, {s.dense_epochs:g} epochs, test accuracy "
        f"{100 * info['test_acc']:.2f}%, {latency}",
        f"latency: {s.threads} torch thread(s), the fastest of {LATENCY_ROUNDS} interleaved "
        f"rounds of {LATENCY_REPEATS} runs per model",
        f"every method: {s.finetune_epochs:g} epochs of finetune (lr {FINETUNE_LR}, batch "
        f"{BATCH_SIZE}, distilled at {DISTILL_WEIGHT}); searches: {s.trials} trials, inner "
        f"length {s.inner_epochs:g} epochs, {s.score_steps} score steps",
        *(f"{m} skipped: {why}" for m, why in s.skipped.items()),
    ]


def provenance(threads: int, wall_s: float) -> str:
    """Which command wrote the page, when, on what machine, and how long it took."""
    command = "python scripts/bench_search.py " + shlex.join(sys.argv[1:])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = DeviceInfo.current(threads)
    machine = (
        f"{device.cpu_model}, {os.cpu_count()} CPUs, torch {device.torch_version}, {device.system}"
    )
    return (
        f"Written by `{command.strip()}` on {date}, on {machine}; the run took "
        f"{wall_s / 60:.1f} min. Method and fairness rules: the docstring of "
        "`scripts/bench_search.py`."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (2 for input the user must fix)."""
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    try:
        settings = parse_settings(argv)
        torch.set_num_threads(settings.threads)
        for method, why in settings.skipped.items():
            say(f"skipping {method}: {why}")
        bench = prepare(settings, say)
    except BenchError as exc:
        print(f"bench_search.py: error: {exc}", file=sys.stderr)
        return 2
    say(f"dense test accuracy {100 * bench.dense_info['test_acc']:.2f}%")
    pruned = prune_locally(bench, say)
    rows = [finish_row(bench, one, say) for one in pruned]
    by_search = prune_by_search(bench, say)  # Ray is down again before any latency is measured
    rows += [finish_row(bench, one, say) for one in by_search]
    say("measuring latencies")
    add_latencies(bench, rows, [one.model for one in pruned + by_search])
    rows.sort(key=lambda r: (-r["target"], METHODS.index(r["method"])))
    startup = startup_trials(search_config(bench, settings.targets[0], "search"))
    lines = reading(rows, settings.trials, startup)
    wall_s = time.perf_counter() - started
    text = page(
        "Search benchmark: the full search vs one-shot, Torch-Pruning and random search",
        provenance(settings.threads, wall_s),
        facts(bench),
        rows,
        lines,
    )
    md_path = settings.out_dir / "bench_search.md"
    atomic_write(md_path, lambda path: path.write_text(text, encoding="utf-8"))
    png_path = settings.out_dir / "bench_search.png"
    plot(rows, METHODS, bench.dense_info["test_acc"], png_path)
    print("\n" + table(rows) + "\n\n" + "\n".join(f"- {line}" for line in lines))
    print(f"\nwrote {md_path} and bench_search.png ({wall_s / 60:.1f} min)\n")
    figures = {
        "benchmark": "search",
        "settings": {k: v for k, v in vars(settings).items() if not isinstance(v, Path)},
        "dense": {**bench.dense_info, "flops": bench.flops.dense, "params": bench.params.dense},
        "rows": rows,
        "reading": lines,
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
