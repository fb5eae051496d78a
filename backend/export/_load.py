"""Reading an export directory (checksums first) or a checkpoint back into a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.backend.checkpoint import load_checkpoint, load_state, read_torch_file
from prunetune.backend.errors import (
    CheckpointError,
    SpecError,
    UnsupportedModelError,
)
from prunetune.backend.export._record import _FILES, EXPORT_FORMAT, _record_checksum, _sha256
from prunetune.backend.graph import ChannelGraph, match_leaf_modules
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a dense checkpoint or an export directory."""

    model: nn.Module
    ref: ModelRef
    input_shape: tuple[int, ...]
    spec: SubnetSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    """What inputs must be (see :func:`export_subnet`); ``None`` when not known."""


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / "subnet.json"
    if not directory.exists():
        raise CheckpointError(f"export {str(directory)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not a subnet export: it has no subnet.json")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a prunetune export ({EXPORT_FORMAT})")
    try:
        matches = record.get("checksum") == _record_checksum(record)
    except ValueError:  # NaN or infinity: never written by export
        matches = False
    if not matches:
        raise CheckpointError(
            f"{str(path)!r} does not match its own checksum: it was edited or corrupted after "
            "export (or written by an older prunetune); export the subnet again"
        )
    return record


def _verify_files(root: Path, record: dict[str, Any]) -> None:
    """Check every file the export recorded against its SHA-256; weights.pt must be recorded."""
    recorded = record.get("files")
    if not isinstance(recorded, dict) or "weights.pt" not in recorded:
        raise CheckpointError(
            f"subnet.json in {str(root)!r} records no checksum for weights.pt: it was not "
            "written by prunetune's export, or was edited; export the subnet again"
        )
    unknown = sorted(set(recorded) - set(_FILES))
    if unknown:
        raise CheckpointError(f"subnet.json in {str(root)!r} records unknown files: {unknown}")
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
    directory: str | Path,
    dense: nn.Module | None = None,
    *,
    expect: ModelRef | str | None = None,
    trust_model_code: bool = False,
) -> LoadedModel:
    """Rebuild an exported subnet, verifying every recorded checksum first.

    The pruned module comes from, in order: ``dense`` when given (traced, pruned to the spec,
    loaded with ``weights.pt``); the zoo when the spec names a zoo model; the factory the spec
    names when it is ``expect`` (the model the caller gave) or with ``trust_model_code``
    (importing it runs its code); else the export's own ``torch.export`` program
    (``model.pt2``), which needs no source code.

    Args:
        directory: the export directory.
        dense: the dense model the export was pruned from.
        expect: the model reference (or name) the caller gave; a factory of that name is built.
        trust_model_code: build whatever factory ``subnet.json`` names.

    Returns:
        The pruned model (eval mode), its reference, input shape, spec and metrics.

    Raises:
        CheckpointError: not an export, files missing or changed since export, weights that do
            not fit, or no way to rebuild the model.
        SpecError: the spec does not fit the model it names.
    """
    root = Path(directory)
    record = _read_record(root)
    _verify_files(root, record)
    spec = _spec_of(root, record)
    metrics = dict(record.get("metrics") or {})
    if dense is None and spec.model.buildable:
        try:
            spec.model.check_trusted(str(root / "subnet.json"), expect, trust_model_code)
            dense = spec.model.build()
        except UnsupportedModelError as exc:
            if not (root / "model.pt2").is_file():
                raise CheckpointError(str(exc)) from exc
    preprocessing = record.get("preprocessing")
    if not isinstance(preprocessing, dict):
        preprocessing = None
    if dense is None:
        program = _load_program(root, spec)
        return LoadedModel(program, spec.model, spec.input_shape, spec, metrics, preprocessing)
    example = tuple(torch.zeros(s) for s in spec.input_shapes)
    leaves = match_leaf_modules(dense, spec.leaf_modules)
    graph = ChannelGraph.trace(dense, example, leaf_modules=leaves)
    spec.validate(graph)
    pruned = prune_model(dense, graph, spec)
    weights = root / "weights.pt"
    load_state(pruned, read_torch_file(weights, "weights"), str(weights))
    if preprocessing is not None and preprocessing.get("normalization") == "folded":
        preprocessing = {**preprocessing, "normalization": "caller"}  # weights.pt: not folded
    return LoadedModel(pruned.eval(), spec.model, spec.input_shape, spec, metrics, preprocessing)


def _spec_of(root: Path, record: dict[str, Any]) -> SubnetSpec:
    try:
        return SubnetSpec.from_dict(record["spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"subnet.json in {str(root)!r} has a malformed spec: {exc}") from exc


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
    return ExportedProgramModule(program.module())


class ExportedProgramModule(nn.Module):
    """An export's ``torch.export`` program, as a module users can call and put in eval mode.

    The program computes what the pruned model computed in eval mode when it was exported; it
    has no training mode (torch refuses ``train()``/``eval()`` on it), so here they only set the
    flag, and ``model.eval()`` right after :func:`load_export` works as with any module.

    Args:
        program: ``ExportedProgram.module()``.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedProgramModule:
        self.training = mode  # the program itself is fixed in eval semantics
        return self


def load_subnet(
    directory: str | Path, expect: ModelRef | str | None = None, trust_model_code: bool = False
) -> LoadedModel:
    """Rebuild an exported subnet from its source: the dense model pruned to the spec.

    Unlike :func:`load_export` this never falls back to the exported program: the caller needs
    the dense architecture (to estimate costs, or to prune further). The model the spec names
    is built only when it is a zoo model, ``expect``, or trusted (see :func:`load_export`).

    Args:
        directory: the export directory.
        expect: the model reference (or name) the caller gave.
        trust_model_code: build whatever factory ``subnet.json`` names.

    Returns:
        The pruned model, its reference, input shape, spec and metrics.

    Raises:
        CheckpointError: files missing, tampered with (checksum), a model the caller did not
            trust, or weights that do not fit.
        SpecError: the spec does not fit the model it names.
    """
    root = Path(directory)
    record = _read_record(root)
    _verify_files(root, record)
    ref = _spec_of(root, record).model
    try:
        ref.check_trusted(str(root / "subnet.json"), expect, trust_model_code)
        dense = ref.build()
    except UnsupportedModelError as exc:
        raise CheckpointError(str(exc)) from exc
    return load_export(root, dense=dense)


def load_model(
    path: str | Path, expect: ModelRef | None = None, trust_model_code: bool = False
) -> LoadedModel:
    """Load what ``--checkpoint`` names: a dense checkpoint file or a subnet export directory.

    Args:
        path: the file or directory.
        expect: the model the caller gave (``--model``), if any.
        trust_model_code: build whatever factory the file names (it runs that code).

    Returns:
        The model, its reference, input shape, spec (of an export) and metrics.

    Raises:
        CheckpointError: see :func:`load_subnet` and
        :func:`prunetune.backend.checkpoint.load_checkpoint`.
    """
    source = Path(path)
    if source.is_dir():
        loaded = load_subnet(source, expect, trust_model_code)
        if expect is not None and expect.name != loaded.ref.name:
            raise CheckpointError(
                f"export {str(source)!r} is of model {loaded.ref.name!r}, not {expect.name!r}"
            )
        return loaded
    model, info = load_checkpoint(source, expect=expect, trust_model_code=trust_model_code)
    return LoadedModel(
        model, info.model, info.input_shape, None, dict(info.metrics), info.preprocessing
    )
