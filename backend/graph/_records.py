"""Frozen records that describe a traced model's channels: groups, layers, norms.

Every channel dimension of every conv, linear and norm layer belongs to exactly one
:class:`ChannelGroup`. Groups that cannot shrink (the image's channels, the logits, anything
untraceable) are still groups, with ``prunable=False`` and the reason, so cost estimators need no
special cases: a fixed group simply always has its full width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ChannelGroup",
    "ChannelMember",
    "ChannelSegment",
    "HeadAttribute",
    "HeadCost",
    "LayerInfo",
    "NormInfo",
    "ScaleInfo",
    "SplitAttribute",
]


@dataclass(frozen=True)
class ChannelMember:
    """One channel dimension of one module that belongs to a group.

    Attributes:
        module: the module's qualified name in the model (``layer1.0.conv1``).
        role: ``"out"`` for a conv/linear output dimension (weight dim 0), ``"in"`` for an input
            dimension (weight dim 1, or the slice of it a concat or flatten gives this group),
            ``"norm"`` for a norm layer's channels.
        offset: where this group's channels start along that dimension (non-zero after a concat).
        multiplier: features per channel along that dimension (a linear layer after flattening an
            HxW map sees H*W features per channel); 1 otherwise.
    """

    module: str
    role: Literal["out", "in", "norm"]
    offset: int = 0
    multiplier: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channel dimensions that must be pruned together, sharing one width and one kept index set.

    Attributes:
        name: stable, deterministic name (the first producing module's qualified name).
        size: channels in the dense model.
        members: every (module, role) whose channels are these.
        prunable: False when the group must be kept whole; ``reason`` says why.
        reason: why the group is fixed, ``None`` when prunable.
        step: kept widths must be multiples of this (a grouped conv keeps the same count in each of
            its conv groups); 1 for ordinary groups.
        min_width: the smallest allowed width (``step`` for prunable groups, ``size`` otherwise).
        unit: what one channel of the group is: ``"channels"``, or ``"heads"`` for attention
            heads (each one spans ``head_dim`` features of its members: their multiplier).
    """

    name: str
    size: int
    members: tuple[ChannelMember, ...]
    prunable: bool = True
    reason: str | None = None
    step: int = 1
    unit: Literal["channels", "heads"] = "channels"

    @property
    def min_width(self) -> int:
        """The smallest width this group may be given."""
        return self.step if self.prunable else self.size


@dataclass(frozen=True)
class ChannelSegment:
    """A run of a layer's input features that come from one group (several after a concat)."""

    group: str
    multiplier: int = 1


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer, with everything FLOPs, params and latency estimates need.

    MACs of the dense layer: ``out_channels * positions * prod(kernel_size) * in_features /
    groups`` where ``in_features = sum(size(seg.group) * seg.multiplier)`` and ``positions`` the
    output positions of every call together. A pruned layer replaces each size by the group's
    width; a depthwise conv (``depthwise=True``) has its input and output in one group and scales
    with that width once. ``input_hw`` and ``output_hw`` are those of the first call.

    Attributes:
        positions: output positions (``prod(output_hw)`` of a conv, 1 for a linear on
            ``[batch, features]``, the token positions of a linear over the last dim, the
            *input* positions of a transposed conv) summed over every call, per example; 0
            means ``calls * prod(output_hw)``.
        transposed: a transposed conv, whose weight is ``[in, out / groups, *kernel]``.
        weight: for a layer written as a function of parameters (``F.conv2d(x, self.weight,
            self.bias)``, ``F.linear``) in module ``name``, the weight's qualified name; empty
            for a layer module. ``bias_parameter`` names its bias (empty if none).
        out_segments: the groups along the layer's output channels, in order, when its output
            is cut into pieces (a ``chunk`` or ``split`` of its output along the channels, each
            piece pruned on its own), or a depthwise conv reads several groups (its outputs
            follow them, each segment's multiplier counting the outputs per input channel);
            empty when the output is one group, ``out_group``.
        per_output: parameters per output channel besides the bias, held by a layer subclass
            (the gain of a scaled weight-standardised conv); pruned with the outputs.
    """

    name: str
    kind: Literal["conv", "linear"]
    in_segments: tuple[ChannelSegment, ...]
    out_group: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    depthwise: bool = False
    input_hw: tuple[int, ...] = ()
    output_hw: tuple[int, ...] = ()
    bias: bool = False
    calls: int = 1
    positions: int = 0
    transposed: bool = False
    out_segments: tuple[ChannelSegment, ...] = ()
    weight: str = ""
    bias_parameter: str = ""
    per_output: int = 0

    @property
    def outputs(self) -> tuple[ChannelSegment, ...]:
        """The groups along the output channels in order: ``out_segments``, or ``out_group``."""
        return self.out_segments or (ChannelSegment(self.out_group),)

    @property
    def total_positions(self) -> int:
        """Output positions of every call together, per example."""
        if self.positions:
            return self.positions
        count = 1
        for size in self.output_hw:
            count *= size
        return count * self.calls


@dataclass(frozen=True)
class NormInfo:
    """A norm layer (BatchNorm and kin) whose channels belong to ``group``.

    A norm after a concat sees several groups: ``segments`` lists them in channel order (its
    parameters then number ``2 * sum(width(seg.group) * seg.multiplier)``), and ``group`` is the
    first of them. ``segments`` is filled for every norm, one entry in the ordinary case.
    ``group_size`` is the channels per group of a ``GroupNorm`` (it prunes whole groups), 0 for
    a BatchNorm.
    """

    name: str
    group: str
    affine: bool
    input_hw: tuple[int, ...] = ()
    calls: int = 1
    segments: tuple[ChannelSegment, ...] = ()
    group_size: int = 0


@dataclass(frozen=True)
class ScaleInfo:
    """A per-channel parameter (or buffer) applied elementwise to a group's activations: a
    layer scale ``x * gamma``, the slopes of a ``PReLU(C)``, a bias added to a map, a bias per
    attention head added to the scores (one head per channel).

    Attributes:
        name: the tensor's qualified name in the model (``blocks.0.gamma``, ``act.weight``).
        segments: the groups along its channel dim, in order (several after a concat).
        dim: the tensor's dim with one entry per channel; every other dim has size 1.
        parameter: a parameter (counted in the model's parameters), not a buffer.
        rescale_segments: the channels a statistic across channels counts, when this tensor
            multiplies channels rescaled by it (the ``gamma`` of a global response norm); empty
            otherwise.
        rescale_power: with ``C`` channels of ``rescale_segments`` in the dense model and
            ``C'`` kept, surgery multiplies the kept entries by ``(C / C') ** rescale_power``
            so the pruned model computes what the zeroed one does.
        entries: elements per channel (the product of its other dims): 1 for a layer scale,
            ``(2 * window - 1) ** 2`` for Swin's relative position bias table ``[entries,
            heads]``, whose heads are the channels.
    """

    name: str
    segments: tuple[ChannelSegment, ...]
    dim: int
    parameter: bool = True
    rescale_segments: tuple[ChannelSegment, ...] = ()
    rescale_power: float = 0.0
    entries: int = 1


@dataclass(frozen=True)
class HeadAttribute:
    """An attribute of an attention module that the forward reads to reshape its heads (timm's
    ``num_heads``, or ``attn_dim`` = heads * head dim): a pruned model sets it to ``per_head``
    times the heads kept in ``segments`` (one head per channel).

    Attributes:
        module: the module's qualified name (``blocks.0.attn``).
        attribute: the attribute's name (``num_heads``).
        segments: the head groups that it counts, in order.
        per_head: what one head adds to it: 1 for a head count, the head dim for a width.
    """

    module: str
    attribute: str
    segments: tuple[ChannelSegment, ...]
    per_head: int


@dataclass(frozen=True)
class SplitAttribute:
    """A list attribute that the forward splits channels at (MixConv's ``torch.split(x,
    self.splits, 1)`` in timm's ``MixedConv2d``, after Tan & Le, BMVC 2019): a pruned model sets
    entry i to the features it keeps of piece i.

    Attributes:
        module: the module's qualified name (``blocks.1.0.conv_dw``).
        attribute: the attribute's name (``splits``).
        pieces: per piece, the groups it is made of, in order (with their multipliers).
    """

    module: str
    attribute: str
    pieces: tuple[tuple[ChannelSegment, ...], ...]


@dataclass(frozen=True)
class HeadCost:
    """An op between attention heads (``q @ k^T``, ``attention @ v``, a fused scaled dot-product
    attention): ``macs`` multiply-accumulates per head kept in ``segments`` and per example, as
    ``FlopCounterMode`` counts them on the example input (its total / 2).

    Attributes:
        name: the fx node of the op.
        segments: its head groups (one head per channel).
        macs: MACs per head and example.
    """

    name: str
    segments: tuple[ChannelSegment, ...]
    macs: int
