"""One-shot pruning to a cost target: uniform or global allocation of channel widths.

It is a useful tool on its own and the baseline every search must beat. The cost is injected as
a predicate (``fits(widths) -> bool``), so one call serves FLOPs, parameter and latency targets,
alone or together, without the backend knowing how costs are estimated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.errors import InfeasibleTargetError
from prunetune.backend.graph import ChannelGraph, ChannelGroup

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "alignment",
    "check_round_to",
    "check_round_to_fits",
    "cost_widths",
    "global_widths",
    "normalised_importance",
    "one_shot_widths",
    "ratio_widths",
    "uniform_widths",
]

Allocation = Literal["uniform", "global", "cost"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
Fits = Callable[[dict[str, int]], bool]
Cost = Callable[[np.ndarray], np.ndarray]
"""Cost of candidate widths ``(N, P)`` (ordered as ``graph.prunable_groups``), shape ``(N,)``."""


def normalised_importance(scores: Tensor) -> Tensor:
    """A group's channel scores divided by their mean (float64), so groups of different scale
    compete fairly: raw magnitudes would empty whole layers with small weights."""
    scores = scores.double()
    return scores / (scores.mean() + 1e-12)


def check_round_to(round_to: object) -> int:
    """``round_to`` itself if it is a positive integer.

    Raises:
        ValueError: it is not.
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    return round_to


def check_round_to_fits(graph: ChannelGraph, round_to: int) -> int:
    """``round_to`` checked against the model: it must not exceed every prunable group.

    A group narrower than ``round_to`` keeps its own step (see :func:`alignment`): that is the
    documented clamp. But when ``round_to`` exceeds every group, no width anywhere could be
    rounded to it, and the option would be silently ignored; that is refused instead.

    Raises:
        ValueError: not a positive integer, or larger than every prunable group (the message
            gives the widest group and the largest value that takes effect).
    """
    check_round_to(round_to)
    widest = max((g.size for g in graph.prunable_groups), default=0)
    if widest and round_to > widest:
        raise ValueError(
            f"round_to={round_to} is larger than every prunable channel group (the widest has "
            f"{widest} channels), so no pruned width could be a multiple of it; use a value of "
            f"at most {widest} (or 1 for no rounding)"
        )
    return round_to


def alignment(group: ChannelGroup, round_to: int = 1) -> int:
    """The multiple a pruned width of ``group`` is kept at: ``lcm(step, round_to)``, or just the
    group's ``step`` where that would exceed the group's size."""
    aligned = math.lcm(group.step, check_round_to(round_to))
    return aligned if aligned <= group.size else group.step


def _round_width(group: ChannelGroup, width: float, round_to: int = 1) -> int:
    """``width`` rounded down to the group's alignment, within ``[alignment, size]``."""
    if width >= group.size:
        return group.size
    step = alignment(group, round_to)
    return int(min(group.size, max(step, step * int(width // step))))


def ratio_widths(graph: ChannelGraph, ratio: float, round_to: int = 1) -> dict[str, int]:
    """Every prunable group at ``ratio`` of its size, rounded down to its alignment (at least
    one aligned step, at most the full size)."""
    return {g.name: _round_width(g, ratio * g.size, round_to) for g in graph.prunable_groups}


def uniform_widths(
    graph: ChannelGraph, fits: Fits, resolution: int = 40, round_to: int = 1
) -> dict[str, int]:
    """The widest widths with one keep ratio for every group that still fit.

    Bisection on the shared ratio (costs are monotone in it), then a greedy pass that gives back
    one aligned step per group, widest-ratio-first, where it still fits, so rounding wastes little
    budget. Widths are multiples of :func:`alignment` (or the full size).

    Raises:
        InfeasibleTargetError: even every group at its minimum width does not fit.
    """
    groups = graph.prunable_groups

    def at(ratio: float) -> dict[str, int]:
        return ratio_widths(graph, ratio, round_to)

    if not fits(at(0.0)):
        raise InfeasibleTargetError(
            "the target cannot be met: even the smallest subnet (every group at its minimum "
            "width) exceeds it; relax the target"
        )
    if fits(at(1.0)):
        return at(1.0)
    low, high = 0.0, 1.0
    for _ in range(resolution):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(at(middle)) else (low, middle)
    widths = at(low)
    for group in sorted(groups, key=lambda g: widths[g.name] / g.size):
        trial = dict(widths)
        trial[group.name] = min(group.size, widths[group.name] + alignment(group, round_to))
        if trial[group.name] != widths[group.name] and fits(trial):
            widths = trial
    return widths


def global_widths(
    graph: ChannelGraph, scores: Mapping[str, Tensor], fits: Fits, round_to: int = 1
) -> dict[str, int]:
    """Remove the globally least important channels until the widths fit.

    Scores are normalised by their group's mean so groups of different scale compete fairly
    (raw magnitudes would empty whole layers with small weights). Channels are removed in order of
    normalised score, never below a group's minimum width; the number removed is found by
    bisection (removing more never costs more). Each group's width is then rounded down to a
    multiple of its :func:`alignment`.

    Raises:
        InfeasibleTargetError: even every group at its minimum width does not fit.
    """
    groups = graph.prunable_groups
    order_groups: list[int] = []
    order_scores: list[float] = []
    for index, group in enumerate(groups):
        normalised = normalised_importance(scores[group.name])
        removable = group.size - group.min_width
        lowest = torch.sort(normalised).values[:removable]
        order_groups += [index] * removable
        order_scores += lowest.tolist()
    sequence = np.asarray(order_groups, dtype=np.int64)[np.argsort(order_scores, kind="stable")]
    sizes = np.asarray([g.size for g in groups], dtype=np.int64)

    def after(count: int) -> dict[str, int]:
        removed = np.bincount(sequence[:count], minlength=len(groups))
        return {g.name: _round_width(g, int(w), round_to) for g, w in zip(groups, sizes - removed)}

    if not fits(after(len(sequence))):
        raise InfeasibleTargetError(
            "the target cannot be met: even the smallest subnet (every group at its minimum "
            "width) exceeds it; relax the target"
        )
    low, high = 0, len(sequence)  # after(high) fits; find the fewest removals that fit
    if fits(after(0)):
        return after(0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(after(middle)) else (middle, high)
    return after(high)


def cost_widths(
    graph: ChannelGraph,
    scores: Mapping[str, Tensor],
    fits: Fits,
    cost: Cost,
    round_to: int = 1,
    start: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Remove channels where they save the most ``cost`` per unit of importance, until it fits.

    Greedy, from the dense widths (or ``start``): each step takes one aligned step of channels
    (the group's least important ones) from the group where ``cost`` falls most per unit of
    their normalised importance. With a latency estimate as ``cost`` and a FLOPs target as
    ``fits`` this is latency-aware pruning: the same FLOPs saving, spent where the device gains
    the most time (on a CPU, wide feature maps with few channels are slow per FLOP).

    Raises:
        InfeasibleTargetError: even every group at its minimum width does not fit.
    """
    groups = graph.prunable_groups
    steps = np.asarray([alignment(g, round_to) for g in groups], dtype=np.int64)
    sizes = np.asarray([g.size for g in groups], dtype=np.int64)
    ranked = []
    for group in groups:
        normalised = normalised_importance(scores[group.name])
        ranked.append(torch.sort(normalised, descending=True).values.numpy())

    def as_widths(vector: np.ndarray) -> dict[str, int]:
        return {g.name: int(w) for g, w in zip(groups, vector)}

    current = sizes.copy()
    if start is not None:
        current = np.asarray([start[g.name] for g in groups], dtype=np.int64)
    while not fits(as_widths(current)):
        # shrinking a group not at a multiple of its step first lands on one
        lower = np.where(current % steps, current // steps * steps, current - steps)
        shrinkable = lower >= steps
        if not shrinkable.any():
            raise InfeasibleTargetError(
                "the target cannot be met: even the smallest subnet (every group at its minimum "
                "width) exceeds it; relax the target"
            )
        smaller = np.where(shrinkable, lower, current)
        candidates = np.where(np.eye(len(groups), dtype=bool), smaller[None, :], current[None, :])
        saved = float(cost(current[None, :])[0]) - np.asarray(cost(candidates), dtype=np.float64)
        value = np.asarray(
            [
                ranked[i][lower[i] : current[i]].sum() if shrinkable[i] else 0.0
                for i in range(len(groups))
            ]
        )
        score = np.where(shrinkable, np.maximum(saved, 0.0) / (value + 1e-9), -np.inf)
        if not np.any(np.isfinite(score) & (score > 0)):
            score = np.where(shrinkable, -value, -np.inf)  # nothing saves cost: least value
        best = int(np.argmax(score))
        current[best] = lower[best]
    return as_widths(current)


def one_shot_widths(
    graph: ChannelGraph,
    fits: Fits,
    allocation: str = "global",
    scores: Mapping[str, Tensor] | None = None,
    round_to: int = 1,
    cost: Cost | None = None,
) -> dict[str, int]:
    """Widths for a one-shot prune to a target, by ``uniform``, ``global`` or ``cost`` allocation.

    Args:
        graph: the model's channel graph.
        fits: whether widths meet the target.
        allocation: ``uniform`` (one keep ratio everywhere), ``global`` (least important
            channels first, by ``scores``) or ``cost`` (channels first where they save the most
            ``cost`` per unit of importance, :func:`cost_widths`).
        scores: channel importance by group name (``global`` and ``cost``).
        cost: what ``cost`` allocation saves, e.g. a latency estimate's ``evaluate``.
        round_to: keep pruned widths at multiples of this (and of each group's step) where the
            group is that wide: CPU and GPU kernels are often much faster at multiples of 8 or
            16 channels, so aligned subnets turn FLOPs savings into more real speed-up.

    Raises:
        ValueError: unknown allocation, ``global`` or ``cost`` without scores, ``cost``
            without a cost, or a bad ``round_to`` (not positive, or larger than every group:
            see :func:`check_round_to_fits`).
        InfeasibleTargetError: no subnet fits.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")
    check_round_to_fits(graph, round_to)
    if allocation == "uniform":
        return uniform_widths(graph, fits, round_to=round_to)
    if scores is None:
        raise ValueError(f"{allocation} allocation needs channel importance scores")
    if allocation == "cost":
        if cost is None:
            raise ValueError("cost allocation needs a cost to save (e.g. a latency estimate)")
        return cost_widths(graph, scores, fits, cost, round_to=round_to)
    return global_widths(graph, scores, fits, round_to=round_to)
