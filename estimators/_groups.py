"""A traced graph seen by the estimators: group order, sizes, and widths in array form.

Every estimator works on one ``(N, G_all)`` integer (or float) matrix of widths, one column per
channel group of the graph, fixed groups always at their full size. This module turns what users
pass (a ``{group: width}`` mapping, a :class:`SubnetSpec`, a ``(P,)`` or ``(N, P)`` array ordered
as ``graph.prunable_groups``) into that matrix, and checks it on the way in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.errors import SpecError
from prunetune.backend.graph import ChannelGroup, ChannelSegment, LayerInfo, NormInfo

__all__ = [
    "GraphLike",
    "GroupView",
    "HasWidths",
    "WidthsLike",
    "graph_fingerprint",
    "layer_config",
    "norm_segments",
]


class GraphLike(Protocol):
    """What the estimators read from a traced graph (``backend.graph.ChannelGraph`` has it all)."""

    @property
    def groups(self) -> Sequence[ChannelGroup]: ...

    @property
    def layers(self) -> Sequence[LayerInfo]: ...

    @property
    def norms(self) -> Sequence[NormInfo]: ...

    @property
    def other_params(self) -> int: ...

    @property
    def other_flops(self) -> int: ...


@runtime_checkable
class HasWidths(Protocol):
    """Anything with a ``widths`` mapping from group name to kept channels (a ``SubnetSpec``)."""

    @property
    def widths(self) -> Mapping[Any, int]: ...


WidthsLike = Mapping[Any, int] | HasWidths | np.ndarray | Sequence[int] | Sequence[Sequence[int]]
"""Widths of one or many candidates: a mapping/spec, a ``(P,)`` or an ``(N, P)`` array."""


def _group_name(key: Any) -> str:
    name = getattr(key, "name", key)
    if not isinstance(name, str):
        raise TypeError(f"group keys must be group names (str) or ChannelGroup, got {key!r}")
    return name


@dataclass(frozen=True, eq=False)
class GroupView:
    """The graph's channel groups in a fixed order, with the conversions from user widths.

    Attributes:
        names: every group's name, in ``graph.groups`` order (the columns of full widths).
        sizes: dense width of every group, shape ``(G_all,)``.
        prunable: names of the prunable groups, in ``graph.prunable_groups`` order.
        prunable_index: column of each prunable group in the full widths, shape ``(P,)``.
        min_widths: smallest allowed width of each prunable group, shape ``(P,)``.
        steps: kept widths of each prunable group are multiples of this, shape ``(P,)``.
    """

    names: tuple[str, ...]
    sizes: np.ndarray
    prunable: tuple[str, ...]
    prunable_index: np.ndarray
    min_widths: np.ndarray
    steps: np.ndarray

    @classmethod
    def from_graph(cls, graph: GraphLike) -> GroupView:
        """Read the group order from ``graph.groups`` and ``graph.prunable_groups``.

        Raises:
            ValueError: two groups share a name, or ``prunable_groups`` names an unknown or
                fixed group.
        """
        groups = tuple(graph.groups)
        names = tuple(group.name for group in groups)
        if len(set(names)) != len(names):
            raise ValueError(f"graph has duplicate channel group names: {sorted(names)}")
        by_name = {group.name: group for group in groups}
        listed = getattr(graph, "prunable_groups", None)
        if listed is None:
            prunable = tuple(group.name for group in groups if group.prunable)
        else:
            prunable = tuple(_group_name(item) for item in listed)
        for name in prunable:
            if name not in by_name or not by_name[name].prunable:
                raise ValueError(f"graph.prunable_groups lists {name!r}, not a prunable group")
        index = {name: position for position, name in enumerate(names)}
        return cls(
            names=names,
            sizes=np.array([group.size for group in groups], dtype=np.int64),
            prunable=prunable,
            prunable_index=np.array([index[name] for name in prunable], dtype=np.int64),
            min_widths=np.array([by_name[n].min_width for n in prunable], dtype=np.int64),
            steps=np.array([by_name[n].step for n in prunable], dtype=np.int64),
        )

    @property
    def index(self) -> dict[str, int]:
        """Column of each group (by name) in the full widths."""
        return {name: position for position, name in enumerate(self.names)}

    @property
    def prunable_sizes(self) -> np.ndarray:
        """Dense width of each prunable group, shape ``(P,)``."""
        return self.sizes[self.prunable_index]

    def full_widths(self, widths: WidthsLike) -> tuple[np.ndarray, bool]:
        """Turn user widths into full integer widths ``(N, G_all)``, checked.

        Returns:
            The widths of every group (fixed ones at their size), and whether the input was a
            single mapping or spec (``True``) rather than an array.

        Raises:
            SpecError: an unknown group, a fixed group not at its size, or a width below the
                group's minimum, above its size or not a multiple of its step.
            ValueError: an array whose last axis is not the number of prunable groups, or that
                holds non-integer values.
        """
        if isinstance(widths, HasWidths) and not isinstance(widths, Mapping):
            widths = widths.widths
        if isinstance(widths, Mapping):
            return self._from_mapping(widths)[None, :], True
        array = np.asarray(widths)
        if array.ndim not in (1, 2) or array.shape[-1] != len(self.prunable):
            raise ValueError(
                f"widths array must have shape (P,) or (N, P) with P={len(self.prunable)} "
                f"prunable groups, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.integer) and (
            not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array))
        ):
            raise ValueError("widths array must hold whole channel counts (integers)")
        rows = 1 if array.ndim == 1 else array.shape[0]  # -1 cannot be inferred when P is 0
        prunable = array.reshape(rows, len(self.prunable)).astype(np.int64)
        self._check_prunable(prunable)
        full = np.broadcast_to(self.sizes, (prunable.shape[0], len(self.names))).copy()
        full[:, self.prunable_index] = prunable
        return full, False

    def float_widths(self, keep_ratio: Tensor) -> Tensor:
        """Continuous widths ``(N, G_all)`` from keep ratios ``(P,)`` or ``(N, P)``, differentiably.

        Raises:
            ValueError: the last axis of ``keep_ratio`` is not the number of prunable groups.
        """
        if keep_ratio.ndim not in (1, 2) or keep_ratio.shape[-1] != len(self.prunable):
            raise ValueError(
                f"keep ratios must have shape (P,) or (N, P) with P={len(self.prunable)}, "
                f"got {tuple(keep_ratio.shape)}"
            )
        dtype = keep_ratio.dtype if keep_ratio.is_floating_point() else torch.float64
        rows = 1 if keep_ratio.ndim == 1 else keep_ratio.shape[0]
        ratio = keep_ratio.reshape(rows, len(self.prunable)).to(dtype)
        sizes = torch.as_tensor(self.sizes, dtype=dtype, device=ratio.device)
        full = sizes.expand(ratio.shape[0], -1)
        index = torch.as_tensor(self.prunable_index, device=ratio.device)
        return full.index_copy(1, index, ratio * sizes[index])

    def _from_mapping(self, widths: Mapping[Any, int]) -> np.ndarray:
        index = self.index
        full = self.sizes.copy()
        for key, value in widths.items():
            name = _group_name(key)
            if name not in index:
                known = ", ".join(self.prunable[:8]) + (", ..." if len(self.prunable) > 8 else "")
                raise SpecError(f"unknown channel group {name!r}; prunable groups: {known}")
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise SpecError(f"width of group {name!r} must be an integer, got {value!r}")
            full[index[name]] = int(value)
        fixed = np.ones(len(self.names), dtype=bool)
        fixed[self.prunable_index] = False
        wrong = np.flatnonzero(fixed & (full != self.sizes))
        if wrong.size:
            name = self.names[wrong[0]]
            raise SpecError(
                f"group {name!r} cannot be pruned; its width must stay {self.sizes[wrong[0]]}, "
                f"got {full[wrong[0]]}"
            )
        self._check_prunable(full[self.prunable_index][None, :])
        return full

    def _check_prunable(self, prunable: np.ndarray) -> None:
        sizes = self.prunable_sizes
        bad = (prunable < self.min_widths) | (prunable > sizes) | (prunable % self.steps != 0)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            step = int(self.steps[column])
            raise SpecError(
                f"width {prunable[row, column]} of group {self.prunable[column]!r}"
                f"{f' (candidate {row})' if prunable.shape[0] > 1 else ''} is out of range; "
                f"valid: {self.min_widths[column]}..{sizes[column]}"
                f"{f' in multiples of {step}' if step > 1 else ''}"
            )


def norm_segments(norm: NormInfo) -> tuple[ChannelSegment, ...]:
    """The groups a norm layer's channels come from, in order (several after a concat)."""
    return norm.segments or (ChannelSegment(norm.group),)


def layer_config(layer: LayerInfo) -> dict[str, Any]:
    """The configuration of a layer that its run time depends on, JSON-ready (no names)."""
    return {
        "kind": layer.kind,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "depthwise": layer.depthwise,
        "input_hw": list(layer.input_hw),
        "output_hw": list(layer.output_hw),
        "bias": layer.bias,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        **({"transposed": True} if layer.transposed else {}),
    }


def graph_fingerprint(graph: GraphLike) -> str:
    """A short hash of everything cost estimates depend on: groups, layers, norms.

    Two graphs with the same fingerprint give the same FLOPs, parameters and latency for the same
    widths, so a latency profile made for one may be used with the other.
    """
    payload = {
        "groups": [[group.name, group.size, group.prunable, group.step] for group in graph.groups],
        "layers": [
            [
                layer.name,
                layer.out_group if not layer.out_segments else [s.group for s in layer.outputs],
                [[seg.group, seg.multiplier] for seg in layer.in_segments],
                layer.calls,
                layer_config(layer),
            ]
            for layer in graph.layers
        ],
        "norms": [
            [
                norm.name,
                [[seg.group, seg.multiplier] for seg in norm_segments(norm)],
                norm.affine,
                list(norm.input_hw),
                norm.calls,
            ]
            for norm in graph.norms
        ],
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
