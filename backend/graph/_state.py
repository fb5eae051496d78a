"""State shared by the channel analysis: value records, slots, and the coupling helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from prunetune.backend.graph._groups import Channels, Segment, SlotSet
from prunetune.backend.graph._records import ChannelMember
from prunetune.backend.graph._trace import node_shape

__all__ = ["AnalysisState", "Last", "LayerRecord", "Many", "NormRecord", "is_multi"]


@dataclass
class LayerRecord:
    """A conv or linear module as first called, plus its call count."""

    name: str
    kind: Literal["conv", "linear"]
    module: nn.Module
    inputs: Channels
    outputs: Channels
    depthwise: bool
    input_hw: tuple[int, ...]
    output_hw: tuple[int, ...]
    calls: int = 1
    positions: int = 0


@dataclass
class NormRecord:
    """A norm module as first called, plus its call count."""

    name: str
    module: nn.Module
    channels: Channels
    input_hw: tuple[int, ...]
    calls: int = 1


@dataclass(frozen=True)
class Many:
    """The value of a node that returns several tensors (split, chunk, max with dim)."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class Last:
    """The value of a node whose channels are its *last* dim, not dim 1: a channels-last map
    ``[batch, H, W, channels]`` or tokens ``[batch, tokens, channels]``. Its other dims are
    positions; a rank-2 value is always plain :data:`Channels` instead."""

    channels: Channels


def is_multi(meta: Any) -> TypeGuard[tuple[Any, ...] | list[Any]]:
    """Whether recorded tensor metadata is for several outputs (not one tensor's NamedTuple)."""
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


class AnalysisState:
    """Slots, the channels of every value so far, layer records, and how to couple or fix."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.submodules = dict(module.named_modules())
        self.slots = SlotSet()
        self.values: dict[fx.Node, Any] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.norms: dict[str, NormRecord] = {}
        self.unknown_modules: dict[str, str] = {}
        self.mask_points: list[tuple[fx.Node, Channels]] = []
        self._input_seen = False
        self.batch = 1
        """Dim 0 of the example input: the examples that every cost is divided by."""

    def per_example(self, node: fx.Node, positions: int) -> int:
        """``positions`` of one row of ``node``'s output (its dim 0), per example of the input:
        a layer may run on a batch folded with patches, frames or windows (MobileViT folds
        4 patch positions into dim 0), and its MACs then grow with dim 0 / the input's batch."""
        shape = node_shape(node)
        rows = shape[0] if shape else self.batch
        return positions * rows // self.batch if rows % self.batch == 0 else positions

    def channels(self, node: Any) -> Channels | None:
        """The channels of a node's single tensor output, ``None`` if it has none."""
        if not isinstance(node, fx.Node):
            return None
        value = self.values.get(node)
        return value if isinstance(value, tuple) else None

    def last(self, node: Any) -> Channels | None:
        """The channels of a node whose channels are its last dim (:class:`Last`), else None."""
        value = self.values.get(node) if isinstance(node, fx.Node) else None
        return value.channels if isinstance(value, Last) else None

    # --- helpers ---------------------------------------------------------------------------

    def _fix(self, channels: Channels | None, reason: str) -> None:
        for segment in channels or ():
            self.slots.fix(segment.slot, reason)

    def _fix_value(self, value: Any, reason: str) -> None:
        if isinstance(value, tuple):
            self._fix(value, reason)
        elif isinstance(value, Last):
            self._fix(value.channels, reason)
        elif isinstance(value, Many):
            for item in value.items:
                self._fix_value(item, reason)

    def _fresh(self, node: fx.Node, reason: str) -> Any:
        """New fixed slots for whatever tensors ``node`` returns."""
        meta = node.meta.get("tensor_meta")

        def make(item: Any) -> Any:
            if is_multi(item):
                return Many(tuple(make(part) for part in item))
            shape = getattr(item, "shape", None)
            if shape is None or len(shape) < 2:
                return None
            return (Segment(self.slots.new(int(shape[1]), node.name, reason), int(shape[1])),)

        return make(meta) if meta is not None else None

    def _unknown(self, node: fx.Node, what: str) -> Any:
        """Fix every input's channels and give the output new fixed channels."""
        for source in node.all_input_nodes:
            self._fix_value(
                self.values.get(source),
                f"reaches {what} at node '{node.name}', which cannot be pruned through",
            )
        return self._fresh(node, f"produced by {what} at node '{node.name}'")

    def _join(self, first: Channels, second: Channels, node: fx.Node, what: str) -> Channels:
        """Couple two tensors' channels one to one (residual partners, shared-module calls)."""
        if [(s.size, s.mult) for s in first] == [(s.size, s.mult) for s in second]:
            for a, b in zip(first, second, strict=True):
                self.slots.union(a.slot, b.slot)
        else:
            reason = (
                f"{what} at node '{node.name}' combines tensors whose channels are "
                "concatenated differently"
            )
            self._fix(first, reason)
            self._fix(second, reason)
        return first

    def _record_call(
        self, node: fx.Node, name: str, channels: Channels, what: str, positions: int = 0
    ) -> Any:
        """A later call of a shared module: couple its input with the first call's and add this
        call's ``positions`` (output positions per example) to the layer's."""
        record: LayerRecord | NormRecord | None = self.layers.get(name) or self.norms.get(name)
        if record is None:
            return None
        record.calls += 1
        if isinstance(record, LayerRecord):
            record.positions += positions
            self._join(record.inputs, channels, node, what)
            outputs = record.outputs
        else:
            outputs = self._join(record.channels, channels, node, what)
        self.mask_points.append((node, outputs))
        return outputs

    def _add_layer(
        self,
        node: fx.Node,
        module: nn.Module,
        inputs: Channels,
        out_size: int,
        positions: tuple[tuple[int, ...], tuple[int, ...], int],
    ) -> Channels:
        """Record a conv or linear layer that reads ``inputs`` and makes a new group of
        ``out_size`` channels (ungrouped, not depthwise); returns the new group's channels.

        Args:
            node: the layer's (first) call.
            module: the layer module.
            inputs: the channels it reads, in feature order.
            out_size: its output channels.
            positions: ``(input_hw, output_hw, positions per example)`` of this call.
        """
        name = str(node.target)
        offset = 0
        for segment in inputs:
            self.slots.add_member(segment.slot, ChannelMember(name, "in", offset, segment.mult))
            offset += segment.size * segment.mult
        slot = self.slots.new(out_size, name)
        self.slots.add_member(slot, ChannelMember(name, "out"))
        outputs = (Segment(slot, out_size),)
        kind: Literal["conv", "linear"] = "linear" if isinstance(module, nn.Linear) else "conv"
        input_hw, output_hw, count = positions
        self.layers[name] = LayerRecord(
            name, kind, module, inputs, outputs, False, input_hw, output_hw, positions=count
        )
        self.mask_points.append((node, outputs))
        return outputs
