"""``ChannelGraph``: a traced model's layer DAG, coupled channel groups and layer records."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import networkx as nx
import torch
from torch import Tensor, fx, nn

from prunetune.backend.graph._analysis import ChannelAnalysis
from prunetune.backend.graph._groups import Channels
from prunetune.backend.graph._head_probe import check_head_sites
from prunetune.backend.graph._probe import owner_retracer
from prunetune.backend.graph._records import (
    ChannelGroup,
    ChannelSegment,
    HeadAttribute,
    HeadCost,
    LayerInfo,
    NormInfo,
    ScaleInfo,
    SplitAttribute,
)
from prunetune.backend.graph._rules import per_output_parameters
from prunetune.backend.graph._split_probe import SplitSizesProbe
from prunetune.backend.graph._state import Last, LayerRecord
from prunetune.backend.graph._trace import (
    LeafModule,
    build_dag,
    check_leaf_modules,
    example_inputs,
    propagate_shapes,
    trace_module,
)

__all__ = ["ChannelGraph", "MaskPoint"]


class MaskPoint(NamedTuple):
    """Where a group's channels are produced: the fx node whose output dim 1 they make up.

    Attributes:
        node: name of the fx node (a conv/linear call, or the norm right after it).
        segments: the groups along dim 1 of that output, in order, with their multipliers.
        last: the channels are the output's last dim instead (channels-last maps, tokens).
    """

    node: str
    segments: tuple[ChannelSegment, ...]
    last: bool = False


class ChannelGraph:
    """A model traced with torch.fx on an example input, seen as channels to prune.

    Build one with :meth:`trace`. Every conv, linear and norm channel dimension belongs to exactly
    one :class:`ChannelGroup`; groups that must be kept whole are listed with the reason in
    :attr:`unprunable`.

    Example:
        >>> import torch
        >>> from prunetune.backend.graph import ChannelGraph
        >>> from prunetune.backend.models import create_model
        >>> graph = ChannelGraph.trace(create_model("resnet20"), torch.randn(1, 3, 32, 32))
        >>> [g.name for g in graph.prunable_groups][:2]
        ['conv1', 'layer1.0.conv1']
    """

    def __init__(
        self,
        *,
        dag: nx.DiGraph,
        groups: tuple[ChannelGroup, ...],
        layers: tuple[LayerInfo, ...],
        norms: tuple[NormInfo, ...],
        unprunable: dict[str, str],
        input_shape: tuple[int, ...],
        other_params: int,
        leaf_modules: tuple[LeafModule, ...],
        mask_points: tuple[MaskPoint, ...],
        constant_flops: dict[str, int] | None = None,
        scales: tuple[ScaleInfo, ...] = (),
        extra_input_shapes: tuple[tuple[int, ...], ...] = (),
        head_attributes: tuple[HeadAttribute, ...] = (),
        head_costs: tuple[HeadCost, ...] = (),
        split_attributes: tuple[SplitAttribute, ...] = (),
    ) -> None:
        """Store the parts; use :meth:`trace` to build a graph from a model."""
        self._dag = dag
        self._groups = groups
        self._by_name = {group.name: group for group in groups}
        self._layers = layers
        self._norms = norms
        self._unprunable = dict(unprunable)
        self._input_shape = input_shape
        self._other_params = other_params
        self._leaf_modules = leaf_modules
        self._mask_points = mask_points
        self._constant_flops = dict(constant_flops or {})
        self._scales = scales
        self._extra_input_shapes = tuple(extra_input_shapes)
        self._head_attributes = tuple(head_attributes)
        self._head_costs = tuple(head_costs)
        self._split_attributes = tuple(split_attributes)

    @classmethod
    def trace(
        cls,
        model: nn.Module,
        example_input: Tensor | tuple[Tensor, ...],
        *,
        leaf_modules: Sequence[LeafModule] = (),
    ) -> ChannelGraph:
        """Trace ``model`` on ``example_input`` and derive its channel groups.

        The model is traced, run and costed in eval mode, the mode that is exported (branches
        that run only in training are left out); it is run once without gradients, and its
        training flags and BN statistics are left as they were. ``FlopCounterMode`` counts every
        node on the way: what no conv or linear layer record models is kept in
        :attr:`constant_flops`.

        Args:
            model: the dense model.
            example_input: one input batch, e.g. ``torch.randn(1, 3, 32, 32)``; for a model
                whose ``forward`` takes several tensors, a tuple of them (one per positional
                argument, each ``[N, ...]`` with the same ``N``). Channels of the second and
                later inputs are kept whole.
            leaf_modules: extra module types, or qualified names of submodules (``"blocks.3"``),
                to keep as single calls instead of tracing through them (their channels are
                kept whole).

        Returns:
            The channel graph.

        Raises:
            TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
            ValueError: ``example_input`` has fewer than 2 dims or the model fails on it.
            UnsupportedModelError: the model cannot be traced with torch.fx (data-dependent
                control flow); the message names the offending source line.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inputs = example_inputs(example_input)
        leaf_modules = check_leaf_modules(model, leaf_modules)
        module = trace_module(model, leaf_modules, inputs)
        propagate_shapes(module, model, inputs)
        retrace = owner_retracer(model, leaf_modules)
        analysis = _analyse(module, SplitSizesProbe(model, module.graph, retrace))
        attributes = check_head_sites(model, analysis, retrace)
        groups, slot_names = analysis.slots.build()
        head_groups = {slot_names[slot] for slot in analysis.head_slots if slot in slot_names}
        groups = tuple(
            dataclasses.replace(group, unit="heads") if group.name in head_groups else group
            for group in groups
        )

        def segments(channels: Channels) -> tuple[ChannelSegment, ...]:
            return tuple(ChannelSegment(slot_names[s.slot], s.mult) for s in channels)

        layers = tuple(
            _layer_info(record, segments(record.inputs), segments(record.outputs))
            for record in analysis.layers.values()
        )
        norms = tuple(
            NormInfo(
                name=record.name,
                group=slot_names[record.channels[0].slot],
                affine=bool(getattr(record.module, "affine", False)),
                input_hw=record.input_hw,
                calls=record.calls,
                segments=segments(record.channels),
                group_size=_group_size(record.module),
            )
            for record in analysis.norms.values()
        )

        def rescaled(name: str) -> tuple[tuple[ChannelSegment, ...], float]:
            """What a scale absorbs of a statistic across channels (none: factor 1)."""
            counted, power = analysis.rescales.get(name, ((), 0.0))
            if not power or not all(s.slot in slot_names for s in counted):
                return (), 0.0  # channels no layer makes are never pruned
            return segments(counted), power

        scales = tuple(
            ScaleInfo(
                name,
                segments(channels),
                dim,
                _is_param(model, name),
                *rescaled(name),
                entries=_entries(model, name, dim),
            )
            for name, (channels, dim) in analysis.scales.items()
            # channels no layer or norm makes (attention outputs, say) form no group: such a
            # scale is never pruned, and its parameters count as the model's other parameters
            if all(s.slot in slot_names for s in channels)
        )
        unprunable = {group.name: group.reason or "" for group in groups if not group.prunable}
        for name, reason in analysis.unknown_modules.items():
            unprunable.setdefault(name, f"module kept whole: {reason}")
        by_name = {group.name: group for group in groups}
        mask_points = []
        for node, channels in analysis.mask_points:
            users = list(node.users)
            if (
                node.op == "call_module"
                and str(node.target) in analysis.layers
                and len(users) == 1
                and users[0].op == "call_module"
                and str(users[0].target) in analysis.norms
            ):
                continue  # the norm right after it is the mask point, so BN's shift is masked too
            if not all(s.slot in slot_names for s in channels):
                continue  # a scale on channels that form no group (attention heads' logits)
            last = isinstance(analysis.values.get(node), Last)
            point = MaskPoint(node.name, segments(channels), last)
            if any(by_name[seg.group].prunable for seg in point.segments):
                mask_points.append(point)
        modules = [r.module for r in analysis.layers.values()]
        modules += [r.module for r in analysis.norms.values()]
        counted = {id(p) for module in modules for p in module.parameters()}
        counted |= {id(model.get_parameter(scale.name)) for scale in scales if scale.parameter}
        for record in analysis.layers.values():  # functional layers: their real parameters
            counted |= {id(model.get_parameter(n)) for n in (record.weight, record.bias) if n}
        other_params = sum(p.numel() for p in model.parameters() if id(p) not in counted)
        channel_names = {
            node.name: tuple(slot_names.get(s.slot, "?") for s in value)
            for node, value in analysis.values.items()
            if isinstance(value, tuple)
        }
        head_nodes = {node for node, _, _ in analysis.head_costs}
        return cls(
            dag=build_dag(module, channel_names),
            constant_flops=_constant_flops(
                module, analysis.layers, inputs[0].shape[0], set(analysis.functional) | head_nodes
            ),
            head_attributes=tuple(
                HeadAttribute(owner, attribute, segments(channels), per_head)
                for owner, attribute, channels, per_head in attributes
            ),
            head_costs=tuple(
                HeadCost(node.name, segments(channels), macs)
                for node, channels, macs in analysis.head_costs
            ),
            split_attributes=tuple(
                SplitAttribute(owner, attribute, tuple(segments(piece) for piece in pieces))
                for (owner, attribute), pieces in analysis.split_attributes.items()
            ),
            groups=groups,
            layers=layers,
            norms=norms,
            unprunable=unprunable,
            input_shape=tuple(int(d) for d in inputs[0].shape),
            extra_input_shapes=tuple(tuple(int(d) for d in x.shape) for x in inputs[1:]),
            other_params=other_params,
            leaf_modules=tuple(leaf_modules),
            mask_points=tuple(mask_points),
            scales=scales,
        )

    @property
    def dag(self) -> nx.DiGraph:
        """The fx graph as a networkx DiGraph; every edge has the tensor ``shape`` on it."""
        return self._dag

    @property
    def groups(self) -> tuple[ChannelGroup, ...]:
        """Every channel group, fixed ones included, ordered by first producer."""
        return self._groups

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        """The groups that may be given a smaller width, in :attr:`groups` order."""
        return tuple(group for group in self._groups if group.prunable)

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """Every conv and linear layer, in order of first call."""
        return self._layers

    @property
    def norms(self) -> tuple[NormInfo, ...]:
        """Every BatchNorm layer, in order of first call."""
        return self._norms

    @property
    def scales(self) -> tuple[ScaleInfo, ...]:
        """Per-channel parameters and buffers applied to activations (layer scale, PReLU
        slopes): pruned with the channels they meet."""
        return self._scales

    @property
    def head_attributes(self) -> tuple[HeadAttribute, ...]:
        """Attributes of attention modules that count their heads (``num_heads``): a pruned
        model sets them to the heads it keeps."""
        return self._head_attributes

    @property
    def split_attributes(self) -> tuple[SplitAttribute, ...]:
        """List attributes that the forward splits channels at (MixConv's ``splits``): a
        pruned model sets them to the channels it keeps of each piece."""
        return self._split_attributes

    @property
    def head_costs(self) -> tuple[HeadCost, ...]:
        """MACs of the ops between attention heads (``q @ k^T``, ``attention @ v``), per head."""
        return self._head_costs

    @property
    def unprunable(self) -> dict[str, str]:
        """Fixed groups and modules kept whole, each with the reason."""
        return dict(self._unprunable)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of the example input the graph was traced with (the first, for several)."""
        return self._input_shape

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of every example input, one per positional argument of ``forward``."""
        return (self._input_shape, *self._extra_input_shapes)

    @property
    def other_params(self) -> int:
        """Parameters outside every conv, linear and norm layer (constant in the widths)."""
        return self._other_params

    @property
    def constant_flops(self) -> dict[str, int]:
        """MACs per example that no layer record models, by where they are computed.

        Keys are the innermost module around the op (its qualified name, or the fx node's name
        at the top level); values are ``FlopCounterMode`` counts / 2 on the example input. Every
        such op reads only channels that are kept whole, so its cost is the same in every
        subnet: cost models add :attr:`other_flops` as a constant.
        """
        return dict(self._constant_flops)

    @property
    def other_flops(self) -> int:
        """MACs per example outside the conv and linear layer records (constant in the widths)."""
        return sum(self._constant_flops.values())

    @property
    def leaf_modules(self) -> tuple[LeafModule, ...]:
        """The extra leaf module types and submodule names the graph was traced with."""
        return self._leaf_modules

    def trace_module(self, model: nn.Module) -> fx.GraphModule:
        """Trace ``model`` again the way this graph was traced (same node names).

        The result shares its modules with ``model``; :attr:`mask_points` name its nodes.

        Raises:
            UnsupportedModelError: the model cannot be traced.
        """
        examples = tuple(torch.zeros(shape) for shape in self.input_shapes)
        return trace_module(model, self._leaf_modules, examples)

    @property
    def mask_points(self) -> tuple[MaskPoint, ...]:
        """Where channel masks go: after each producer of prunable channels (after its BN)."""
        return self._mask_points

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``.

        Raises:
            KeyError: no such group; the message lists the valid names.
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"no channel group {name!r}; groups: {', '.join(self._by_name)}"
            ) from None

    def layer(self, name: str) -> LayerInfo:
        """The conv or linear layer called ``name``.

        Raises:
            KeyError: no such layer.
        """
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no conv or linear layer {name!r}")

    def dense_widths(self) -> dict[str, int]:
        """Every group's width in the dense model (fixed groups included), in group order."""
        return {group.name: group.size for group in self._groups}

    def __repr__(self) -> str:
        return (
            f"ChannelGraph({len(self._groups)} groups, {len(self.prunable_groups)} prunable, "
            f"{len(self._layers)} layers, {len(self._norms)} norms, input {self._input_shape})"
        )


def _constant_flops(
    module: fx.GraphModule, layers: Mapping[str, LayerRecord], batch: int, functional: set[fx.Node]
) -> dict[str, int]:
    """The MACs per example of every node that is not a call of a recorded layer (a layer
    module, or a functional layer call in ``functional``), by place."""
    totals: dict[str, int] = {}
    for node in module.graph.nodes:
        flops = int(node.meta.get("flops", 0))
        if not flops or (node.op == "call_module" and str(node.target) in layers):
            continue
        if node in functional:
            continue
        if node.op == "call_module":
            place = str(node.target)
        else:
            stack = node.meta.get("nn_module_stack") or {}
            place = next(reversed(stack.values()))[0] if stack else node.name
        totals[place] = totals.get(place, 0) + flops
    return {place: flops // (2 * batch) for place, flops in totals.items()}


def _group_size(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels // module.num_groups
    return 0


def _entries(model: nn.Module, name: str, dim: int) -> int:
    """Elements of tensor ``name`` per index along its ``dim``."""
    owner_name, _, attribute = name.rpartition(".")
    tensor = getattr(model.get_submodule(owner_name) if owner_name else model, attribute)
    return int(tensor.numel() // tensor.shape[dim])


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


_MAX_PASSES = 64


def _analyse(module: fx.GraphModule, split_probe: SplitSizesProbe) -> ChannelAnalysis:
    """The channel analysis of ``module``, run again with the output cuts each pass asks for
    (a split of a layer's channels cuts its output into pieces, and that can ask for cuts of
    the layers coupled to it) until none asks for more, or ``_MAX_PASSES`` passes (the last
    one then keeps whole what it could not split)."""
    cuts: dict[str, frozenset[int]] = {}
    blocks: dict[str, frozenset[tuple[int, int, int]]] = {}
    for _ in range(_MAX_PASSES):
        analysis = ChannelAnalysis(module, cuts, blocks, split_probe)
        analysis.run()
        grown = _grow(cuts, analysis.requests) | _grow(blocks, analysis.block_requests)
        if not grown:
            break
    return analysis


def _grow(plan: dict[str, frozenset[Any]], requests: dict[str, set[Any]]) -> bool:
    """Add ``requests`` to ``plan``; whether anything was new."""
    grown = False
    for name, wanted in requests.items():
        if not wanted <= plan.get(name, frozenset()):
            plan[name] = frozenset(wanted) | plan.get(name, frozenset())
            grown = True
    return grown


def _layer_info(
    record: LayerRecord,
    in_segments: tuple[ChannelSegment, ...],
    out_segments: tuple[ChannelSegment, ...],
) -> LayerInfo:
    module = record.module
    out_group = out_segments[0].group
    # a depthwise conv's outputs follow its input: several groups when it reads several
    whole = len(out_segments) == 1 and (record.depthwise or out_segments[0].multiplier == 1)
    pieces = () if whole else out_segments
    if isinstance(module, nn.Linear):
        return LayerInfo(
            name=record.name,
            kind="linear",
            in_segments=in_segments,
            out_group=out_group,
            in_channels=module.in_features,
            out_channels=module.out_features,
            input_hw=record.input_hw,
            output_hw=record.output_hw,
            bias=module.bias is not None,
            calls=record.calls,
            positions=record.positions,
            out_segments=pieces,
            weight=record.weight,
            bias_parameter=record.bias,
            per_output=_per_output_params(module),
        )
    conv = cast(nn.Conv1d | nn.Conv2d | nn.Conv3d, module)
    padding = conv.padding
    if isinstance(padding, str):
        padding = tuple(
            d * (k - 1) // 2 if padding == "same" else 0
            for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
        )
    return LayerInfo(
        name=record.name,
        kind="conv",
        in_segments=in_segments,
        out_group=out_group,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=tuple(int(p) for p in padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        depthwise=record.depthwise,
        input_hw=record.input_hw,
        output_hw=record.output_hw,
        bias=conv.bias is not None,
        calls=record.calls,
        positions=record.positions,
        transposed=isinstance(module, nn.modules.conv._ConvTransposeNd),
        out_segments=pieces,
        weight=record.weight,
        bias_parameter=record.bias,
        per_output=_per_output_params(module),
    )


def _per_output_params(module: nn.Module) -> int:
    """Parameters per output channel besides the bias: a subclass's gain."""
    return len(per_output_parameters(module))
