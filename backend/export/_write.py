"""Writing an export directory: the pruned model, its program, ONNX graph and record."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunetune.backend.errors import (
    CheckpointError,
    PrunetuneError,
)
from prunetune.backend.export._load import _read_record
from prunetune.backend.export._onnx import (
    _check_onnx_exportable,
    _first_line,
    _onnx_error,
    _OnnxUnavailable,
    _write_onnx,
)
from prunetune.backend.export._record import (
    _FILES,
    EXPORT_FORMAT,
    ExportParityError,
    _output_error,
    _sha256,
    output_tensors,
    seal_record,
)
from prunetune.backend.io import atomic_directory, check_writable
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.spec import SubnetSpec


def check_export_dir(directory: str | Path, overwrite: bool = False) -> Path:
    """Check, before any work, that an export may be written to ``directory``; create nothing.

    An export replaces its directory whole, so it may only go to a new or empty folder, or over
    an earlier prunetune export (its files and nothing else); anything else needs ``overwrite``.

    Args:
        directory: the export directory to write later.
        overwrite: whether a folder holding other files may be replaced (they are deleted).

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        PrunetuneError: the folder holds other files, or cannot be written.
    """
    target = check_writable(directory, directory=True)
    if overwrite or not target.is_dir():
        return target
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return target
    try:
        previous = set(names) <= {"subnet.json", *_FILES} and bool(_read_record(target))
    except CheckpointError:
        previous = False
    if not previous:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PrunetuneError(
            f"output folder {str(target)!r} holds files that are not a prunetune export "
            f"({shown}); an export replaces the whole folder: choose a new or empty --out, or "
            "pass --overwrite to delete them"
        )
    return target


def export_subnet(
    directory: str | Path,
    model: nn.Module,
    spec: SubnetSpec,
    metrics: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
    formats: tuple[str, ...] = ("pt2", "onnx"),
    progress: Callable[[str], None] | None = None,
    preprocessing: dict[str, Any] | None = None,
    fold_normalization: bool = False,
) -> Path:
    """Write ``model`` (already pruned to ``spec``) to ``directory`` and check its parity.

    Args:
        directory: the export directory; replaced atomically if it exists.
        model: the physically pruned model.
        spec: the spec it was pruned with.
        metrics: extra figures to record (accuracy, latency); ``flops`` and ``params`` are always
            measured on ``model`` itself.
        tolerance: the largest output difference (relative to the output's scale, at least 1)
            allowed between PyTorch, the exported program and onnxruntime.
        formats: deployable formats to write besides the weights: ``pt2``, ``onnx``.
        progress: called with a short message as each file is written.
        preprocessing: what the model's inputs must be (``DatasetSplits.preprocessing()``:
            input shape, channel order, raw value range, mean and std), recorded in
            ``subnet.json`` with ``normalization``: ``caller`` (inputs are ``(x - mean) / std``)
            or ``folded``.
        fold_normalization: build ``(x - mean) / std`` into ``model.pt2`` and ``model.onnx``,
            so they take raw values in the value range (``weights.pt`` stays the model's own,
            which takes normalised inputs).

    Returns:
        The export directory.

    An ONNX graph that neither exporter can write (nor onnxruntime run) does not stop the
    export: the other formats are written, ``subnet.json`` records the reason under
    ``missing_formats`` and ``progress`` (or, without it, a ``UserWarning``) says so.

    Raises:
        ExportParityError: an exported format disagrees with the model beyond ``tolerance``,
            or the model computes non-finite outputs.
        ValueError: ``fold_normalization`` without a mean and std in ``preprocessing``.
    """
    say = progress or (lambda message: None)
    model = model.eval()
    weights = model.state_dict()
    recorded = None
    if preprocessing is not None:
        recorded = {**preprocessing, "normalization": "caller"}
    if fold_normalization:
        if not (preprocessing and preprocessing.get("mean") and preprocessing.get("std")):
            raise ValueError(
                "fold_normalization needs the inputs' mean and std: export a model trained by "
                "prunetune (its checkpoint records them) or give the dataset"
            )
        model = Normalize(model, preprocessing["mean"], preprocessing["std"], spec.input_shape)
        recorded = {**preprocessing, "normalization": "folded"}
    generator = torch.Generator().manual_seed(0)
    # batch 1 would be specialised to a constant by torch.export; 2 keeps the batch dynamic,
    # and the parity check runs at another batch size to prove it
    example = tuple(torch.randn((2, *s[1:]), generator=generator) for s in spec.input_shapes)
    check_input = tuple(torch.randn((3, *s[1:]), generator=generator) for s in spec.input_shapes)
    with torch.no_grad():
        expected = output_tensors(model(*check_input))
    if not all(bool(torch.isfinite(tensor).all()) for _, tensor in expected):
        raise ExportParityError(
            "the model computes non-finite outputs (NaN or inf) on a random input: its weights "
            "are broken (a diverged training run?); nothing was exported"
        )
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "spec": spec.to_dict(),
        "metrics": {
            **(metrics or {}),
            "flops": count_flops(model, tuple(x[:1] for x in example)),
            "params": count_params(model),
        },
        "parity": {},
        "files": {},
        "preprocessing": recorded,
    }
    with atomic_directory(directory) as staging:
        torch.save(weights, staging / "weights.pt")
        say("wrote weights.pt")
        if "pt2" in formats:
            # torch.export, and reloading the file for the parity check, take minutes on large
            # models (MaxViT: over a minute on a slow core): say what is going on first
            say("exporting model.pt2 (torch.export, then reloaded to check it)")
            try:
                program = _export_program(model, example)
            except Exception as exc:  # torch.export raises many types
                first = _first_line(exc)
                hint = ""
                if "data-dependent" in first:
                    hint = (
                        "; the model branches on a tensor's value (Python if/while), which "
                        "torch.export cannot capture: write it with torch.where or torch.cond"
                    )
                message = f"torch.export failed on the subnet: {first}{hint}"
                raise ExportParityError(message) from exc
            torch.export.save(program, staging / "model.pt2")
            with torch.no_grad():
                output = output_tensors(program.module()(*check_input))
                error = _output_error(expected, output, "the torch.export program")
                reloaded = torch.export.load(str(staging / "model.pt2")).module()
                output = output_tensors(reloaded(*check_input))
                error = max(error, _output_error(expected, output, "model.pt2 reloaded"))
            record["parity"]["pt2"] = error
            if not error <= tolerance:
                raise ExportParityError(
                    f"torch.export program differs from the model by {error:.2e} (> {tolerance})"
                )
            say(f"wrote model.pt2 (parity {error:.1e})")
        if "onnx" in formats:
            say("exporting model.onnx (then run in onnxruntime to check it)")
            _check_onnx_exportable(model)
            try:
                exporter = _write_onnx(model, example, staging / "model.onnx")
                error = _onnx_error(staging / "model.onnx", check_input, expected, exporter)
            except _OnnxUnavailable as exc:
                # one op ONNX cannot express must not cost the user the other formats
                record["missing_formats"] = {"onnx": str(exc)}
                message = f"model.onnx not written: {exc}; the other formats are complete"
                say(message)
                if progress is None:
                    warnings.warn(message, stacklevel=2)
                (staging / "model.onnx").unlink(missing_ok=True)
            else:
                record["parity"]["onnx"] = error
                record["onnx_exporter"] = exporter
                if not error <= tolerance:
                    raise ExportParityError(
                        f"ONNX graph ({exporter} exporter) differs from the model by "
                        f"{error:.2e} (> {tolerance})"
                    )
                via = "" if exporter == "torchscript" else f", {exporter} exporter"
                say(f"wrote model.onnx (parity {error:.1e}{via})")
        for name in _FILES:
            if (staging / name).exists():
                record["files"][name] = _sha256(staging / name)
        text = json.dumps(seal_record(record), indent=2, allow_nan=False)
        (staging / "subnet.json").write_text(text + "\n")
    return Path(directory)


class Normalize(nn.Module):
    """``model((x - mean) / std)``: a model that takes raw inputs, for deployment."""

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: list[float],
        std: list[float],
        input_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.model = model
        view = (1, -1, *([1] * (len(input_shape) - 2)))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def forward(self, x: Tensor, *others: Tensor) -> Any:
        return self.model((x - self.mean) / self.std, *others)


def _export_program(model: nn.Module, example: tuple[Tensor, ...]) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example))
