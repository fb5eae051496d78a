"""Channels along the last dim: channels-last maps and tokens, as ConvNeXt and transformers use.

A ``permute`` that moves dim 1 to the end (``[N, C, H, W] -> [N, H, W, C]``, or
``[N, C, L] -> [N, L, C]`` by ``transpose(1, 2)``) turns a value's channels into a :class:`Last`
value; a ``Linear`` over the last dim of any rank reads and makes such values (its positions are
every dim between batch and features); activations, dropout and sums pass them on; the
reverse permute, or a mean over the positions down to ``[N, C]``, turns them back. ``LayerNorm``
over the last dim keeps its channels whole (it normalises across them). Anything else fixes them.
"""

from __future__ import annotations

import math
from typing import Any, cast

from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._scales import ScaleRules
from prunetune.backend.graph._state import Last
from prunetune.backend.graph._trace import node_shape

__all__ = ["ChannelsLastRules"]


def as_value(channels: Channels, rank: int) -> Any:
    """``channels`` along the last dim of a tensor of ``rank``: plain channels when rank is 2."""
    return channels if rank == 2 else Last(channels)


class ChannelsLastRules(ScaleRules):
    """The rules for :class:`Last` values, used by the channel analysis."""

    def _permute_channels(self, node: fx.Node, order: tuple[int, ...]) -> Any | None:
        """Where a permute by ``order`` puts the channels; ``None`` when it does not apply."""
        source = node.args[0]
        rank = len(order)
        if rank < 3 or order[0] != 0:
            return None
        channels = self.channels(source)
        if channels is not None and order.index(1) == rank - 1:
            if any(segment.mult != 1 for segment in channels):
                return None
            return Last(channels)
        last = self.last(source)
        if last is not None:
            position = order.index(rank - 1)
            if position == 1:
                return last
            if position == rank - 1:
                return Last(last)
        return None

    def _last_same(self, node: fx.Node) -> Any | None:
        """Ops that keep the shape (activations, dropout) on a :class:`Last` value."""
        source = node.args[0] if node.args else None
        last = self.last(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if last is None or in_shape is None or out_shape is None:
            return None
        if len(in_shape) == len(out_shape) and in_shape[-1] == out_shape[-1]:
            return Last(last)
        return None

    def _last_elementwise(self, node: fx.Node, what: str) -> Any | None:
        """Sums and products of :class:`Last` values of one shape (scalars broadcast freely)."""
        out_shape = node_shape(node)
        lasts = [self.last(source) for source in node.all_input_nodes]
        if out_shape is None or not any(lasts):
            return None
        joined: list[Channels] = []
        scales: list[tuple[str, int]] = []
        for source, last in zip(node.all_input_nodes, lasts, strict=True):
            shape = node_shape(source)
            if shape is None or len(shape) == 0 or math.prod(shape) == 1:
                continue
            scale = self._scale_of(source, out_shape, len(out_shape) - 1) if last is None else None
            if scale is not None:  # a per-channel parameter (layer scale): pruned with them
                scales.append(scale)
                continue
            if last is None or len(shape) != len(out_shape) or shape[-1] != out_shape[-1]:
                return None
            joined.append(last)
        result = joined[0]
        for other in joined[1:]:
            result = self._join(result, other, node, what)
        for name, dim in scales:
            self._add_scale(name, result, dim, node, what)
        return Last(result)

    def _last_reduce(self, node: fx.Node, reduced: tuple[int, ...] | None) -> Any | None:
        """A mean (or sum, max) over positions of a :class:`Last` value."""
        source = node.args[0]
        last = self.last(source)
        shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if last is None or shape is None or out_shape is None or reduced is None:
            return None
        if 0 in reduced or len(shape) - 1 in reduced or out_shape[-1] != shape[-1]:
            return None
        return as_value(last, len(out_shape))

    def _last_norm(self, node: fx.Node, module: nn.Module) -> Any | None:
        """``LayerNorm`` over the channels of a :class:`Last` value: they stay whole."""
        last = self.last(node.args[0])
        shape = tuple(getattr(module, "normalized_shape", ()))
        if last is None or len(shape) != 1:
            return None
        self._fix(last, f"LayerNorm '{node.target}' normalises across these channels")
        return Last(last)

    def _token_linear(self, node: fx.Node, module: nn.Module) -> Any | None:
        """A ``Linear`` over the last dim of a tensor of rank 3 or more.

        Its input features are the channels of a :class:`Last` input, else a new fixed group
        (dim 1 of a plain input is then positions, kept whole); its output is a new group
        along the last dim, with ``prod(shape[1:-1])`` positions per call.
        """
        name = self._layer_name(node)
        source = node.args[0]
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        linear = cast(nn.Linear, module)
        if not isinstance(source, fx.Node) or in_shape is None or out_shape is None:
            return None
        if len(in_shape) < 3:
            return None
        inputs = self.last(source)
        if inputs is None:
            self._fix_value(
                self.values.get(source),
                f"Linear '{name}' acts on the last dim, so dim 1 of its input is positions",
            )
            reason = f"Linear '{name}' reads features that no traced layer produces"
            slot = self.slots.new(linear.in_features, name, reason)
            inputs = (Segment(slot, linear.in_features),)
        positions = self.per_example(node, math.prod(out_shape[1:-1]))
        shared = self._record_call(node, name, inputs, f"shared module '{name}'", positions)
        if shared is not None:
            return Last(shared)
        shape = (tuple(in_shape[1:-1]), tuple(out_shape[1:-1]), positions)
        return Last(self._add_layer(node, module, inputs, linear.out_features, shape))

    def _permute_order(self, node: fx.Node, name: str, rank: int) -> tuple[int, ...] | None:
        """The full dim order of a permute, transpose or swapaxes call, ``None`` if unknown."""
        if name == "permute":
            dims: Any = list(node.args[1:]) or rules.argument(node, 1, "dims")
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            return rules.normalise_dims(tuple(dims), rank) if dims else None
        pair = rules.normalise_dims(
            (rules.argument(node, 1, "dim0"), rules.argument(node, 2, "dim1")), rank
        )
        if pair is None:
            return None
        order = list(range(rank))
        order[pair[0]], order[pair[1]] = order[pair[1]], order[pair[0]]
        return tuple(order)
