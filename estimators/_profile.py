"""Latency profiles: measured run times of a model's layer kinds on one device, saved as JSON.

A profile holds one :class:`LatencyTable` per distinct layer configuration of a traced graph
(ResNet-56's 27 identical 3x3 convs of a stage share one table), each measured over a grid of
(input width, output width), plus the identity of the device and of the graph it was made for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunetune.backend.errors import CheckpointError
from prunetune.backend.graph import LayerInfo, NormInfo
from prunetune.backend.io import atomic_write
from prunetune.estimators._groups import (
    GraphLike,
    GroupView,
    graph_fingerprint,
    layer_config,
    norm_segments,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeviceInfo",
    "LatencyProfile",
    "LatencyTable",
    "ProfileError",
    "ProfileMismatchWarning",
    "TableAxes",
    "layer_axes",
    "norm_axes",
]

SCHEMA_VERSION = 1


MAX_MS = 1e6
"""The longest time a profile may hold for one layer or model (ms): anything longer is no
measurement, and would swamp every prediction."""


class ProfileError(CheckpointError):
    """A latency profile file is missing, corrupt, of another schema, or made for another model."""


_GPU_FIELDS = {"accelerator", "gpu_name", "gpu_driver", "cuda_version"}


def _comparable(device: DeviceInfo) -> str:
    """The device to describe this machine by when comparing with ``device``'s profile."""
    return "cuda" if device.accelerator == "cuda" and torch.cuda.is_available() else "cpu"


class ProfileMismatchWarning(UserWarning):
    """A latency profile was measured on another machine, thread count, torch or batch size."""


def _nvidia_driver() -> str:
    import subprocess

    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip().splitlines()[0] if found.stdout.strip() else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class DeviceInfo:
    """Where a profile was measured; latency tables only hold on the same setup.

    Attributes:
        system: operating system (``platform.system()``).
        machine: architecture (``platform.machine()``).
        processor: ``platform.processor()``, often empty on Linux.
        cpu_model: the CPU's model name from ``/proc/cpuinfo`` where available.
        threads: torch intra-op threads used for the measurement.
        torch_version: ``torch.__version__``.
        accelerator: ``cpu`` or ``cuda``: where the layers ran.
        gpu_name: the GPU's name (``torch.cuda.get_device_name``), ``""`` on the CPU.
        gpu_driver: the NVIDIA driver version (``nvidia-smi``; ``unknown`` without it).
        cuda_version: the CUDA version torch was built with (``torch.version.cuda``).
    """

    system: str
    machine: str
    processor: str
    cpu_model: str
    threads: int
    torch_version: str
    accelerator: str = "cpu"
    gpu_name: str = ""
    gpu_driver: str = ""
    cuda_version: str = ""

    @classmethod
    def current(cls, threads: int | None = None, device: str = "cpu") -> DeviceInfo:
        """This machine, with ``threads`` (default: torch's current thread count), measuring
        on ``device`` (``cpu``, ``cuda`` or ``cuda:<index>``)."""
        gpu: dict[str, str] = {}
        if torch.device(device).type == "cuda":
            index = torch.device(device).index or 0
            gpu = {
                "accelerator": "cuda",
                "gpu_name": torch.cuda.get_device_name(index),
                "gpu_driver": _nvidia_driver(),
                "cuda_version": str(torch.version.cuda or "unknown"),
            }
        return cls(
            system=platform.system(),
            machine=platform.machine(),
            processor=platform.processor(),
            cpu_model=_cpu_model(),
            threads=torch.get_num_threads() if threads is None else threads,
            torch_version=torch.__version__,
            **gpu,
        )

    def describe(self) -> str:
        """``the CPU <model>`` or ``GPU <name>``, for messages."""
        return f"GPU {self.gpu_name}" if self.accelerator == "cuda" else f"CPU {self.cpu_model}"

    def differences(self, other: DeviceInfo) -> list[str]:
        """``"field: mine vs other's"`` for every field that differs."""
        return [
            f"{item.name} {getattr(self, item.name)!r} vs {getattr(other, item.name)!r}"
            for item in fields(self)
            if getattr(self, item.name) != getattr(other, item.name)
        ]


@dataclass(frozen=True)
class TableAxes:
    """What a table is measured over: a layer configuration and the range of its widths.

    Attributes:
        config: the layer's configuration (:func:`layer_config`, or a norm's), JSON-ready.
        in_range: ``(lowest, highest, step)`` of the input axis: input features of a conv or
            linear layer, channels of a depthwise conv or a norm.
        out_range: ``(lowest, highest, step)`` of output channels; ``None`` for 1-D tables.
    """

    config: Mapping[str, Any]
    in_range: tuple[int, int, int]
    out_range: tuple[int, int, int] | None

    @property
    def key(self) -> str:
        """A short stable hash naming the table."""
        text = json.dumps([dict(self.config), list(self.in_range), self.out_range], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def grid(
        self, widths_grid: int | tuple[float, ...], blocks: tuple[int, int] = (1, 1)
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Grid points of both axes (the output axis is empty for 1-D tables): multiples of
        the axis's block (and step), plus its highest width."""
        out = () if self.out_range is None else _axis_grid(self.out_range, widths_grid, blocks[1])
        return _axis_grid(self.in_range, widths_grid, blocks[0]), out


def _axis_grid(
    axis: tuple[int, int, int], widths_grid: int | tuple[float, ...], block: int = 1
) -> tuple[int, ...]:
    low, high, step = axis
    step = math.lcm(step, block)
    low = min(high, -(-low // step) * step)
    if low == high:
        return (high,)
    if isinstance(widths_grid, int):
        raw = np.linspace(low, high, widths_grid)
    else:
        raw = np.array(widths_grid, dtype=np.float64) * high
    points = np.clip(np.round(raw / step) * step, low, high).astype(np.int64)
    return tuple(sorted({low, high, *(int(p) for p in points)}))


def layer_axes(layer: LayerInfo, view: GroupView) -> TableAxes:
    """The table a conv or linear layer is predicted from."""
    index = view.index
    full_min = view.sizes.copy()
    full_min[view.prunable_index] = view.min_widths
    steps = np.ones(len(view.names), dtype=np.int64)
    steps[view.prunable_index] = view.steps
    out = index[layer.out_group]
    if layer.depthwise:  # its input features, whatever groups they come from
        ins = [(index[s.group], s.multiplier) for s in layer.in_segments]
        step = int(steps[out]) if len(ins) == 1 and ins[0][1] == 1 else 1
        low = sum(int(full_min[i]) * m for i, m in ins)
        return TableAxes(
            layer_config(layer), (low, sum(int(view.sizes[i]) * m for i, m in ins), step), None
        )
    step = layer.groups
    low = sum(int(full_min[index[s.group]]) * s.multiplier for s in layer.in_segments)
    high = sum(int(view.sizes[index[s.group]]) * s.multiplier for s in layer.in_segments)
    # several when its output is cut in pieces, in blocks of ``multiplier`` channels
    outs = [(index[s.group], s.multiplier) for s in layer.outputs]
    out_step = math.lcm(step, int(steps[out])) if not layer.out_segments else 1
    return TableAxes(
        layer_config(layer),
        (low, high, step),
        (
            sum(int(full_min[i]) * m for i, m in outs),
            sum(int(view.sizes[i]) * m for i, m in outs),
            out_step,
        ),
    )


def norm_axes(norm: NormInfo, view: GroupView) -> TableAxes:
    """The 1-D table a norm layer (with its activation) is predicted from."""
    index = view.index
    minimum = dict(zip(view.prunable, view.min_widths.tolist(), strict=True))
    low = high = 0
    for segment in norm_segments(norm):
        size = int(view.sizes[index[segment.group]])
        low += int(minimum.get(segment.group, size)) * segment.multiplier
        high += size * segment.multiplier
    config: dict[str, Any] = {
        "kind": "norm",
        "input_hw": list(norm.input_hw),
        "affine": norm.affine,
    }
    if norm.group_size:  # a GroupNorm: timed as one, in whole groups
        config["group_size"] = norm.group_size
    return TableAxes(config, (low, high, max(1, norm.group_size)), None)


@dataclass(frozen=True, eq=False)
class LatencyTable:
    """Measured milliseconds of one layer configuration over a grid of widths.

    Attributes:
        config: the layer configuration (see :class:`TableAxes`).
        in_grid: input-axis grid points, ascending.
        out_grid: output-axis grid points, ascending; empty for 1-D tables.
        ms: median milliseconds, shape ``(len(in_grid), len(out_grid))`` or ``(len(in_grid),)``.
        blocks: the channel block of the input (first) and output (second) axis: where the
            layer's kernel computes whole blocks of channels (oneDNN's blocked convs, 16 wide
            on AVX-512), a width between two multiples costs about what the upper one costs,
            so widths are rounded up to a multiple before the lookup and the grid holds
            multiples. 1: the time is interpolated at the width itself.
        unaligned: factors on the time when the input or output width was rounded up to a
            multiple ``m`` of its block: ``time(m - block / 2) / time(m)`` as measured.
    """

    config: Mapping[str, Any]
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    ms: np.ndarray
    blocks: tuple[int, int] = (1, 1)
    unaligned: tuple[float, float] = (1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "config": dict(self.config),
            "in_grid": list(self.in_grid),
            "out_grid": list(self.out_grid),
            "ms": self.ms.tolist(),
            "blocks": list(self.blocks),
            "unaligned": list(self.unaligned),
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatencyTable:
        """Parse and check the JSON form.

        Raises:
            ValueError: a field is missing or malformed.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a table must be an object, got {type(data).__name__}")
        grids = []
        for name in ("in_grid", "out_grid"):
            grid = data.get(name)
            if not isinstance(grid, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid
            ):
                raise ValueError(f"{name!r} must be a list of positive integers")
            if sorted(set(grid)) != grid:
                raise ValueError(f"{name!r} must be strictly ascending")
            grids.append(tuple(grid))
        if not grids[0]:
            raise ValueError("'in_grid' is empty")
        try:
            ms = np.array(data.get("ms"), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'ms' is not a numeric array: {exc}") from exc
        shape = (len(grids[0]), len(grids[1])) if grids[1] else (len(grids[0]),)
        if ms.shape != shape:
            raise ValueError(f"'ms' has shape {ms.shape}, its grids need {shape}")
        if not np.all(np.isfinite(ms)) or np.any(ms < 0):
            raise ValueError("'ms' holds negative or non-finite times")
        if np.any(ms > MAX_MS):
            raise ValueError(
                f"'ms' holds a time of {float(ms.max()):.3g} ms, above {MAX_MS:g} ms for one "
                "layer: not a measurement"
            )
        config = data.get("config")
        if not isinstance(config, dict):
            raise ValueError("'config' must be an object")
        blocks = data.get("blocks", [1, 1])  # absent in profiles made before blocks were measured
        if not (
            isinstance(blocks, list)
            and len(blocks) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in blocks)
        ):
            raise ValueError(f"'blocks' must be two positive integers, got {blocks!r}")
        unaligned = data.get("unaligned", [1.0, 1.0])
        if (
            not isinstance(unaligned, list)
            or len(unaligned) != 2
            or not all(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0
                for v in unaligned
            )
        ):
            raise ValueError(f"'unaligned' must be two positive numbers, got {unaligned!r}")
        return cls(
            config,
            grids[0],
            grids[1],
            ms,
            (blocks[0], blocks[1]),
            (float(unaligned[0]), float(unaligned[1])),
        )


@dataclass(frozen=True, eq=False)
class LatencyProfile:
    """Latency lookup tables of one model on one device, at one batch size.

    Made by :func:`profile_model`, saved with :meth:`save`, read back with :meth:`load`, used
    through :class:`LatencyPredictor`.

    Attributes:
        device: the machine and thread count it was measured with.
        batch_size: the batch size of every measurement.
        model_id: the model it was made for, for messages.
        fingerprint: :func:`graph_fingerprint` of the model's graph; checked by the predictor.
        tables: one table per :attr:`TableAxes.key`.
        model_ms: the whole dense model's measured latency (``None`` if not measured); the
            predictor's default overhead is the difference to the sum of its tables.
        settings: how it was measured (grid, warm-up, repeats), for the record.
        created: when it was measured (ISO 8601).
        calibration: whole-model measurements of a few pruned subnets, ``({group: width}, ms)``
            pairs (prunable groups only); with :attr:`model_ms` the predictor fits its scale and
            overhead to them. Empty when none were measured.
    """

    device: DeviceInfo
    batch_size: int
    model_id: str
    fingerprint: str
    tables: Mapping[str, LatencyTable]
    model_ms: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    calibration: tuple[tuple[Mapping[str, int], float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (with ``schema`` version)."""
        return {
            "schema": SCHEMA_VERSION,
            "device": asdict(self.device),
            "batch_size": self.batch_size,
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "model_ms": self.model_ms,
            "settings": dict(self.settings),
            "created": self.created,
            "calibration": [{"widths": dict(w), "ms": ms} for w, ms in self.calibration],
            "tables": {key: table.to_dict() for key, table in sorted(self.tables.items())},
        }

    def check_graph(self, graph: GraphLike) -> None:
        """Raise :class:`ProfileError` unless this profile was made for ``graph``'s model."""
        fingerprint = graph_fingerprint(graph)
        if self.fingerprint != fingerprint:
            raise ProfileError(
                f"latency profile was made for another model ({self.model_id}, graph "
                f"fingerprint {self.fingerprint}); this graph's fingerprint is {fingerprint}. "
                "Measure a profile for this model with `prunetune profile`."
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, atomically (a temporary file, then a rename).

        Returns:
            The path written.

        Raises:
            OutputError: the file cannot be written (a full disk); nothing is left.
        """
        data = self.to_dict()

        def write(temporary: Path) -> None:
            with temporary.open("w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())

        return atomic_write(Path(path), write)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        batch_size: int | None = None,
        device: str | None = None,
    ) -> LatencyProfile:
        """Read a profile written by :meth:`save`, and warn if it was made elsewhere.

        Args:
            path: the JSON file.
            threads: the torch thread count it will be used with (default: the current one).
            batch_size: the batch size it will be used with; not compared when ``None``.
            device: the device it will be used (measured again) on: ``cpu``, ``cuda`` or
                ``cuda:<index>``; a profile of another kind of device or another GPU is
                refused. ``None`` does not compare.

        Raises:
            ProfileError: the file is missing, unreadable, not JSON, of another schema version,
                or malformed; the message names the file and the problem; with ``device``, it was
                measured on another kind of device or another GPU.

        Warns:
            ProfileMismatchWarning: it was measured on another machine, CPU, thread count,
                torch version or batch size, so its times may not hold here.
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read latency profile {source}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(
                f"{source} is not a latency profile: it is binary, not JSON text (a checkpoint?); "
                "give the JSON file `prunetune profile --out` wrote"
            ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"latency profile {source} is not valid JSON ({exc}); it may be truncated or "
                "corrupt: measure it again with `prunetune profile`"
            ) from exc
        try:
            profile = cls.from_dict(data)
        except ValueError as exc:
            raise ProfileError(f"latency profile {source} is malformed: {exc}") from exc
        if device is not None:
            here = DeviceInfo.current(threads, device)
            if (profile.device.accelerator, profile.device.gpu_name) != (
                here.accelerator,
                here.gpu_name,
            ):
                raise ProfileError(
                    f"latency profile {source} was measured on the {profile.device.describe()}, "
                    f"not on this {here.describe()}: its times do not hold here; measure one "
                    f"with `prunetune profile --device {device}`"
                )
        expected = DeviceInfo.current(threads, _comparable(profile.device))
        differences = profile.device.differences(expected)
        if batch_size is not None and batch_size != profile.batch_size:
            differences.append(f"batch_size {profile.batch_size} vs {batch_size}")
        if differences:
            warnings.warn(
                f"latency profile {source} was measured on a different setup "
                f"(profile vs here: {'; '.join(differences)}); its latencies may not hold here. "
                "Measure a profile on this machine with these settings (`prunetune profile`).",
                ProfileMismatchWarning,
                stacklevel=2,
            )
        return profile

    @classmethod
    def from_dict(cls, data: Any) -> LatencyProfile:
        """Parse and check the JSON form written by :meth:`to_dict`.

        Raises:
            ValueError: wrong schema version, or a field missing or malformed.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"schema version {data.get('schema')!r}, this prunetune reads version "
                f"{SCHEMA_VERSION}; measure the profile again"
            )
        device = data.get("device")
        names = {item.name: item.type for item in fields(DeviceInfo)}
        required = set(names) - _GPU_FIELDS  # profiles from before GPUs lack those
        if not isinstance(device, dict) or not required <= set(device) <= set(names):
            raise ValueError(f"'device' must be an object with fields {sorted(names)}")
        if not isinstance(device["threads"], int) or not all(
            isinstance(device[name], str) for name in device if name != "threads"
        ):
            raise ValueError("'device' has fields of the wrong type")
        batch_size = data.get("batch_size")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"'batch_size' must be a positive integer, got {batch_size!r}")
        for name in ("model_id", "fingerprint", "created"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"{name!r} must be a string")
        model_ms = data.get("model_ms")
        if model_ms is not None and (
            not isinstance(model_ms, int | float)
            or not math.isfinite(model_ms)
            or not 0 < model_ms <= MAX_MS
        ):
            raise ValueError(
                f"'model_ms' must be a positive number of ms (at most {MAX_MS:g}) or null, "
                f"got {model_ms!r}"
            )
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ValueError("'settings' must be an object")
        calibration = _calibration_points(data.get("calibration", []))
        raw_tables = data.get("tables")
        if not isinstance(raw_tables, dict):
            raise ValueError("'tables' must be an object")
        tables = {}
        for key, raw in raw_tables.items():
            try:
                tables[key] = LatencyTable.from_dict(raw)
            except ValueError as exc:
                raise ValueError(f"table {key!r}: {exc}") from exc
        return cls(
            device=DeviceInfo(**device),
            batch_size=batch_size,
            model_id=data["model_id"],
            fingerprint=data["fingerprint"],
            tables=tables,
            model_ms=None if model_ms is None else float(model_ms),
            settings=settings,
            created=data["created"],
            calibration=calibration,
        )


def _calibration_points(raw: Any) -> tuple[tuple[dict[str, int], float], ...]:
    """Parse and check the ``calibration`` list of a profile's JSON form."""
    message = '\'calibration\' must be a list of {"widths": {group: width}, "ms": time} objects'
    if not isinstance(raw, list):
        raise ValueError(message)
    points = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"widths", "ms"}:
            raise ValueError(message)
        widths, ms = item["widths"], item["ms"]
        if not isinstance(widths, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in widths.items()
        ):
            raise ValueError("'calibration' widths must map group names to positive integers")
        if not isinstance(ms, int | float) or not math.isfinite(ms) or not 0 < ms <= MAX_MS:
            raise ValueError(
                f"'calibration' times must be positive numbers of ms (at most {MAX_MS:g}), "
                f"got {ms!r}"
            )
        points.append((dict(widths), float(ms)))
    return tuple(points)
