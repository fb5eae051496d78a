"""Helpers of the latency tests: fast profile settings and table times that bilinear
interpolation reproduces exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from prunetune.estimators import (
    LatencyProfile,
    LatencyTable,
)
from tests.estimators._fakes import FakeGraph, chain_graph

FAST: dict[str, Any] = {
    "widths_grid": 3,
    "repeats": 1,
    "warmup": 1,
    "measure_model": False,
    "channel_block": 1,  # grids independent of this CPU's SIMD width
}


def with_tables(
    profile: LatencyProfile, make_ms: Callable[[LatencyTable], np.ndarray]
) -> LatencyProfile:
    """``profile`` with every table's times replaced by ``make_ms(table)``."""
    tables = {
        key: dataclasses.replace(t, ms=np.asarray(make_ms(t), dtype=float))
        for key, t in profile.tables.items()
    }
    return dataclasses.replace(profile, tables=tables, model_ms=None)


def bilinear_ms(table: LatencyTable) -> np.ndarray:
    """A time that bilinear interpolation reproduces exactly: ``1 + 0.1 i + 0.2 o + 0.01 i o``."""
    i = np.array(table.in_grid, dtype=float)
    if not table.out_grid:
        return 0.5 + 0.05 * i
    o = np.array(table.out_grid, dtype=float)
    return 1 + 0.1 * i[:, None] + 0.2 * o[None, :] + 0.01 * i[:, None] * o[None, :]


def bilinear_reference(graph: FakeGraph, widths: dict[str, int]) -> float:
    """Sum of ``bilinear_ms`` over the graph's layers and norms, computed from the records."""
    width = {group.name: widths.get(group.name, group.size) for group in graph.groups}
    total = 0.0
    for layer in graph.layers:
        out = width[layer.out_group]
        if layer.depthwise:
            total += (0.5 + 0.05 * out) * layer.calls
            continue
        features = sum(width[s.group] * s.multiplier for s in layer.in_segments)
        total += (1 + 0.1 * features + 0.2 * out + 0.01 * features * out) * layer.calls
    for norm in graph.norms:
        channels = sum(width[s.group] * s.multiplier for s in norm.segments) or width[norm.group]
        total += (0.5 + 0.05 * channels) * norm.calls
    return total


def two_conv_graph() -> FakeGraph:
    """image (3) -> conv a (8) -> conv b (12): tables T0 over a (1-D in practice) and T1 (a, b)."""
    base = chain_graph((8, 12), hw=4)
    return FakeGraph(base.groups[:-1], base.layers[:2], (), 0, base.input_shape)
