"""The methods ``bench_search.py`` compares: what each one prunes a dense model to, at a FLOPs
target (one-shot uniform and global L1, Torch-Pruning, each space alone, random search and the
full search), and the state they share."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef
from prunetune.backend.pruning import one_shot_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.estimators import Budget, FlopsModel, ParamsModel, Target
from prunetune.search import SearchConfig
from prunetune.spaces import SpaceContext, create_space, list_spaces

SEARCHES = ("random-search", "search")
METHODS = ("uniform", "global-l1", "torch-pruning", *list_spaces(), *SEARCHES)
BATCH_SIZE = 64  # every finetune and search step, as the search's default
SEED = 0


@dataclass(frozen=True)
class Settings:
    """The benchmark's knobs, resolved from the flags (``--quick`` changes the defaults)."""

    targets: tuple[float, ...]
    methods: tuple[str, ...]
    trials: int
    dense_epochs: float
    finetune_epochs: float
    inner_epochs: float
    score_steps: int
    threads: int
    quick: bool
    data_dir: Path
    work_dir: Path
    out_dir: Path
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Bench:
    """What every method shares: the data, the trained dense model and its graph and costs."""

    settings: Settings
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
    """One method's pruned model at one target, before the common finetune."""

    target: float
    method: str
    model: nn.Module | None
    prune_s: float
    note: str = ""


def search_config(bench: Bench, target: float, method: str) -> SearchConfig:
    """The search ``method`` runs at ``target`` (also fixes each space's inner run length)."""
    settings = bench.settings
    random = method == "random-search"
    return SearchConfig(
        target=Target.parse(f"flops<={target:g}%"),
        checkpoint=str(bench.dense_path),
        dataset="mnist",
        data_dir=str(settings.data_dir),  # trials run in their own folders: absolute paths
        spaces=("ratios",) if random else (),
        trials=settings.trials,
        sampler="random" if random else "tpe",
        cpus_per_trial=1.0,
        name=f"{method}-{target:g}",
        runs_dir=str(settings.work_dir / "searches"),
        overwrite=True,
        seed=SEED,
        finetune_epochs=0.01,  # the benchmark finetunes the chosen subnet itself
        score_steps=settings.score_steps,
        inner_epochs=settings.inner_epochs,
        batch_size=BATCH_SIZE,
        distill=True,
    )


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
        pruning_ratio=0.95,
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
    macs, _ = tp.utils.count_ops_and_params(model, bench.example)
    return model, f"{done} steps; its own op counter: {macs / 1e6:.2f}M"


def space_alone(bench: Bench, target: float, space: str) -> tuple[nn.Module, str]:
    """One run of ``space`` with its defaults and a search trial's inner length."""
    options = search_config(bench, target, "search").fixed_options(space)
    context = SpaceContext(
        model=bench.dense,
        graph=bench.graph,
        model_ref=bench.ref,
        data=bench.data,
        budget=bench.budget(target),
        seed=SEED,
        batch_size=BATCH_SIZE,
        importance=bench.scores,
    )
    result = create_space(space, **options).run(context)
    start = copy.deepcopy(bench.dense)
    if result.state_dict is not None:
        start.load_state_dict(result.state_dict)
    note = ", ".join(f"{k}={v}" for k, v in options.items())
    return prune_model(start, bench.graph, result.spec), note


def searched(
    bench: Bench, target: float, method: str, say: Callable[[str], None]
) -> tuple[nn.Module, str]:
    """``run_search`` (full or random); its chosen subnet, with the weights its trial scored (as
    the search's own final step starts from them)."""
    from prunetune.search import run_search

    result = run_search(search_config(bench, target, method), say=lambda m: say("  " + m))
    counts = ", ".join(f"{n} {status}" for status, n in result.counts.items() if n)
    note = f"best trial {result.best.space} (val {100 * (result.best.score or 0):.1f}%); {counts}"
    model = prune_model(bench.dense, bench.graph, result.spec)
    if result.best.weights is None:
        return model, note + "; from the dense weights (the trial kept none)"
    model.load_state_dict(torch.load(result.best.weights, map_location="cpu", weights_only=True))
    return model, note


def prune(bench: Bench, target: float, method: str, say: Callable[[str], None]) -> Pruned:
    """One method's pruned model at ``target``, timed; a failure is recorded, not raised."""
    runners: dict[str, Callable[[], tuple[nn.Module, str]]] = {
        "uniform": partial(one_shot, bench, target, "uniform"),
        "global-l1": partial(one_shot, bench, target, "global"),
        "torch-pruning": partial(torch_pruning, bench, target),
        **{space: partial(space_alone, bench, target, space) for space in list_spaces()},
        **{name: partial(searched, bench, target, name, say) for name in SEARCHES},
    }
    started = time.perf_counter()
    try:
        model, note = runners[method]()
    except Exception as exc:  # one broken method must not lose the others' figures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        say(f"{target:g}% {method}: FAILED: {type(exc).__name__}: {first}")
        return Pruned(target, method, None, time.perf_counter() - started, f"failed: {first}")
    seconds = time.perf_counter() - started
    say(f"{target:g}% {method}: pruned in {seconds:.1f}s {note}".rstrip())
    return Pruned(target, method, model, seconds, note)


def prune_locally(bench: Bench, say: Callable[[str], None]) -> list[Pruned]:
    """Every method but the searches, at every target."""
    methods = [m for m in bench.settings.methods if m not in SEARCHES]
    return [prune(bench, t, m, say) for t in bench.settings.targets for m in methods]


def prune_by_search(bench: Bench, say: Callable[[str], None]) -> list[Pruned]:
    """Both searches at every target, in one Ray session (started once, shut down after)."""
    from prunetune.search._cluster import ray_session

    runs = [(t, m) for t in bench.settings.targets for m in bench.settings.methods if m in SEARCHES]
    if not runs:
        return []
    try:
        with ray_session(None):
            return [prune(bench, t, m, say) for t, m in runs]
    except Exception as exc:  # Ray would not start: the other methods' figures still count
        say(f"searches FAILED: {type(exc).__name__}: {exc}")
        return [Pruned(t, m, None, 0.0, f"failed: Ray: {exc}") for t, m in runs]
