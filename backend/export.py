"""Export a pruned subnet to a directory, check it, and rebuild it from there.

An export directory holds:

- ``subnet.json``: the :class:`SubnetSpec` (model identity, input shape, kept channels), metrics
  (``flops``, ``params`` measured on the exported model, plus whatever the caller adds) and the
  SHA-256 of every other file;
- ``weights.pt``: the pruned model's state_dict;
- ``model.pt2``: the ``torch.export`` program (batch dimension dynamic);
- ``model.onnx``: the ONNX graph (batch dimension dynamic).

Export runs the model, the exported program and onnxruntime on the same input and refuses to
leave a directory behind when they disagree by more than the tolerance. The directory is written
atomically: a failed export leaves nothing (or the previous export) in place.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunetune.backend.checkpoint import load_checkpoint, load_state
from prunetune.backend.errors import CheckpointError, PrunetuneError, SpecError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.io import atomic_directory
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model

__all__ = [
    "EXPORT_FORMAT",
    "LoadedModel",
    "export_subnet",
    "load_export",
    "load_model",
    "load_subnet",
]

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


def _leaves(outputs: Any) -> list[Tensor]:
    """The tensors of a model's outputs (a tensor, a tuple/list or a dict), in order."""
    if isinstance(outputs, Tensor):
        return [outputs]
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return [leaf for value in values for leaf in _leaves(value)]


def _max_error(reference: Any, other: Any) -> float:
    """Largest relative difference over every output tensor (models may return dicts)."""
    errors = []
    for expected, got in zip(_leaves(reference), _leaves(other), strict=True):
        scale = max(1.0, float(expected.abs().max()))
        errors.append(float((expected - got).abs().max()) / scale)
    return max(errors)


def export_subnet(
    directory: str | Path,
    model: nn.Module,
    spec: SubnetSpec,
    metrics: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
    formats: tuple[str, ...] = ("pt2", "onnx"),
    progress: Callable[[str], None] | None = None,
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

    Returns:
        The export directory.

    Raises:
        ExportParityError: an exported format disagrees with the model beyond ``tolerance``.
    """
    say = progress or (lambda message: None)
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    # batch 1 would be specialised to a constant by torch.export; 2 keeps the batch dynamic,
    # and the parity check runs at another batch size to prove it
    example = torch.randn((2, *spec.input_shape[1:]), generator=generator)
    check_input = torch.randn((3, *spec.input_shape[1:]), generator=generator)
    with torch.no_grad():
        expected = model(check_input)
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "spec": spec.to_dict(),
        "metrics": {
            **(metrics or {}),
            "flops": count_flops(model, example[:1]),
            "params": count_params(model),
        },
        "parity": {},
        "files": {},
    }
    with atomic_directory(directory) as staging:
        torch.save(model.state_dict(), staging / "weights.pt")
        say("wrote weights.pt")
        if "pt2" in formats:
            try:
                program = _export_program(model, example)
            except Exception as exc:  # torch.export raises many types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise ExportParityError(f"torch.export failed on the subnet: {first}") from exc
            torch.export.save(program, staging / "model.pt2")
            with torch.no_grad():
                error = _max_error(expected, program.module()(check_input))
            record["parity"]["pt2"] = error
            if error > tolerance:
                raise ExportParityError(
                    f"torch.export program differs from the model by {error:.2e} (> {tolerance})"
                )
            say(f"wrote model.pt2 (parity {error:.1e})")
        if "onnx" in formats:
            try:
                error = _export_onnx(model, example, check_input, expected, staging / "model.onnx")
            except Exception as exc:  # the ONNX exporter raises many types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise ExportParityError(f"ONNX export failed on the subnet: {first}") from exc
            record["parity"]["onnx"] = error
            if error > tolerance:
                raise ExportParityError(
                    f"ONNX graph differs from the model by {error:.2e} (> {tolerance})"
                )
            say(f"wrote model.onnx (parity {error:.1e})")
        for name in _FILES:
            if (staging / name).exists():
                record["files"][name] = _sha256(staging / name)
        (staging / "subnet.json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(directory)


def _export_program(model: nn.Module, example: Tensor) -> Any:
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _export_onnx(
    model: nn.Module, example: Tensor, check_input: Tensor, expected: Tensor, path: Path
) -> float:
    import onnxruntime

    # "output" alone for a tensor; a dict or tuple's further outputs are "output_1", ...
    names = ["output"] + [f"output_{i}" for i in range(1, len(_leaves(expected)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in names}},
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": check_input.numpy()})
    return _max_error(expected, [torch.from_numpy(output) for output in outputs])


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a dense checkpoint or an export directory."""

    model: nn.Module
    ref: ModelRef
    input_shape: tuple[int, ...]
    spec: SubnetSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / "subnet.json"
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a subnet export: it has no subnet.json")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a prunetune export ({EXPORT_FORMAT})")
    return record


def _verify_files(root: Path, record: dict[str, Any]) -> None:
    """Check every file the export recorded against its SHA-256; weights.pt must be recorded."""
    recorded = record.get("files")
    if not isinstance(recorded, dict) or "weights.pt" not in recorded:
        raise CheckpointError(
            f"subnet.json in {str(root)!r} records no checksum for weights.pt: it was not "
            "written by prunetune's export, or was edited; export the subnet again"
        )
    for name in _FILES:
        if name not in recorded:
            continue
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"export {str(root)!r} has no {name} (subnet.json lists it)")
        if recorded[name] != _sha256(path):
            raise CheckpointError(
                f"{str(path)!r} does not match the checksum in subnet.json: the file was changed "
                "or corrupted after export; export the subnet again"
            )


def load_export(
    directory: str | Path, dense: nn.Module | None = None, allow_factory: bool = False
) -> LoadedModel:
    """Rebuild an exported subnet, verifying every recorded checksum first.

    The pruned module comes from, in order: ``dense`` when given (traced, pruned to the spec,
    loaded with ``weights.pt``); the zoo when the spec names a zoo model; the user's factory
    named in the spec, only with ``allow_factory`` (importing it runs its code); else the
    export's own ``torch.export`` program (``model.pt2``), which needs no source code.

    Raises:
        CheckpointError: not an export, files missing or changed since export, weights that do
            not fit, or no way to rebuild the model.
        SpecError: the spec does not fit the model it names.
    """
    root = Path(directory)
    record = _read_record(root)
    _verify_files(root, record)
    try:
        spec = SubnetSpec.from_dict(record["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"subnet.json in {str(root)!r} has a malformed spec: {exc}") from exc
    metrics = dict(record.get("metrics") or {})
    if dense is None and spec.model.buildable and (spec.model.is_zoo or allow_factory):
        dense = spec.model.build()
    if dense is None:
        return LoadedModel(_load_program(root, spec), spec.model, spec.input_shape, spec, metrics)
    graph = ChannelGraph.trace(dense, torch.zeros(spec.input_shape))
    spec.validate(graph)
    pruned = prune_model(dense, graph, spec)
    weights = root / "weights.pt"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{str(weights)!r} cannot be read: {exc}") from exc
    load_state(pruned, state, str(weights))
    return LoadedModel(pruned.eval(), spec.model, spec.input_shape, spec, metrics)


def _load_program(root: Path, spec: SubnetSpec) -> nn.Module:
    path = root / "model.pt2"
    if not path.is_file():
        raise CheckpointError(
            f"export {str(root)!r} is of model {spec.model.name!r}, which is not in the zoo, "
            "and it has no model.pt2 to load without the source: pass the dense model "
            "(prunetune.load(directory, model=...))"
        )
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export raises many types for a corrupt program
        raise CheckpointError(f"{str(path)!r} cannot be loaded: {exc}") from exc
    module: nn.Module = program.module()
    return module


def load_subnet(directory: str | Path) -> LoadedModel:
    """Rebuild an exported subnet from ``subnet.json`` and ``weights.pt``.

    The dense model is rebuilt from the zoo or the user's factory, traced, pruned to the spec and
    loaded with the exported weights (``weights_only=True``); see :func:`load_export`.

    Raises:
        CheckpointError: files missing, tampered with (checksum), or weights that do not fit.
        SpecError: the spec does not fit the model it names.
    """
    return load_export(directory, allow_factory=True)


def load_model(path: str | Path, expect: ModelRef | None = None) -> LoadedModel:
    """Load what ``--checkpoint`` names: a dense checkpoint file or a subnet export directory.

    Raises:
        CheckpointError: see :func:`load_subnet` and
        :func:`prunetune.backend.checkpoint.load_checkpoint`.
    """
    source = Path(path)
    if source.is_dir():
        loaded = load_subnet(source)
        if expect is not None and expect.name != loaded.ref.name:
            raise CheckpointError(
                f"export {str(source)!r} is of model {loaded.ref.name!r}, not {expect.name!r}"
            )
        return loaded
    model, info = load_checkpoint(source, expect=expect)
    return LoadedModel(model, info.model, info.input_shape, None, dict(info.metrics))
