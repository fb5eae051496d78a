"""The one training loop everything shares: train, finetune (optionally distilled), evaluate.

SGD with Nesterov momentum and a per-step cosine schedule by default. Progress goes to a callback
(the command line prints it); the loop never touches global state beyond torch's thread count,
which the caller owns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunetune.backend.data import DatasetSplits, Split, TensorLoader
from prunetune.backend.errors import PrunetuneError

__all__ = ["DivergedError", "EpochReport", "TrainConfig", "TrainResult", "evaluate", "train"]


class DivergedError(PrunetuneError):
    """The training loss became NaN or infinite: the run stopped before the weights did."""


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


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did: training loss and accuracy, validation accuracy, elapsed seconds."""

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_acc: float
    seconds: float

    def line(self) -> str:
        """A one-line progress message."""
        return (
            f"epoch {self.epoch}/{self.epochs}  loss {self.train_loss:.4f}  "
            f"train {100 * self.train_acc:.2f}%  val {100 * self.val_acc:.2f}%  "
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


def distillation_loss(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None,
    weight: float,
    temperature: float,
) -> Tensor:
    """Cross-entropy, mixed with KL divergence to a teacher's softened outputs (Hinton et al.)."""
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is None or weight == 0.0:
        return loss
    soft = F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * loss + weight * soft * temperature**2


def train(
    model: nn.Module,
    data: DatasetSplits,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data.train``, reporting validation accuracy every epoch.

    Args:
        model: the network; trained in place.
        data: the dataset's splits (``train`` to learn from, ``val`` to report on).
        config: optimiser, schedule and distillation settings.
        teacher: when given and ``config.distill_weight > 0``, its outputs are distilled into the
            student (the dense model teaching its pruned subnet).
        on_epoch: called after every epoch with its report (progress display, early stopping by
            raising).
        on_step: called after every step with (step, total steps, loss).

    Returns:
        The per-epoch history.

    Raises:
        DivergedError: the loss became NaN or infinite; the weights are left as they were
            before that step.
    """
    generator_seed = config.seed
    loader = TensorLoader(
        data.train, config.batch_size, shuffle=True, seed=generator_seed, augment=data.augment
    )
    total_steps = max(1, math.ceil(config.epochs * len(loader)))
    epochs = math.ceil(config.epochs)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    parameter_groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(
        parameter_groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
    )

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if teacher is not None:
        teacher.eval()
    result = TrainResult()
    step = 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            if step >= total_steps:
                break
            logits = model(x)
            teacher_logits = None
            if teacher is not None and config.distill_weight > 0:
                with torch.no_grad():
                    teacher_logits = teacher(x)
            loss = distillation_loss(
                logits, y, teacher_logits, config.distill_weight, config.distill_temperature
            )
            if not bool(torch.isfinite(loss)):
                raise DivergedError(
                    f"training diverged: the loss is {float(loss.detach())} at step {step + 1} of "
                    f"{total_steps} (epoch {epoch}); lower the learning rate (lr {config.lr:g}) "
                    "or check the data and the checkpoint for NaN"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if on_step is not None:
                on_step(step, total_steps, loss_value)
        report = EpochReport(
            epoch=epoch,
            epochs=epochs,
            train_loss=loss_sum / max(1, seen),
            train_acc=correct / max(1, seen),
            val_acc=evaluate(model, data.val)[1],
            seconds=time.perf_counter() - started,
        )
        result.history.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` in eval mode on ``split``.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in TensorLoader(split, batch_size):
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(1, len(split))
    return loss_sum / n, correct / n
