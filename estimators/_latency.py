"""Latency prediction from a measured profile: interpolated tables, summed, plus an overhead."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.errors import SpecError
from prunetune.estimators._cost import CostModel, FlopsModel, ParamsModel
from prunetune.estimators._groups import (
    GraphLike,
    GroupView,
    HasWidths,
    WidthsLike,
    norm_segments,
)
from prunetune.estimators._profile import (
    LatencyProfile,
    LatencyTable,
    ProfileError,
    layer_axes,
    norm_axes,
)

__all__ = ["Calibration", "LatencyPredictor"]


_Array = TypeVar("_Array", np.ndarray, Tensor)


@dataclass(frozen=True)
class Calibration:
    """``latency = scale * sum(table lookups) ** exponent + overhead_ms``, fitted to
    whole-model measurements.

    Attributes:
        overhead_ms: time the tables do not see (pooling, additions, Python, allocation).
        scale: multiplies the summed tables (1 unless fitted).
        rms_error_ms: root-mean-square error on the measurements it was fitted to.
        points: how many whole-model measurements it was fitted to (0: none, or only the
            profile's dense-model measurement counted as 1).
        exponent: 1 for the linear fit; fitted (with no overhead) where summed tables grow
            faster or slower than whole models do, as on MobileNetV2 at batch 32, where
            isolated layers run slower than in the model at full width and faster when narrow.
    """

    overhead_ms: float
    scale: float = 1.0
    rms_error_ms: float = 0.0
    points: int = 0
    exponent: float = 1.0

    def apply(self, sums: _Array) -> _Array:
        """Calibrated latency (ms) of summed table times (array or tensor, differentiable)."""
        if self.exponent == 1.0:
            return self.scale * sums + self.overhead_ms
        return self.scale * sums.clip(min=1e-12) ** self.exponent + self.overhead_ms


def _locate_np(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell ``low`` (``0..K-1``) and position ``t`` in ``[0, 1]`` of ``x`` on ``grid``; values
    outside the grid are clamped to its ends. ``low + 1`` indexes the edge-padded table."""
    if grid.size == 1:
        return np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
    low = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    t = np.clip((x - grid[low]) / (grid[low + 1] - grid[low]), 0.0, 1.0)
    return low, t


def _locate_torch(grid: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_locate_np` in torch, differentiable in ``x`` through ``t``."""
    if grid.numel() == 1:
        return torch.zeros(x.shape, dtype=torch.int64, device=x.device), torch.zeros_like(x)
    low = torch.searchsorted(grid, x.detach().contiguous(), right=True) - 1
    low = low.clamp(0, grid.numel() - 2)
    raw = (x - grid[low]) / (grid[low + 1] - grid[low])
    # the cell's slope as gradient on the whole closed cell: torch >= 2.14 gives clamp a zero
    # gradient at its bounds, which would zero it at every grid point (integer widths often are)
    inside = (raw >= 0.0) & (raw <= 1.0)
    return low, torch.where(inside, raw, raw.detach().clamp(0.0, 1.0))


def _blocks_np(
    grid: np.ndarray, block: int, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every integer width ``0..grid[-1]``: its cell and position on ``grid`` after
    rounding up to a multiple of ``block`` (at most the grid's top), and the factor on its time:
    ``factor`` where it was rounded up to a multiple, else 1."""
    widths = np.arange(grid[-1] + 1.0)
    rounded = np.minimum(np.ceil(widths / block) * block, grid[-1])
    scale = np.where((rounded != widths) & (rounded % block == 0), factor, 1.0)
    return (*_locate_np(grid, rounded), scale)


def _blocks_torch(
    grid: Tensor, x: Tensor, block: int, factor: float
) -> tuple[Tensor, Tensor, Tensor | float]:
    """:func:`_blocks_np` for real widths ``x``: the value is the table's at the rounded width,
    the gradient its slope there (straight through the rounding)."""
    if block == 1:
        return (*_locate_torch(grid, x), 1.0)
    whole = torch.ceil(x.detach() - 1e-6)  # a float width that is an integer stays where it is
    rounded = torch.minimum(torch.ceil(whole / block) * block, grid[-1])
    scale = torch.where((rounded != whole) & (rounded % block == 0), factor, 1.0)
    return (*_locate_torch(grid, x + (rounded - x.detach())), scale)


def _bilinear(
    v00: _Array, v01: _Array, v10: _Array, v11: _Array, t_in: _Array, t_out: _Array
) -> _Array:
    """Interpolate between cell corners ``v[in][out]`` at ``(t_in, t_out)`` in ``[0, 1]^2``."""
    return v00 + t_in * (v10 - v00) + t_out * (v01 - v00 + t_in * (v11 - v10 - v01 + v00))


class _TableUse:
    """One table and the layers that read it, prepared for fast lookups.

    The table is edge-padded by one row and column and flattened, so the four corners of a cell
    are ``flat[base]``, ``flat[base + 1]``, ``flat[base + stride]``, ``flat[base + stride + 1]``
    with ``base = low_in * stride + low_out``. Integer points are located through lookup arrays
    indexed by the point itself (no search), which also hold the table's rounding to its
    channel block and the factors for unaligned widths.
    """

    def __init__(
        self, table: LatencyTable, members: list[tuple[np.ndarray, np.ndarray, int]]
    ) -> None:
        self.in_grid = np.array(table.in_grid, dtype=np.float64)
        self.out_grid = np.array(table.out_grid, dtype=np.float64)
        self.blocks = table.blocks
        self.unaligned = table.unaligned
        ms = table.ms if table.out_grid else table.ms[:, None]
        padded = np.pad(ms, ((0, 1), (0, 1)), mode="edge")
        self.stride = padded.shape[1]
        self.flat = padded.ravel()
        self.in_matrix = np.stack([m[0] for m in members], axis=1).astype(np.int64)
        # output channels of each layer: the sum of its output groups' widths (one, unless
        # its output is cut into pieces)
        self.out_matrix = np.stack([m[1] for m in members], axis=1).astype(np.int64)
        self.calls = np.array([m[2] for m in members], dtype=np.float64)
        self.in_low, self.in_t, self.in_scale = _blocks_np(
            self.in_grid, self.blocks[0], self.unaligned[0]
        )
        self.out_low, self.out_t, self.out_scale = np.zeros(1, np.int64), np.zeros(1), np.ones(1)
        if table.out_grid:
            self.out_low, self.out_t, self.out_scale = _blocks_np(
                self.out_grid, self.blocks[1], self.unaligned[1]
            )

    def tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        """``in_grid, out_grid, flat, in_matrix, calls, out_matrix`` in ``dtype``."""
        floats = (self.in_grid, self.out_grid, self.flat, self.in_matrix, self.calls)
        return (
            *(torch.as_tensor(array, dtype=dtype, device=device) for array in floats),
            torch.as_tensor(self.out_matrix, dtype=dtype, device=device),
        )

    def lookup(self, full_widths: np.ndarray) -> np.ndarray:
        """Summed milliseconds of these layers for integer full widths ``(N, G_all)``."""
        features = np.minimum(full_widths @ self.in_matrix, self.in_low.size - 1)
        t_in = self.in_t[features]
        base = self.in_low[features] * self.stride
        if self.out_grid.size:
            outputs = np.minimum(full_widths @ self.out_matrix, self.out_low.size - 1)
            base += self.out_low[outputs]
            t_out = self.out_t[outputs]
            v00, v01 = self.flat[base], self.flat[base + 1]
            v10, v11 = self.flat[base + self.stride], self.flat[base + self.stride + 1]
            values = _bilinear(v00, v01, v10, v11, t_in, t_out)
            if self.blocks[1] > 1:
                values = values * self.out_scale[outputs]
        else:
            v0, v1 = self.flat[base], self.flat[base + self.stride]
            values = v0 + t_in * (v1 - v0)
        if self.blocks[0] > 1:
            values = values * self.in_scale[features]
        return values @ self.calls


def _fit(sums: np.ndarray, times: np.ndarray, fit_scale: bool) -> Calibration:
    """The calibration of ``times`` against summed tables ``sums``, fitted in relative error
    (each point weighted by ``1 / time``, so a small subnet's 10% counts as much as a large
    one's), with ``scale > 0`` and ``overhead >= 0``.

    With ``fit_scale`` the best of the free linear fit, the scale alone, the overhead alone and
    (from three points) a power law ``scale * sums ** exponent`` wins, among those that keep the
    constraints. Without, the scale stays 1 unless the tables alone exceed the measurements:
    shrinking them then beats subtracting a constant (which would predict negative times for
    small subnets).
    """
    weights = 1.0 / times
    ratios = sums * weights

    def error(fit: Calibration) -> float:
        residual = (fit.apply(sums) - times) * weights
        return float(residual @ residual)

    scale_only = Calibration(0.0, float(ratios.sum() / (ratios @ ratios))) if ratios.any() else None
    overhead_only = Calibration(float(((times - sums) * weights**2).sum() / (weights**2).sum()))
    if not fit_scale:
        if overhead_only.overhead_ms >= 0 or scale_only is None:
            return Calibration(max(overhead_only.overhead_ms, 0.0))
        return scale_only
    design = np.stack([ratios, weights], axis=1)
    (scale, overhead), *_ = np.linalg.lstsq(design, np.ones_like(times), rcond=None)
    candidates = [Calibration(float(overhead), float(scale)), overhead_only]
    if scale_only is not None:
        candidates.append(scale_only)
    if len(sums) >= 3 and np.all(sums > 0):
        logs = np.stack([np.ones_like(sums), np.log(sums)], axis=1)
        (log_scale, exponent), *_ = np.linalg.lstsq(logs, np.log(times), rcond=None)
        if 0.5 <= exponent <= 1.5:  # time grows with work, if not in proportion
            candidates.append(Calibration(0.0, float(np.exp(log_scale)), exponent=float(exponent)))
    valid = [c for c in candidates if c.scale > 0 and c.overhead_ms >= 0]
    return min(valid or [Calibration(0.0)], key=error)


class LatencyPredictor(CostModel):
    """Predicted latency (ms) of a subnet from a :class:`LatencyProfile` of its dense model.

    Each conv/linear layer's time is bilinearly interpolated in its table at (input features,
    output channels), depthwise convs and norms linearly in channels. Convs first round widths
    up to their table's channel block (a kernel computes whole blocks) and pay the table's
    measured factor for a partial block. Times are multiplied by how often the layer runs and
    summed. The sum is then calibrated (:class:`Calibration`), fitted in relative error to the
    whole-model measurements the profile holds: the dense model and the pruned calibration
    subnets :func:`profile_model` times. With the dense model alone only the overhead is
    fitted (or, when the tables already add up to more, the scale); :meth:`calibrate` refits
    from the caller's own measurements.

    Example:
        >>> profile = LatencyProfile.load("r56-bs32.json")  # doctest: +SKIP
        >>> latency = LatencyPredictor(profile, graph)  # doctest: +SKIP
        >>> latency.predict({"layer1.0.conv1": 8})  # ms, one candidate  # doctest: +SKIP
        >>> latency.calibrate([(spec.widths, measured_ms)])  # refit  # doctest: +SKIP

    Raises:
        ProfileError: the profile was made for another model (its graph fingerprint differs) or
            lacks a table the graph needs.
    """

    metric: ClassVar[str] = "latency_ms"

    def __init__(self, profile: LatencyProfile, graph: GraphLike) -> None:
        view = GroupView.from_graph(graph)
        super().__init__(view)
        profile.check_graph(graph)
        self.profile = profile
        layers: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
        columns = len(view.names)
        index = view.index
        for layer in graph.layers:
            in_vector = np.zeros(columns)
            for segment in layer.in_segments:  # a depthwise conv's too: its input features
                in_vector[index[segment.group]] += segment.multiplier
            out_vector = np.zeros(columns)
            for piece in layer.outputs:
                out_vector[index[piece.group]] += piece.multiplier
            key = layer_axes(layer, view).key
            layers.setdefault(key, []).append((in_vector, out_vector, layer.calls))
        for norm in graph.norms:
            in_vector = np.zeros(columns)
            for segment in norm_segments(norm):
                in_vector[index[segment.group]] += segment.multiplier
            key = norm_axes(norm, view).key
            out_vector = np.zeros(columns)
            out_vector[index[norm.group]] = 1.0
            layers.setdefault(key, []).append((in_vector, out_vector, norm.calls))
        self._uses: list[_TableUse] = []
        for key, members in layers.items():
            table = profile.tables.get(key)
            if table is None:
                raise ProfileError(
                    f"latency profile of {profile.model_id} has no table {key} that this graph "
                    "needs; measure the profile again"
                )
            self._uses.append(_TableUse(table, members))
        self._torch_cache: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, ...]]] = {}
        self.calibration = Calibration(overhead_ms=0.0)
        measured: list[tuple[Mapping[str, int], float]] = list(profile.calibration)
        if profile.model_ms is not None and profile.model_ms > 0:
            measured.append(({}, profile.model_ms))
        if measured:
            try:
                self.calibrate(measured)
            except (ValueError, SpecError) as exc:
                raise ProfileError(
                    f"latency profile of {profile.model_id} holds calibration measurements "
                    f"that do not fit this graph ({exc}); measure the profile again"
                ) from exc

    @overload
    def predict(self, widths: Mapping[Any, int] | HasWidths) -> float: ...

    @overload
    def predict(
        self, widths: np.ndarray | Sequence[int] | Sequence[Sequence[int]]
    ) -> np.ndarray: ...

    def predict(self, widths: WidthsLike) -> float | np.ndarray:
        """Predicted latency in ms; the same as :meth:`evaluate`.

        Args:
            widths: a ``{group: width}`` mapping or ``SubnetSpec``, or integer widths of shape
                ``(P,)`` or ``(N, P)`` ordered as :attr:`groups`.

        Returns:
            A float for a mapping or spec; an array of shape ``widths.shape[:-1]`` otherwise.
        """
        return self.evaluate(widths)

    def calibrate(
        self,
        measured: Sequence[tuple[Mapping[Any, int] | HasWidths | np.ndarray, float]],
        *,
        fit_scale: bool | None = None,
    ) -> Calibration:
        """Fit the overhead (and optionally the scale) to whole-model measurements.

        Args:
            measured: ``(widths, ms)`` pairs: a subnet's widths (mapping, spec or ``(P,)`` array)
                and its latency measured with :func:`measure_latency` at the profile's batch size
                and threads.
            fit_scale: also fit the scale on the summed tables (needs at least two subnets with
                different predictions); ``False``: the scale is 1; ``None`` (default): fit it
                when there are two such subnets. Either way the fit minimises relative error,
                the overhead stays non-negative and the scale positive: when the tables alone
                exceed the measurements, the scale shrinks them instead (so no prediction is
                negative).

        Returns:
            The new calibration, also kept by the predictor.

        Raises:
            ValueError: no measurements, a non-positive time, or too few distinct subnets to fit
                the scale.
        """
        if not measured:
            raise ValueError("calibrate needs at least one (widths, ms) measurement")
        raw = []
        for widths, _ in measured:
            full, _single = self._view.full_widths(widths)
            if full.shape[0] != 1:
                raise ValueError("each calibration measurement must be of one subnet")
            raw.append(float(self._raw(full)[0]))
        times = np.array([float(ms) for _, ms in measured])
        if not np.all(np.isfinite(times)) or np.any(times <= 0):
            raise ValueError(f"measured latencies must be positive, got {times.tolist()}")
        sums = np.array(raw)
        distinct = np.ptp(sums) > 1e-9 * max(1.0, float(np.abs(sums).max()))
        if fit_scale is None:
            fit_scale = bool(distinct)
        if fit_scale and not distinct:
            raise ValueError(
                "fit_scale needs at least two measured subnets of different size; "
                f"got {len(measured)} with the same predicted time"
            )
        fit = _fit(sums, times, fit_scale)
        residual = times - fit.apply(sums)
        self.calibration = dataclasses.replace(
            fit, rms_error_ms=float(math.sqrt(np.mean(residual**2))), points=len(measured)
        )
        return self.calibration

    def _raw(self, full_widths: np.ndarray) -> np.ndarray:
        """Summed table lookups for each row of integer full widths ``(N, G_all)``."""
        total = np.zeros(full_widths.shape[0])
        for use in self._uses:
            total += use.lookup(full_widths)
        return total

    def _evaluate_full(self, full_widths: np.ndarray) -> np.ndarray:
        return self.calibration.apply(self._raw(full_widths))

    def relaxed(self, alpha: Tensor) -> Tensor:
        """Predicted latency (ms) at keep ratios ``alpha``, differentiable (piecewise linear).

        Args:
            alpha: keep ratios of shape ``(P,)`` or ``(N, P)`` ordered as :attr:`groups`.

        Returns:
            A 0-d tensor for ``(P,)``, shape ``(N,)`` for ``(N, P)``.

        Raises:
            ValueError: the last axis of ``alpha`` is not the number of prunable groups.
        """
        widths = self._view.float_widths(alpha)
        key = (widths.dtype, widths.device)
        if key not in self._torch_cache:
            self._torch_cache[key] = [
                use.tensors(widths.dtype, widths.device) for use in self._uses
            ]
        total = torch.zeros(widths.shape[0], dtype=widths.dtype, device=widths.device)
        for use, (in_grid, out_grid, flat, in_matrix, calls, out_matrix) in zip(
            self._uses, self._torch_cache[key], strict=True
        ):
            low_in, t_in, scale_in = _blocks_torch(
                in_grid, widths @ in_matrix, use.blocks[0], use.unaligned[0]
            )
            base = low_in * use.stride
            if out_grid.numel():
                low_out, t_out, scale_out = _blocks_torch(
                    out_grid, widths @ out_matrix, use.blocks[1], use.unaligned[1]
                )
                base = base + low_out
                v00, v01 = flat[base], flat[base + 1]
                v10, v11 = flat[base + use.stride], flat[base + use.stride + 1]
                values = _bilinear(v00, v01, v10, v11, t_in, t_out) * scale_out
            else:
                v0, v1 = flat[base], flat[base + use.stride]
                values = v0 + t_in * (v1 - v0)
            total = total + (values * scale_in) @ calls
        result = self.calibration.apply(total)
        return result.reshape(alpha.shape[:-1])


def cost_models(graph: GraphLike, profile: LatencyProfile | str | None = None) -> dict[str, Any]:
    """Every estimator of ``graph``: ``flops`` and ``params``, plus ``latency_ms`` with a profile.

    Args:
        graph: the traced model (a :class:`~prunetune.backend.graph.ChannelGraph`).
        profile: a latency profile, or the path of one written by ``prunetune profile``.

    Returns:
        ``{metric: CostModel}`` in the order flops, params, latency_ms.

    Raises:
        ProfileError: the profile cannot be read, or was measured for another model.
    """
    costs: dict[str, Any] = {
        "flops": FlopsModel.from_graph(graph),
        "params": ParamsModel.from_graph(graph),
    }
    if profile is not None and profile != "":
        loaded = profile if isinstance(profile, LatencyProfile) else LatencyProfile.load(profile)
        costs["latency_ms"] = LatencyPredictor(loaded, graph)
    return costs
