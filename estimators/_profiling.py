"""Latency profiles of a model on this machine: tables (:func:`profile_model`) and the
whole-model measurements that calibrate them (:func:`recalibrate_profile`)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunetune.backend.errors import SpecError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.training import Runtime
from prunetune.estimators._groups import GraphLike, GroupView, graph_fingerprint
from prunetune.estimators._profile import (
    DeviceInfo,
    LatencyProfile,
    LatencyTable,
    ProfileError,
    TableAxes,
    layer_axes,
    norm_axes,
)
from prunetune.estimators._stability import (
    Stability,
)
from prunetune.estimators._timing import (
    MIN_REPEAT_S,
    MODEL_MIN_S,
    Statistic,
    check_timing,
    measure_latency,
    steady_allocator,
    time_samples,
    torch_threads,
)

__all__ = [
    "ProfileProgress",
    "calibration_widths",
    "cpu_channel_block",
    "profile_model",
    "recalibrate_profile",
]

_POINT_MIN_S = 0.02
"""Each table point is timed for at least this long in all: tables of small layers (batch 1)
then take a minimum over tens of repeats, not 7, and vary less from one profile to the next."""

_CALIBRATION_ROUNDS = 3
"""Rounds over the dense model and calibration subnets in a profile (each keeps its best)."""

_NORMS: dict[int, Callable[..., nn.Module]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
_CONVS: dict[int, Callable[..., nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONVS: dict[int, Callable[..., nn.Module]] = {
    1: nn.ConvTranspose1d,
    2: nn.ConvTranspose2d,
    3: nn.ConvTranspose3d,
}


_BLOCKS = {"AVX512": 16, "AVX2": 8, "SVE256": 8}
"""Channel block of oneDNN's conv kernels by torch's CPU capability: the SIMD width in floats."""


def cpu_channel_block() -> int:
    """The channel block convolutions are computed in on this CPU (16 with AVX-512, 8 with AVX2;
    1, meaning none assumed, where torch reports another capability).

    A conv's time then steps up at each multiple of it: 33 to 48 channels cost about what 48
    do. :func:`profile_model` places table points on these multiples.
    """
    return _BLOCKS.get(torch.backends.cpu.get_cpu_capability(), 1)


@dataclass(frozen=True)
class ProfileProgress:
    """Where :func:`profile_model` is: ``done`` of ``total`` tables, the last one described."""

    done: int
    total: int
    description: str


def _check_options(
    batch_size: int,
    threads: int | None,
    widths_grid: int | Sequence[float],
    repeats: int,
    warmup: int,
    statistic: str,
) -> int | tuple[float, ...]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_timing(threads, repeats, warmup, statistic)
    if isinstance(widths_grid, int) and not isinstance(widths_grid, bool):
        if widths_grid < 2:
            raise ValueError(f"widths_grid must be at least 2 points per axis, got {widths_grid}")
        return widths_grid
    if isinstance(widths_grid, bool | str):
        raise ValueError(
            f"widths_grid must be an int or a sequence of keep ratios, got {widths_grid!r}"
        )
    ratios = tuple(float(r) for r in widths_grid)
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(
            f"widths_grid must be a number of points (>= 2) or keep ratios in (0, 1], "
            f"got {widths_grid!r}"
        )
    return ratios


def _layer_runner(
    config: dict[str, Any], in_width: int, out_width: int, batch_size: int, device: str = "cpu"
) -> Callable[[], Tensor]:
    kind = config["kind"]
    input_hw = tuple(config["input_hw"])
    module: nn.Module
    if kind == "norm":
        dims = max(1, len(input_hw))
        norm_class: Callable[..., nn.Module] = _NORMS[dims]
        norm = norm_class(in_width, affine=config["affine"])
        if config.get("group_size"):
            groups = max(1, in_width // config["group_size"])  # widths are whole groups
            norm = nn.GroupNorm(groups, in_width, affine=config["affine"])
        module = nn.Sequential(norm, nn.ReLU())
        inputs = torch.randn(batch_size, in_width, *input_hw)
    elif kind == "linear":
        module = nn.Linear(in_width, out_width, bias=config["bias"])
        inputs = torch.randn(batch_size, *input_hw, in_width)
    else:
        kernel = tuple(config["kernel_size"])
        convs = _TRANSPOSED_CONVS if config.get("transposed") else _CONVS
        conv_class: Callable[..., nn.Module] = convs[len(kernel)]
        if config["depthwise"]:
            groups = in_width
            out_width = in_width * max(1, config["out_channels"] // config["in_channels"])
        else:
            groups = config["groups"]
        module = conv_class(
            in_width,
            out_width,
            kernel,
            stride=tuple(config["stride"]),
            padding=tuple(config["padding"]),
            dilation=tuple(config["dilation"]),
            groups=groups,
            bias=config["bias"],
        )
        inputs = torch.randn(batch_size, in_width, *input_hw)
    module.eval().to(device)
    inputs = inputs.to(device)
    return lambda: module(inputs)


def _blocked(config: dict[str, Any]) -> bool:
    """Whether a table's kernel may compute whole blocks of channels: convs without groups,
    and depthwise ones. Grouped convs, linear layers and norms are interpolated as measured."""
    if config["kind"] in ("norm", "linear"):
        return False
    return bool(config["groups"] == 1 or config["depthwise"])


def _axis_block(high: int, block: int, time_at: Callable[[int], float]) -> tuple[int, float]:
    """``(block, unaligned factor)`` of one table axis, probed at a multiple ``m`` of ``block``
    in the lower part of the axis (where one block is a large share of the work): ``time_at``
    the width ``m - block``, ``m - block / 2`` and ``m``. A kernel that computes whole blocks
    costs at mid-block about what it costs at ``m`` (a step); one that does not, about halfway
    between (a slope). Whether oneDNN picks a blocked kernel depends on the shapes (on this
    project's machine: at batch 32, not at batch 1), so it is measured, not assumed. Axes
    shorter than two blocks are interpolated: their grid points are close enough."""
    if block == 1 or high < 2 * block:
        return 1, 1.0
    multiple = min(max(2, math.ceil(high / 4 / block)), high // block) * block
    below, middle, top = (time_at(w) for w in (multiple - block, multiple - block // 2, multiple))
    rise = top - below
    if rise <= 0.1 * top or (middle - below) / rise < 0.75:
        return 1, 1.0
    return block, middle / top


def _measure_table(
    axes: TableAxes,
    widths_grid: int | tuple[float, ...],
    batch_size: int,
    timing: tuple[int, int, Statistic],
    block: int,
    stability: Stability,
    device: str = "cpu",
) -> LatencyTable:
    config = dict(axes.config)
    warmup, repeats, statistic = timing
    cuda = torch.device(device).type == "cuda"

    def time_at(in_width: int, out_width: int) -> float:
        runner = _layer_runner(config, in_width, out_width, batch_size, device)
        return 1e3 * stability.steady_time(
            lambda: time_samples(runner, warmup, repeats, _POINT_MIN_S, cuda=cuda), statistic
        )

    blocks, unaligned = [1, 1], [1.0, 1.0]
    if _blocked(config):
        in_high = axes.in_range[1]
        if axes.out_range is None:  # depthwise: the output follows the input
            blocks[0], unaligned[0] = _axis_block(in_high, block, lambda w: time_at(w, w))
        else:
            out_high = axes.out_range[1]
            blocks[0], unaligned[0] = _axis_block(in_high, block, lambda w: time_at(w, out_high))
            blocks[1], unaligned[1] = _axis_block(out_high, block, lambda w: time_at(in_high, w))
    in_grid, out_grid = axes.grid(widths_grid, (blocks[0], blocks[1]))

    def point(index: tuple[int, ...]) -> float:
        if not out_grid:
            return time_at(in_grid[index[0]], in_grid[index[0]])
        return time_at(in_grid[index[0]], out_grid[index[1]])

    shape = (len(in_grid), len(out_grid)) if out_grid else (len(in_grid),)
    ms = np.array([point(index) for index in np.ndindex(*shape)]).reshape(shape)
    grids = (in_grid, out_grid)
    stability.remeasure_outliers(ms, grids, point)
    return LatencyTable(
        config, in_grid, out_grid, ms, (blocks[0], blocks[1]), (unaligned[0], unaligned[1])
    )


def calibration_widths(graph: ChannelGraph, count: int, seed: int = 0) -> list[dict[str, int]]:
    """``count`` subnets of ``graph`` spread over sizes, for calibrating a latency predictor.

    Subnet ``k`` keeps about ``s_k`` of every group, ``s_k`` evenly spaced over 0.3-0.9, each
    group's ratio jittered by up to 25% (seeded), so the subnets span small to large models and
    are not all uniform scalings. Widths respect each group's step and minimum.
    """
    rng = np.random.default_rng(seed)
    subnets = []
    for scale in np.linspace(0.3, 0.9, count) if count > 1 else [0.6]:
        widths = {}
        for group in graph.prunable_groups:
            ratio = min(1.0, scale * rng.uniform(0.75, 1.25))
            width = round(ratio * group.size / group.step) * group.step
            widths[group.name] = min(group.size, max(group.min_width, width))
        subnets.append(widths)
    return subnets


def _on_device(models: list[tuple[str, nn.Module]], device: str) -> list[tuple[str, nn.Module]]:
    """Copies of ``models`` on ``device`` (the originals stay where they are).

    Raises:
        DeviceError: no such device here, or a model does not fit its memory.
    """
    if torch.device(device).type == "cpu":
        return models
    runtime = Runtime(device=device)
    return [(label, runtime.model(copy.deepcopy(model))) for label, model in models]


def _device_of(profile: LatencyProfile) -> str:
    """Where a profile's whole models are timed again: its GPU kind when there is one here."""
    return "cuda" if profile.device.accelerator == "cuda" and torch.cuda.is_available() else "cpu"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _example_input(model: nn.Module, batch_size: int, input_shape: Sequence[int]) -> Tensor:
    """A random input of ``input_shape`` with the batch size replaced, in the model's dtype."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    return torch.randn(batch_size, *input_shape[1:], dtype=dtype)


def _calibration_models(
    model: nn.Module, graph: GraphLike, widths_list: Sequence[Mapping[str, int]]
) -> list[tuple[str, nn.Module]]:
    """The dense model and its pruned calibration subnets, labelled for progress messages."""
    models: list[tuple[str, nn.Module]] = [("dense model", model)]
    if not widths_list:
        return models
    if not isinstance(graph, ChannelGraph):
        raise ValueError("pruning calibration subnets needs the model's ChannelGraph")
    for number, widths in enumerate(widths_list, start=1):
        spec = SubnetSpec.from_widths(graph, ModelRef("profiled-model"), dict(widths))
        models.append((f"calibration subnet {number}", prune_model(model, graph, spec)))
    return models


def _whole_models_ms(
    models: Sequence[tuple[str, nn.Module]],
    example: Tensor,
    timing: tuple[int, int, Statistic],
    report: Callable[[int, str], None],
) -> list[float]:
    """The dense model's and the calibration subnets' latencies, timed in
    :data:`_CALIBRATION_ROUNDS` interleaved rounds, each keeping its best: a slow spell of the
    machine then has to last all rounds to move the calibration. ``report(index, label)`` is
    called as each model's last round ends."""
    warmup, repeats, statistic = timing
    best = [math.inf] * len(models)
    for round_number in range(_CALIBRATION_ROUNDS):
        for index, (label, model) in enumerate(models):
            ms = measure_latency(
                model, example, repeats=repeats, warmup=warmup, statistic=statistic
            )
            best[index] = min(best[index], ms)
            if round_number == _CALIBRATION_ROUNDS - 1:
                report(index, label)
    return best


def profile_model(
    model: nn.Module,
    graph: GraphLike,
    batch_size: int = 1,
    *,
    threads: int | None = None,
    widths_grid: int | Sequence[float] = 7,
    repeats: int = 7,
    warmup: int = 3,
    statistic: Statistic = "median",
    model_id: str | None = None,
    measure_model: bool = True,
    calibration_subnets: int = 12,
    channel_block: int | None = None,
    progress: Callable[[ProfileProgress], None] | None = None,
    device: str = "cpu",
) -> LatencyProfile:
    """Measure latency tables for every layer kind ``graph`` can produce, on this machine (CPU).

    Each distinct conv/linear configuration (kernel, stride, groups, spatial size, width ranges)
    is timed once over a grid of (input features, output channels) with ``widths_grid`` points
    per axis between its smallest and largest width; depthwise convs and norm layers (timed with
    a ReLU after them) over a 1-D grid of channels. Each point is the median of ``repeats``
    timed runs after ``warmup`` runs. Conv grids sit on multiples of the CPU's channel block
    (:func:`cpu_channel_block`) where a probe finds that their time steps up at those
    multiples, with the cost of a partial block measured too (:attr:`LatencyTable.unaligned`).

    Measuring switches this process to :func:`steady_allocator` first.

    Args:
        model: the dense model ``graph`` was traced from (timed whole when ``measure_model``).
        graph: its traced graph (``ChannelGraph``).
        batch_size: the batch size to measure at; predictions hold for this batch size.
        threads: torch threads during measurement (default: the current count); restored after.
        widths_grid: points per axis (>= 2), or keep ratios in (0, 1] to place them.
        repeats: timed runs per point.
        statistic: ``"median"`` of the repeats, or ``"min"`` (steadier when other processes
            share the CPU).
        warmup: untimed runs before timing.
        model_id: a name for the model in messages (default: its class).
        measure_model: also time the whole dense model on an input of ``graph.input_shape`` (with
            the batch size replaced), which calibrates the predictor's overhead.
        calibration_subnets: with ``measure_model`` and a ``ChannelGraph``, also prune and time
            this many subnets of assorted sizes (:func:`calibration_widths`); the predictor fits
            its scale and overhead to them and the dense model, which absorbs what per-layer
            tables miss (elementwise ops, dispatch, cache effects between layers). 0: none.
            The dense model and these are timed in 3 interleaved rounds, each keeping its best.
        channel_block: the channel block to probe conv tables for (default:
            :func:`cpu_channel_block`); 1: no probe, grids placed evenly and interpolated, as
            for other layers.
        progress: called after each table with a :class:`ProfileProgress`.
        device: where to measure: ``cpu``, or ``cuda``/``cuda:<index>`` (layers, inputs and
            copies of the models on that GPU; CUDA event times after synchronising; the GPU's
            name, driver and CUDA version go into the profile's ``device``).

    Timings are checked as they are taken: a point whose repeats spread more than
    :data:`MAX_SPREAD`, or that stands out :data:`OUTLIER_FACTOR` times from its neighbours in
    the table, is measured again (twice at most).

    Returns:
        The profile; save it with :meth:`LatencyProfile.save`.

    Raises:
        ValueError: an option out of range.
        UnstableTimingError: a point stayed :data:`REFUSE_FACTOR` times off its neighbours
            after re-measuring: the message advises a quiet machine and ``--threads 1``.
    """
    grid = _check_options(batch_size, threads, widths_grid, repeats, warmup, statistic)
    if (
        isinstance(calibration_subnets, bool)
        or not isinstance(calibration_subnets, int)
        or calibration_subnets < 0
    ):
        raise ValueError(
            f"calibration_subnets must be a non-negative integer, got {calibration_subnets!r}"
        )
    if channel_block is None:
        channel_block = cpu_channel_block()
    elif isinstance(channel_block, bool) or not isinstance(channel_block, int) or channel_block < 1:
        raise ValueError(f"channel_block must be a positive integer, got {channel_block!r}")
    steady = steady_allocator()
    view = GroupView.from_graph(graph)
    axes: dict[str, TableAxes] = {}
    for layer in graph.layers:
        item = layer_axes(layer, view)
        axes.setdefault(item.key, item)
    for norm in graph.norms:
        item = norm_axes(norm, view)
        axes.setdefault(item.key, item)
    tables: dict[str, LatencyTable] = {}
    model_ms = None
    calibration: tuple[tuple[dict[str, int], float], ...] = ()
    input_shape: tuple[int, ...] = tuple(getattr(graph, "input_shape", None) or ())
    measure_model = measure_model and bool(input_shape)
    subnets = calibration_subnets if measure_model and isinstance(graph, ChannelGraph) else 0
    total = len(axes) + subnets + (1 if measure_model else 0)
    timing: tuple[int, int, Statistic] = (warmup, repeats, statistic)
    stability = Stability()
    with torch_threads(threads) as used_threads:
        for done, (key, item) in enumerate(axes.items(), start=1):
            tables[key] = _measure_table(
                item, grid, batch_size, timing, channel_block, stability, device
            )
            if progress is not None:
                config = item.config
                progress(ProfileProgress(done, total, f"{config['kind']} {key}"))
        if measure_model:
            example = _example_input(model, batch_size, input_shape).to(device)
            widths_list = (
                calibration_widths(graph, subnets)
                if subnets and isinstance(graph, ChannelGraph)
                else []
            )
            models = _on_device(_calibration_models(model, graph, widths_list), device)

            def report(index: int, label: str) -> None:
                if progress is not None:
                    progress(ProfileProgress(len(axes) + 1 + index, total, label))

            model_ms, *subnet_ms = _whole_models_ms(models, example, timing, report)
            calibration = tuple(zip(widths_list, subnet_ms, strict=True))
    stability.check(used_threads)
    return LatencyProfile(
        device=DeviceInfo.current(used_threads, device),
        batch_size=batch_size,
        model_id=model_id or f"{type(model).__module__}.{type(model).__qualname__}",
        fingerprint=graph_fingerprint(graph),
        tables=tables,
        model_ms=model_ms,
        settings={
            "widths_grid": grid if isinstance(grid, int) else list(grid),
            "repeats": repeats,
            "warmup": warmup,
            "statistic": statistic,
            "min_repeat_s": MIN_REPEAT_S,
            "point_min_s": _POINT_MIN_S,
            "model_min_s": MODEL_MIN_S,
            "channel_block": channel_block,
            "allocator": "steady" if steady else "system",
            "points": stability.points,
            "remeasured_points": stability.remeasured,
            "unsteady_points": stability.unsteady,
        },
        created=_now(),
        calibration=calibration,
    )


def recalibrate_profile(
    profile: LatencyProfile,
    model: nn.Module,
    graph: GraphLike,
    *,
    progress: Callable[[ProfileProgress], None] | None = None,
) -> LatencyProfile:
    """``profile`` with its whole-model measurements taken again, here and now; tables kept.

    The dense model and the profile's calibration subnets (the same widths) are timed as
    :func:`profile_model` timed them: the profile's batch size, threads, warm-up, repeats and
    statistic, 3 interleaved rounds each keeping its best. Use it where whole models run at
    another speed than when the profile was measured: on a shared or virtual machine the same
    MobileNetV2 subnets at batch 1 measured up to 15% slower or 12% faster a minute after
    profiling, while the tables, which the calibration scales, still ranked them as well as
    repeated measurements did. Refreshing the calibration (seconds) is much cheaper than
    profiling again; it cannot help against swings within the seconds it takes.

    Args:
        profile: a profile of ``model`` measured on this machine with this torch.
        model: the dense model the profile was made for.
        graph: its traced graph; its ``input_shape`` gives the input (batch size replaced).
        progress: called after each model's last round with a :class:`ProfileProgress`.

    Returns:
        A new profile with ``model_ms`` and ``calibration`` measured again and
        ``settings["recalibrated"]`` the time it was done (ISO 8601); save it with
        :meth:`LatencyProfile.save`.

    Raises:
        ProfileError: the profile is of another model, was measured on another machine, CPU or
            torch version, or its calibration subnets do not fit ``graph``.
        ValueError: ``graph`` has no input shape to time the model with.
    """
    profile.check_graph(graph)
    here = DeviceInfo.current(profile.device.threads, _device_of(profile))
    differences = profile.device.differences(here)
    if differences:
        raise ProfileError(
            f"latency profile of {profile.model_id} was measured on another setup (profile vs "
            f"here: {'; '.join(differences)}): recalibrating would fit its tables to another "
            "machine. Measure a new profile here with `prunetune profile`."
        )
    input_shape = tuple(getattr(graph, "input_shape", None) or ())
    if not input_shape:
        raise ValueError("the graph has no input shape to time the model with; trace it again")
    settings = profile.settings
    timing: tuple[int, int, Statistic] = (
        int(settings.get("warmup", 3)),
        int(settings.get("repeats", 7)),
        "min" if settings.get("statistic") == "min" else "median",
    )
    widths_list = [dict(widths) for widths, _ in profile.calibration]
    try:
        models = _calibration_models(model, graph, widths_list)
    except SpecError as exc:
        raise ProfileError(
            f"latency profile of {profile.model_id} holds calibration subnets that do not fit "
            f"this graph ({exc}); measure the profile again"
        ) from exc
    device = _device_of(profile)
    models = _on_device(models, device)
    example = _example_input(model, profile.batch_size, input_shape).to(device)
    steady_allocator()

    def report(index: int, label: str) -> None:
        if progress is not None:
            progress(ProfileProgress(index + 1, len(models), label))

    with torch_threads(profile.device.threads):
        model_ms, *subnet_ms = _whole_models_ms(models, example, timing, report)
    return dataclasses.replace(
        profile,
        model_ms=model_ms,
        calibration=tuple(zip(widths_list, subnet_ms, strict=True)),
        settings={**settings, "recalibrated": _now()},
    )
