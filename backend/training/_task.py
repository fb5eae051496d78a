"""What is learned and how it is judged: the model output used, the loss and the metric.

A model may return a tensor, a tuple or a dict (torchvision's segmentation models return
``{"out": ..., "aux": ...}``); :attr:`Task.output` names the entry that the loss, the metric and
distillation use. Metrics stream: :meth:`Metric.update` per batch, :meth:`Metric.compute` at the
end; higher is better, and each has a name that the search optimises and reports by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from prunetune.backend.errors import TrainingError

__all__ = [
    "METRICS",
    "Accuracy",
    "LossFn",
    "MeanIoU",
    "Metric",
    "MetricName",
    "PixelAccuracy",
    "Task",
    "distillation_loss",
    "select_output",
]

MetricName = Literal["top1", "miou", "pixel_acc"]
METRICS: tuple[MetricName, ...] = get_args(MetricName)
LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(outputs, targets) -> scalar``: outputs as :attr:`Task.output` selects them."""


@runtime_checkable
class Metric(Protocol):
    """A streaming metric: higher is better.

    Attributes:
        name: how the search reports and optimises it (``acc``, ``miou``, ...).
    """

    name: str

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Accumulate one batch (outputs as selected, targets as the loader gives them)."""

    def compute(self) -> float:
        """The metric over every batch since this object was made."""


class Accuracy:
    """Top-1 accuracy of class scores (N, C) against labels (N,); named ``acc``."""

    name = "acc"

    def __init__(self) -> None:
        self.correct, self.seen = 0, 0

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Count the batch's correct top-1 predictions."""
        self.correct += int((outputs.argmax(1) == targets).sum())
        self.seen += int(targets.numel())

    def compute(self) -> float:
        """Correct / seen (0 before any batch)."""
        return self.correct / max(1, self.seen)


class _Confusion:
    """A C x C confusion matrix of dense predictions (N, C, H, W) against (N, H, W) labels."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index
        self.matrix: Tensor | None = None

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add the batch's pixels whose label is not ``ignore_index``."""
        classes = int(outputs.shape[1])
        if self.matrix is None:
            self.matrix = torch.zeros(classes, classes, dtype=torch.int64)
        predicted = outputs.argmax(1).flatten().cpu()
        labels = targets.flatten().cpu().long()
        keep = (labels != self.ignore_index) & (labels >= 0) & (labels < classes)
        index = labels[keep] * classes + predicted[keep]
        self.matrix += torch.bincount(index, minlength=classes * classes).view(classes, classes)


class MeanIoU(_Confusion):
    """Mean intersection over union of the classes present; named ``miou``."""

    name = "miou"

    def compute(self) -> float:
        """Mean over classes seen in labels or predictions of TP / (TP + FP + FN)."""
        if self.matrix is None:
            return 0.0
        true = self.matrix.diag().double()
        union = self.matrix.sum(0).double() + self.matrix.sum(1).double() - true
        present = union > 0
        return float((true[present] / union[present]).mean()) if present.any() else 0.0


class PixelAccuracy(_Confusion):
    """Share of labelled pixels predicted right; named ``pixel_acc``."""

    name = "pixel_acc"

    def compute(self) -> float:
        """Correct pixels / labelled pixels."""
        if self.matrix is None:
            return 0.0
        return float(self.matrix.diag().sum()) / max(1, int(self.matrix.sum()))


def select_output(outputs: Any, output: str | int | None) -> Tensor:
    """The tensor the loss and metric use from what a model returned.

    Args:
        outputs: a tensor, a tuple/list or a dict of tensors.
        output: a dict key or tuple index; ``None`` takes a tensor as it is, the first item of
            a tuple and the ``"out"`` entry of a dict.

    Raises:
        TrainingError: the named output is not there, or nothing names one.
    """
    if isinstance(outputs, Tensor) and output is None:
        return outputs
    if isinstance(outputs, dict):
        key = "out" if output is None else output
        if key not in outputs:
            raise TrainingError(
                f"the model returns a dict with {', '.join(map(repr, outputs))}; name the "
                f"output to use (--output KEY), not {key!r}"
            )
        return outputs[key]  # type: ignore[no-any-return]
    if isinstance(outputs, (tuple, list)):
        index = 0 if output is None else output
        if not isinstance(index, int) or not -len(outputs) <= index < len(outputs):
            raise TrainingError(
                f"the model returns {len(outputs)} outputs; --output must be an index below "
                f"{len(outputs)}, not {index!r}"
            )
        return outputs[index]  # type: ignore[no-any-return]
    raise TrainingError(
        f"the model returns a {type(outputs).__name__}; --output {output!r} needs a dict or tuple"
    )


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL divergence to a teacher's softened outputs (Hinton et al.), times ``temperature**2``.

    Class scores are along dim 1 ((N, C) or (N, C, H, W)); dense outputs average per pixel.
    """
    classes = student.shape[1]
    s = student.movedim(1, -1).reshape(-1, classes).float()
    t = teacher.movedim(1, -1).reshape(-1, classes).float()
    soft = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return soft * temperature**2


@dataclass(frozen=True)
class Task:
    """The output used, the loss and the metric of every loop.

    Attributes:
        loss: ``"cross_entropy"`` (class scores along dim 1: (N, C) or (N, C, H, W)) or a
            callable ``loss(outputs, targets) -> scalar tensor`` (module-level, so Ray can
            ship it to the trials).
        metric: ``"top1"`` (accuracy, reported as ``acc``), ``"miou"`` (mean IoU),
            ``"pixel_acc"``, or a zero-argument callable (e.g. a class) making a fresh
            :class:`Metric`.
        output: which output of the model the loss, metric and distillation use (a dict key
            or tuple index; see :func:`select_output`).
        ignore_index: target value that cross-entropy and the dense metrics skip.
    """

    loss: str | LossFn = "cross_entropy"
    metric: MetricName | Callable[[], Metric] = "top1"
    output: str | int | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if isinstance(self.loss, str) and self.loss != "cross_entropy":
            raise ValueError(f"loss must be 'cross_entropy' or a callable, got {self.loss!r}")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise ValueError(
                f"metric must be one of {', '.join(METRICS)} or a callable, got {self.metric!r}"
            )

    @classmethod
    def from_names(
        cls,
        loss: str | LossFn = "cross_entropy",
        metric: str | Callable[[], Metric] = "top1",
        output: str | int | None = None,
        ignore_index: int = -100,
    ) -> Task:
        """The task that command-line or config names describe.

        Args:
            loss: ``cross_entropy``, ``package.module:function`` or a callable.
            metric: one of :data:`METRICS`, ``package.module:Class`` or a callable.
            output: a dict key, or a tuple index (``"0"`` from a command line becomes ``0``).
            ignore_index: target value the loss and the dense metrics skip.

        Raises:
            ValueError: a ``package.module:name`` that cannot be imported, or an unknown name.
        """
        from prunetune.backend.datasources import import_callable

        if isinstance(metric, str) and metric not in METRICS:
            metric = import_callable(metric, f"metric (or one of {', '.join(METRICS)})")
        if isinstance(loss, str) and loss != "cross_entropy":
            loss = import_callable(loss, "loss (or cross_entropy)")
        if isinstance(output, str) and output.lstrip("-").isdigit():
            output = int(output)  # --output 0: a tuple index
        return cls(loss=loss, metric=metric, output=output, ignore_index=ignore_index)

    def new_metric(self) -> Metric:
        """A fresh metric object.

        Raises:
            TrainingError: a user metric lacks ``name``, ``update`` or ``compute``.
        """
        if self.metric == "top1":
            return Accuracy()
        if self.metric == "miou":
            return MeanIoU(self.ignore_index)
        if self.metric == "pixel_acc":
            return PixelAccuracy(self.ignore_index)
        assert callable(self.metric)
        made = self.metric()
        if not isinstance(made, Metric) or not isinstance(getattr(made, "name", None), str):
            raise TrainingError(
                f"metric {self.metric!r} must make an object with a name (str), "
                "update(outputs, targets) and compute() -> float"
            )
        return made

    @property
    def metric_name(self) -> str:
        """The metric's own name (``acc`` for top-1)."""
        return self.new_metric().name

    def select(self, outputs: Any) -> Tensor:
        """The output used from what the model returned (see :func:`select_output`)."""
        return select_output(outputs, self.output)

    def loss_of(self, outputs: Any, targets: Tensor) -> Tensor:
        """The loss of a batch from the model's raw outputs."""
        selected = self.select(outputs)
        if callable(self.loss):
            return self.loss(selected, targets)
        return F.cross_entropy(selected.float(), targets, ignore_index=self.ignore_index)
