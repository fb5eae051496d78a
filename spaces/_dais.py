"""DAIS: differentiable annealing indicator search (Guan et al., arXiv 2011.02166).

Every channel of every prunable group has an indicator ``I = sigmoid(a / T)`` multiplied onto its
output (through :class:`~prunetune.backend.masks.ChannelMasker`, so coupled channels share one
indicator).
The temperature ``T`` is annealed towards ``T_min`` so the indicators become binary. Search is
bi-level and first order (DARTS style): each step, one SGD step on the weights with the training
loss at the current indicators, then one Adam step on the logits ``a`` with

``L_val + lambda_s * mean(I) + lambda_F * R_F``,

where the expected costs take the indicator sums as widths (``alpha_k = sum(I_k) / C_k``) and the
band regulariser ``R_F`` is zero while the expected cost lies in ``[band * limit, limit]``.
Extraction keeps the channels with ``I > 0.5``, bisects a global threshold on ``a / T`` when the
exact cost leaves the band, and ends with :func:`~prunetune.spaces.finalize`.

Adaptations (ours, not the paper's):

- Every constrained metric (FLOPs, params, latency) enters ``R_F``: the upper side is
  ``sum_m log(r_m)`` over the ratios ``r_m = E[cost_m] / limit_m`` above 1; the lower side is
  ``-log(max_m r_m / band)`` on the binding metric only, since a loose secondary limit cannot be
  filled without breaking the binding one. The paper has FLOPs alone and ``log E[F]``.
- The sparsity term is the mean indicator (the paper's ``sum(I)``), so ``lambda_s`` does not
  depend on the model's size.
- The Adam learning rate of ``a`` follows the run's length unless given: ``arch_travel * a0 /
  steps``, so a logit can cross from ``a0`` to the cut (0) in a fixed share of the run before the
  temperature freezes it. The paper's 3e-4 suits its tens of thousands of steps; our inner runs
  take a few hundred (about 0.1 by default on digits), and a fixed rate froze short runs.
- :func:`~prunetune.spaces.finalize` ranks channels by ``softplus(a / T - threshold)``, so the kept
  channels are the ones the indicators chose, also where it trims or fills a group.
- Logits start from the dense model's channel importance, ``a = a0 * clip(s / mean(s), 0, 2)``
  per group, so indicators start near 1 and the least important channels nearest the cut.
- The architecture step leaves BatchNorm running statistics untouched (momentum 0), so the
  validation batches used to learn ``a`` do not leak into the statistics.
- ``acc`` is the proxy accuracy (BN recalibrated) of the hard subnet ``I > 0.5``; ``acc_soft``
  is the validation accuracy at the current indicators.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prunetune.backend.graph import ChannelGraph, ChannelGroup
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.training import (
    Optimization,
    Stepper,
    frozen_bn,
    recalibrate_bn,
    sgd,
    steps_per_pass,
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

__all__ = ["DaisSpace", "anneal_temperature", "band_penalty", "threshold_widths"]

_REPORTS_PER_EPOCH = 2
_CALIBRATION_BATCHES = 4


def anneal_temperature(
    epoch: float, epochs: float, initial: float, rate: float, minimum: float
) -> float:
    """The annealed temperature ``max(T_min, T0 / (1 + kappa * e / E))``.

    Args:
        epoch: epochs done so far (fractional: ``step / steps_per_epoch``).
        epochs: the run's length ``E`` in epochs.
        initial: ``T0``.
        rate: ``kappa``; larger anneals faster (``T = T0 / (1 + kappa)`` at the end).
        minimum: ``T_min``, the floor.
    """
    return max(minimum, initial / (1.0 + rate * epoch / epochs))


def band_penalty(ratios: Mapping[str, Tensor], band: float) -> Tensor:
    """The band regulariser ``R_F`` over expected cost / limit ratios, zero inside the band.

    ``sum_m log(r_m)`` over the metrics whose ratio exceeds 1, plus ``-log(max_m r_m / band)``
    when even the most binding metric is below the lower bound ``band * limit``.

    Args:
        ratios: differentiable ``E[cost] / limit`` by metric (``Budget.relaxed_ratios``).
        band: the lower bound as a share of each limit, in (0, 1).
    """
    values = torch.stack([ratio.reshape(()) for ratio in ratios.values()])
    above = torch.relu(torch.log(values)).sum()
    below = torch.relu(-torch.log(values.max() / band))
    return above + below


def threshold_widths(
    groups: Sequence[ChannelGroup], scores: Mapping[str, Tensor], threshold: float
) -> dict[str, int]:
    """Widths that keep every channel whose score exceeds ``threshold``, made legal per group.

    The count is rounded to the group's step and clipped to ``[min_width, size]``.
    """
    widths = {}
    for group in groups:
        count = int((scores[group.name] > threshold).sum())
        width = round(count / group.step) * group.step
        widths[group.name] = min(group.size, max(group.min_width, width))
    return widths


def bisect_threshold(
    budget: Budget,
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, Tensor],
    band: float,
    iterations: int = 60,
) -> tuple[float, dict[str, int], bool]:
    """A global threshold on ``scores`` (``a / T``) whose widths land in the budget's band.

    Starts at 0 (``I > 0.5``). When the exact utilisation (largest cost / limit) lies outside
    ``[band, 1]`` the threshold is bisected; utilisation never grows with the threshold.

    Returns:
        The threshold, its widths and whether they are in the band. Out of the band (a single
        channel can jump across it) the widths are the feasible side of the last bracket.
    """

    def utilisation(threshold: float) -> tuple[float, dict[str, int]]:
        widths = threshold_widths(groups, scores, threshold)
        return budget.utilisation(widths), widths

    start, widths = utilisation(0.0)
    if band <= start <= 1.0:
        return 0.0, widths, True
    every = torch.cat([scores[group.name].flatten() for group in groups])
    low, high = float(every.min()) - 1.0, float(every.max()) + 1.0
    if start > 1.0:
        low = 0.0
    else:
        high = 0.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        value, widths = utilisation(middle)
        if value > 1.0:
            low = middle
        elif value < band:
            high = middle
        else:
            return middle, widths, True
    return high, threshold_widths(groups, scores, high), False


@register_space
class DaisSpace(Space):
    """Channel indicators ``sigmoid(a / T)`` learned bi-level under an annealed temperature.

    Example:
        >>> result = create_space("dais", epochs=4).run(context, report=print)  # doctest: +SKIP
    """

    name: ClassVar[str] = "dais"

    @dataclass(frozen=True)
    class Options:
        """Hyper-parameters of the DAIS search.

        Attributes:
            epochs: search length ``E`` in passes over the training split (fractions allowed).
            weight_lr: SGD learning rate of the weights (momentum 0.9, weight decay 5e-4).
            arch_lr: Adam learning rate of the indicator logits ``a``; ``None`` scales it to
                the run, ``arch_travel * logit_init / steps``.
            arch_travel: with ``arch_lr=None``, how many times a logit could travel the
                distance ``logit_init`` over the run at full Adam speed.
            temperature_init: ``T0``.
            temperature_min: ``T_min``, the floor of the annealed temperature.
            anneal_rate: ``kappa`` in ``T = T0 / (1 + kappa * e / E)``.
            lambda_sparsity: weight of the mean indicator ``lambda_s``.
            lambda_budget: weight of the band regulariser ``lambda_F``.
            band: lower bound of the cost band as a share of each limit.
            logit_init: ``a0``, the mean initial logit of a group (``sigmoid(2) = 0.88``).
        """

        epochs: float = 8.0
        weight_lr: float = 0.01
        arch_lr: float | None = None
        arch_travel: float = 8.0
        temperature_init: float = 1.0
        temperature_min: float = 0.02
        anneal_rate: float = 20.0
        lambda_sparsity: float = 0.1
        lambda_budget: float = 2.0
        band: float = 0.9
        logit_init: float = 2.0

        def __post_init__(self) -> None:
            positive = ("epochs", "weight_lr", "arch_travel", "temperature_init", "temperature_min")
            for name in (*positive, "arch_lr"):
                value = getattr(self, name)
                if name == "arch_lr" and value is None:
                    continue
                if not value > 0:
                    raise ValueError(f"dais option {name}={value!r} is invalid; it must be > 0")
            for name in ("anneal_rate", "lambda_sparsity", "lambda_budget", "logit_init"):
                value = getattr(self, name)
                if not value >= 0:
                    raise ValueError(f"dais option {name}={value!r} is invalid; it must be >= 0")
            if self.temperature_min > self.temperature_init:
                raise ValueError(
                    f"dais option temperature_min={self.temperature_min!r} is invalid; it must "
                    f"be at most temperature_init={self.temperature_init!r}"
                )
            if not 0.0 < self.band < 1.0:
                raise ValueError(
                    f"dais option band={self.band!r} is invalid; it must be in (0, 1), e.g. 0.9"
                )

    options: Options

    @classmethod
    def search_space(cls, graph: ChannelGraph) -> dict[str, Any]:
        """Schedule, step sizes, regulariser weights and band for Ray Tune."""
        from ray import tune

        return {
            "anneal_rate": tune.loguniform(5.0, 60.0),
            "temperature_min": tune.choice([0.01, 0.02, 0.05]),
            "arch_travel": tune.loguniform(3.0, 30.0),
            "weight_lr": tune.loguniform(0.002, 0.05),
            "lambda_sparsity": tune.loguniform(0.01, 1.0),
            "lambda_budget": tune.loguniform(0.5, 10.0),
            "band": tune.uniform(0.8, 0.97),
        }

    def run(self, context: SpaceContext, report: Report | None = None) -> SpaceResult:
        """Search the indicators, extract widths by threshold, and :func:`finalize` them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            return _DaisRun(self.options, context, report).search()


class _DaisRun:
    """One DAIS search: the masked copy of the model, the logits, both optimisers."""

    def __init__(
        self, options: DaisSpace.Options, context: SpaceContext, report: Report | None
    ) -> None:
        self.options = options
        self.context = context
        self.report = report
        self.groups = context.graph.prunable_groups
        self.budget = context.budget
        self.model = context.runtime.model(copy.deepcopy(context.model))
        self.masker = ChannelMasker(self.model, context.graph)
        importance = context.importance or {}
        self.logits = [
            _initial_logits(importance.get(g.name), g.size, options.logit_init) for g in self.groups
        ]
        self.sizes = torch.tensor([float(g.size) for g in self.groups])
        self.temperature = options.temperature_init
        self.history: list[dict[str, Any]] = []
        self.arch_lr = math.nan

    def indicators(self, detach: bool = False) -> dict[str, Tensor]:
        """``sigmoid(a / T)`` by group name."""
        return {
            group.name: torch.sigmoid((a.detach() if detach else a) / self.temperature)
            for group, a in zip(self.groups, self.logits, strict=True)
        }

    def expected_ratios(self, indicators: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Differentiable expected cost / limit with ``sum(I_k) / C_k`` as keep ratios."""
        alpha = torch.stack([indicators[g.name].sum() for g in self.groups]) / self.sizes
        return self.budget.relaxed_ratios(alpha)

    def search(self) -> SpaceResult:
        options, context = self.options, self.context
        train_loader = context.train_batches()
        val_batches = context.val_batches()
        steps_per_epoch = steps_per_pass(context.data.train, context.batch_size)
        total = max(1, math.ceil(options.epochs * steps_per_epoch))
        report_every = max(1, steps_per_epoch // _REPORTS_PER_EPOCH)
        weight_optimizer = sgd(self.model, Optimization(options.weight_lr))
        weights = Stepper(self.masker, weight_optimizer, context.task, context.runtime)
        arch_lr = options.arch_lr
        if arch_lr is None:  # a logit may cross from a0 to the cut in 1/arch_travel of the run
            arch_lr = options.arch_travel * max(options.logit_init, 0.1) / total
        self.arch_lr = arch_lr
        arch_optimizer = torch.optim.Adam(self.logits, lr=arch_lr)
        step = 0
        losses: tuple[float, float, float] = (math.nan, math.nan, math.nan)
        while step < total:
            for x, y in train_loader:
                if step >= total:
                    break
                self.temperature = anneal_temperature(
                    step / steps_per_epoch,
                    options.epochs,
                    options.temperature_init,
                    options.anneal_rate,
                    options.temperature_min,
                )
                self.masker.train()
                self.masker.set_masks(self.indicators(detach=True))
                train_loss, _ = weights.step(x, y)
                val_loss, penalty = self._arch_step(arch_optimizer, next(val_batches))
                losses = (train_loss, val_loss, penalty)
                step += 1
                if step % report_every == 0 or step == total:
                    self._report(step, step / steps_per_epoch, losses)
        return self._extract(step, losses)

    def _arch_step(
        self,
        optimizer: torch.optim.Optimizer,
        batch: tuple[Any, Any],
    ) -> tuple[float, float]:
        """One Adam step on the logits; BN keeps its running statistics (momentum 0)."""
        options, runtime = self.options, self.context.runtime
        x, y = runtime.batch(*batch)
        indicators = self.indicators()
        self.masker.set_masks(indicators)
        with frozen_bn(self.model), runtime.autocast():
            val_loss = self.context.task.loss_of(self.masker(x), y).float().cpu()
        every = torch.cat([indicators[g.name] for g in self.groups])
        penalty = band_penalty(self.expected_ratios(indicators), options.band)
        loss = val_loss + options.lambda_sparsity * every.mean() + options.lambda_budget * penalty
        grads = torch.autograd.grad(loss, self.logits)
        for logit, grad in zip(self.logits, grads, strict=True):
            logit.grad = grad
        optimizer.step()
        return val_loss.item(), float(penalty.detach())

    def _scores(self) -> dict[str, Tensor]:
        """``a / T`` by group: the extraction's threshold variable."""
        return {
            g.name: a.detach() / self.temperature
            for g, a in zip(self.groups, self.logits, strict=True)
        }

    def _subnet_accuracy(self, spec: SubnetSpec) -> float:
        """Proxy accuracy of ``spec`` as hard masks; BN statistics are restored afterwards."""
        context = self.context
        saved = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        self.masker.set_masks(masks_from_spec(context.graph, spec))
        recalibrate_bn(
            self.masker,
            context.data.train,
            _CALIBRATION_BATCHES,
            context.batch_size,
            context.runtime,
            context.data.workers,
        )
        accuracy = self._evaluate()
        for name, buffer in self.model.named_buffers():
            buffer.copy_(saved[name])
        return accuracy

    def _state(self) -> dict[str, Any]:
        """The expected costs, their ratios and the indicators' softness, now."""
        with torch.no_grad():
            indicators = self.indicators(detach=True)
            ratios = {m: float(r) for m, r in self.expected_ratios(indicators).items()}
            every = torch.cat([indicators[g.name] for g in self.groups])
            self.masker.set_masks(indicators)
            soft_accuracy = self._evaluate()
        state: dict[str, Any] = {"temperature": self.temperature, "acc_soft": soft_accuracy}
        for metric, ratio in ratios.items():
            state[f"expected_{metric}"] = ratio * self.budget.limits[metric]
            state[f"expected_{metric}_ratio"] = ratio
        state["undecided_share"] = float(((every > 0.1) & (every < 0.9)).float().mean())
        return state

    def _evaluate(self) -> float:
        """The task's metric of the masked model on the validation split."""
        return self.context.score(self.masker)

    def _report(self, step: int, epoch: float, losses: tuple[float, float, float]) -> None:
        widths = threshold_widths(self.groups, self._scores(), 0.0)
        spec = _spec(self.context, widths, self._scores())
        metrics: dict[str, Any] = {"step": step, "epoch": epoch, **self._state()}
        metrics[self.context.metric_name] = self._subnet_accuracy(spec)
        metrics.update(self.context.metrics(widths))
        metrics["utilisation"] = self.budget.utilisation(widths)
        metrics.update(zip(("loss_train", "loss_val", "band_penalty"), losses, strict=True))
        self.history.append(metrics)
        if self.report is not None:
            self.report(dict(metrics))

    def _extract(self, step: int, losses: tuple[float, float, float]) -> SpaceResult:
        scores = self._scores()
        threshold, widths, in_band = bisect_threshold(
            self.budget, self.groups, scores, self.options.band
        )
        # Kept channels follow the logits; softplus keeps them positive and ordered.
        ranking = {name: F.softplus(value - threshold) for name, value in scores.items()}
        chosen = dataclasses.replace(self.context, importance=ranking)
        spec, final = finalize(chosen, widths)
        metrics: dict[str, Any] = {"step": step, **self._state()}
        metrics[self.context.metric_name] = self._subnet_accuracy(spec)
        metrics.update(self.context.metrics(final))
        metrics["utilisation"] = self.budget.utilisation(final)
        metrics.update(zip(("loss_train", "loss_val", "band_penalty"), losses, strict=True))
        metrics.update(threshold=threshold, in_band=in_band, arch_lr=self.arch_lr)
        metrics["extracted_utilisation"] = self.budget.utilisation(widths)
        for metric, value in self.budget.evaluate(widths).items():
            metrics[f"extracted_{metric}"] = float(value)
        self.masker.clear_masks()
        state_dict = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return SpaceResult(spec, metrics, state_dict=state_dict, history=self.history)


def _spec(
    context: SpaceContext, widths: Mapping[str, int], scores: Mapping[str, Tensor]
) -> SubnetSpec:
    return SubnetSpec.from_widths(context.graph, context.model_ref, widths, scores)


def _initial_logits(importance: Tensor | None, size: int, logit_init: float) -> Tensor:
    """``a0 * clip(s / mean(s), 0, 2)``: indicators near 1, least important channels lowest."""
    if importance is None:
        scores = torch.ones(size)
    else:
        scores = importance.detach().double().cpu().flatten()
        scores = scores / scores.mean() if float(scores.mean()) > 0 else torch.ones(size)
    logits = logit_init * torch.clamp(scores, 0.0, 2.0)
    return logits.float().requires_grad_(True)
