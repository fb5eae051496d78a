"""Benchmark the full search against one-shot pruning, Torch-Pruning and random search, at equal
finetune and at equal total compute, over several seeds (a hard MNIST task).

    python scripts/bench_search.py [--quick] [--data-dir ../shared/data/mnist-t10k]

``--quick`` checks the whole pipeline in a few minutes on tiny settings and writes its page, plot
and figures to the work directory, never to ``docs/``. How long the defaults take, and on what
machine, is on the page they write (``docs/bench_search.md``).

Task. Plain MNIST saturates (uniform pruning to 10% of the FLOPs plus a long finetune loses 0.2
points), so every seed draws a harder one from the MNIST test set at ``--data-dir`` (the only
MNIST files here): ``--train-images`` images to learn from (default 1,000, about 100 per class),
``--val-images`` to choose on (default 1,000: every search chooses on validation only) and the
other images (8,000) to score the final models, every image shrunk to ``--image-size`` pixels
square (default 14, by area averaging: harder, and each training step about 3x cheaper than at
28). Model: the zoo's ResNet-20 (1 input channel), trained dense for ``--dense-epochs`` per seed
(cached in ``--work-dir``).

Grid. ``--seeds`` seeds (default 3) at each of ``--targets`` (default 25, 10 and 5% of the dense
FLOPs) and seed 0 alone at each of ``--once`` (default 50 and 2%). A seed redraws the split, the
dense training, every search and every finetune's order.

Methods, at each seed and target: ``uniform`` (one keep ratio for every channel group),
``global-l1`` (channels ranked by L1 norm across groups), ``torch-pruning`` (Torch-Pruning's
global magnitude pruner, ``GroupMagnitudeImportance(p=1)``, stepped until our FLOPs count fits;
skipped with a note when Torch-Pruning is not installed), ``random-search`` (``run_search`` over
the ``ratios`` space with the random sampler) and ``search`` (the full ``run_search``: every
space, TPE). Both searches run ``--trials`` trials, two at a time (one CPU and one thread each),
score every trial after ``--score-steps`` steps of distilled finetune, score the best
``--rescore-top`` again after ``--rescore-steps`` more, and hand back their chosen subnet with the
weights their final finetune would start from; the benchmark finetunes it itself.

Two comparisons:

- **equal finetune**: every method's pruned model gets the same ``--finetune-epochs`` of
  finetune (lr 0.01, batch 64, distilled from the dense model at 0.7, seeded by the seed);
- **equal compute**: the budget is the full search's cost plus ``--compute-epochs`` (default
  20) of finetune of its subnet; the search's subnet gets that long finetune, and every other
  method a finetune lengthened (in epochs, from the CPU seconds a step of its own model costs)
  until its pruning (or random search) plus finetune spends the same budget.

Compute is CPU seconds (``time.process_time``) of one-thread processes: this process while it
prunes or drives a search (Tune's driver loop, the re-scoring, the search's export), each
trial's own process (reported by the trial), and each finetune's process (finetunes run in a
pool of two processes). On a machine shared with other work, wall time counts their work too;
CPU seconds count ours. Not counted: Ray's daemons, process start-up, and test evaluation. Wall
times are reported beside.

Output: ``bench_search.md`` (both tables as mean ± standard deviation over the seeds, the
compute, every run's figures, the reading) and ``bench_search.png`` (both comparisons with error
bars) in ``--out-dir`` (default ``docs/``; the work directory with ``--quick``), and
``results.json`` in the work directory, rewritten after every seed so a cut-short run keeps what
it finished (``python scripts/bench_search.py --render OUT_DIR RESULTS.json...`` writes the page
and plot again from one or more runs' results: ``--first-seed`` splits one grid over processes).
The last line printed is one JSON object with every figure.

Torch-Pruning is not a dependency of prunetune; install it for the benchmark only:
``.venv/bin/pip install -c constraints.txt torch-pruning``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from _bench_search_methods import (
    METHODS,
    Bench,
    BenchError,
    Job,
    Pruned,
    Settings,
    close_search_process,
    init_worker,
    prune,
    run_job,
    split,
)
from _bench_search_results import code_commit, merged, render, write
from torch import nn

from prunetune.backend.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunetune.backend.data import DatasetSplits
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.io import check_writable
from prunetune.backend.models import ModelRef
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.estimators import FlopsModel, ParamsModel, Target

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist-t10k"
DENSE_THREADS = 1  # two threads on a busy 2-core machine spin more than they compute
# 3 seeds at 25, 10 and 5%, seed 0 alone at 50 and 2%; 6 trials per search (the search's own
# default is 8): one per space, then 2 that TPE proposes from the first results
FULL: dict[str, Any] = dict(
    targets="25,10,5", once="50,2", seeds=3, trials=6, train_images=1000, val_images=1000,
    image_size=14, dense_epochs=20.0, finetune_epochs=3.0, compute_epochs=20.0, inner_epochs=1.0,
    score_steps=20, rescore_top=3, rescore_steps=20,
)  # fmt: skip
QUICK: dict[str, Any] = dict(
    targets="10", once="", seeds=1, trials=2, train_images=300, val_images=200, image_size=14,
    dense_epochs=1.0, finetune_epochs=0.5, compute_epochs=1.0, inner_epochs=1.0, score_steps=3,
    rescore_top=2, rescore_steps=2,
)  # fmt: skip
_NUMBERS = (
    ("seeds", int, "seeds at every --targets target"),
    ("trials", int, "trials of each search"),
    ("train-images", int, "images to learn from"),
    ("val-images", int, "images to choose on"),
    ("image-size", int, "side of the images in pixels (MNIST's 28 shrunk by area averaging)"),
    ("dense-epochs", float, "epochs of dense training"),
    ("finetune-epochs", float, "epochs of the equal finetune"),
    ("compute-epochs", float, "epochs of the full search's finetune in the equal-compute table"),
    ("inner-epochs", float, "length of one space run in a trial"),
    ("score-steps", int, "steps of a trial's score finetune"),
    ("rescore-top", int, "trials scored again before choosing (0: none)"),
    ("rescore-steps", int, "steps of that second score finetune"),
)


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
    parser.add_argument("--work-dir", type=Path, help="dense caches, searches, results.json")
    parser.add_argument("--out-dir", type=Path, help="page and plot (default docs/)")
    parser.add_argument("--targets", help=f"FLOPs targets in %% (default {FULL['targets']})")
    parser.add_argument("--once", help=f"targets run with seed 0 only (default {FULL['once']})")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument(
        "--first-seed", type=int, default=0,
        help="first seed (default 0): split one grid over processes, then --render their results",
    )  # fmt: skip
    for flag, kind, what in _NUMBERS:
        default = FULL[flag.replace("-", "_")]
        parser.add_argument(f"--{flag}", type=kind, help=f"{what} (default {default:g})")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    pick = {key: value if (value := getattr(args, key)) is not None else defaults[key]
            for key in FULL}  # fmt: skip
    for flag, _, _ in _NUMBERS:
        key = flag.replace("-", "_")
        least = 0 if key == "rescore_top" else 1e-9
        if not pick[key] >= least:
            raise BenchError(f"--{flag} must be {'>= 0' if least == 0 else 'positive'}, got "
                             f"{pick[key]}")  # fmt: skip
    if not 8 <= pick["image_size"] <= 28:
        raise BenchError(f"--image-size must be between 8 and 28 pixels, got {pick['image_size']}")
    if args.first_seed < 0:
        raise BenchError(f"--first-seed must be >= 0, got {args.first_seed}")
    work_dir = args.work_dir or REPO / "runs" / f"bench_search{'_quick' if args.quick else ''}"
    methods, skipped = _methods(args.methods)
    return Settings(
        targets=_targets(str(pick["targets"]), "--targets"),
        once=_targets(str(pick["once"]), "--once", empty=True),
        seeds=int(pick["seeds"]),
        methods=methods,
        trials=int(pick["trials"]),
        train_images=int(pick["train_images"]),
        val_images=int(pick["val_images"]),
        image_size=int(pick["image_size"]),
        dense_epochs=float(pick["dense_epochs"]),
        finetune_epochs=float(pick["finetune_epochs"]),
        compute_epochs=float(pick["compute_epochs"]),
        inner_epochs=float(pick["inner_epochs"]),
        score_steps=int(pick["score_steps"]),
        rescore_top=int(pick["rescore_top"]),
        rescore_steps=int(pick["rescore_steps"]),
        quick=args.quick,
        data_dir=args.data_dir.resolve(),
        work_dir=work_dir.resolve(),
        out_dir=(args.out_dir or (work_dir if args.quick else REPO / "docs")).resolve(),
        skipped=skipped,
        first_seed=args.first_seed,
    )


def _targets(text: str, flag: str, empty: bool = False) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise BenchError(f"{flag} {text!r} must be percentages like 25,10,5") from None
    if (not targets and not empty) or not all(0 < t < 100 for t in targets):
        raise BenchError(f"{flag} {text!r} must be percentages between 0 and 100")
    return targets


def _methods(text: str | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The methods to run, and those skipped (torch-pruning when not installed) with why."""
    named = tuple(m.strip() for m in (text or "").split(",") if m.strip()) or METHODS
    unknown = [m for m in named if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if "search" not in named:
        raise BenchError("--methods must include search: every other method is costed against it")
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


def check(settings: Settings) -> None:
    """Fail before any training: unreadable data, unwritable outputs, infeasible targets.

    Raises:
        BenchError: what is wrong and how to fix it.
    """
    try:
        check_writable(settings.work_dir, directory=True)
        check_writable(settings.out_dir, directory=True)
        data = split(settings, 0)
    except (PrunetuneError, ValueError) as exc:
        raise BenchError(f"{exc} (--data-dir: the MNIST t10k IDX files)") from None
    ref = _ref(data)
    flops = FlopsModel.from_graph(ChannelGraph.trace(ref.build(), torch.zeros(data.input_shape(1))))
    for target in settings.targets + settings.once:
        try:
            Target.parse(f"flops<={target:g}%").resolve({"flops": flops})
        except (PrunetuneError, ValueError) as exc:
            raise BenchError(str(exc)) from None


def _ref(data: DatasetSplits) -> ModelRef:
    return ModelRef("resnet20", {"num_classes": data.num_classes, "in_channels": data.in_channels})


def prepare(settings: Settings, seed: int, say: Callable[[str], None]) -> Bench:
    """One seed's split, dense model (trained or from the cache), graph and channel scores."""
    data = split(settings, seed)
    ref = _ref(data)
    example = torch.zeros(data.input_shape(1))
    path = settings.work_dir / f"dense-s{seed}.pt"
    dense, info = dense_model(settings, seed, data, ref, path, say)
    graph = ChannelGraph.trace(dense, example)
    return Bench(
        settings=settings,
        seed=seed,
        data=data,
        ref=ref,
        dense=dense,
        dense_path=path,
        dense_info=info,
        graph=graph,
        flops=FlopsModel.from_graph(graph),
        params=ParamsModel.from_graph(graph),
        scores=channel_importance(dense, graph, "l1"),
        example=example,
    )


def dense_model(
    settings: Settings,
    seed: int,
    data: DatasetSplits,
    ref: ModelRef,
    path: Path,
    say: Callable[[str], None],
) -> tuple[nn.Module, dict[str, float]]:
    """The dense ResNet-20 of one seed, from the cache when trained the same way."""
    wanted = {
        "epochs": settings.dense_epochs,
        "seed": float(seed),
        "train_images": float(settings.train_images),
        "val_images": float(settings.val_images),
        "image_size": float(settings.image_size),
    }
    if path.is_file():
        try:
            model, info = load_checkpoint(path, expect=ref)
        except PrunetuneError as exc:
            say(f"dense cache {path} unusable ({exc}); training again")
        else:
            if all(info.metrics.get(k) == v for k, v in wanted.items()):
                say(f"seed {seed}: dense model from {path}")
                return model, dict(info.metrics)
    say(f"seed {seed}: training the dense resnet20 for {settings.dense_epochs:g} epochs")
    torch.manual_seed(seed)
    model = ref.build()
    started = time.perf_counter()
    torch.set_num_threads(DENSE_THREADS)
    try:
        config = TrainConfig(epochs=settings.dense_epochs, seed=seed, distill_weight=0.0)
        train(model, data, config, on_epoch=lambda r: None if r.epoch % 5 else say(f"  {r.line()}"))
    finally:
        torch.set_num_threads(1)
    metrics = {
        **wanted,
        "train_s": time.perf_counter() - started,
        "test_acc": evaluate(model, data.test)[1],
    }
    save_checkpoint(path, model, Checkpoint(ref, data.input_shape(1), data.name, metrics))
    say(f"seed {seed}: dense test accuracy {100 * metrics['test_acc']:.2f}%")
    return model, metrics


def run_seed(
    settings: Settings, seed: int, pool: ProcessPoolExecutor, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every method at every target of one seed; returns its rows and its dense model's facts.

    Order: target by target, every prune and search (one at a time, each search in a child
    process with its own Ray). A target's equal-finetune jobs go to the pool as soon as its
    methods are pruned, and its equal-compute jobs as soon as the full search's finetune has
    measured what an epoch of its subnet costs; both run while the next targets' searches do,
    which keeps the cores busy while Ray starts and the searches wait between trials.
    """
    bench = prepare(settings, seed, say)
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    futures: list[tuple[Job, Future[dict[str, Any]]]] = []
    waiting: dict[float, list[Pruned]] = {}  # targets whose equal-compute jobs wait for a cost
    for target in settings.targets_of(seed):
        pruned = [prune(bench, target, method, say) for method in settings.methods]
        for p in pruned:
            key = (target, p.method, "finetune")
            rows[key] = _row(bench, p, "finetune")
            if p.model is not None:
                job = Job(key, p.model, bench.dense, settings, seed, settings.finetune_epochs)
                futures.append((job, pool.submit(run_job, job)))
        waiting[target] = pruned
        _harvest(futures, rows, say)
        futures += _compute_jobs(bench, waiting, rows, pool, futures)
    while futures or waiting:
        _harvest(futures, rows, say, block=True)
        futures += _compute_jobs(bench, waiting, rows, pool, futures)
    for row in rows.values():
        if "finetune_cpu_s" in row:
            row["total_cpu_s"] = round(row["prune_cpu_s"] + row["finetune_cpu_s"], 1)
            row["total_s"] = round(row["prune_s"] + row["finetune_s"], 1)
    return list(rows.values()), {k: float(v) for k, v in bench.dense_info.items()}


def _compute_jobs(
    bench: Bench,
    waiting: dict[float, list[Pruned]],
    rows: dict[tuple[Any, ...], dict[str, Any]],
    pool: ProcessPoolExecutor,
    pending: list[tuple[Job, Future[dict[str, Any]]]],
) -> list[tuple[Job, Future[dict[str, Any]]]]:
    """Submit the equal-compute jobs of every waiting target whose full search's finetune has
    finished (a target whose search or its finetune failed gets none, and waits no more).

    The budget: the full search plus ``compute_epochs`` of finetune of its subnet (CPU cost per
    epoch from its equal-finetune run); every method spends it all.
    """
    settings, submitted = bench.settings, []
    for target in list(waiting):
        search = rows.get((target, "search", "finetune"), {})
        if any(job.key == (target, "search", "finetune") for job, _ in pending):
            continue
        pruned = waiting.pop(target)
        if "test_acc" not in search:
            continue
        found = next(p for p in pruned if p.method == "search")
        per_epoch = search["finetune_cpu_s"] / search["finetune_epochs"]
        budget = found.cpu_s + settings.compute_epochs * per_epoch
        for p in pruned:
            if p.model is None:
                continue
            key = (target, p.method, "compute")
            rows[key] = {**_row(bench, p, "compute"), "budget_cpu_s": round(budget, 1)}
            # the pool pickled p.model for its first finetune: p.model itself is still untrained
            if p.method == "search":
                job = Job(key, p.model, bench.dense, settings, bench.seed, settings.compute_epochs)
            else:
                left = budget - p.cpu_s
                job = Job(key, p.model, bench.dense, settings, bench.seed, 1.0, budget_cpu_s=left)
            submitted.append((job, pool.submit(run_job, job)))
    return submitted


def _row(bench: Bench, p: Pruned, table: str) -> dict[str, Any]:
    return {
        "seed": bench.seed,
        "target": p.target,
        "method": p.method,
        "table": table,
        "prune_s": round(p.prune_s, 1),
        "prune_cpu_s": round(p.cpu_s, 1),
        "trials_cpu_s": round(p.trials_cpu_s, 1),
        "note": p.note,
        "dense_flops": bench.flops.dense,
    }


def _harvest(
    futures: list[tuple[Job, Future[dict[str, Any]]]],
    rows: dict[tuple[Any, ...], dict[str, Any]],
    say: Callable[[str], None],
    block: bool = False,
) -> None:
    """Fill the rows of the finished jobs (with ``block``: wait for the first one to finish)
    and drop them from ``futures``; a failure is noted in its row."""
    if block and futures:
        wait([future for _, future in futures], return_when=FIRST_COMPLETED)
    for job, future in [(j, f) for j, f in futures if f.done()]:
        futures.remove((job, future))
        row = rows[job.key]
        try:
            result = future.result()
        except Exception as exc:  # one failed finetune must not lose the others
            row["note"] = f"{row['note']}; finetune failed: {type(exc).__name__}: {exc}".strip("; ")
            say(f"{job.key}: finetune FAILED: {exc}")
            continue
        result.pop("key")
        row.update(result)
        row["flops_pct"] = round(100 * row["flops"] / row["dense_flops"], 2)
        target, method, table = job.key
        say(
            f"seed {job.seed} {target:g}% {method} ({table}): test {100 * row['test_acc']:.2f}% "
            f"at {row['flops_pct']:.1f}% FLOPs after {row['finetune_epochs']:g} epochs "
            f"({row['finetune_cpu_s']:.0f} CPU-s, {row['finetune_s']:.0f}s wall)"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (2 for input the user must fix)."""
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    if argv is None and sys.argv[1:2] == ["--render"]:  # page and plot again from results
        if len(sys.argv) < 4:
            print("usage: bench_search.py --render OUT_DIR RESULTS.json...", file=sys.stderr)
            return 2
        try:
            render(merged([Path(p) for p in sys.argv[3:]]), Path(sys.argv[2]))
        except BenchError as exc:
            print(f"bench_search.py: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        settings = parse_settings(argv)
        check(settings)
    except BenchError as exc:
        print(f"bench_search.py: error: {exc}", file=sys.stderr)
        return 2
    code_commit()  # the code that runs, even if the checkout changes while it runs
    torch.set_num_threads(1)
    for method, why in settings.skipped.items():
        say(f"skipping {method}: {why}")
    rows: list[dict[str, Any]] = []
    dense: dict[int, dict[str, float]] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process running Ray or torch
    with ProcessPoolExecutor(2, mp_context=context, initializer=init_worker) as pool:
        try:
            for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
                seed_rows, dense[seed] = run_seed(settings, seed, pool, say)
                rows += seed_rows
                write(settings, rows, dense, time.perf_counter() - started, finished=False)
                say(f"seed {seed} done; figures so far in {settings.work_dir / 'results.json'}")
        finally:
            close_search_process()
    wall_s = time.perf_counter() - started
    figures = write(settings, rows, dense, wall_s, finished=True)
    print("\n" + "\n".join(f"- {line}" for line in figures["reading"]))
    print(f"\nwrote {settings.out_dir / 'bench_search.md'} and .png ({wall_s / 60:.1f} min)\n")
    print(json.dumps(figures, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
