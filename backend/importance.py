"""Channel importance criteria, one score per channel of every prunable group.

A group's score for a channel adds up the evidence of all its members: every producing conv or
linear (weight rows) and every norm layer over those channels. Criteria:

- ``l1`` / ``l2``: norm of the producing weight rows (Li et al., 2017);
- ``bn``: |gamma| of the norm layers (network slimming, Liu et al., 2017);
- ``taylor``: first-order Taylor estimate of the loss change when the channel is removed,
  ``(gamma * dL/dgamma + beta * dL/dbeta)^2`` on norm layers, or ``(sum w * dL/dw)^2`` over a
  producing weight row where there is no norm (Molchanov et al., 2019), summed over batches.
  The loss is the training toolkit's (:class:`~prunetune.backend.training.Task`): of the output
  the task names, for a model returning a tuple or a dict (a segmentation model's ``"out"``).

A channel that spans several features of a member (``multiplier`` > 1) is scored over all of
them. An attention head (a group with ``unit="heads"``) is such a channel: its score adds up the
evidence of all ``head_dim`` rows of the head in the q, k and v projections (``l1``: the sum of
their absolute weights; ``l2``: the root of the sum of their squares; ``taylor``: the sum of
the rows' terms; ``bn`` without a norm: the mean absolute weight), the output projection's
columns being inputs, which no criterion reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from prunetune.backend.graph import ChannelGraph, ChannelMember
from prunetune.backend.surgery import output_major
from prunetune.backend.training import Task

__all__ = ["IMPORTANCE_CRITERIA", "Criterion", "channel_importance"]

Criterion = Literal["l1", "l2", "bn", "taylor"]
IMPORTANCE_CRITERIA: tuple[str, ...] = get_args(Criterion)


def channel_importance(
    model: nn.Module,
    graph: ChannelGraph,
    criterion: str = "l1",
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    task: Task | None = None,
) -> dict[str, Tensor]:
    """Score every channel of every prunable group; higher means more important.

    Args:
        model: the dense model ``graph`` was traced from (its weights are read, not changed).
        graph: the model's channel graph.
        criterion: one of ``l1``, ``l2``, ``bn``, ``taylor``.
        batches: (inputs, labels) batches, needed by ``taylor`` only.
        task: the loss ``taylor`` differentiates and the output it is taken on, for a model
            that returns a tuple or a dict (default: cross-entropy on the tensor, the first
            item of a tuple or the ``"out"`` entry of a dict).

    Returns:
        ``{group name: float tensor of shape [group size]}`` for every prunable group.

    Raises:
        ValueError: unknown criterion, or ``taylor`` without batches.
        TrainingError: ``taylor`` on a model whose output the task does not find (a dict
            without ``"out"``, say): the message says how to name it.
    """
    if criterion not in IMPORTANCE_CRITERIA:
        raise ValueError(
            f"unknown importance criterion {criterion!r}; valid: {', '.join(IMPORTANCE_CRITERIA)}"
        )
    modules = dict(model.named_modules())
    if criterion == "taylor":
        if batches is None:
            raise ValueError("the taylor criterion needs data batches to take gradients on")
        grads = _accumulate_taylor(model, batches, task or Task())
    scores: dict[str, Tensor] = {}
    for group in graph.prunable_groups:
        total = torch.zeros(group.size)
        norm_seen = False
        for member in group.members:
            module = modules[member.module]
            if member.role == "norm" and getattr(module, "weight", None) is not None:
                norm_seen = True
                if criterion == "bn":
                    total += _per_channel(module.weight.detach().abs(), member, group.size)
                elif criterion == "taylor":
                    total += _per_channel(
                        _taylor(grads, member, module, ".norm"), member, group.size
                    )
            elif member.role == "out" and criterion in ("l1", "l2"):
                rows = _per_channel(output_major(module).detach(), member, group.size)
                total += rows.abs().sum(1) if criterion == "l1" else rows.pow(2).sum(1)
        if criterion == "taylor" and not norm_seen:
            for member in group.members:
                if member.role == "out":
                    total += _per_channel(
                        _taylor(grads, member, modules[member.module], ".weight"),
                        member,
                        group.size,
                    )
        if criterion == "l2":
            total = total.sqrt()
        if criterion == "bn" and not norm_seen:  # no norm layer: fall back on weight magnitude
            for member in group.members:
                if member.role == "out":
                    weight = output_major(modules[member.module]).detach()
                    total += _per_channel(weight, member, group.size).abs().mean(1)
        scores[group.name] = total
    return scores


def _taylor(
    grads: dict[str, Tensor], member: ChannelMember, module: nn.Module, kind: str
) -> Tensor:
    """A member's accumulated Taylor terms (one per output feature); zero for a layer that no
    gradient reached (an output the loss does not use: its channels do not change the loss)."""
    found = grads.get(member.module + kind)
    if found is not None:
        return found
    weight = getattr(module, "weight") if kind == ".norm" else output_major(module)  # noqa: B009
    return torch.zeros(int(weight.shape[0]))


def _per_channel(values: Tensor, member: ChannelMember, size: int) -> Tensor:
    """The rows of ``values`` (one per feature along dim 0) that belong to ``member``'s group,
    one row per channel: shape ``[size]`` for 1-D values, ``[size, rest]`` otherwise (a channel
    spanning ``multiplier`` features gets them all)."""
    span = values[member.offset : member.offset + size * member.multiplier]
    if values.ndim == 1 and member.multiplier == 1:
        return span
    if values.ndim == 1:
        return span.reshape(size, member.multiplier).sum(1)
    return span.reshape(size, -1)


def _accumulate_taylor(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], task: Task
) -> dict[str, Tensor]:
    """Per-channel squared first-order Taylor terms for norm layers and weight rows."""
    was_training = model.training
    model.eval()  # keep running statistics untouched; gradients flow all the same
    sums: dict[str, Tensor] = {}
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        task.loss_of(model(x), y).backward()
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention):  # its stacked q, k and v rows
                term = _projection_taylor(module)
                if term is not None:
                    key = name + ".weight"
                    sums[key] = sums.get(key, torch.zeros_like(term)) + term.pow(2)
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight.grad is None:
                continue
            if isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm):
                term = weight.detach() * weight.grad
                bias = getattr(module, "bias", None)
                if isinstance(bias, Tensor) and bias.grad is not None:
                    term = term + bias.detach() * bias.grad
                key = name + ".norm"
            elif weight.ndim < 2:  # a LayerNorm's gain: no group's rows (kept whole)
                continue
            else:
                term = weight.detach() * weight.grad
                if isinstance(module, nn.modules.conv._ConvTransposeNd):
                    term = term.transpose(0, 1)
                term = term.flatten(1).sum(1)
                key = name + ".weight"
            sums[key] = sums.get(key, torch.zeros_like(term)) + term.pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return sums


def _projection_taylor(attention: nn.MultiheadAttention) -> Tensor | None:
    """First-order Taylor terms of the rows of an ``nn.MultiheadAttention``'s query, key and
    value projections, stacked as in ``in_proj_weight``; ``None`` when no gradient reached
    them."""
    if attention.in_proj_weight is not None:
        weights = [attention.in_proj_weight]
    else:
        weights = [attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight]
    terms = []
    for weight in weights:
        if weight.grad is None:
            return None
        terms.append((weight.detach() * weight.grad).sum(1))
    return torch.cat(terms)
