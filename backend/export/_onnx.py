"""Writing ``model.onnx``: TorchScript exporter first, dynamo exporter where it fails, and
clear refusals naming the layer or op."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunetune.backend.export._record import ExportParityError, _output_error, output_tensors


def _onnx_input_names(count: int) -> list[str]:
    """``input`` for a model of one input; ``input``, ``input.1``, ... for several."""
    return ["input", *(f"input.{index}" for index in range(1, count))]


def _check_onnx_exportable(model: nn.Module) -> None:
    """Refuse, naming the layer, what the ONNX exporter fails on deep inside.

    Raises:
        ExportParityError: a BatchNorm without running statistics.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ExportParityError(
                f"BatchNorm '{name}' has no running statistics (track_running_stats=False), "
                "which ONNX cannot express; give it running statistics, or export without "
                "ONNX (formats=('pt2',))"
            )


class _OnnxUnavailable(Exception):
    """Neither ONNX exporter can write the model; the message says why, per exporter."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _onnx_names(output_names: list[str]) -> list[str]:
    """ONNX output names for the model's output tensors named by :func:`output_tensors`."""
    return ["output" if name == "output" else f"output.{name}" for name in output_names]


def _write_onnx(model: nn.Module, example: tuple[Tensor, ...], path: Path) -> str:
    """Write the ONNX graph of ``model`` (one named output per output tensor, batch dynamic).

    The TorchScript exporter is tried first (fast, and what earlier exports used); where it
    fails on an op (adaptive pooling to a size that does not divide the input, among others),
    torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs
    ``onnxscript``) is tried on the same program ``torch.export`` takes.

    Returns:
        The exporter that wrote the file: ``torchscript`` or ``dynamo``.

    Raises:
        _OnnxUnavailable: both failed (or the dynamo exporter is not installed); the message
            gives each exporter's first line.
    """
    with torch.no_grad():
        names = _onnx_names([name for name, _ in output_tensors(model(*example))])
    inputs = _onnx_input_names(len(example))

    def export(**exporter: Any) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, example, str(path), input_names=inputs, output_names=names, **exporter
            )

    try:
        export(
            dynamic_axes={name: {0: "batch"} for name in (*inputs, *names)},
            dynamo=False,
        )
        return "torchscript"
    except Exception as exc:  # the TorchScript exporter raises many types
        torchscript = _first_line(exc)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError as exc:
        raise _OnnxUnavailable(
            f"the TorchScript exporter failed ({torchscript}) and torch's dynamo exporter "
            "needs onnxscript, which is not installed (pip install onnxscript)"
        ) from exc
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        export(dynamic_shapes=tuple({0: batch} for _ in example), dynamo=True, verbose=False)
    except Exception as exc:  # the dynamo exporter raises many types
        path.unlink(missing_ok=True)
        raise _OnnxUnavailable(
            f"the TorchScript exporter failed ({torchscript}) and so did the dynamo exporter "
            f"({_first_line(exc)})"
        ) from exc
    return "dynamo"


def _onnx_error(
    path: Path, check_input: tuple[Tensor, ...], expected: list[tuple[str, Tensor]], exporter: str
) -> float:
    """Reload the ONNX graph in onnxruntime and return its largest error over every output.

    Raises:
        _OnnxUnavailable: onnxruntime cannot load or run the graph.
        ExportParityError: the graph returns other outputs than the model.
    """
    import onnxruntime

    names = _onnx_names([name for name, _ in expected])
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = dict(zip(_onnx_input_names(len(check_input)), check_input, strict=True))
        outputs = session.run(None, {name: x.numpy() for name, x in feed.items()})
    except Exception as exc:  # onnxruntime raises its own types
        raise _OnnxUnavailable(
            f"onnxruntime cannot run the graph the {exporter} exporter wrote ({_first_line(exc)})"
        ) from exc
    got = [(name, torch.from_numpy(value)) for name, value in zip(names, outputs, strict=False)]
    return _output_error(expected, got, "the ONNX graph")
