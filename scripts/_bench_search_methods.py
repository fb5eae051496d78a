"""The methods ``bench_search.py`` compares and how it costs them: what each one prunes a dense
model to at a FLOPs target (one-shot uniform and global L1, Torch-Pruning, random search and the
full search), the CPU seconds that took, and the finetune jobs that run in a pool of processes.

Compute is counted in CPU seconds (``time.process_time``) of one-thread processes: the benchmark's
own process while it prunes or drives a search, each search trial's process (reported by the
trial itself), each finetune job's process. Wall time is measured too, but on a shared machine it
counts other people's work; CPU time counts (almost) only ours.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prunetune.backend.data import DatasetSplits, Split, load_dataset
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.pruning import one_shot_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.backend.training import steps_per_pass
from prunetune.estimators import Budget, FlopsModel, ParamsModel, Target
from prunetune.search import SearchConfig

SEARCHES = ("random-search", "search")
ONE_SHOT = ("uniform", "global-l1", "torch-pruning")
METHODS = (*ONE_SHOT, *SEARCHES)
BATCH_SIZE = 64  # every finetune and search step, as the search's default
FINETUNE_LR = 0.01
DISTILL_WEIGHT = 0.7
CALIBRATION_STEPS = 12
SEARCH_ATTEMPTS = 3
TRAIN_VAL_IMAGES = 64  # validation images a finetune job reports on each epoch (not scored)


class BenchError(Exception):
    """Bad input the user must fix: printed in one line, exit code 2."""


@dataclass(frozen=True)
class Settings:
    """The benchmark's knobs, resolved from the flags (``--quick`` changes the defaults)."""

    targets: tuple[float, ...]
    once: tuple[float, ...]
    seeds: int
    methods: tuple[str, ...]
    trials: int
    train_images: int
    val_images: int
    image_size: int
    dense_epochs: float
    finetune_epochs: float
    compute_epochs: float
    inner_epochs: float
    score_steps: int
    rescore_top: int
    rescore_steps: int
    quick: bool
    data_dir: Path
    work_dir: Path
    out_dir: Path
    skipped: dict[str, str] = field(default_factory=dict)
    first_seed: int = 0  # seeds run: first_seed .. first_seed + seeds - 1

    def targets_of(self, seed: int) -> tuple[float, ...]:
        """The targets run with ``seed``: every target, and the ``once`` ones with seed 0."""
        return self.targets + (self.once if seed == 0 else ())


def split(settings: Settings, seed: int) -> DatasetSplits:
    """The harder MNIST task of one seed: ``train_images`` to learn from, ``val_images`` to
    choose on, every other image of the MNIST test set to score the final models, every image
    shrunk from 28 x 28 to ``image_size`` x ``image_size`` pixels (area averaging).

    Smaller images make the task harder and every step about 3x cheaper at 14 x 14 (one
    distilled ResNet-20 step at batch 64: 0.45 CPU-s at 28 x 28, 0.15 at 14 x 14 on the shared
    2-core machine), which is what lets a grid of seeds fit the benchmark's time.

    Raises:
        PrunetuneError: the data directory is missing or unreadable; ValueError: the sizes leave
            no test images.
    """
    total = 10_000  # the MNIST test set (t10k), the only MNIST files at hand
    learn = settings.train_images + settings.val_images
    if not 0 < learn < total:
        raise ValueError(f"train + val images must be between 1 and {total - 1}, got {learn}")
    data = load_dataset(
        "mnist",
        root=settings.data_dir,
        seed=seed,
        val_fraction=settings.val_images / learn,
        test_fraction=1 - learn / total,
    )
    if settings.image_size == data.image_shape[-1]:
        return data
    size = (settings.image_size, settings.image_size)
    # averaging is linear, so the normalised images keep their mean (the std shrinks a little)

    def shrunk(part: Split) -> Split:
        return Split(F.interpolate(part.x, size=size, mode="area"), part.y)

    return replace(data, train=shrunk(data.train), val=shrunk(data.val), test=shrunk(data.test))


@dataclass
class Bench:
    """What every method of one seed shares: the data, the trained dense model and its costs."""

    settings: Settings
    seed: int
    data: DatasetSplits
    ref: ModelRef
    dense: nn.Module
    dense_path: Path
    dense_info: dict[str, float]
    graph: ChannelGraph
    flops: FlopsModel
    params: ParamsModel
    scores: dict[str, Tensor]
    example: Tensor

    def budget(self, target: float) -> Budget:
        """The FLOPs target ``target``% of the dense model, resolved."""
        return Target.parse(f"flops<={target:g}%").resolve({"flops": self.flops})


@dataclass
class Pruned:
    """One method's pruned model at one target, before any finetune, and what it cost."""

    target: float
    method: str
    model: nn.Module | None
    prune_s: float
    cpu_s: float
    note: str = ""
    trials_cpu_s: float = 0.0  # a search's: the part of cpu_s its trials' processes spent


def search_config(job: SearchJob) -> SearchConfig:
    """The search a job runs (the benchmark finetunes the chosen subnet itself)."""
    settings, target, method = job.settings, job.target, job.method
    random = method == "random-search"
    return SearchConfig(
        target=Target.parse(f"flops<={target:g}%"),
        checkpoint=str(job.dense_path),
        dataset="python",  # the benchmark's split, shipped to the trials through Ray
        spaces=("ratios",) if random else (),
        trials=settings.trials,
        sampler="random" if random else "tpe",
        cpus_per_trial=1.0,
        name=f"{method}-{target:g}-s{job.seed}",
        runs_dir=str(settings.work_dir / "searches"),
        overwrite=True,
        seed=job.seed,
        finetune_epochs=0.01,  # the benchmark finetunes the chosen subnet itself
        score_steps=settings.score_steps,
        rescore_top=settings.rescore_top,
        rescore_steps=settings.rescore_steps,
        inner_epochs=settings.inner_epochs,
        batch_size=BATCH_SIZE,
        distill=True,
    )


@dataclass(frozen=True)
class SearchJob:
    """One search, run in a process of its own (see :func:`searched`)."""

    settings: Settings
    seed: int
    target: float
    method: str
    dense_path: Path


def one_shot(bench: Bench, target: float, allocation: str) -> tuple[nn.Module, str]:
    """Uniform or global-L1 one-shot widths, pruned from the dense weights."""
    widths = one_shot_widths(bench.graph, bench.budget(target).fits, allocation, bench.scores)
    spec = SubnetSpec.from_widths(bench.graph, bench.ref, widths, bench.scores)
    return prune_model(bench.dense, bench.graph, spec), ""


def torch_pruning(bench: Bench, target: float, steps: int = 400) -> tuple[nn.Module, str]:
    """Torch-Pruning's global L1 magnitude pruner, stepped until our FLOPs count fits.

    Raises:
        PrunetuneError: the target is not reached within ``steps`` steps.
    """
    import torch_pruning as tp

    model = copy.deepcopy(bench.dense).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        model,
        bench.example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        global_pruning=True,
        pruning_ratio=0.98,
        iterative_steps=steps,
        ignored_layers=[classifier],
    )
    limit = bench.budget(target).limits["flops"]
    done = 0
    while count_flops(model, bench.example) > limit:
        if done == steps:
            raise PrunetuneError(f"Torch-Pruning did not reach {target:g}% FLOPs in {steps} steps")
        pruner.step()
        done += 1
    return model, f"{done} Torch-Pruning steps"


_RAY: contextlib.ExitStack | None = None  # the search process's Ray session


def start_search_process() -> None:
    """Start Ray once in the process that runs every search (:func:`searched`): one Ray start
    per benchmark instead of one per search, and trial workers that stay warm between searches.

    Ray starts its workers at nice 15; here the trials compete with the finetune pool, whose
    processes run at the benchmark's own priority, so they get the same.
    """
    from prunetune.search._cluster import ray_session

    global _RAY
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # held open for the process's life (a dropped generator-based context manager would be
    # closed by the garbage collector, which shuts Ray down); Ray's exit hook ends it
    _RAY = contextlib.ExitStack()
    _RAY.enter_context(ray_session(None))


def run_search_job(job: SearchJob) -> dict[str, Any]:
    """Run one search in this (child) process, on the Ray session it started.

    The search gets the benchmark's train and val splits, its test split cut to a few images
    (its own final test score is not used, and would cost it CPU time). Returns its chosen
    subnet (spec and the weights its final finetune would start from), a note, the CPU seconds
    of this process during ``run_search`` (Ray's start and stop are not counted) and of its
    trials, and the wall seconds of ``run_search``.
    """
    from prunetune.search import run_search

    data = split(job.settings, job.seed)
    data = replace(data, test=data.val.subset(TRAIN_VAL_IMAGES))
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run_search(search_config(job), say=lambda m: print("  " + m, flush=True), data=data)
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - started
    counts = ", ".join(f"{n} {status}" for status, n in result.counts.items() if n)
    rescored = [c for c in result.candidates if c.rescore is not None]
    pairs = [f"{c.space} {100 * c.score:.1f}->{100 * (c.rescore or 0):.1f}" for c in rescored]
    second = f"; scored again: {', '.join(pairs)}" if pairs else ""
    note = (
        f"chose {result.best.space} (val {100 * (result.best.score or 0):.1f}% on "
        f"{result.val_size}){second}; {counts}"
    )
    if result.start_state is None:
        note += "; from the dense weights (the trial kept none)"
    return {
        "spec": result.spec.to_dict(),
        "state": result.start_state,
        "note": note,
        "driver_cpu_s": cpu,
        "trials_cpu_s": result.trials_cpu_s,
        "wall_s": wall,
    }


_SEARCHER: ProcessPoolExecutor | None = None  # the process every search runs in


def close_search_process() -> None:
    """End the search process (and its Ray), if one runs."""
    global _SEARCHER
    if _SEARCHER is not None:
        _SEARCHER.shutdown(cancel_futures=True)
        _SEARCHER = None


def searched(
    bench: Bench, target: float, method: str, say: Callable[[str], None]
) -> tuple[nn.Module, str, float, float, float]:
    """``run_search`` (full or random) in the search process (one for the whole benchmark,
    started again, with its Ray, when it dies: on a shared machine someone may stop every Ray
    session, which ends its driver), retried then.

    Returns the chosen subnet with the weights its final finetune would start from, a note, the
    search's CPU seconds (its driver's and its trials'), the trials' share of them, and its wall
    seconds.

    Raises:
        RuntimeError: every attempt failed (the last error).
    """
    global _SEARCHER
    job = SearchJob(bench.settings, bench.seed, target, method, bench.dense_path)
    last: BaseException | None = None
    for attempt in range(1, SEARCH_ATTEMPTS + 1):
        if _SEARCHER is None:
            context = multiprocessing.get_context("spawn")
            _SEARCHER = ProcessPoolExecutor(1, context, initializer=start_search_process)
        try:
            out = _SEARCHER.submit(run_search_job, job).result()
        except Exception as exc:  # the process died, or its search raised: a fresh one
            last = exc
            say(f"seed {bench.seed} {target:g}% {method}: attempt {attempt} failed: {exc}")
            close_search_process()
            continue
        model = prune_model(bench.dense, bench.graph, SubnetSpec.from_dict(out["spec"]))
        if out["state"] is not None:
            model.load_state_dict(out["state"])
        note = out["note"] + (f"; attempt {attempt}" if attempt > 1 else "")
        cpu = out["driver_cpu_s"] + out["trials_cpu_s"]
        return model, note, cpu, out["trials_cpu_s"], out["wall_s"]
    raise RuntimeError(f"{SEARCH_ATTEMPTS} attempts failed; last: {last}")


def prune(bench: Bench, target: float, method: str, say: Callable[[str], None]) -> Pruned:
    """One method's pruned model at ``target``, timed (wall and CPU); a failure is recorded,
    not raised."""
    runners: dict[str, Callable[[], tuple[nn.Module, str]]] = {
        "uniform": partial(one_shot, bench, target, "uniform"),
        "global-l1": partial(one_shot, bench, target, "global"),
        "torch-pruning": partial(torch_pruning, bench, target),
    }
    started, cpu_started = time.perf_counter(), time.process_time()
    trials_cpu = 0.0
    try:
        if method in SEARCHES:
            model, note, cpu, trials_cpu, seconds = searched(bench, target, method, say)
        else:
            model, note = runners[method]()
            cpu, seconds = time.process_time() - cpu_started, time.perf_counter() - started
    except Exception as exc:  # one broken method must not lose the others' figures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        say(f"seed {bench.seed} {target:g}% {method}: FAILED: {type(exc).__name__}: {first}")
        return Pruned(target, method, None, time.perf_counter() - started, 0.0, f"failed: {first}")
    say(
        f"seed {bench.seed} {target:g}% {method}: pruned in {seconds:.1f}s wall, {cpu:.1f} CPU-s "
        f"{note}".rstrip()
    )
    return Pruned(target, method, model, seconds, cpu, note, trials_cpu)


@dataclass(frozen=True)
class Job:
    """One finetune to run in a worker process: a pruned model, its teacher and its length."""

    key: tuple[Any, ...]
    model: nn.Module
    teacher: nn.Module
    settings: Settings
    seed: int
    epochs: float
    budget_cpu_s: float | None = None  # when set, the epochs that spend it (at least one)


_SPLITS: dict[tuple[Any, ...], DatasetSplits] = {}


def init_worker() -> None:
    """Every finetune process computes on one thread (so CPU seconds compare across them), and
    pays its one-off costs (lazy imports, the allocator's first blocks) on a throw-away step
    here, part of process start-up, not of the first finetune it runs."""
    torch.set_num_threads(1)
    model = ModelRef("resnet20", {"num_classes": 10, "in_channels": 1}).build()
    labels = torch.zeros(BATCH_SIZE, dtype=torch.long)
    F.cross_entropy(model(torch.randn(BATCH_SIZE, 1, 14, 14)), labels).backward()


def run_job(job: Job) -> dict[str, Any]:
    """Finetune ``job.model`` (distilled from the dense model) and measure it on the test split.

    With ``job.budget_cpu_s`` the length is the number of steps that spends that many CPU
    seconds (at least one epoch): the CPU cost of a step of this model is measured first on a
    copy (:func:`cpu_per_step`, not counted). Its validation report each epoch uses only
    ``TRAIN_VAL_IMAGES`` images, so nearly all of the job's CPU time is training. Returns the
    key, test accuracy, FLOPs, parameters, the finetune's epochs and its CPU and wall seconds
    (the test evaluation is not counted).
    """
    s = job.settings
    cache_key = (s.data_dir, s.train_images, s.val_images, s.image_size, job.seed)
    if cache_key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[cache_key] = split(job.settings, job.seed)
    data = _SPLITS[cache_key]
    small = replace(data, val=data.val.subset(TRAIN_VAL_IMAGES))
    model, epochs = job.model, job.epochs
    per_step = None
    if job.budget_cpu_s is not None:
        per_step = cpu_per_step(copy.deepcopy(model), job.teacher, small, job.seed)
        per_pass = steps_per_pass(small.train, BATCH_SIZE)
        epochs = round(max(1.0, job.budget_cpu_s / per_step / per_pass), 2)
    config = TrainConfig(
        epochs=epochs,
        lr=FINETUNE_LR,
        batch_size=BATCH_SIZE,
        distill_weight=DISTILL_WEIGHT,
        seed=job.seed,
    )
    torch.manual_seed(job.seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    train(model, small, config, teacher=job.teacher)
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - started
    example = torch.zeros(data.input_shape(1))
    return {
        "key": job.key,
        "test_acc": round(evaluate(model, data.test)[1], 5),
        "flops": count_flops(model, example),
        "params": count_params(model),
        "finetune_epochs": epochs,
        "finetune_cpu_s": round(cpu_s, 2),
        "finetune_s": round(wall_s, 2),
        **({"cpu_per_step": round(per_step, 4)} if per_step is not None else {}),
    }


def cpu_per_step(model: nn.Module, teacher: nn.Module, data: DatasetSplits, seed: int) -> float:
    """CPU seconds one distilled finetune step of ``model`` costs here: the mean of steps 3 to
    12 of a throw-away finetune (the first steps pay one-off costs)."""
    marks: list[float] = []
    per_pass = steps_per_pass(data.train, BATCH_SIZE)
    config = TrainConfig(
        epochs=CALIBRATION_STEPS / per_pass, lr=FINETUNE_LR, batch_size=BATCH_SIZE,
        distill_weight=DISTILL_WEIGHT, seed=seed,
    )  # fmt: skip
    train(
        model, data, config, teacher=teacher, on_step=lambda *_: marks.append(time.process_time())
    )
    return (marks[-1] - marks[1]) / (len(marks) - 2)
