"""Export a pruned subnet to a directory, check it, and rebuild it from there.

An export directory holds:

- ``subnet.json``: the :class:`SubnetSpec` (model identity, input shape, kept channels), metrics
  (``flops``, ``params`` measured on the exported model, plus whatever the caller adds; a
  non-finite figure is written as ``null``: strict JSON), the SHA-256 of every other file and
  a ``checksum`` of its own content;
- ``weights.pt``: the pruned model's state_dict;
- ``model.pt2``: the ``torch.export`` program (batch dimension dynamic);
- ``model.onnx``: the ONNX graph (batch dimension dynamic), written by torch's TorchScript
  exporter or, where that fails on an op, by its dynamo exporter. When neither can write the
  model, the other files are still written and ``subnet.json`` says under ``missing_formats``
  that ONNX is missing and why.

Export runs the model, the exported program and onnxruntime on the same input and refuses to
leave a directory behind when they disagree by more than the tolerance or compute anything
non-finite. Loading verifies every checksum first and never imports a model reference read from
the files unless it names a zoo model or the model the caller gave (or the caller trusts it).
The directory is written atomically: a failed export leaves nothing (or the previous export)
in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten_with_path

from prunetune.backend.checkpoint import load_checkpoint, load_state, read_torch_file
from prunetune.backend.errors import (
    CheckpointError,
    PrunetuneError,
    SpecError,
    UnsupportedModelError,
)
from prunetune.backend.graph import ChannelGraph, match_leaf_modules
from prunetune.backend.io import atomic_directory, check_writable
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model

__all__ = [
    "EXPORT_FORMAT",
    "LoadedModel",
    "Normalize",
    "check_export_dir",
    "export_subnet",
    "load_export",
    "load_model",
    "load_subnet",
    "seal_record",
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
