"""DSA: differentiable sparsity allocation under a budget, solved by ADMM (docs/methods.md §1).

Ning et al., "DSA: More Efficient Budgeted Pruning via Differentiable Sparsity Allocation"
(ECCV 2020, arXiv 2004.02164). Every prunable channel group ``k`` has a keep ratio
``alpha_k = sigmoid(theta_k)``. A differentiable pruning process turns it into keep
probabilities ``p_i = sigmoid(beta2 * (ln b_i - ln beta1_k))`` of the group's channels, with
``beta1_k`` solved so that ``mean_i p_i = alpha_k``; Bernoulli masks sampled from ``p`` multiply
the channels (straight-through), and the loss reaches ``alpha`` through the implicit function
``dL/dalpha_k = C_k * sum_i w_i dL/dp_i``, ``w_i = p_i (1 - p_i) / sum_j p_j (1 - p_j)``.
The budget is handled by ADMM between ``theta`` (loss side) and a copy ``z`` (budget side);
weight steps with freshly sampled masks alternate with ADMM steps until the relaxed costs of
``alpha`` meet every limit, then the weights keep training while ``beta2`` grows and the masks
harden. Extraction: ``n_k = round(alpha_k * C_k)`` channels of highest importance, then the shared
:func:`~prunetune.spaces.finalize` check.

Adaptations (ours, not the paper's):

- ``theta_init = 2`` (``alpha = 0.88``), not 5, and ``rho2 = 1``, not 0.01. At 5 the sigmoid
  saturates (``d alpha / d theta = 0.0066``), the budget multiplier grows for many steps and the
  z step then jumps to cutting the most expensive group (the ResNet-20 stem went to 1-2
  channels, though the loss rates it the most sensitive per FLOP); a stiff coupling keeps the z
  problem from having two minima per group.
- The theta step averages the loss gradient over steps (``loss_momentum``; one batch and one
  mask sample give a signal-to-noise ratio near 1, and the non-negative clamp would turn noise
  into pruning), lowers no theta by more than ``max_theta_step``, and shortens the step that
  crosses the budget to land on it (alpha never rises again).
- The budget is every constrained metric, each as relaxed cost / limit with its own ``u1``.
- The z step takes its gradient steps with Adam (scale-free); theta stays at or above
  ``logit(min_width / C_k)``.
- ``ln b_i`` is standardised per group so one ``beta2`` schedule hardens every group alike;
  ``beta2 = beta2_0 * growth ** (step / steps_per_epoch)`` with defaults for short runs.
- One weight step per ADMM step (paper: ~20); past ``allocation_share`` of the run, any excess is
  removed by lowering every theta by one common amount, so the masks have time to harden.
- The theta step runs in eval mode (no BN statistics from the validation split); extraction
  ranks channels by the final ``b_i``, the importance the masks were sampled from.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunetune.backend.graph import ChannelGraph, ChannelGroup
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.spec import select_channels
from prunetune.backend.training import (
    Optimization,
    Stepper,
    cosine_schedule,
    sgd,
    steps_per_pass,
)
from prunetune.spaces._base import (
    Report,
    Space,
    SpaceContext,
    SpaceResult,
    finalize,
    register_space,
)

__all__ = ["DSASpace", "keep_probabilities", "solve_log_threshold"]


def solve_log_threshold(
    alpha: Tensor, log_importance: Tensor, valid: Tensor, beta2: float, iterations: int = 50
) -> Tensor:
    """``ln beta1`` of every group, such that ``mean_i sigmoid(beta2 (l_i - ln beta1)) = alpha``.

    The mean is decreasing in ``ln beta1``, so bisection finds it; all groups are solved at once.

    Args:
        alpha: keep ratios, shape ``(P,)``, each in (0, 1).
        log_importance: ``l_i = ln b_i`` per channel, shape ``(P, C_max)``, padded.
        valid: which entries of ``log_importance`` are channels (bool, ``(P, C_max)``).
        beta2: the sharpness of the process (positive).
        iterations: bisection halvings.

    Returns:
        ``ln beta1`` per group, float64, shape ``(P,)``.
    """
    with torch.no_grad():
        logs = log_importance.double()
        ratio = alpha.detach().double().clamp(1e-12, 1 - 1e-12)
        count = valid.sum(1).double()
        margin = (torch.logit(ratio).abs() + 1.0) / beta2  # all p above / below alpha out there
        low = torch.where(valid, logs, math.inf).amin(1) - margin
        high = torch.where(valid, logs, -math.inf).amax(1) + margin
        for _ in range(iterations):
            middle = (low + high) / 2
            mean = (torch.sigmoid(beta2 * (logs - middle[:, None])) * valid).sum(1) / count
            above = mean > ratio  # too many kept: the threshold must rise
            low = torch.where(above, middle, low)
            high = torch.where(above, high, middle)
        return (low + high) / 2


class _KeepProbability(torch.autograd.Function):
    """``p(alpha)`` of the differentiable pruning process, with the implicit-function gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, alpha: Tensor, log_importance: Tensor, valid: Tensor, beta2: float
    ) -> Tensor:
        threshold = solve_log_threshold(alpha, log_importance, valid, beta2)
        logits = beta2 * (log_importance.double() - threshold[:, None])
        probability = torch.sigmoid(logits) * valid
        # w_i = p(1-p) / sum p(1-p), in log space so that it stays defined when masks harden
        log_slope = F.logsigmoid(logits) + F.logsigmoid(-logits)
        weights = torch.softmax(log_slope.masked_fill(~valid, -math.inf), dim=1)
        ctx.save_for_backward(weights, valid.sum(1).double())
        return probability.to(alpha.dtype)

    @staticmethod
    def backward(ctx: Any, grad_probability: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        weights, count = ctx.saved_tensors
        grad_alpha = count * (weights * grad_probability.double()).sum(1)
        return grad_alpha.to(grad_probability.dtype), None, None, None


def keep_probabilities(
    alpha: Tensor, log_importance: Tensor, valid: Tensor, beta2: float
) -> Tensor:
    """Keep probability of every channel: ``sigmoid(beta2 (l_i - ln beta1_k))``, mean ``alpha_k``.

    Arguments as for :func:`solve_log_threshold`. Differentiable in ``alpha`` through the implicit
    function of ``beta1``: ``dp_i / dalpha_k = C_k p_i (1 - p_i) / sum_j p_j (1 - p_j)``.

    Returns:
        Probabilities of shape ``(P, C_max)`` (0 at padding), in ``alpha``'s dtype.
    """
    return _KeepProbability.apply(alpha, log_importance, valid, beta2)  # type: ignore[no-any-return]


def _bisect(fits: Callable[[float], bool], high: float, iterations: int = 40) -> float:
    """The smallest ``t`` in ``[0, high]`` with ``fits(t)`` (``fits`` monotone, true at high)."""
    low = 0.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _norm_slices(model: nn.Module, group: ChannelGroup) -> list[tuple[Tensor, slice]]:
    """The BN gamma tensors of the group's norm members and the slice of each that is ours."""
    modules = dict(model.named_modules())
    found = []
    for member in group.members:
        weight = getattr(modules[member.module], "weight", None)
        if member.role == "norm" and isinstance(weight, Tensor):
            found.append((weight, slice(member.offset, member.offset + group.size)))
    return found


def _standardised_log(scores: Tensor) -> Tensor:
    logs = scores.clamp_min(1e-8 * float(scores.max()) + 1e-30).log()
    return (logs - logs.mean()) / logs.std(unbiased=False).clamp_min(1e-6)


def _check(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and (low < value if low_open else low <= value) and value <= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"dsa option {name}={value!r} must be a number in {bounds}")


@register_space
class DSASpace(Space):
    """Differentiable sparsity allocation (Ning et al., 2020): keep ratios learned under ADMM.

    Example:
        >>> result = create_space("dsa", epochs=6).run(context, report=print)  # doctest: +SKIP
    """

    name: ClassVar[str] = "dsa"

    @dataclass(frozen=True)
    class Options:
        """DSA's hyper-parameters.

        Attributes:
            epochs: passes over the training split (weight steps; ADMM steps interleave).
            batch_size: examples per weight step and per theta step; ``None`` (the default):
                the search's batch size.
            lr: peak learning rate of the weights (SGD, Nesterov momentum 0.9, cosine decay).
            weight_decay: L2 penalty on conv and linear weights.
            weight_steps: weight steps between two ADMM steps while over budget (paper: ~20).
            theta_lr: SGD step size of theta (the keep ratios' logits).
            theta_init: initial theta, ``alpha = sigmoid(theta_init)`` (paper: 5).
            loss_scale: ``s``, the weight of the validation loss in the theta step.
            loss_momentum: averaging factor of the loss gradient across theta steps (EMA).
            max_theta_step: the most any theta may fall in one theta step.
            rho1: ADMM penalty on the budget violation (also the step of its multiplier).
            rho2: ADMM penalty on ``theta - z`` (also the step of its multiplier).
            z_steps: gradient steps of each z step.
            z_lr: Adam step size of the z steps.
            beta2_0: initial sharpness of the pruning process (on standardised ``ln b``).
            growth: factor by which ``beta2`` grows per epoch.
            allocation_share: share of the weight steps within which ADMM must meet the budget;
                past it, every theta is lowered by one common amount until the relaxed costs fit.
        """

        epochs: int = 6
        batch_size: int | None = None
        lr: float = 0.02
        weight_decay: float = 5e-4
        weight_steps: int = 1
        theta_lr: float = 1.0
        theta_init: float = 2.0
        loss_scale: float = 1.0
        loss_momentum: float = 0.9
        max_theta_step: float = 0.25
        rho1: float = 0.01
        rho2: float = 1.0
        z_steps: int = 50
        z_lr: float = 0.01
        beta2_0: float = 1.0
        growth: float = 1.6
        allocation_share: float = 0.5

        def __post_init__(self) -> None:
            for name in ("epochs", "batch_size", "weight_steps", "z_steps"):
                value = getattr(self, name)
                if name == "batch_size" and value is None:
                    continue
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"dsa option {name}={value!r} must be an integer >= 1")
            for name in ("lr", "theta_lr", "rho1", "rho2", "z_lr", "beta2_0", "max_theta_step"):
                _check(name, getattr(self, name), 0.0, 1e6, low_open=True)
            _check("weight_decay", self.weight_decay, 0.0, 1.0)
            _check("loss_scale", self.loss_scale, 0.0, 1e9)
            _check("loss_momentum", self.loss_momentum, 0.0, 0.999)
            _check("allocation_share", self.allocation_share, 0.0, 1.0, low_open=True)
            _check("growth", self.growth, 1.0, 100.0)
            _check("theta_init", self.theta_init, 0.0, 20.0, low_open=True)

    @classmethod
    def search_space(cls, graph: ChannelGraph) -> dict[str, Any]:
        """Step sizes, ADMM penalties, the loss scale, the start and the hardening schedule."""
        from ray import tune

        return {
            "lr": tune.loguniform(5e-3, 5e-2),
            "theta_lr": tune.loguniform(0.3, 3.0),
            "theta_init": tune.uniform(1.5, 3.5),
            "loss_scale": tune.loguniform(0.3, 10.0),
            "rho1": tune.loguniform(3e-3, 3e-2),
            "rho2": tune.loguniform(0.3, 3.0),
            "beta2_0": tune.loguniform(0.3, 3.0),
            "growth": tune.uniform(1.2, 2.0),
        }

    def run(self, context: SpaceContext, report: Report | None = None) -> SpaceResult:
        """Allocate sparsity by ADMM while training the weights, then :func:`finalize`."""
        return _DSARun(self.options, context, report).run()


class _DSARun:
    """One run's state: the model copy, the keep-ratio logits and the ADMM variables."""

    def __init__(self, options: Any, context: SpaceContext, report: Report | None) -> None:
        self.options, self.context, self.report = options, context, report
        self.generator = torch.Generator().manual_seed(context.seed)
        self.model = context.runtime.model(copy.deepcopy(context.model))
        self.masker = ChannelMasker(self.model, context.graph)
        self.groups = context.graph.prunable_groups
        self.norms = [_norm_slices(self.model, group) for group in self.groups]
        sizes = torch.tensor([g.size for g in self.groups], dtype=torch.float64)
        self.valid = torch.arange(int(sizes.max()) if len(sizes) else 1)[None, :] < sizes[:, None]
        minimum = torch.tensor([g.min_width for g in self.groups], dtype=torch.float64)
        init = float(options.theta_init)
        self.theta_min = torch.logit((minimum / sizes).clamp(max=0.999)).clamp(max=init)
        self.theta = torch.full((len(self.groups),), init, dtype=torch.float64)
        self.z = self.theta.clone().requires_grad_(True)
        self.z_optimizer = torch.optim.Adam([self.z], lr=options.z_lr)
        self.u1 = torch.zeros(len(context.budget.limits), dtype=torch.float64)
        self.u2 = torch.zeros_like(self.theta)
        self.loss_grad = torch.zeros_like(self.theta)
        self.history: list[dict[str, Any]] = []
        self.admm_steps, self.forced = 0, False

    # -- the differentiable pruning process -----------------------------------------------------

    def importance(self) -> list[Tensor]:
        """``b_i``: |gamma| of each group's norm layers (mean over several), else the context's."""
        scores = []
        for group, norms in zip(self.groups, self.norms, strict=True):
            if norms:
                gammas = [weight.detach()[span].abs() for weight, span in norms]
                scores.append(torch.stack(gammas).mean(0).double())
            else:
                fallback = (self.context.importance or {}).get(group.name)
                scores.append((torch.ones(group.size) if fallback is None else fallback).double())
        return scores

    def sample_masks(self, alpha: Tensor, beta2: float) -> None:
        """Bernoulli masks from ``p(alpha)``, straight-through to ``p`` (and so to ``alpha``)."""
        logs = torch.zeros(self.valid.shape, dtype=torch.float64)
        for row, scores in enumerate(self.importance()):
            logs[row, : len(scores)] = _standardised_log(scores)
        probability = keep_probabilities(alpha, logs, self.valid, beta2)
        sample = torch.bernoulli(probability.detach(), generator=self.generator)
        masks = probability + (sample - probability).detach()
        self.masker.set_masks(
            {g.name: masks[k, : g.size].float() for k, g in enumerate(self.groups)}
        )

    def hard_widths(self, alpha: Tensor) -> dict[str, int]:
        """``n_k = round(alpha_k C_k)``, to the group's step and within its bounds."""
        widths = {}
        for group, ratio in zip(self.groups, alpha.tolist(), strict=True):
            width = round(ratio * group.size / group.step) * group.step
            widths[group.name] = int(min(max(width, group.min_width), group.size))
        return widths

    def hard_accuracy(self, widths: dict[str, int]) -> float:
        """Validation accuracy with the top-``n_k`` channels by ``b_i`` kept, the rest masked."""
        masks = {}
        for group, scores in zip(self.groups, self.importance(), strict=True):
            mask = torch.zeros(group.size)
            mask[list(select_channels(group, widths[group.name], scores))] = 1.0
            masks[group.name] = mask
        self.masker.set_masks(masks)
        return self.evaluate()

    def evaluate(self) -> float:
        """The task's metric of the masked model on the validation split."""
        return self.context.score(self.masker)

    # -- ADMM -----------------------------------------------------------------------------------

    def ratios(self, alpha: Tensor) -> Tensor:
        return torch.stack(list(self.context.budget.relaxed_ratios(alpha).values()))

    def within_budget(self, theta: Tensor) -> bool:
        with torch.no_grad():
            return bool((self.ratios(torch.sigmoid(theta)) <= 1.0).all())

    def theta_step(self, x: Any, y: Any, beta2: float) -> None:
        """One SGD step on ``s L_val + u2^T (theta - z) + rho2/2 ||theta - z||^2``, grad >= 0."""
        opts, runtime = self.options, self.context.runtime
        theta = self.theta.clone().requires_grad_(True)
        self.sample_masks(torch.sigmoid(theta), beta2)
        self.masker.eval()
        x, y = runtime.batch(x, y)
        with runtime.autocast():
            loss = self.context.task.loss_of(self.masker(x), y)
        (grad,) = torch.autograd.grad(opts.loss_scale * loss, theta)
        # one batch and one mask sample make a noisy estimate, and the clamp below would turn
        # its noise into pruning: average it over theta steps
        self.loss_grad = torch.lerp(self.loss_grad, grad, 1.0 - opts.loss_momentum)
        grad = self.loss_grad + self.u2 + opts.rho2 * (self.theta - self.z.detach())
        step = (opts.theta_lr * grad.clamp_min(0.0)).clamp_max(opts.max_theta_step)
        moved = lambda t: torch.maximum(self.theta - t * step, self.theta_min)  # noqa: E731
        # alpha never rises again, so a step past the budget would be final: land on it instead
        fraction = 1.0
        if self.within_budget(moved(1.0)):
            fraction = _bisect(lambda t: self.within_budget(moved(t)), 1.0)
        self.theta = moved(fraction)

    def z_step(self) -> None:
        """~50 gradient steps on the augmented budget penalty, then the multiplier updates."""
        opts = self.options
        for _ in range(opts.z_steps):
            violation = torch.relu(self.ratios(torch.sigmoid(self.z)) - 1.0)
            gap = self.theta - self.z
            objective = (
                (self.u1 * violation).sum()
                + opts.rho1 / 2 * violation.pow(2).sum()
                + (self.u2 * gap).sum()
                + opts.rho2 / 2 * gap.pow(2).sum()
            )
            self.z_optimizer.zero_grad()
            objective.backward()
            self.z_optimizer.step()
            self.u1 += opts.rho1 * violation.detach()
        self.u2 += opts.rho2 * (self.theta - self.z.detach())
        self.admm_steps += 1

    def force_budget(self) -> None:
        """Lower every theta by the smallest common amount that meets the budget."""
        lowered = lambda t: torch.maximum(self.theta - t, self.theta_min)  # noqa: E731
        span = float(self.theta.max() - self.theta_min.min()) + 1.0
        self.theta = lowered(_bisect(lambda t: self.within_budget(lowered(t)), span))
        self.forced = True

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> SpaceResult:
        opts, context = self.options, self.context
        batch_size = opts.batch_size or context.batch_size
        loader = context.train_batches(batch_size)
        val_batches = context.val_batches(batch_size)
        per_epoch = steps_per_pass(context.data.train, batch_size)
        total = opts.epochs * per_epoch
        optimizer = sgd(self.model, Optimization(opts.lr, weight_decay=opts.weight_decay))
        stepper = Stepper(
            self.masker,
            optimizer,
            task=context.task,
            runtime=context.runtime,
            scheduler=cosine_schedule(optimizer, total),
        )
        allocating = not self.within_budget(self.theta)
        deadline = max(1, round(opts.allocation_share * total))
        step, beta2 = 0, opts.beta2_0
        for epoch in range(opts.epochs):
            for x, y in loader:
                beta2 = opts.beta2_0 * opts.growth ** (step / per_epoch)
                if allocating and step % opts.weight_steps == 0:
                    x_val, y_val = next(val_batches)
                    self.theta_step(x_val, y_val, beta2)
                    self.z_step()
                    allocating = not self.within_budget(self.theta)
                if allocating and step + 1 >= deadline:
                    self.force_budget()
                    allocating = False
                self.masker.train()
                with torch.no_grad():
                    self.sample_masks(torch.sigmoid(self.theta), beta2)
                stepper.step(x, y)
                step += 1
            alpha = torch.sigmoid(self.theta)
            widths = self.hard_widths(alpha)
            metrics = {**context.metrics(widths), context.metric_name: self.hard_accuracy(widths)}
            self.emit(metrics, alpha, step=step, epoch=epoch + 1, beta2=beta2)
        return self.finish(step, beta2)

    def emit(self, metrics: dict[str, Any], alpha: Tensor, **extra: Any) -> None:
        """Add the expected (relaxed) costs and the run's state, record and report."""
        budget = self.context.budget
        for metric, ratio in budget.relaxed_ratios(alpha.detach()).items():
            metrics[f"expected_{metric}"] = float(ratio) * budget.limits[metric]
        metrics.update(extra, admm_steps=self.admm_steps, forced=self.forced)
        metrics["allocating"] = not self.within_budget(self.theta)
        metrics["keep_ratio_mean"] = float(alpha.mean()) if len(alpha) else 1.0
        self.history.append(metrics)
        if self.report is not None:
            self.report(dict(metrics))

    def finish(self, step: int, beta2: float) -> SpaceResult:
        """Extract ``n_k = round(alpha_k C_k)`` by the final ``b_i``, finalize, report."""
        alpha = torch.sigmoid(self.theta)
        ratios = {g.name: float(a) for g, a in zip(self.groups, alpha.tolist(), strict=True)}
        importance = {
            g.name: s.float() for g, s in zip(self.groups, self.importance(), strict=True)
        }
        context = dataclasses.replace(self.context, importance=importance)
        spec, widths = finalize(context, {g.name: ratios[g.name] * g.size for g in self.groups})
        self.masker.set_masks(masks_from_spec(self.context.graph, spec))
        metrics = {**self.context.metrics(widths), context.metric_name: self.evaluate()}
        self.masker.clear_masks()
        rounded = self.context.metrics(self.hard_widths(alpha))
        metrics.update({f"rounded_{m}": rounded[m] for m in self.context.budget.limits})
        self.emit(metrics, alpha, step=step, beta2=beta2)
        metrics["keep_ratios"] = ratios
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return SpaceResult(spec, metrics, state_dict=state, history=list(self.history))
