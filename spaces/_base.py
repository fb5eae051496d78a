"""The search-space plug-in point: ``Space``, its registry, and the final step all spaces share.

Lifecycle of a space:

1. ``create_space(name, **options)`` builds it; unknown names and options fail here, before any
   training, with the valid choices.
2. ``Space.search_space(graph)`` (class method) declares the hyper-parameters for Ray Tune;
   the outer search samples them and calls ``create_space(name, **sampled)``.
3. ``space.run(context, report)`` runs the inner optimisation from ``context.model`` (never
   modified in place) on the training split, choosing on the validation split, and calls
   ``report(metrics)`` with the standard names (``acc``, ``flops``, ``params``, ``latency_ms``,
   ``feasible``) plus its own, so the outer search can show progress and stop weak runs.
4. It ends with :func:`finalize`: integer widths, kept indices, an exact check against every
   limit of the budget, and a :class:`SubnetSpec`, returned in a :class:`SpaceResult`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.models import ModelRef
from prunetune.backend.pruning import alignment, check_round_to, cost_widths, normalised_importance
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.training import Runtime, Task, batches, endless, evaluate
from prunetune.estimators import Budget

__all__ = [
    "Report",
    "Space",
    "SpaceContext",
    "SpaceResult",
    "create_space",
    "finalize",
    "list_spaces",
    "register_space",
]

Report = Callable[[dict[str, Any]], None]
_REGISTRY: dict[str, type[Space]] = {}


@dataclass
class SpaceContext:
    """Everything a space's inner run needs about the model, the data and the target.

    Attributes:
        model: the dense model (pretrained or not); spaces work on copies.
        graph: its channel graph.
        model_ref: its identity, recorded in the spec.
        data: the dataset's splits: ``train`` to learn on, ``val`` to choose on.
        budget: the resolved target, with the cost estimators that check it.
        seed: seeds every random choice of the run.
        batch_size: examples per training step.
        importance: per-channel scores by group (L1 of the dense weights when not given).
        round_to: final widths are multiples of this (and of each group's step) where the
            group is that wide (:func:`prunetune.backend.pruning.alignment`); 8 or 16 suit CPU
            kernels.
        task: the model output used, the loss and the metric every inner loop uses; spaces
            report the metric under its own name.
        runtime: the device and precision of every inner loop.
    """

    model: nn.Module
    graph: ChannelGraph
    model_ref: ModelRef
    data: DatasetSplits
    budget: Budget
    seed: int = 0
    batch_size: int = 64
    importance: dict[str, Tensor] | None = None
    round_to: int = 1
    task: Task = field(default_factory=Task)
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        check_round_to(self.round_to)
        if self.importance is None:
            self.importance = channel_importance(self.model, self.graph, "l1")

    @property
    def metric_name(self) -> str:
        """The name spaces report the task's metric under (``acc`` for top-1)."""
        return self.task.metric_name

    def score(
        self, model: nn.Module, split: Any = None, keep_mode: bool = False, batch_size: int = 512
    ) -> float:
        """The task's metric of ``model`` on ``split`` (default: the validation split).

        ``keep_mode`` evaluates in the modes the caller set instead of eval mode.
        """
        return evaluate(
            model,
            self.data.val if split is None else split,
            self.task,
            self.runtime,
            batch_size=batch_size,
            workers=self.data.workers,
            keep_mode=keep_mode,
        )[1]

    def train_batches(self, batch_size: int | None = None, seed_offset: int = 0) -> Any:
        """One pass of shuffled (and, for the built-ins, augmented) training batches."""
        return batches(
            self.data.train,
            batch_size or self.batch_size,
            shuffle=True,
            seed=self.seed + seed_offset,
            augment=self.data.augment,
            workers=self.data.workers,
            runtime=self.runtime,
        )

    def val_batches(self, batch_size: int | None = None, seed_offset: int = 1) -> Any:
        """Shuffled validation batches for ever (architecture steps learn on them)."""
        loader = batches(
            self.data.val,
            batch_size or self.batch_size,
            shuffle=True,
            seed=self.seed + seed_offset,
            workers=self.data.workers,
            runtime=self.runtime,
        )
        return endless(loader)

    @property
    def group_names(self) -> tuple[str, ...]:
        """Prunable groups, in the order of the estimators' width vectors."""
        return tuple(g.name for g in self.graph.prunable_groups)

    @property
    def sizes(self) -> np.ndarray:
        """Dense width of every prunable group."""
        return np.asarray([g.size for g in self.graph.prunable_groups], dtype=np.int64)

    def metrics(self, widths: Mapping[str, int]) -> dict[str, Any]:
        """The standard cost metrics of ``widths``: every estimator the budget knows, + fit."""
        values = {m: float(c.evaluate(widths)) for m, c in self.budget.costs.items()}
        flops_params = {"flops", "params"} - set(values)
        for metric in flops_params:  # the budget may constrain only some metrics
            values[metric] = float(_fallback_cost(self, metric).evaluate(widths))
        values.setdefault("latency_ms", float("nan"))
        values["feasible"] = bool(self.budget.fits(widths))
        return values


def _fallback_cost(context: SpaceContext, metric: str) -> Any:
    from prunetune.estimators import FlopsModel, ParamsModel

    cache = context.__dict__.setdefault("_costs", {})
    if metric not in cache:
        cache[metric] = (FlopsModel if metric == "flops" else ParamsModel).from_graph(context.graph)
    return cache[metric]


@dataclass
class SpaceResult:
    """What a space's run ends with.

    Attributes:
        spec: the chosen subnet, meeting every limit exactly.
        metrics: its final metrics (standard names, plus the space's own).
        state_dict: weights of the dense-shaped model after the inner run (weights learned while
            searching), for the backend to prune and finetune from; ``None`` keeps the input's.
        history: every report made during the run.
    """

    spec: SubnetSpec
    metrics: dict[str, Any]
    state_dict: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Space(abc.ABC):
    """A search space and its inner optimisation; subclasses set ``name`` and ``Options``.

    ``Options`` is a frozen dataclass of the space's hyper-parameters with working defaults;
    ``create_space`` checks keyword arguments against its fields.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Any]]

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    @abc.abstractmethod
    def search_space(cls, graph: ChannelGraph) -> dict[str, Any]:
        """The hyper-parameters for Ray Tune (``ray.tune`` sampling objects) by option name."""

    @abc.abstractmethod
    def run(self, context: SpaceContext, report: Report | None = None) -> SpaceResult:
        """Search, then :func:`finalize`; see the module docstring for the contract."""


def register_space(cls: type[Space]) -> type[Space]:
    """Class decorator adding a space to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"space {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_spaces() -> list[str]:
    """Registered space names, sorted."""
    return sorted(_REGISTRY)


def create_space(name: str, **options: Any) -> Space:
    """Build a registered space with its options.

    Raises:
        ValueError: unknown space name or option, listing the valid ones, or an option value
            that the space's ``Options`` rejects.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown space {name!r}; valid: {', '.join(list_spaces())}")
    cls = _REGISTRY[name]
    valid = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"space {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )
    return cls(cls.Options(**options))


def finalize(
    context: SpaceContext, widths: Mapping[str, float], fill: bool = True
) -> tuple[SubnetSpec, dict[str, int]]:
    """The final step every space shares: integer widths that meet every limit exactly.

    Widths are rounded (to each group's step, or its alignment to ``context.round_to``, within
    its bounds). While they overshoot any limit, one step of channels goes from the group whose
    weakest kept channels cost the most per unit of importance
    (:func:`prunetune.backend.pruning.cost_widths`, with the budget's use as the cost); then, with
    ``fill``, steps are given back to the groups with the most importance per unit of cost while
    everything still fits, so no budget is wasted by rounding.

    Raises:
        InfeasibleTargetError: no subnet fits (cannot happen for a target that resolved).
    """
    graph, budget = context.graph, context.budget
    groups = graph.prunable_groups
    importance = context.importance or {}
    steps = np.asarray([alignment(g, context.round_to) for g in groups], dtype=np.int64)
    minimum = steps.copy()
    sizes = np.asarray([g.size for g in groups])
    current = np.asarray(
        [round(float(widths[g.name]) / s) * s for g, s in zip(groups, steps)], dtype=np.int64
    )
    current = np.clip(current, minimum, sizes)
    scores = {g.name: importance.get(g.name, torch.ones(g.size)) for g in groups}
    ranked = []
    for group in groups:
        normalised = normalised_importance(scores[group.name])
        ranked.append(torch.sort(normalised, descending=True).values.numpy())

    def usage(candidates: np.ndarray) -> np.ndarray:
        costs = budget.evaluate(candidates)
        return np.max([np.asarray(costs[m]) / limit for m, limit in budget.limits.items()], axis=0)

    start = {g.name: int(w) for g, w in zip(groups, current)}
    shrunk = cost_widths(graph, scores, budget.fits, usage, context.round_to, start)
    current = np.asarray([shrunk[g.name] for g in groups], dtype=np.int64)
    eye = np.diag(steps)
    while fill:
        growable = current + steps <= sizes
        candidates = np.minimum(current[None] + eye, sizes)
        fits = np.asarray(budget.fits(candidates)) & growable
        if not fits.any():
            break
        base = usage(current[None])[0]
        spent = usage(candidates) - base
        value = np.asarray(
            [
                float(ranked[i][current[i] : current[i] + steps[i]].sum()) if growable[i] else 0.0
                for i in range(len(groups))
            ]
        )
        score = np.where(fits, value / (spent + 1e-9), -np.inf)
        best = int(np.argmax(score))
        current[best] += steps[best]
    final = {g.name: int(w) for g, w in zip(groups, current)}
    spec = SubnetSpec.from_widths(graph, context.model_ref, final, importance)
    return spec, final
