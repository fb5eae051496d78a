"""The training toolkit every loop goes through: device, precision, loss, metric, batches, steps.

- :class:`Runtime`: device (``auto``/``cpu``/``cuda[:i]``), precision (fp32, bf16 or fp16
  autocast with a gradient scaler), channels-last.
- :class:`Task`: the model output used, the loss and the streaming metric (top-1 accuracy by
  default; mean IoU and pixel accuracy built in; user callables).
- :class:`Optimization`, :func:`sgd`, :func:`cosine_schedule`: the one optimiser set-up.
- :func:`batches`, :func:`endless`: in-memory or streamed batches, one pass or for ever.
- :class:`Stepper`: one training step (autocast, scaled backward, non-finite loss check).
- :func:`frozen_bn`, :func:`recalibrate_bn`, :func:`evaluate`.
"""

from prunetune.backend.training._loop import (
    Optimization,
    Stepper,
    batches,
    cosine_schedule,
    endless,
    evaluate,
    first_examples,
    frozen_bn,
    recalibrate_bn,
    sgd,
    steps_per_pass,
)
from prunetune.backend.training._runtime import PRECISIONS, Precision, Runtime, parse_device
from prunetune.backend.training._task import (
    METRICS,
    Accuracy,
    LossFn,
    MeanIoU,
    Metric,
    MetricName,
    PixelAccuracy,
    Task,
    distillation_loss,
    select_output,
)

__all__ = [
    "METRICS",
    "PRECISIONS",
    "Accuracy",
    "LossFn",
    "MeanIoU",
    "Metric",
    "MetricName",
    "Optimization",
    "PixelAccuracy",
    "Precision",
    "Runtime",
    "Stepper",
    "Task",
    "batches",
    "cosine_schedule",
    "distillation_loss",
    "endless",
    "evaluate",
    "first_examples",
    "frozen_bn",
    "parse_device",
    "recalibrate_bn",
    "select_output",
    "sgd",
    "steps_per_pass",
]
