"""A cheap accuracy proxy: recalibrate BN statistics on a few batches, then score on validation.

Pruned subnets inherit BN statistics computed for the dense network, which makes their
accuracy right after pruning misleading. Recomputing the statistics from a few training batches
and then evaluating ranks candidates far better, at the cost of forward passes only
(adaptive BN, as in EagleEye, Li et al., 2020).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunetune.backend.data import Split, TensorLoader
from prunetune.backend.train import evaluate

__all__ = ["proxy_accuracy", "recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batches: int = 8, batch_size: int = 64) -> None:
    """Recompute every BN layer's running statistics in place from ``batches`` training batches.

    The statistics are reset and accumulated as a plain average (``momentum=None``), so the
    result does not depend on what the model saw before. Mode and momenta are restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    loader = TensorLoader(split, batch_size, shuffle=True, seed=0)
    for index, (x, _) in enumerate(loader):
        if index >= batches:
            break
        model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def proxy_accuracy(
    model: nn.Module,
    calibration: Split,
    validation: Split,
    batches: int = 8,
    batch_size: int = 64,
) -> float:
    """Validation accuracy of a copy of ``model`` after BN recalibration; ``model`` is untouched.

    Args:
        model: a (pruned) network.
        calibration: the split whose batches recalibrate BN (the training split).
        validation: the split to score on.
        batches: how many calibration batches.
        batch_size: examples per calibration batch.
    """
    candidate = copy.deepcopy(model)
    recalibrate_bn(candidate, calibration, batches, batch_size)
    return evaluate(candidate, validation)[1]
