"""The pieces every loop is made of: batches, optimiser and schedule, a step, BN handling, scoring.

Dense training, finetuning, each space's inner run, trial scoring and the proxy all build their
loops from these, so they share one device, precision, loss, metric and data path.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, Subset

from prunetune.backend.data import Split, TensorLoader, split_length
from prunetune.backend.errors import DivergedError
from prunetune.backend.training._runtime import Runtime
from prunetune.backend.training._task import Task, distillation_loss

__all__ = [
    "Optimization",
    "Stepper",
    "batches",
    "cosine_schedule",
    "endless",
    "evaluate",
    "first_examples",
    "frozen_bn",
    "recalibrate_bn",
    "sgd",
    "steps_per_pass",
]


@dataclass(frozen=True)
class Optimization:
    """SGD with Nesterov momentum and a cosine schedule: the one optimiser set-up of all loops.

    Attributes:
        lr: peak learning rate.
        momentum: SGD momentum (Nesterov when above 0).
        weight_decay: L2 penalty on weights of 2 or more dimensions; never on BN or biases.
        warmup_steps: linear warm-up steps before the cosine decay.
    """

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def sgd(model: nn.Module, optimization: Optimization) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters; no weight decay on BN and bias parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": optimization.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups,
        lr=optimization.lr,
        momentum=optimization.momentum,
        nesterov=optimization.momentum > 0,
    )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(
    split: Split | Dataset[Any] | DataLoader[Any],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    workers: int = 0,
    runtime: Runtime | None = None,
) -> Iterable[tuple[Any, Any]]:
    """One pass's batches of a split: sliced from memory, or streamed by ``DataLoader`` workers.

    Args:
        split: an in-memory :class:`Split` (fast path), a ``Dataset`` of (input, target) pairs,
            or a ready ``DataLoader`` (used as it is).
        batch_size: examples per batch.
        shuffle: reshuffle every pass (seeded).
        seed: the shuffle's (and augmentation's) seed.
        augment: random crop and flip of an in-memory split (a ``Dataset`` brings its own
            transforms).
        workers: ``DataLoader`` worker processes for a ``Dataset``.
        runtime: pins memory when the loops run on a GPU.
    """
    if isinstance(split, Split):
        return TensorLoader(split, batch_size, shuffle=shuffle, seed=seed, augment=augment)
    if isinstance(split, DataLoader):
        return split
    pin = runtime is not None and runtime.on_cuda
    return DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )


def steps_per_pass(split: Any, batch_size: int) -> int:
    """Batches in one pass over ``split`` (a ``DataLoader`` counts its own)."""
    if isinstance(split, DataLoader):
        return max(1, len(split))
    return max(1, math.ceil(split_length(split) / batch_size))


def endless(loader: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """Batches for ever: the loader's passes one after another (reshuffled each pass)."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def _norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextlib.contextmanager
def frozen_bn(model: nn.Module, batch_statistics: bool = False) -> Iterator[None]:
    """BN running statistics unchanged inside (momentum 0); restored on leaving.

    Args:
        model: the network.
        batch_statistics: also put BN layers in train mode, so they normalise with the batch's
            own statistics (the rest of ``model`` keeps its mode).
    """
    norms = _norms(model)
    saved = [(norm.momentum, norm.training) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
        if batch_statistics:
            norm.train()
    try:
        yield
    finally:
        for norm, (momentum, training) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.train(training)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    split: Any,
    batches_count: int = 8,
    batch_size: int = 64,
    runtime: Runtime | None = None,
    workers: int = 0,
) -> None:
    """Recompute every BN layer's running statistics in place from a few training batches.

    ``torch.optim.swa_utils.update_bn``: statistics reset and accumulated as a plain average,
    so the result does not depend on what the model saw before; mode and momenta restored.
    """
    if not _norms(model):
        return
    runtime = runtime or Runtime()
    loader = batches(split, batch_size, shuffle=True, seed=0, workers=workers, runtime=runtime)
    inputs = (runtime.batch(x, y)[0] for x, y in itertools.islice(loader, batches_count))
    with runtime.autocast():
        update_bn(inputs, model)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Any,
    task: Task | None = None,
    runtime: Runtime | None = None,
    batch_size: int = 512,
    workers: int = 0,
    keep_mode: bool = False,
) -> tuple[float, float]:
    """Mean loss and the task's metric of ``model`` in eval mode on ``split``.

    The model's train/eval mode is restored afterwards.

    Args:
        model: the network (already on ``runtime``'s device).
        split: an in-memory split, a ``Dataset`` or a ``DataLoader``.
        task: output, loss and metric (default: cross-entropy, top-1 accuracy).
        runtime: device and precision (default: the CPU in fp32).
        batch_size: examples per forward pass.
        workers: ``DataLoader`` workers for a ``Dataset``.
        keep_mode: evaluate in the modes the caller set (e.g. BN on batch statistics inside
            :func:`frozen_bn`) instead of eval mode.

    Returns:
        (mean loss per batch example, metric value).

    Raises:
        DeviceError: a batch does not fit in the device's memory.
    """
    task = task or Task()
    runtime = runtime or Runtime()
    was_training = model.training
    if not keep_mode:
        model.eval()
    metric = task.new_metric()
    loss_sum, seen = 0.0, 0
    for x, y in batches(split, batch_size, workers=workers, runtime=runtime):
        x, y = runtime.batch(x, y)
        with runtime.fits(f"evaluation at batch size {batch_size}"), runtime.autocast():
            outputs = model(x)
        loss_sum += float(task.loss_of(outputs, y)) * len(y)
        seen += len(y)
        metric.update(task.select(outputs).float(), y)
    if not keep_mode:
        model.train(was_training)
    return loss_sum / max(1, seen), metric.compute()


def _count(x: Any) -> int | str:
    """Examples in a batch of inputs (a tensor, or a tuple/list/dict of them), for messages."""
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.ndim else 1
    items = list(x.values()) if isinstance(x, dict) else x
    if isinstance(items, (list, tuple)) and items:
        return _count(items[0])
    return "unknown size"


def first_examples(split: Any, count: int) -> Any:
    """The first ``count`` examples of an in-memory split or a ``Dataset`` (a fixed batch)."""
    if isinstance(split, Split):
        return split.subset(count)
    dataset = split.dataset if isinstance(split, DataLoader) else split
    return Subset(dataset, range(min(count, split_length(dataset))))


@dataclass
class Stepper:
    """One optimiser step of any loop: autocast forward, loss, scaled backward, step.

    Attributes:
        model: the network being trained (its forward is called).
        optimizer: its optimiser.
        task: loss and output selection.
        runtime: device and precision.
        scheduler: stepped after every optimiser step, when given.
        teacher: distilled from when given with ``distill_weight > 0``.
        distill_weight: share of the loss from distillation.
        distill_temperature: its softmax temperature.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: Task = field(default_factory=Task)
    runtime: Runtime = field(default_factory=Runtime)
    scheduler: Any = None
    teacher: nn.Module | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    steps: int = 0

    def __post_init__(self) -> None:
        self.scaler = self.runtime.scaler()

    def loss(self, x: Any, y: Any) -> tuple[Tensor, Any]:
        """The (possibly distilled) loss of a device batch, and the model's raw outputs."""
        with self.runtime.autocast():
            outputs = self.model(x)
            loss = self.task.loss_of(outputs, y)
            if self.teacher is not None and self.distill_weight > 0:
                with torch.no_grad():
                    teacher_out = self.task.select(self.teacher(x))
                soft = distillation_loss(
                    self.task.select(outputs), teacher_out, self.distill_temperature
                )
                loss = (1.0 - self.distill_weight) * loss + self.distill_weight * soft
        return loss, outputs

    def step(self, x: Any, y: Any) -> tuple[float, Any]:
        """Train on one batch (moved to the device here).

        Returns:
            (the loss, the model's raw outputs).

        Raises:
            DivergedError: the loss is not finite (the run diverged).
            DeviceError: the batch does not fit in the device's memory.
        """
        with self.runtime.fits(f"a training step on a batch of {_count(x)}"):
            x, y = self.runtime.batch(x, y)
            loss, outputs = self.loss(x, y)
            self.backward(loss)
        return float(loss.detach()), outputs

    def backward(self, loss: Tensor) -> None:
        """Backward and step from an already computed loss (spaces with their own forward).

        Raises:
            DivergedError: the loss is not finite (the run diverged).
        """
        if not torch.isfinite(loss.detach()).all():
            lr = self.optimizer.param_groups[0]["lr"]
            raise DivergedError(
                f"training diverged: the loss became {float(loss.detach())} at step "
                f"{self.steps + 1} (lr {lr:.3g}); lower the learning rate (--lr) or check the "
                "data and the checkpoint for NaN"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with self.runtime.fits("a backward pass"):
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
