"""DDPNAS: dynamically pruned architecture distributions over channel widths (docs/methods.md §3).

After Zheng et al., "Dynamic Distribution Pruning for Efficient Network Architecture Search"
(arXiv 1905.13543), adapted to channel widths. Every prunable group ``l`` has a categorical
distribution ``theta_l`` over K width options (keep ratios); a supernet shares the dense weights,
and a width-``w`` option keeps the ``w`` most important channels of its group (a 0/1 mask through
:class:`~prunetune.backend.masks.ChannelMasker`). Each epoch runs R rounds; in a round every active
option
of every group is sampled once (without replacement), its subnet trained for a few steps and
scored on validation data, ``P_r[l, x_l] = reward``. Then::

    E = mean_r softmax(reward_scale * P_r over active options)
    theta = E + theta_decay * theta; renormalise
    prune, in every group with more than one active option, the one with the lowest theta

until one option per group is left (or ``max_epochs``). The budget enters at the end as a small
knapsack: one option per group maximising ``sum_l log theta_l[x_l]`` subject to the exact budget
(:func:`constrained_choice`), then :func:`prunetune.spaces.finalize`.

Our adaptations (not in the paper):

- Target-aware reward: ``reward = acc - budget_penalty * max(0, utilisation - 1)`` where
  utilisation is the sampled subnet's largest exact cost/limit ratio, so the widest option does
  not win every group (the usual advice when adapting it to a budget).
- Options are deduplicated per group: keep ratios that round to the same width (the group's step,
  its minimum width) are one option, so small groups may have fewer than K options; a round then
  pads their sampling sequence with uniform draws among their active options (a repeated option's
  reward is the mean of its draws).
- BN pitfall: sampled subnets are scored in train mode on a fixed validation batch (batch
  statistics of the subnet itself, running statistics untouched) by default
  (``evaluation="train_mode"``), or after recomputing BN statistics from a few training batches
  (``"recalibrate"``; the running statistics are restored afterwards).
- Final choice over the whole history: surviving options score ``log theta``; a pruned option
  scores ``log(theta when it was pruned) + log(1e-6)``, so it is chosen only when the survivors
  cannot meet the budget, and then the latest-pruned (most probable) ones first.
- Pruning ties (equal theta, e.g. when accuracy saturates) drop the widest tied option.
- Before returning the weights, BN statistics are recomputed for the chosen subnet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.training import (
    Optimization,
    Stepper,
    endless,
    first_examples,
    frozen_bn,
    recalibrate_bn,
    sgd,
)
from prunetune.estimators import Budget
from prunetune.spaces._base import (
    Report,
    Space,
    SpaceContext,
    SpaceResult,
    finalize,
    register_space,
)

__all__ = [
    "DDPNASOptions",
    "DDPNASSpace",
    "constrained_choice",
    "history_scores",
    "option_widths",
    "prune_lowest",
    "round_plan",
    "update_theta",
]

_PRUNED_LOG_WEIGHT = float(np.log(1e-6))  # a pruned option's score offset: last resort only
_EVALUATIONS = ("train_mode", "recalibrate")
_MAX_PAIRS = 20_000  # pair moves checked per local-search step of the constrained choice


@dataclass(frozen=True)
class DDPNASOptions:
    """Hyper-parameters of the DDPNAS space.

    Attributes:
        keep_ratios: the K width options of every group, as fractions of its dense width.
        rounds: R, rounds per epoch (each trains every active option once).
        steps_per_sample: SGD steps on the training split for each sampled subnet.
        max_epochs: stop pruning options after this many epochs (``None``: until one is left).
        lr: learning rate of the shared weights (SGD, momentum 0.9, weight decay 5e-4).
        reward_scale: the softmax sharpness applied to rewards (100 in the paper).
        theta_decay: weight of the previous theta in the update (0.5 in the paper).
        budget_penalty: lambda of the target-aware reward ``acc - lambda * max(0, util - 1)``.
        evaluation: how sampled subnets are scored despite shared BN statistics.
        eval_examples: validation examples in the fixed scoring batch.
        calibration_batches: training batches that recompute BN statistics (``recalibrate``
            scoring, and the returned weights).
    """

    keep_ratios: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    rounds: int = 3
    steps_per_sample: int = 4
    max_epochs: int | None = None
    lr: float = 0.01
    reward_scale: float = 100.0
    theta_decay: float = 0.5
    budget_penalty: float = 0.25
    evaluation: Literal["train_mode", "recalibrate"] = "train_mode"
    eval_examples: int = 256
    calibration_batches: int = 4

    def __post_init__(self) -> None:
        ratios = tuple(self.keep_ratios)
        if len(ratios) < 2 or any(not 0.0 < float(r) <= 1.0 for r in ratios):
            raise ValueError(
                f"keep_ratios must hold at least two values in (0, 1], got {self.keep_ratios!r}"
            )
        if len(set(ratios)) != len(ratios):
            raise ValueError(f"keep_ratios must not repeat a value, got {self.keep_ratios!r}")
        object.__setattr__(self, "keep_ratios", tuple(sorted(float(r) for r in ratios)))
        integers = ("rounds", "steps_per_sample", "eval_examples", "calibration_batches")
        for name in (*integers, "max_epochs"):
            value = getattr(self, name)
            is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            if not (is_int and value >= 1) and not (name == "max_epochs" and value is None):
                valid = "None or an integer >= 1" if name == "max_epochs" else "an integer >= 1"
                raise ValueError(f"{name} must be {valid}, got {value!r}")
        ranges = {
            "lr": (self.lr > 0, "positive"),
            "reward_scale": (self.reward_scale > 0, "positive"),
            "theta_decay": (0.0 <= self.theta_decay <= 1.0, "in [0, 1]"),
            "budget_penalty": (self.budget_penalty >= 0, ">= 0"),
            "evaluation": (self.evaluation in _EVALUATIONS, "'train_mode' or 'recalibrate'"),
        }
        for name, (ok, valid) in ranges.items():
            if not ok:
                raise ValueError(f"{name} must be {valid}, got {getattr(self, name)!r}")


def option_widths(graph: ChannelGraph, keep_ratios: tuple[float, ...]) -> tuple[Any, Any]:
    """Integer widths of every (group, option) and which options are distinct.

    Args:
        graph: the channel graph; rows follow ``graph.prunable_groups``.
        keep_ratios: the options, ascending.

    Returns:
        ``(widths, valid)``: ``(G, K)`` int widths rounded to each group's step and clipped to
        ``[min_width, size]``, and a ``(G, K)`` bool array, False for an option whose width an
        earlier (narrower) option already has.
    """
    groups = graph.prunable_groups
    widths = np.zeros((len(groups), len(keep_ratios)), dtype=np.int64)
    valid = np.zeros_like(widths, dtype=bool)
    for row, group in enumerate(groups):
        for col, ratio in enumerate(keep_ratios):
            width = round(ratio * group.size / group.step) * group.step
            widths[row, col] = min(max(width, group.min_width), group.size)
            valid[row, col] = col == 0 or widths[row, col] not in widths[row, :col]
    return widths, valid


def update_theta(
    theta: np.ndarray, active: np.ndarray, rewards: np.ndarray, scale: float, decay: float
) -> np.ndarray:
    """One epoch's DDPNAS update: ``theta = mean_r softmax(scale * P_r) + decay * theta``.

    Args:
        theta: ``(G, K)`` current distributions (zero outside ``active``).
        active: ``(G, K)`` bool, the options still in play.
        rewards: ``(R, G, K)`` rewards of the epoch's rounds (read only where ``active``).
        scale: softmax sharpness.
        decay: weight of the previous ``theta``.

    Returns:
        The new ``(G, K)`` distributions, normalised over active options, zero elsewhere.
    """
    logits = np.where(active[None], scale * np.nan_to_num(rewards, nan=0.0), -np.inf)
    logits = logits - logits.max(axis=2, keepdims=True)
    weights = np.exp(logits)
    expectation = (weights / weights.sum(axis=2, keepdims=True)).mean(axis=0)
    updated = np.where(active, expectation + decay * theta, 0.0)
    return updated / updated.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def prune_lowest(theta: np.ndarray, active: np.ndarray) -> tuple[Any, Any, Any]:
    """Drop, in every group with two or more active options, the one with the lowest theta.

    Ties go to the widest option (adaptation: when accuracy saturates, keep the cheaper one).
    Returns ``(theta, active, dropped)``: the renormalised distributions, the new active mask,
    and the ``(G,)`` index dropped per group (-1: none).
    """
    theta, active = theta.copy(), active.copy()
    dropped = np.full(len(theta), -1, dtype=np.int64)
    for row in np.flatnonzero(active.sum(axis=1) > 1):
        last = int(np.argmin(np.where(active[row], theta[row], np.inf)[::-1]))
        col = theta.shape[1] - 1 - last
        active[row, col], theta[row, col], dropped[row] = False, 0.0, col
        theta[row] /= theta[row].sum()
    return theta, active, dropped


def constrained_choice(
    scores: np.ndarray, widths: np.ndarray, budget: Budget, max_moves: int = 200
) -> Any:
    """One option per group maximising ``sum_l scores[l, x_l]`` subject to ``budget.fits``.

    Greedy Lagrangian-style descent from the per-group argmax (take the narrowing with the
    smallest score loss per unit of budget utilisation saved until everything fits), then local
    search: the best single move or pair of moves (one group up, another down) that still fits
    and raises the score, until none does. Every candidate is checked with the exact, vectorised
    ``budget.fits`` on ``(N, G)`` width arrays.

    Args:
        scores: ``(G, K)`` scores, ``-inf`` for options that may not be chosen.
        widths: ``(G, K)`` integer widths of the options.
        budget: the exact limits.
        max_moves: bound on local-search moves.

    Returns:
        The ``(G,)`` chosen option indices.
    """
    rows = np.arange(len(scores))
    allowed = np.isfinite(scores)
    choice = np.argmax(np.where(allowed, scores, -np.inf), axis=1)

    def usage(candidates: np.ndarray) -> np.ndarray:
        costs = budget.evaluate(candidates)
        return np.max([np.asarray(costs[m]) / lim for m, lim in budget.limits.items()], axis=0)

    moves = [(r, c) for r in rows for c in range(scores.shape[1]) if allowed[r, c]]
    move_row = np.asarray([m[0] for m in moves])
    move_col = np.asarray([m[1] for m in moves])

    def candidates(base: np.ndarray) -> np.ndarray:
        table = np.repeat(widths[rows, base][None], len(moves), axis=0)
        table[np.arange(len(moves)), move_row] = widths[move_row, move_col]
        return table

    while not budget.fits(widths[rows, choice]):
        narrower = widths[move_row, move_col] < widths[move_row, choice[move_row]]
        if not narrower.any():
            break  # every group at its narrowest allowed option; finalize shrinks further
        saved = usage(widths[rows, choice][None])[0] - usage(candidates(choice))
        loss = scores[rows, choice][move_row] - scores[move_row, move_col]
        ratio = np.where(narrower & (saved > 0), loss / np.maximum(saved, 1e-12), np.inf)
        if not np.isfinite(ratio).any():
            ratio = np.where(narrower, -widths[move_row, move_col], np.inf)
        best = int(np.argmin(ratio))
        choice[move_row[best]] = move_col[best]
    if not budget.fits(widths[rows, choice]):
        return choice
    for _ in range(max_moves):
        gain = scores[move_row, move_col] - scores[rows, choice][move_row]
        single = np.flatnonzero(gain > 1e-12)
        best_moves: tuple[int, ...] = ()
        best_gain = 0.0
        if single.size:
            fits = np.asarray(budget.fits(candidates(choice)[single]))
            if fits.any():
                index = single[fits][int(np.argmax(gain[single][fits]))]
                best_gain, best_moves = float(gain[index]), (index,)
        pair_gain = gain[:, None] + gain[None, :]
        first, second = np.nonzero(
            (pair_gain > best_gain + 1e-12) & (move_row[:, None] != move_row[None, :])
        )
        if first.size > _MAX_PAIRS:  # bound memory on wide graphs: the most promising pairs
            keep = np.argpartition(-pair_gain[first, second], _MAX_PAIRS)[:_MAX_PAIRS]
            first, second = first[keep], second[keep]
        if first.size:
            table = candidates(choice)[first]
            table[np.arange(first.size), move_row[second]] = widths[
                move_row[second], move_col[second]
            ]
            fits = np.asarray(budget.fits(table))
            if fits.any():
                pair_gain = gain[first] + gain[second]
                index = int(np.argmax(np.where(fits, pair_gain, -np.inf)))
                best_gain, best_moves = float(pair_gain[index]), (first[index], second[index])
        if not best_moves:
            break
        for index in best_moves:
            choice[move_row[index]] = move_col[index]
    return choice


def round_plan(active: np.ndarray, rng: np.random.Generator) -> Any:
    """One round's samples: column ``t`` holds the option of every group in sample ``t``.

    Each group's row is a random permutation of its active options (sampling without
    replacement), padded with uniform draws among them when other groups have more options.

    Returns:
        A ``(G, max_l |S_l|)`` int array of option indices.
    """
    length = int(active.sum(axis=1).max())
    plan = np.empty((len(active), length), dtype=np.int64)
    for row, mask in enumerate(active):
        cols = np.flatnonzero(mask)
        plan[row] = np.concatenate([rng.permutation(cols), rng.choice(cols, length - cols.size)])
    return plan


def history_scores(
    theta: np.ndarray,
    active: np.ndarray,
    valid: np.ndarray,
    pruned_theta: np.ndarray,
    widths: np.ndarray,
) -> np.ndarray:
    """Scores for :func:`constrained_choice` over the whole distribution history.

    Active options score ``log theta``; a pruned option scores ``log(theta when pruned) +
    log(1e-6)``, so it wins only when no choice of active options fits the budget (then the
    latest-pruned first). A tiny bonus for width breaks ties (a uniform theta) towards using
    the budget. Duplicate widths (``~valid``) score ``-inf``.

    Args:
        theta: ``(G, K)`` current distributions (zero for pruned options).
        active: ``(G, K)`` options still in play.
        valid: ``(G, K)`` distinct options (see :func:`option_widths`).
        pruned_theta: ``(G, K)`` theta of each pruned option at the epoch it was pruned.
        widths: ``(G, K)`` option widths.
    """
    scores = 1e-6 * widths / widths.max(axis=1, keepdims=True)
    scores[active] += np.log(np.maximum(theta[active], 1e-300))
    pruned = valid & ~active
    scores[pruned] += np.log(np.maximum(pruned_theta[pruned], 1e-300)) + _PRUNED_LOG_WEIGHT
    scores[~valid] = -np.inf
    return scores


def _entropy(theta: np.ndarray) -> float:
    """Mean over groups of the entropy (nats) of theta."""
    safe = np.where(theta > 0, theta, 1.0)
    return float(-(theta * np.log(safe)).sum(axis=1).mean()) + 0.0


class _Supernet:
    """The masked copy of the dense model that every sampled subnet trains and is scored in."""

    def __init__(self, context: SpaceContext, options: DDPNASOptions) -> None:
        self.context = context
        self.model = context.runtime.model(copy.deepcopy(context.model))
        data = self.data = context.data
        self.options = options
        self.masker = ChannelMasker(self.model, context.graph)
        importance = context.importance or {}
        self.ranks: list[Tensor] = []
        for group in context.graph.prunable_groups:
            scores = importance.get(group.name, torch.ones(group.size)).float()
            order = torch.argsort(scores, descending=True, stable=True)
            self.ranks.append(torch.empty_like(order).scatter_(0, order, torch.arange(group.size)))
        self.names = context.group_names
        self.stepper = Stepper(
            self.masker,
            sgd(self.model, Optimization(options.lr)),
            task=context.task,
            runtime=context.runtime,
        )
        self.batches = endless(context.train_batches())
        self.score_split = first_examples(data.val, options.eval_examples)

    def use(self, widths: np.ndarray) -> None:
        """Mask every group to its top-``width`` channels by importance."""
        pairs = zip(self.names, self.ranks, widths, strict=True)
        self.masker.set_masks({name: (rank < int(w)).float() for name, rank, w in pairs})

    def train(self, widths: np.ndarray, steps: int) -> None:
        """A few SGD steps of the subnet ``widths`` on training batches."""
        self.use(widths)
        self.masker.train()
        for _ in range(steps):
            self.stepper.step(*next(self.batches))

    @property
    def steps(self) -> int:
        """Weight steps taken so far."""
        return self.stepper.steps

    def evaluate(self, split: Any, keep_mode: bool = False, batch_size: int = 512) -> float:
        """The task's metric of the masked supernet on ``split``."""
        return self.context.score(self.masker, split, keep_mode, batch_size)

    def recalibrate(self) -> None:
        """BN statistics of the current masks from a few training batches."""
        context = self.context
        recalibrate_bn(
            self.masker,
            self.data.train,
            self.options.calibration_batches,
            runtime=context.runtime,
            workers=self.data.workers,
        )

    @torch.no_grad()
    def score(self, widths: np.ndarray) -> float:
        """Validation accuracy of subnet ``widths`` on the fixed scoring batch (BN-safe)."""
        self.use(widths)
        split = self.score_split
        if self.options.evaluation == "recalibrate":
            saved = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
            self.recalibrate()
            accuracy = self.evaluate(split)
            for name, buffer in self.model.named_buffers():
                buffer.copy_(saved[name])
            return accuracy
        self.masker.eval()  # dropout and the like off; BN alone uses the batch's statistics
        with frozen_bn(self.masker, batch_statistics=True):  # running statistics unchanged
            return self.evaluate(split, keep_mode=True, batch_size=max(1, len(split)))


@register_space
class DDPNASSpace(Space):
    """DDPNAS over channel widths: sampled subnets of a shared supernet prune width options.

    See the module docstring for the loop and our adaptations. Reports once per round the
    current most probable feasible architecture (``acc`` on the scoring batch, exact costs),
    ``active_options`` (over all groups), ``entropy`` (mean nats per group), ``reward``.
    """

    name = "ddpnas"
    Options = DDPNASOptions

    @classmethod
    def search_space(cls, graph: ChannelGraph) -> dict[str, Any]:
        """Ray Tune domains for the options worth searching."""
        from ray import tune

        return {
            "rounds": tune.choice([1, 2, 3]),
            "steps_per_sample": tune.choice([2, 4, 8]),
            "lr": tune.loguniform(1e-3, 5e-2),
            "reward_scale": tune.loguniform(20.0, 300.0),
            "budget_penalty": tune.loguniform(0.05, 2.0),
            "evaluation": tune.choice(["train_mode", "recalibrate"]),
        }

    def run(self, context: SpaceContext, report: Report | None = None) -> SpaceResult:
        """Prune the width distributions, choose under the budget, then :func:`finalize`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            return self._run(context, report)

    def _run(self, context: SpaceContext, report: Report | None) -> SpaceResult:
        options: DDPNASOptions = self.options
        rng = np.random.default_rng(context.seed)
        budget, history = context.budget, []
        widths, valid = option_widths(context.graph, options.keep_ratios)
        rows = np.arange(len(widths))
        active = valid.copy()
        theta = active / active.sum(axis=1, keepdims=True)
        pruned_theta = np.zeros_like(theta)  # theta of each option when it was pruned
        supernet = _Supernet(context, options)

        def named(chosen: np.ndarray) -> dict[str, int]:
            return dict(zip(context.group_names, chosen.tolist(), strict=True))

        def emit(metrics: dict[str, Any]) -> None:
            history.append(metrics)
            if report is not None:
                report(dict(metrics))

        epoch = 0
        epochs = np.inf if options.max_epochs is None else options.max_epochs
        while active.sum(axis=1).max() > 1 and epoch < epochs:
            rewards = np.full((options.rounds, *theta.shape), np.nan)
            for round_ in range(options.rounds):
                plan = round_plan(active, rng)
                totals, counts, accs = np.zeros(theta.shape), np.zeros(theta.shape), []
                for column in plan.T:
                    sample = widths[rows, column]
                    supernet.train(sample, options.steps_per_sample)
                    accs.append(supernet.score(sample))
                    excess = max(0.0, budget.utilisation(sample) - 1.0)
                    totals[rows, column] += accs[-1] - options.budget_penalty * excess
                    counts[rows, column] += 1.0
                rewards[round_] = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
                # the most probable feasible subnet if the epoch ended now
                estimate = update_theta(
                    theta, active, rewards[: round_ + 1], options.reward_scale, options.theta_decay
                )
                scores = history_scores(estimate, active, valid, pruned_theta, widths)
                chosen = widths[rows, constrained_choice(scores, widths, budget)]
                emit({
                    context.metric_name: supernet.score(chosen),
                    **context.metrics(named(chosen)),
                    "step": supernet.steps,
                    "epoch": epoch,
                    "round": round_,
                    "active_options": int(active.sum()),
                    "entropy": _entropy(estimate),
                    "sample_acc": float(np.mean(accs)),
                    "reward": float(np.nanmean(np.where(active, rewards[round_], np.nan))),
                })  # fmt: skip
            theta = update_theta(theta, active, rewards, options.reward_scale, options.theta_decay)
            previous = theta
            theta, active, dropped = prune_lowest(theta, active)
            hit = dropped >= 0
            pruned_theta[rows[hit], dropped[hit]] = previous[rows[hit], dropped[hit]]
            epoch += 1

        scores = history_scores(theta, active, valid, pruned_theta, widths)
        choice = constrained_choice(scores, widths, budget)
        chosen = widths[rows, choice]
        spec, final = finalize(context, named(chosen))
        supernet.masker.set_masks(masks_from_spec(context.graph, spec))
        supernet.recalibrate()
        accuracy = supernet.evaluate(context.data.val)
        supernet.masker.clear_masks()
        metrics = {
            context.metric_name: accuracy,
            **context.metrics(final),
            "step": supernet.steps,
            "epoch": epoch,
            "active_options": int(active.sum()),
            "entropy": _entropy(theta),
            "choice_score": float(scores[rows, choice].sum()),
        }
        alpha = torch.as_tensor((theta * widths).sum(axis=1) / context.sizes)
        for metric, cost in budget.costs.items():
            metrics[f"expected_{metric}"] = float(cost.relaxed(alpha))  # under theta
            metrics[f"chosen_{metric}"] = float(cost.evaluate(named(chosen)))  # before finalize
        emit(metrics)
        state = {k: v.detach().cpu().clone() for k, v in supernet.model.state_dict().items()}
        return SpaceResult(spec=spec, metrics=metrics, state_dict=state, history=history)
