"""Channel analysis of a shape-propagated fx graph: which channel dims are coupled, which fixed.

Every tensor value gets :data:`Channels`: what its dim 1 is made of, as segments of slots.
Ordinary convs and linears cut the graph (they create a new slot for their output); everything
else either passes channels through, joins them (residual partners, concat), or is not
understood, in which case its inputs are fixed and its output is a new fixed slot.
"""

from __future__ import annotations

import math
import operator
from typing import Any, cast

from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._channel_stats import ChannelStatisticRules
from prunetune.backend.graph._functional import FUNCTIONAL_LAYERS, FunctionalRules
from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._mha import MultiheadAttentionRules
from prunetune.backend.graph._records import ChannelMember
from prunetune.backend.graph._rules import reshape_sizes
from prunetune.backend.graph._shuffle import ShuffleRules
from prunetune.backend.graph._splits import SplitRules
from prunetune.backend.graph._state import (
    Heads,
    Last,
    LayerRecord,
    Many,
    NormRecord,
    Shuffled,
    is_multi,
)
from prunetune.backend.graph._trace import KEPT_CALL_REASON, node_shape
from prunetune.backend.graph._transposed import TransposedConvRules
from prunetune.backend.graph._window_rules import WindowAttentionRules

__all__ = ["ChannelAnalysis"]


_SPECIAL_MODULE_REASONS: dict[type[nn.Module], str] = {
    nn.LayerNorm: "LayerNorm normalises across channels",
}


class ChannelAnalysis(
    WindowAttentionRules,
    MultiheadAttentionRules,
    ChannelStatisticRules,
    TransposedConvRules,
    ShuffleRules,
    SplitRules,
    FunctionalRules,
):
    """Walks the fx graph once, in topological order, assigning channels to every value."""

    def run(self) -> None:
        """Analyse every node."""
        for node in self.module.graph.nodes:
            value = self._visit(node)
            if isinstance(value, Last) and len(node_shape(node) or ()) == 2:
                value = value.channels  # [N, C]: the last dim is dim 1
            self.values[node] = value

    # --- dispatch --------------------------------------------------------------------------

    def _visit_ordinary(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.op == "get_attr":
            return self._fresh(
                node, f"parameter or buffer '{node.target}' is used directly (node '{node.name}')"
            )
        if node.op == "output":
            for source in node.all_input_nodes:
                self._fix_value(self.values.get(source), "model output")
            return None
        if "tensor_meta" not in node.meta:
            return None  # sizes, dtypes and other non-tensor values couple nothing
        if node.op == "call_module":
            return self._call_module(node)
        return self._call_function(node)

    def _placeholder(self, node: fx.Node) -> Any:
        shape = node_shape(node)
        if shape is None or len(shape) < 2:
            return None
        if self._input_seen:
            return self._fresh(node, f"model input '{node.target}'")
        self._input_seen = True
        self.batch = max(1, shape[0])
        return (Segment(self.slots.new(shape[1], "input", "model input"), shape[1]),)

    def _call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        module = self.submodules[name]
        kind = type(module)
        heads = self._heads_module(node, module)
        if heads is not None:
            return heads
        if isinstance(module, rules.LAYER_TYPES) and (
            kind in rules.LAYER_TYPES or rules.is_layer_subclass(module)
        ):
            unlike = self._unlike_its_layer(node, module)
            if unlike is not None:
                self.unknown_modules[name] = unlike
                return self._unknown(node, f"module '{name}' ({kind.__name__}: {unlike})")
            if isinstance(module, rules.NORM_TYPES):
                return self._norm(node, module)
            return self._layer_call(node, module)
        if isinstance(module, nn.LayerNorm):
            normed = self._last_norm(node, module)
            if normed is not None:
                return normed
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            channels = self._same(node, f"module '{name}' (PReLU)")
            if isinstance(channels, tuple) and self.channels(node.args[0]) is not None:
                self._add_scale(f"{name}.weight", channels, 0, node, f"module '{name}'")
            return channels
        passthrough = kind in rules.PASSTHROUGH_MODULE_TYPES
        passthrough |= isinstance(module, nn.PReLU) and module.num_parameters == 1
        passthrough |= isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d)) and not (
            module.affine or module.track_running_stats
        )
        if passthrough:
            return self._same(node, f"module '{name}' ({kind.__name__})")
        if kind is nn.PixelShuffle:
            return self._pixel_shuffle(node, module.upscale_factor, f"module '{name}'")
        if kind is nn.PixelUnshuffle:
            return self._pixel_unshuffle(node, module.downscale_factor, f"module '{name}'")
        if isinstance(module, nn.GroupNorm) and (
            kind is nn.GroupNorm or rules.is_layer_subclass(module)
        ):
            return self._group_norm(node, cast(nn.GroupNorm, module))
        if kind is nn.ChannelShuffle:
            return self._channel_shuffle(node, int(module.groups), f"module '{name}'")
        if isinstance(module, nn.MultiheadAttention) and KEPT_CALL_REASON not in node.meta:
            return self._multihead_attention(node, module)
        if kind is nn.Flatten:
            return self._reshape(node, f"module '{name}' (Flatten)", literal_sizes=None)
        if kind in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
            source = node.args[0]
            shape = node_shape(source) if isinstance(source, fx.Node) else None
            dims = rules.normalise_dims(getattr(module, "dim", None), len(shape or ()))
            if dims is not None and 1 not in dims:
                return self._same(node, f"module '{name}' ({kind.__name__})")
        reason = node.meta.get(KEPT_CALL_REASON) or _SPECIAL_MODULE_REASONS.get(
            kind, f"{kind.__name__} is not a layer prunetune knows"
        )
        self.unknown_modules[name] = reason
        return self._unknown(node, f"module '{name}' ({kind.__name__}: {reason})")

    def _layer_call(self, node: fx.Node, module: nn.Module) -> Any:
        """A call of a conv, transposed conv or linear layer (or a stand-in for one)."""
        if isinstance(module, rules.CONV_TYPES):
            return self._conv(node, module)
        if isinstance(module, rules.TRANSPOSED_CONV_TYPES):
            return self._transposed_conv(node, module)
        return self._linear(node, module)

    def _call_function(self, node: fx.Node) -> Any:
        name = rules.op_name(node)
        what = rules.describe(node)
        window = self._window_call(node, name, what)  # torchvision's Swin: wrapped calls
        if window is not None:
            return window
        if name is None:
            return self._unknown(node, what)
        if name in FUNCTIONAL_LAYERS:
            stand_in = self._functional_stand_in(node, name)
            if stand_in is not None:  # F.conv2d(x, self.weight, self.bias) and kin
                value = self._layer_call(node, stand_in)
                self._name_parameters(node)
                return value
            what = (
                f"{what} (a functional layer that is not ungrouped on a submodule's own "
                "`weight` and `bias` parameters)"
            )
        if name in ("view", "reshape"):
            self._fix_borrowed_widths(node, what)
        heads = self._heads_call(node, name, what)
        if heads is not None:
            return heads
        if name == "getitem":
            return self._getitem(node, what)
        shuffled = [s for s in node.all_input_nodes if isinstance(self.values.get(s), Shuffled)]
        if shuffled and name in ("contiguous", "clone", "detach"):
            return self.values[shuffled[0]]
        if shuffled and name not in rules.RESHAPE_OPS and name not in rules.PERMUTE_OPS:
            return self._unknown(node, f"{what} (acts on a channel shuffle's groups)")
        if name in ("pixel_shuffle", "pixel_unshuffle"):
            factor = rules.argument(
                node, 1, "upscale_factor", rules.argument(node, 1, "downscale_factor")
            )
            if isinstance(factor, int):
                if name == "pixel_shuffle":
                    return self._pixel_shuffle(node, factor, what)
                return self._pixel_unshuffle(node, factor, what)
        if name == "channel_shuffle" or name == "native_channel_shuffle":
            return self._channel_shuffle(node, int(rules.argument(node, 1, "groups", 1)), what)
        if name in ("max", "min") and isinstance(rules.argument(node, 1, "other"), fx.Node):
            return self._elementwise(node, what)
        if name in rules.ELEMENTWISE_OPS:
            if any(self.last(source) is not None for source in node.all_input_nodes):
                value = self._last_elementwise(node, what)
                return value if value is not None else self._unknown(node, what)
            return self._elementwise(node, what)
        if name in rules.SPATIAL_OPS:
            if name == "pad":
                pad = rules.argument(node, 1, "pad", ())
                shape = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
                if shape is None or len(pad) > 2 * (len(shape) - 2):
                    return self._unknown(node, what)
            return self._same(node, what)
        if name in rules.RESHAPE_OPS:
            split = self._split_heads(node, name, what)
            if split is not None:
                return split
            literal = reshape_sizes(node) if name in ("view", "reshape") else None
            if name == "unflatten" and rules.normalise_dims(
                rules.argument(node, 1, "dim"),
                len(node_shape(node.args[0]) or ()),  # type: ignore[arg-type]
            ) == (1,):
                return self._unknown(node, f"{what} (splits the channel dim)")
            return self._reshape(node, what, literal_sizes=literal)
        if name in rules.PERMUTE_OPS:
            return self._permute(node, name, what)
        if name in rules.EXPAND_OPS:
            return self._same(node, what)
        if name in rules.REDUCE_OPS or name in rules.NORM_OPS:
            return self._reduce(node, what)
        if name in rules.CAT_OPS:
            return self._cat(node, what)
        if name in rules.SPLIT_OPS:
            return self._split(node, name, what)
        if name in rules.SOFTMAX_OPS:
            source = node.args[0]
            shape = node_shape(source) if isinstance(source, fx.Node) else None
            dims = rules.normalise_dims(rules.argument(node, 1, "dim"), len(shape or ()))
            if dims is not None and 1 not in dims:
                return self._same(node, what)
        return self._unknown(node, what)

    # --- rules -----------------------------------------------------------------------------

    def _same(self, node: fx.Node, what: str) -> Any:
        """Ops that keep dim 1 as it is (activations, pooling, dropout, expand)."""
        source = node.args[0] if node.args else None
        if self.last(source) is not None:
            value = self._last_same(node)
            return value if value is not None else self._unknown(node, what)
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if (
            channels is not None
            and in_shape is not None
            and out_shape is not None
            and len(in_shape) == len(out_shape)
            and in_shape[1] == out_shape[1]
        ):
            return channels
        return self._unknown(node, what)

    def _elementwise(self, node: fx.Node, what: str) -> Any:
        out_shape = node_shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self._unknown(node, what)
        rank = len(out_shape)
        joined: list[Channels] = []
        conflict: str | None = None
        scales: list[tuple[str, int]] = []
        for source in node.all_input_nodes:
            shape = node_shape(source)
            if shape is None or len(shape) == 0:
                continue
            scale = self._scale_of(source, out_shape, 1)
            if scale is not None:  # a per-channel parameter: pruned with the channels
                scales.append(scale)
                continue
            channels = self.channels(source)
            if channels is not None and len(shape) == rank:
                if shape[1] == out_shape[1]:
                    joined.append(channels)
                elif shape[1] != 1:
                    conflict = f"{what} at node '{node.name}' broadcasts mismatched channels"
            elif channels is not None:
                conflict = f"{what} at node '{node.name}' broadcasts channels along another dim"
                self._fix(channels, conflict)
            else:
                position = 1 - (rank - len(shape))
                if position >= 0 and shape[position] == out_shape[1] and out_shape[1] > 1:
                    conflict = (
                        f"{what} at node '{node.name}' combines them with a constant of shape "
                        f"{tuple(shape)}"
                    )
        if not joined:
            return self._unknown(node, what)
        result = joined[0]
        for other in joined[1:]:
            result = self._join(result, other, node, what)
        if conflict is not None:
            self._fix(result, conflict)
        for name, dim in scales:
            self._add_scale(name, result, dim, node, what)
        return result

    def _fix_borrowed_widths(self, node: fx.Node, what: str) -> None:
        """A view or reshape to another tensor's channel count (``B, N, C = x.shape`` then
        ``y.reshape(B, N, C)``, as NextViT's attention merges its heads) ties ``y``'s width to
        ``x``'s, which pruning would part: the channels of both are kept whole."""
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return
        sizes = reshape_sizes(node)
        scores = self.values.get(source)
        if isinstance(scores, Heads) and scores.inner is None:
            return  # attention scores: their last dim is the keys, not a width
        source_is_last = not isinstance(scores, tuple)
        for position, size in enumerate(sizes):
            # only a size that gives the result's channel dim: the last one for tokens
            # (``[B, N, C]``), dim 1 for ``[N, C, H, W]`` maps
            if position != (len(sizes) - 1 if source_is_last else 1):
                continue
            read = _shape_read(size)
            if read is None or read[0] is source:
                continue
            tensor, dim = read
            value = self.values.get(tensor)
            rank = len(node_shape(tensor) or ())
            channel_dim = rank - 1 if isinstance(value, Last) else 1
            if not rank or dim % rank != channel_dim:
                continue
            if _slots(value) == _slots(self.values.get(source)):  # the same channels, moved
                continue
            reason = (
                f"its channel count, read at node '{size.name}', is a size of {what} of another "
                f"tensor at node '{node.name}', which would keep the dense width once pruned "
                "(reshape with -1 or that tensor's own size to let it be pruned)"
            )
            self._fix_value(value, reason)
            self._fix_value(self.values.get(source), reason)

    def _reshape(self, node: fx.Node, what: str, literal_sizes: list[Any] | None) -> Any:
        shuffle = self._shuffle_view(node, what, literal_sizes)
        if shuffle is not None:
            return shuffle
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if channels is None or in_shape is None or out_shape is None:
            return self._unknown(node, what)
        result = rules.reshape_channels(channels, in_shape, out_shape)
        if result is None:
            return self._unknown(
                node, f"{what} (shape {tuple(in_shape)} -> {tuple(out_shape)} mixes channels)"
            )
        if literal_sizes is not None and len(literal_sizes) >= 2:
            size = literal_sizes[1]
            if isinstance(size, int) and size != -1:
                self._fix(
                    result,
                    f"{what} at node '{node.name}' reshapes to a fixed size {size} along dim 1 "
                    "(compute it from the tensor, e.g. x.size(1) or -1, to let it be pruned)",
                )
        return result

    def _permute(self, node: fx.Node, name: str, what: str) -> Any:
        shape = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        rank = len(shape or ())
        order = self._permute_order(node, name, rank)
        swapped = self._shuffle_swap(node, order)
        if swapped is not None:
            return swapped
        moved = self._permute_channels(node, order) if order is not None else None
        if moved is not None:
            return moved
        if name == "permute":
            dims: Any = list(node.args[1:]) or rules.argument(node, 1, "dims")
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            order = rules.normalise_dims(tuple(dims), rank) if dims else None
            keeps = order is not None and order[:2] == (0, 1)
        else:
            pair = rules.normalise_dims(
                (rules.argument(node, 1, "dim0"), rules.argument(node, 2, "dim1")), rank
            )
            keeps = pair is not None and (pair[0] == pair[1] or min(pair) >= 2)
        if keeps:
            return self._same(node, what)
        return self._unknown(node, f"{what} (moves the channel dim)")

    def _reduce(self, node: fx.Node, what: str) -> Any:
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        shape = node_shape(source) if isinstance(source, fx.Node) else None
        position = 2 if rules.op_name(node) in rules.NORM_OPS else 1  # norm(x, p, dim)
        dims = rules.argument(node, position, "dim", rules.argument(node, position, "axis"))
        reduced = rules.normalise_dims(dims, len(shape or ()))
        if self.last(source) is not None:
            value = self._last_reduce(node, reduced)
            if value is None and reduced is not None and len(shape or ()) - 1 in reduced:
                what = (
                    f"{what} (a statistic across the channels, as a LayerNorm takes: pruning "
                    "would change it, so they are kept whole)"
                )
            return value if value is not None else self._unknown(node, what)
        if channels is not None and reduced is not None and 1 in reduced and 0 not in reduced:
            return self._unknown(
                node,
                f"{what} (a statistic across the channels, as a LayerNorm takes: pruning would "
                "change it, so they are kept whole)",
            )
        if channels is None or reduced is None or 0 in reduced or 1 in reduced:
            return self._unknown(node, f"{what} (reduces over the batch or channel dim)")
        meta = node.meta.get("tensor_meta")
        if is_multi(meta):
            return Many(tuple(channels for _ in meta))
        out_shape = node_shape(node)
        if out_shape is None or shape is None or len(out_shape) < 2 or out_shape[1] != shape[1]:
            return self._unknown(node, what)
        return channels

    def _cat(self, node: fx.Node, what: str) -> Any:
        tensors = rules.argument(node, 0, "tensors")
        out_shape = node_shape(node)
        if not isinstance(tensors, (tuple, list)) or out_shape is None or len(out_shape) < 2:
            return self._unknown(node, what)
        parts = [self.channels(t) for t in tensors]
        if any(part is None for part in parts):
            return self._unknown(node, what)
        dim = rules.argument(node, 1, "dim", rules.argument(node, 1, "axis", 0))
        axis = rules.normalise_dims(dim, len(out_shape))
        if axis == (1,):
            joined = tuple(segment for part in parts for segment in part)  # type: ignore[union-attr]
            if sum(s.size * s.mult for s in joined) != out_shape[1]:
                return self._unknown(node, what)
            return joined
        if axis is None:
            return self._unknown(node, what)
        result: Channels = parts[0]  # type: ignore[assignment]
        for part in parts[1:]:
            result = self._join(result, part, node, what)  # type: ignore[arg-type]
        return result

    def _getitem(self, node: fx.Node, what: str) -> Any:
        source, index = node.args[0], node.args[1]
        value = self.values.get(source) if isinstance(source, fx.Node) else None
        if isinstance(value, Many):
            if isinstance(index, int) and -len(value.items) <= index < len(value.items):
                return value.items[index]
            return self._unknown(node, what)
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if (
            channels is not None
            and in_shape is not None
            and out_shape is not None
            and rules.index_keeps_channels(index, len(in_shape), in_shape[1], out_shape)
        ):
            return channels
        return self._unknown(node, f"{what} (indexes the batch or channel dim)")

    # --- layers ----------------------------------------------------------------------------

    def _unlike_its_layer(self, node: fx.Node, module: nn.Module) -> str | None:
        """Why a call of a conv, linear or norm module does not compute what its weight says."""
        source = node.args[0] if node.args else None
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if in_shape is None or out_shape is None or len(node.all_input_nodes) != 1:
            return None  # the layer rules refuse it with their own reason
        return rules.unlike_its_layer(module, out_shape, int(node.meta.get("flops", 0)) // 2)

    def _conv(self, node: fx.Node, module: nn.Module) -> Any:
        name = self._layer_name(node)
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if channels is None or in_shape is None or out_shape is None:
            self.unknown_modules[name] = "its input is not a traced tensor"
            return self._unknown(node, f"module '{name}'")
        positions = self.per_example(node, math.prod(out_shape[2:]))
        shared = self._record_call(node, name, channels, f"shared module '{name}'", positions)
        if shared is not None:
            return shared
        conv = cast(nn.Conv1d | nn.Conv2d | nn.Conv3d, module)
        groups, c_in, c_out = conv.groups, conv.in_channels, conv.out_channels
        # depthwise, possibly with a channel multiplier: output j is made from input j // m
        depthwise = groups > 1 and groups == c_in and c_out % c_in == 0
        reason = None
        if groups > 1 and not depthwise and any(s.mult != 1 for s in channels):
            reason = f"conv '{name}' reads a tensor whose dim 1 does not hold whole channels"
        elif groups > 1 and not depthwise and len(channels) > 1:
            reason = f"grouped conv '{name}' reads a concat of several groups"
        if reason is not None:
            self._fix(channels, reason)
            depthwise = False
        offset = 0
        for segment in channels:
            self.slots.add_member(segment.slot, ChannelMember(name, "in", offset, segment.mult))
            offset += segment.size * segment.mult
        outputs: Channels
        if depthwise:  # each input feature makes ``multiplier`` consecutive outputs
            multiplier = c_out // c_in
            outputs = tuple(Segment(s.slot, s.size, s.mult * multiplier) for s in channels)
            offset = 0
            for segment in outputs:
                member = ChannelMember(name, "out", offset, segment.mult)
                self.slots.add_member(segment.slot, member)
                offset += segment.size * segment.mult
        elif groups == 1:
            outputs = self._output_slots(name, c_out)
        else:
            slot = self.slots.new(c_out, name)
            self.slots.add_member(slot, ChannelMember(name, "out"))
            # every conv group must keep the same number of input and output channels
            self.slots.add_step(slot, groups)
            if reason is None:
                self.slots.add_step(channels[0].slot, groups)
            outputs = (Segment(slot, c_out),)
        self.layers[name] = LayerRecord(
            name,
            "conv",
            module,
            channels,
            outputs,
            depthwise,
            in_shape[2:],
            out_shape[2:],
            positions=positions,
        )
        self.mask_points.append((node, outputs))
        return outputs

    def _linear(self, node: fx.Node, module: nn.Module) -> Any:
        name = self._layer_name(node)
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        if in_shape is not None and len(in_shape) >= 3:
            tokens = self._token_linear(node, module)
            if tokens is not None:
                return tokens
        if channels is None or in_shape is None or len(in_shape) != 2:
            reason = "Linear applied to a tensor that is not [batch, features]"
            self.unknown_modules[name] = reason
            return self._unknown(node, f"module '{name}' ({reason})")
        rows = self.per_example(node, 1)
        shared = self._record_call(node, name, channels, f"shared module '{name}'", rows)
        if shared is not None:
            return shared
        out_features = cast(nn.Linear, module).out_features
        return self._add_layer(node, module, channels, out_features, ((), (), rows))

    def _group_norm(self, node: fx.Node, module: nn.GroupNorm) -> Any:
        """``GroupNorm``: statistics within each group of ``C / G`` channels, so its input is
        pruned in whole groups (channels per group kept; surgery lowers ``num_groups``)."""
        name = str(node.target)
        per_group = module.num_channels // module.num_groups
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        if in_shape != node_shape(node) or int(node.meta.get("flops", 0)) != 0:
            reason = f"{type(module).__name__} computes more than a GroupNorm"  # a subclass
        elif module.num_groups == 1:
            reason = "GroupNorm with one group normalises across all its channels"
        elif channels is not None and self._in_blocks(channels, per_group):
            return self._norm(node, module)
        else:
            reason = (
                f"GroupNorm normalises in groups of {per_group} channels that are not made by "
                "layers that can prune in whole groups"
            )
        self.unknown_modules[name] = reason
        return self._unknown(node, f"module '{name}' ({reason})")

    def _norm(self, node: fx.Node, module: nn.Module) -> Any:
        name = str(node.target)
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        if channels is None or in_shape is None:
            self.unknown_modules[name] = "its input is not a traced tensor"
            return self._unknown(node, f"module '{name}'")
        shared = self._record_call(node, name, channels, f"shared module '{name}'")
        if shared is not None:
            return shared
        offset = 0
        for segment in channels:
            self.slots.add_member(segment.slot, ChannelMember(name, "norm", offset, segment.mult))
            offset += segment.size * segment.mult
        self.norms[name] = NormRecord(name, module, channels, in_shape[2:])
        self.mask_points.append((node, channels))
        return channels


def _shape_read(size: Any) -> tuple[fx.Node, int] | None:
    """``(tensor, dim)`` when ``size`` is the node of ``tensor.shape[dim]`` or
    ``tensor.size(dim)``, else ``None``."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        tensor, dim = size.args
        return (tensor, dim) if isinstance(tensor, fx.Node) and isinstance(dim, int) else None
    if size.op != "call_function" or size.target is not operator.getitem:
        return None
    shape, dim = size.args[0], size.args[1]
    if not isinstance(shape, fx.Node) or not isinstance(dim, int):
        return None
    whole = (
        shape.op == "call_function" and shape.target is getattr and shape.args[1:] == ("shape",)
    ) or (shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1)
    tensor = shape.args[0]
    return (tensor, dim) if whole and isinstance(tensor, fx.Node) else None


def _slots(value: Any) -> tuple[Any, ...] | None:
    """The channel slots of a plain or channels-last value, ``None`` for anything else."""
    channels = value.channels if isinstance(value, Last) else value
    if not isinstance(channels, tuple) or not channels:
        return None
    return tuple((segment.slot, segment.size) for segment in channels)
