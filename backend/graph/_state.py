"""State shared by the channel analysis: value records, slots, and the coupling helpers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from prunetune.backend.graph._groups import Channels, Segment, SlotSet
from prunetune.backend.graph._records import ChannelMember
from prunetune.backend.graph._trace import node_shape

__all__ = [
    "AnalysisState",
    "HeadSite",
    "Heads",
    "Last",
    "LayerRecord",
    "Many",
    "NormRecord",
    "Shuffled",
    "SizesProbe",
    "is_multi",
]


@dataclass
class LayerRecord:
    """A conv or linear module as first called, plus its call count. A functional layer
    (``F.conv2d(x, self.weight, self.bias)``) names its ``weight`` and ``bias`` parameters; its
    ``module`` is then a stand-in on the meta device with the call's configuration."""

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
    weight: str = ""
    bias: str = ""


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


@dataclass(frozen=True)
class Shuffled:
    """The middle of a channel shuffle: a tensor whose channels were viewed as dims 1 and 2,
    ``[batch, groups, C / groups, ...]`` (``swapped``: ``[batch, C / groups, groups, ...]``),
    ``pieces`` being what each of the ``groups`` runs of ``C / groups`` channels is made of."""

    pieces: tuple[Channels, ...]
    swapped: bool = False


@dataclass(frozen=True)
class Heads:
    """Attention heads split out of a token projection's output: dim ``head`` of the tensor
    indexes heads, each head one channel of ``parts`` (its ``head_dim`` features a segment's
    multiplier), dim ``inner`` (``None`` once contracted, as in attention scores) the features
    within a head. A fused projection's output viewed as ``[..., 3, heads, head_dim]`` has
    ``parts`` q, k and v along dim ``part``; otherwise ``parts`` holds one entry and ``part`` is
    ``None``."""

    parts: tuple[Channels, ...]
    head: int
    inner: int | None
    part: int | None = None


@dataclass(frozen=True)
class HeadSite:
    """A size in a reshape of attention heads that must follow the kept heads: argument
    ``position`` of fx node ``node`` (its sizes counted from 0, the tensor excluded) is
    ``heads * per_head`` for the heads of ``channels`` (``per_head`` 1: the head count; the
    head dim: the width). ``module`` is the innermost module whose forward holds the reshape."""

    node: str
    position: int
    channels: Channels
    per_head: int
    module: str


SizesProbe = Callable[[fx.Node], tuple[str | None, str | None]]
"""Where the literal sizes of a channel split come from: ``(attribute, None)`` when the split
node reads them from that list attribute of the module that owns the call, ``(None, why)`` when
that could not be checked, ``(None, None)`` when they are literals in the code."""


def is_multi(meta: Any) -> TypeGuard[tuple[Any, ...] | list[Any]]:
    """Whether recorded tensor metadata is for several outputs (not one tensor's NamedTuple)."""
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata)


class AnalysisState:
    """Slots, the channels of every value so far, layer records, and how to couple or fix.

    ``cuts`` names, for layers whose output is cut into pieces, the output channels where a new
    piece starts; ``blocks`` names runs ``(start, stop, k)`` of output channels pruned in whole
    blocks of ``k`` (a channel shuffle interleaves them with blocks elsewhere). A pass that finds
    a split (or a join) that needs them asks for them in :attr:`requests` and
    :attr:`block_requests`; the analysis is then run again with them, until no pass asks for
    more (see ``ChannelGraph.trace``). ``split_probe`` says where the literal sizes of a
    channel split come from (without one, literal sizes keep the pieces whole).
    """

    def __init__(
        self,
        module: fx.GraphModule,
        cuts: Mapping[str, frozenset[int]] | None = None,
        blocks: Mapping[str, frozenset[tuple[int, int, int]]] | None = None,
        split_probe: SizesProbe | None = None,
    ) -> None:
        self.module = module
        self.cuts: Mapping[str, frozenset[int]] = cuts or {}
        self.blocks: Mapping[str, frozenset[tuple[int, int, int]]] = blocks or {}
        self.requests: dict[str, set[int]] = {}
        self.block_requests: dict[str, set[tuple[int, int, int]]] = {}
        # slot -> (layer, first output channel, output channels per slot channel)
        self.origin: dict[int, tuple[str, int, int]] = {}
        self.submodules = dict(module.named_modules())
        self.slots = SlotSet()
        self.values: dict[fx.Node, Any] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.norms: dict[str, NormRecord] = {}
        self.unknown_modules: dict[str, str] = {}
        self.mask_points: list[tuple[fx.Node, Channels]] = []
        # per-channel tensors applied to activations: qualified name -> (channels, dim)
        self.scales: dict[str, tuple[Channels, int]] = {}
        # calls of F.conv2d / F.linear on parameters: node -> the module holding the weight
        self.functional: dict[fx.Node, str] = {}
        self._functional_bias: dict[str, str] = {}
        # attention heads: sizes that must follow them, their slots, per-head matmul MACs
        self.head_sites: list[HeadSite] = []
        self.head_slots: set[int] = set()
        self.head_costs: list[tuple[fx.Node, Channels, int]] = []
        # channel splits at sizes read from a list attribute: (module, attribute) -> pieces
        self.split_probe = split_probe
        self.split_attributes: dict[tuple[str, str], tuple[Channels, ...]] = {}
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

    def _layer_name(self, node: fx.Node) -> str:
        """The name of the layer a call computes: its module, or the module whose weight a
        functional call reads."""
        return self.functional.get(node, str(node.target))

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
        elif isinstance(value, Shuffled):
            for piece in value.pieces:
                self._fix(piece, reason)
        elif isinstance(value, Heads):
            for part in value.parts:
                self._fix(part, reason)

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

    def _output_slots(self, name: str, size: int) -> Channels:
        """New slots for the ``size`` output channels of layer ``name``: one slot, or one per
        piece where :attr:`cuts` cut its output, each in blocks where :attr:`blocks` asks; each
        is an ``out`` member at its offset."""
        bounds = [0, *sorted(c for c in self.cuts.get(name, ()) if 0 < c < size), size]
        segments = []
        for start, stop in itertools.pairwise(bounds):
            block = 1
            for low, high, k in self.blocks.get(name, ()):
                if low <= start and stop <= high and (start - low) % k == 0:
                    block = math.lcm(block, k)
            if (stop - start) % block:
                block = 1  # cut inside a block: the join that asked for it keeps it whole
            label = name if len(bounds) == 2 else f"{name}[{start}:{stop}]"
            slot = self.slots.new((stop - start) // block, label)
            self.origin[slot] = (name, start, block)
            self.slots.add_member(slot, ChannelMember(name, "out", start, block))
            segments.append(Segment(slot, (stop - start) // block, block))
        return tuple(segments)

    def _cuts_needed(
        self, channels: Channels, bounds: Sequence[int]
    ) -> list[tuple[int, int]] | None:
        """``(slot, channel)`` cuts after which every feature position in ``bounds`` starts a
        segment of ``channels``; ``None`` when one falls inside a channel's features."""
        needed = []
        start = 0
        for segment in channels:
            stop = start + segment.size * segment.mult
            for bound in bounds:
                if start < bound < stop:
                    if (bound - start) % segment.mult:
                        return None
                    needed.append((segment.slot, (bound - start) // segment.mult))
            start = stop
        return needed

    def _request_cuts(self, needed: Sequence[tuple[int, int]]) -> bool:
        """Ask for every layer whose output is coupled to a slot to be cut at a channel of it;
        ``False`` (nothing asked) when a slot is not made by a layer that can be cut."""
        wanted: dict[str, set[int]] = {}
        for slot, channel in needed:
            for member in self.slots.set_of(slot):
                origin = self.origin.get(member)
                if origin is None:
                    return False
                name, start, block = origin
                wanted.setdefault(name, set()).add(start + channel * block)
        for name, cuts in wanted.items():
            self.requests.setdefault(name, set()).update(cuts)
        return True

    def _request_blocks(self, slot: int, factor: int) -> bool:
        """Ask for every layer whose output is coupled to ``slot`` to prune those channels in
        blocks of ``factor`` of them; ``False`` (nothing asked) when that cannot be done."""
        wanted: dict[str, set[tuple[int, int, int]]] = {}
        size = self.slots.size(slot)
        if size % factor:
            return False
        for member in self.slots.set_of(slot):
            origin = self.origin.get(member)
            if origin is None:
                return False
            name, start, block = origin
            wanted.setdefault(name, set()).add((start, start + size * block, block * factor))
        for name, blocks in wanted.items():
            self.block_requests.setdefault(name, set()).update(blocks)
        return True

    def _pieces(self, channels: Channels, sizes: Sequence[int]) -> list[Channels] | None:
        """``channels`` split into consecutive pieces of ``sizes`` features, ``None`` when a
        piece would start inside a segment (the cuts that fix that are then requested)."""
        bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
        needed = self._cuts_needed(channels, bounds)
        if needed is None or sum(sizes) != sum(s.size * s.mult for s in channels):
            return None
        if needed:
            self._request_cuts(needed)
            return None
        pieces: list[Channels] = []
        remaining = list(channels)
        for size in sizes:
            piece: list[Segment] = []
            while size > 0:
                segment = remaining.pop(0)
                piece.append(segment)
                size -= segment.size * segment.mult
            pieces.append(tuple(piece))
        return pieces

    def _join(self, first: Channels, second: Channels, node: fx.Node, what: str) -> Channels:
        """Couple two tensors' channels one to one (residual partners, shared-module calls).

        Where they are concatenated differently but hold as many features, the cuts that would
        line their segments up are requested (the next pass then couples them piece by piece).
        """
        if [(s.size, s.mult) for s in first] == [(s.size, s.mult) for s in second]:
            for a, b in zip(first, second, strict=True):
                self.slots.union(a.slot, b.slot)
        else:
            if sum(s.size * s.mult for s in first) == sum(s.size * s.mult for s in second):
                needed_first = self._cuts_needed(first, _starts(second))
                needed_second = self._cuts_needed(second, _starts(first))
                if needed_first is not None and needed_second is not None:
                    self._request_cuts(needed_first + needed_second)
                    if not needed_first and not needed_second:  # the same runs, in blocks
                        self._align_blocks(first, second)
            reason = (
                f"{what} at node '{node.name}' combines tensors whose channels are "
                "concatenated differently"
            )
            self._fix(first, reason)
            self._fix(second, reason)
        return first

    def _in_blocks(self, channels: Channels, block: int) -> bool:
        """Whether ``channels`` come in whole runs of ``block`` features (each channel spanning
        a multiple of ``block``); where they could, the blocks are requested instead (the next
        pass then finds them), and ``False`` is returned."""
        aligned, offset = True, 0
        for segment in channels:
            if offset % block:
                return False
            if segment.mult % block:
                if block % segment.mult or not self._request_blocks(
                    segment.slot, block // segment.mult
                ):
                    return False
                aligned = False
            offset += segment.size * segment.mult
        return aligned

    def _align_blocks(self, first: Channels, second: Channels) -> None:
        """For segments that cover the same features with channels of different sizes, ask
        for the finer one's producers to prune in the coarser one's blocks."""
        for a, b in zip(first, second, strict=True):
            if a.mult != b.mult:
                fine, coarse = (a, b) if a.mult < b.mult else (b, a)
                if coarse.mult % fine.mult == 0:
                    self._request_blocks(fine.slot, coarse.mult // fine.mult)

    def _add_scale(self, name: str, channels: Channels, dim: int, node: fx.Node, what: str) -> None:
        """Record the per-channel tensor ``name`` applied to ``channels`` (along its ``dim``);
        one used again is coupled to its first use. Masks go after ``node`` too (an added
        bias would turn masked channels into non-zeros)."""
        self.mask_points.append((node, channels))
        known = self.scales.get(name)
        if known is not None:
            self._join(known[0], channels, node, what)
            return
        self.scales[name] = (channels, dim)

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
        name = self._layer_name(node)
        offset = 0
        for segment in inputs:
            self.slots.add_member(segment.slot, ChannelMember(name, "in", offset, segment.mult))
            offset += segment.size * segment.mult
        outputs = self._output_slots(name, out_size)
        kind: Literal["conv", "linear"] = "linear" if isinstance(module, nn.Linear) else "conv"
        input_hw, output_hw, count = positions
        self.layers[name] = LayerRecord(
            name, kind, module, inputs, outputs, False, input_hw, output_hw, positions=count
        )
        self.mask_points.append((node, outputs))
        return outputs


def _starts(channels: Channels) -> list[int]:
    """The feature position where each segment of ``channels`` after the first starts."""
    starts, position = [], 0
    for segment in channels[:-1]:
        position += segment.size * segment.mult
        starts.append(position)
    return starts
