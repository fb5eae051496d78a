"""``ratios``: per-group keep ratios proposed directly by the outer search (the black-box space).

As in AMC or MetaPruning, the outer algorithm (Optuna inside Ray Tune) proposes one keep ratio
per channel group. The proposal is projected onto the target: all ratios are scaled by the
largest common factor whose rounded widths still fit, then the shared final step repairs rounding
and fills leftover budget. The subnet is scored by a short finetune of the pruned model from the
dense weights (or, with ``finetune_epochs=0``, by the BN-recalibrated proxy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, train
from prunetune.estimators import proxy_accuracy
from prunetune.spaces._base import (
    Report,
    Space,
    SpaceContext,
    SpaceResult,
    finalize,
    register_space,
)

__all__ = ["DirectRatios"]


@dataclass(frozen=True)
class RatiosOptions:
    """Options of the ``ratios`` space.

    Attributes:
        ratios: keep ratio in (0, 1] per group name; groups left out keep ratio 1 before the
            projection (so no ratios at all means uniform scaling).
        finetune_epochs: epochs of finetuning the pruned subnet before scoring it; 0 scores the
            BN-recalibrated proxy only.
        lr: learning rate of that finetune.
    """

    ratios: Mapping[str, float] = field(default_factory=dict)
    finetune_epochs: float = 1.0
    lr: float = 0.01

    def __post_init__(self) -> None:
        for name, ratio in self.ratios.items():
            if not 0.0 < float(ratio) <= 1.0:
                raise ValueError(f"ratios[{name!r}] = {ratio} is outside (0, 1]")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@register_space
class DirectRatios(Space):
    """Keep ratios chosen by the outer search, projected onto the target."""

    name = "ratios"
    Options = RatiosOptions

    @classmethod
    def search_space(cls, graph: ChannelGraph) -> dict[str, Any]:
        """One ``uniform(0.1, 1)`` keep ratio per prunable group."""
        from ray import tune

        return {"ratios": {g.name: tune.uniform(0.1, 1.0) for g in graph.prunable_groups}}

    def run(self, context: SpaceContext, report: Report | None = None) -> SpaceResult:
        """Project the proposed ratios onto the budget, finalise, and score the subnet."""
        options: RatiosOptions = self.options
        unknown = sorted(set(options.ratios) - set(context.group_names))
        if unknown:
            raise ValueError(
                f"ratios name unknown groups {', '.join(unknown)}; groups: "
                f"{', '.join(context.group_names)}"
            )
        ratios = np.asarray([float(options.ratios.get(n, 1.0)) for n in context.group_names])
        widths = project(context, ratios)
        spec, final = finalize(context, widths)
        dense = copy.deepcopy(context.model)
        pruned = prune_model(dense, context.graph, spec)
        history: list[dict[str, Any]] = []
        metrics = dict(context.metrics(final))

        def emit(step: int, acc: float) -> None:
            record = {**metrics, context.metric_name: acc, "step": step}
            history.append(record)
            if report is not None:
                report(record)

        emit(
            0,
            proxy_accuracy(
                context.runtime.model(pruned),
                context.data.train,
                context.data.val,
                task=context.task,
                runtime=context.runtime,
                workers=context.data.workers,
            ),
        )
        if options.finetune_epochs > 0:
            torch.manual_seed(context.seed)
            config = TrainConfig(
                epochs=options.finetune_epochs,
                lr=options.lr,
                batch_size=context.batch_size,
                seed=context.seed,
            )
            train(
                pruned,
                context.data,
                config,
                on_epoch=lambda r: emit(r.epoch, r.val_acc),
                task=context.task,
                runtime=context.runtime,
            )
        metrics.update(history[-1])
        return SpaceResult(spec=spec, metrics=metrics, state_dict=None, history=history)


def project(context: SpaceContext, ratios: np.ndarray) -> dict[str, float]:
    """Scale ``ratios`` by the largest common factor whose widths fit the budget.

    Ratios are clipped so no group exceeds its size; the factor is found by bisection on the
    exact costs (they are monotone in every width).
    """
    sizes = context.sizes.astype(np.float64)
    groups = context.graph.prunable_groups
    minimum = np.asarray([g.min_width for g in groups], dtype=np.float64)

    def widths_at(scale: float) -> np.ndarray:
        return np.clip(np.floor(ratios * scale * sizes), minimum, sizes).astype(np.int64)

    low, high = 0.0, 1.0 / float(ratios.max())
    if context.budget.fits(widths_at(high)):
        low = high
    else:
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if context.budget.fits(widths_at(middle)) else (low, middle)
    return {g.name: float(w) for g, w in zip(groups, widths_at(low))}
