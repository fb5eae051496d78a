"""A cheap accuracy proxy: recalibrate BN statistics on a few batches, then score on validation.

Pruned subnets inherit BN statistics computed for the dense network, which makes their
accuracy right after pruning misleading. Recomputing the statistics from a few training batches
and then evaluating ranks candidates far better, at the cost of forward passes only
(adaptive BN, as in EagleEye, Li et al., 2020). Both steps are the training toolkit's
(:func:`prunetune.backend.training.recalibrate_bn`, :func:`~prunetune.backend.training.evaluate`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from prunetune.backend.training import Runtime, Task, evaluate, recalibrate_bn

__all__ = ["proxy_accuracy", "recalibrate_bn"]


def proxy_accuracy(
    model: nn.Module,
    calibration: Any,
    validation: Any,
    batches: int = 8,
    batch_size: int = 64,
    task: Task | None = None,
    runtime: Runtime | None = None,
    workers: int = 0,
) -> float:
    """The task's validation metric of a copy of ``model`` after BN recalibration.

    ``model`` is untouched.

    Args:
        model: a (pruned) network, on ``runtime``'s device.
        calibration: the split whose batches recalibrate BN (the training split).
        validation: the split to score on.
        batches: how many calibration batches.
        batch_size: examples per calibration batch.
        task: output, loss and metric (default: top-1 accuracy).
        runtime: device and precision (default: the CPU in fp32).
        workers: ``DataLoader`` workers for streamed splits.

    Returns:
        The metric (top-1 accuracy by default), higher is better.
    """
    candidate = copy.deepcopy(model)
    recalibrate_bn(candidate, calibration, batches, batch_size, runtime, workers)
    return evaluate(candidate, validation, task, runtime, workers=workers)[1]
