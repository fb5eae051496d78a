"""Dense training and finetuning (optionally distilled), built from :mod:`backend.training`.

SGD with Nesterov momentum and a per-step cosine schedule by default; the device, precision,
loss and metric come from the caller's :class:`~prunetune.backend.training.Runtime` and
:class:`~prunetune.backend.training.Task`. Progress goes to a callback (the command line prints
it); the loop never touches global state beyond torch's thread count, which the caller owns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.errors import DivergedError
from prunetune.backend.training import (
    Optimization,
    Runtime,
    Stepper,
    Task,
    batches,
    cosine_schedule,
    evaluate,
    sgd,
    steps_per_pass,
)

__all__ = ["DivergedError", "EpochReport", "TrainConfig", "TrainResult", "evaluate", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train or finetune.

    Attributes:
        epochs: passes over the training split (fractions allowed, e.g. 0.5).
        lr: peak learning rate of the cosine schedule.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 penalty on weights.
        batch_size: examples per step.
        warmup_steps: linear warm-up steps before the cosine decay.
        distill_weight: share of the loss taken by distillation from the teacher (0 disables).
        distill_temperature: softmax temperature of the distillation loss.
        seed: seeds the shuffling and the initial state of the run.
    """

    epochs: float = 10.0
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_steps: int = 0
    distill_weight: float = 0.7
    distill_temperature: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"weight_decay must be a finite number >= 0 (0 turns it off), got "
                f"{self.weight_decay}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")

    @property
    def optimization(self) -> Optimization:
        """The optimiser set-up these settings describe."""
        return Optimization(self.lr, self.momentum, self.weight_decay, self.warmup_steps)


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did: training loss and metric, validation metric, elapsed seconds.

    ``train_acc`` and ``val_acc`` hold the task's metric (top-1 accuracy by default), named
    ``metric``.
    """

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_acc: float
    seconds: float
    metric: str = "acc"

    def line(self) -> str:
        """A one-line progress message."""
        name = "" if self.metric == "acc" else f"{self.metric} "
        return (
            f"epoch {self.epoch}/{self.epochs}  loss {self.train_loss:.4f}  "
            f"train {name}{100 * self.train_acc:.2f}%  val {name}{100 * self.val_acc:.2f}%  "
            f"({self.seconds:.1f}s)"
        )


@dataclass
class TrainResult:
    """Per-epoch reports of a run; ``val_acc`` is the last epoch's validation accuracy."""

    history: list[EpochReport] = field(default_factory=list)

    @property
    def val_acc(self) -> float:
        """Validation accuracy after the last epoch (0 before any)."""
        return self.history[-1].val_acc if self.history else 0.0


def train(
    model: nn.Module,
    data: DatasetSplits,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    task: Task | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data.train``, reporting the validation metric every epoch.

    Args:
        model: the network; trained in place.
        data: the dataset's splits (``train`` to learn from, ``val`` to report on).
        config: optimiser, schedule and distillation settings.
        teacher: when given and ``config.distill_weight > 0``, its outputs are distilled into the
            student (the dense model teaching its pruned subnet).
        on_epoch: called after every epoch with its report (progress display, early stopping by
            raising).
        on_step: called after every step with (step, total steps, loss).
        task: the output used, loss and metric (default: cross-entropy, top-1 accuracy).
        runtime: device, precision and layout (default: the CPU in fp32); ``model`` and
            ``teacher`` are moved to its device.

    Returns:
        The per-epoch history.

    Raises:
        DivergedError: the loss became NaN or infinite (names the step; try a lower lr); the
            weights are left as they were before that step.
    """
    task = task or Task()
    runtime = runtime or Runtime()
    runtime.model(model)
    loader = batches(
        data.train,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        augment=data.augment,
        workers=data.workers,
        runtime=runtime,
    )
    per_pass = steps_per_pass(data.train, config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * per_pass))
    epochs = math.ceil(config.epochs)
    optimizer = sgd(model, config.optimization)
    distilling = teacher is not None and config.distill_weight > 0
    if teacher is not None:
        runtime.model(teacher).eval()
    stepper = Stepper(
        model,
        optimizer,
        task=task,
        runtime=runtime,
        scheduler=cosine_schedule(optimizer, total_steps, config.warmup_steps),
        teacher=teacher if distilling else None,
        distill_weight=config.distill_weight,
        distill_temperature=config.distill_temperature,
    )
    result = TrainResult()
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        metric = task.new_metric()
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            if stepper.steps >= total_steps:
                break
            loss_value, outputs = stepper.step(x, y)
            y = runtime.batch(None, y)[1]
            loss_sum += loss_value * len(y)
            metric.update(task.select(outputs).detach().float(), y)
            seen += len(y)
            if on_step is not None:
                on_step(stepper.steps, total_steps, loss_value)
        report = EpochReport(
            epoch=epoch,
            epochs=epochs,
            train_loss=loss_sum / max(1, seen),
            train_acc=metric.compute(),
            val_acc=evaluate(model, data.val, task, runtime, workers=data.workers)[1],
            seconds=time.perf_counter() - started,
            metric=metric.name,
        )
        result.history.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return result
