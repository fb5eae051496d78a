"""Where and how numbers are computed: the device, the precision and the memory layout.

A :class:`Runtime` is resolved once per process (``auto`` becomes the GPU Ray gave the trial, or
the CPU) and then moves models and batches, opens the autocast region and builds the gradient
scaler every loop uses.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from prunetune.backend.errors import DeviceError

__all__ = ["PRECISIONS", "Precision", "Runtime", "parse_device"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_device(device: str) -> str:
    """Check a device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.

    Raises:
        ValueError: any other name, with the valid forms.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    return device


@dataclass(frozen=True)
class Runtime:
    """The device, precision and layout of every training and evaluation loop.

    Attributes:
        device: ``auto`` (the first visible GPU, which under Ray is the one it gave the trial,
            else the CPU), ``cpu``, ``cuda`` or ``cuda:<index>``.
        precision: ``fp32``; ``bf16`` or ``fp16`` autocast (fp16 with a gradient scaler).
        channels_last: models and 4-d batches in NHWC memory layout (faster convolutions on
            tensor cores).
    """

    device: str = "cpu"
    precision: Precision = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        parse_device(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    @property
    def torch_device(self) -> torch.device:
        """The resolved device.

        Raises:
            DeviceError: a CUDA device was asked for on a machine without one, or its index is
                out of range.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(
                    f"device {self.device!r} asked for, but torch sees no CUDA GPU here; "
                    "use --device cpu or auto"
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise DeviceError(f"device {self.device!r}: only {count} CUDA device(s) visible")
        return device

    @property
    def on_cuda(self) -> bool:
        """Whether the loops run on a CUDA GPU."""
        return self.torch_device.type == "cuda"

    def model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` (in place) to the device and layout; returns it.

        Raises:
            DeviceError: the model's weights alone do not fit the GPU's memory.
        """
        try:
            model.to(self.torch_device)
        except torch.OutOfMemoryError as exc:
            raise DeviceError(
                f"the model does not fit on {self.torch_device} ({_first_line(exc)}); use a "
                "smaller model, a GPU with more memory or --device cpu"
            ) from exc
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Move one batch to the device (non-blocking from pinned memory) and layout."""
        device = self.torch_device
        x = _move(x, device)
        if self.channels_last and isinstance(x, Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, _move(y, device)

    @contextlib.contextmanager
    def fits(self, what: str) -> Iterator[None]:
        """Turn the device running out of memory inside the block into a clear error.

        Args:
            what: the work the block does, for the message ("a training step at batch 64").

        Raises:
            DeviceError: ``torch.OutOfMemoryError`` was raised inside the block; the message
                names the work, the device and the ways out (a smaller batch, half precision,
                a GPU of its own per trial, the CPU). The cached GPU memory is released first.
        """
        try:
            yield
        except torch.OutOfMemoryError as exc:
            if self.on_cuda:
                torch.cuda.empty_cache()
            raise DeviceError(
                f"{what} does not fit in the memory of {self.torch_device} ({_first_line(exc)}); "
                "lower --batch-size, use --precision bf16 (or fp16), give each trial a GPU of its "
                "own (--gpus-per-trial 1) or use --device cpu"
            ) from exc

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's precision: autocast to bf16/fp16, nothing for fp32."""
        if self.precision == "fp32":
            yield
            return
        with torch.autocast(self.torch_device.type, dtype=_DTYPES[self.precision]):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 alone (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(
            self.torch_device.type, enabled=self.precision == "fp16" and self.on_cuda
        )


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
