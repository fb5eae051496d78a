"""Dense checkpoints: a model's identity, input shape, weights and metrics in one atomic file."""

from __future__ import annotations

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


def save_checkpoint(path: str | Path, model: nn.Module, info: Checkpoint) -> Path:
    """Write ``model``'s state_dict and ``info`` to ``path`` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": info.model.to_dict(),
        "input_shape": list(info.input_shape),
        "dataset": info.dataset,
        "metrics": {k: float(v) for k, v in info.metrics.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_checkpoint(
    path: str | Path, expect: ModelRef | None = None
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint was saved from and load its weights.

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect: when given, the architecture the caller wants; a checkpoint of another one is an
            error rather than a silent switch.

    Raises:
        CheckpointError: the file is missing, not a prunetune checkpoint, made for another
            architecture, or its weights do not fit the model.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {str(source)!r} cannot be read: {exc}") from exc
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(source)!r} has a malformed header: {exc}") from exc
    if expect is not None and expect.name != ref.name:
        raise CheckpointError(
            f"checkpoint {str(source)!r} is for model {ref.name!r}, not {expect.name!r}; "
            f"drop --model or pass --model {ref.name}"
        )
    try:
        model = ref.build()
    except UnsupportedModelError as exc:
        raise CheckpointError(f"checkpoint {str(source)!r}: {exc}") from exc
    load_state(model, payload.get("state_dict"), str(source))
    return model, info


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
