"""The export record: ``subnet.json``'s format, checksums, and the output tensors that
parity compares."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten_with_path

from prunetune.backend.errors import (
    PrunetuneError,
)

EXPORT_FORMAT = "prunetune.subnet/1"
_FILES = ("weights.pt", "model.pt2", "model.onnx")


class ExportParityError(PrunetuneError):
    """The exported program or the ONNX graph does not compute what the PyTorch model does."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _max_error(reference: Tensor, other: Tensor) -> float:
    """The largest difference relative to the output's scale; ``inf`` when ``other`` holds a
    non-finite value (NaN compares as equal to nothing, so it must never pass)."""
    if not bool(torch.isfinite(other).all()):
        return math.inf
    if reference.numel() == 0:
        return 0.0
    scale = max(1.0, float(reference.abs().max()))
    return float((reference - other).abs().max()) / scale


def output_tensors(output: Any) -> list[tuple[str, Tensor]]:
    """Every tensor of a model's output, named by its place (``out``, ``1``, ``aux.0``).

    A model may return one tensor, or tuples, lists and dicts of them (a segmentation model's
    ``{"out": ..., "aux": ...}``, a detection head's tuple); the order is that of
    ``torch.utils._pytree``, which ``torch.export`` and the ONNX exporter also follow.

    Raises:
        ExportParityError: the output holds something else than tensors (a string, an object).
    """
    named = []
    for keys, leaf in tree_flatten_with_path(output)[0]:
        path = ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in keys)
        if leaf is None:
            continue
        if not isinstance(leaf, Tensor):
            raise ExportParityError(
                f"the model's output holds a {type(leaf).__name__} at {path or 'the top'}: "
                "export compares tensors only; return tensors (in a tuple, list or dict)"
            )
        named.append((path or "output", leaf))
    return named


def _output_error(
    expected: list[tuple[str, Tensor]], got: list[tuple[str, Tensor]], where: str
) -> float:
    """The largest relative error over every output tensor of ``got`` against ``expected``.

    Raises:
        ExportParityError: ``got`` does not have as many tensors, of the same shapes.
    """
    if len(got) != len(expected):
        raise ExportParityError(
            f"{where} returns {len(got)} tensors where the model returns {len(expected)} "
            f"({', '.join(name for name, _ in expected)})"
        )
    error = 0.0
    for (name, reference), (_, other) in zip(expected, got, strict=True):
        if tuple(reference.shape) != tuple(other.shape):
            raise ExportParityError(
                f"{where} output {name!r} has shape {tuple(other.shape)}, the model's "
                f"{tuple(reference.shape)}"
            )
        error = max(error, _max_error(reference, other.to(reference.dtype)))
    return error


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (``null`` in strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _record_checksum(record: dict[str, Any]) -> str:
    content = {k: v for k, v in record.items() if k != "checksum"}
    text = json.dumps(content, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` made strict JSON (non-finite figures as ``None``) with its ``checksum`` set.

    Args:
        record: a ``subnet.json`` mapping.

    Returns:
        The mapping to write; :func:`load_export` refuses one whose checksum does not match.
    """
    sealed = _finite(record)
    sealed["checksum"] = _record_checksum(sealed)
    return sealed  # type: ignore[no-any-return]
