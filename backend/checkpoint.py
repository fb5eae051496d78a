"""Dense checkpoints: a model's identity, input shape, weights and metrics in one atomic file."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.backend.errors import CheckpointError, UnsupportedModelError
from prunetune.backend.io import atomic_write
from prunetune.backend.models import ModelRef

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "prunetune.checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds besides the weights."""

    model: ModelRef
    input_shape: tuple[int, ...]
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None


def save_checkpoint(path: str | Path, model: nn.Module, info: Checkpoint) -> Path:
    """Write ``model``'s state_dict and ``info`` to ``path`` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": info.model.to_dict(),
        "input_shape": list(info.input_shape),
        "dataset": info.dataset,
        "metrics": {k: float(v) for k, v in info.metrics.items()},
        "preprocessing": info.preprocessing,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_checkpoint(
    path: str | Path, expect: ModelRef | None = None, trust_model_code: bool = False
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint was saved from and load its weights.

    The model reference in the header is only built when it names a zoo model or ``expect``;
    anything else would import code the file chose (see :meth:`ModelRef.check_trusted`).

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect: when given, the architecture the caller wants; a checkpoint of another one is an
            error rather than a silent switch.
        trust_model_code: build whatever factory the header names (it runs that code).

    Raises:
        CheckpointError: the file is missing, not a prunetune checkpoint, made for another
            architecture, names a model the caller did not trust, or its weights do not fit.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist")
    payload = read_torch_file(source, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(source)!r} is not a prunetune checkpoint (expected format {CHECKPOINT_FORMAT})"
        )
    try:
        ref = ModelRef.from_dict(payload["model"])
        info = Checkpoint(
            model=ref,
            input_shape=tuple(int(d) for d in payload["input_shape"]),
            dataset=payload.get("dataset"),
            metrics=dict(payload.get("metrics") or {}),
            preprocessing=_preprocessing(payload.get("preprocessing")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(source)!r} has a malformed header: {exc}") from exc
    if expect is not None and expect.name != ref.name:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is for model {ref.name!r}, not {expect.name!r}; "
            f"drop --model or pass --model {ref.name}"
        )
    try:
        ref.check_trusted(str(source), expect, trust_model_code)
        model = ref.build()
    except UnsupportedModelError as exc:
        raise CheckpointError(f"checkpoint {str(source)!r}: {exc}") from exc
    load_state(model, payload.get("state_dict"), str(source))
    return model, info


def _preprocessing(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"'preprocessing' must be a mapping or null, got {value!r}")
    return value


def read_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``, every failure one clear line.

    Args:
        path: the file.
        what: what the file should be, for the message (``checkpoint``, ``weights``).

    Raises:
        CheckpointError: the file is empty, not a PyTorch file, or corrupt.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from exc
    if size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (0 bytes): write it again")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what} {str(path)!r} is not a PyTorch file (no zip archive: text, or another "
            "format); give a checkpoint of prunetune train or an export directory"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read by torch.load (corrupt or not prunetune's): "
            f"{type(exc).__name__}{': ' + first if first else ''}"
        ) from exc


def load_state(model: nn.Module, state: Any, source: str) -> None:
    """Load ``state`` into ``model`` strictly, turning mismatches into one clear error."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source!r} holds no state_dict")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(
                f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}"
            )
        if wrong:
            k = wrong[0]
            details.append(
                f"{k} has shape {tuple(state[k].shape)}, model expects {tuple(expected[k].shape)}"
            )
        raise CheckpointError(
            f"weights in {source!r} do not fit the model ({'; '.join(details)}): "
            "it was saved from another architecture"
        )
    model.load_state_dict(state)
