"""Physical channel pruning: build the smaller model a :class:`SubnetSpec` describes.

:func:`prune_model` returns a deep copy of the dense model in which every conv, linear and
BatchNorm layer is replaced (by qualified name) with a smaller one carrying the kept weights, so
the user's own ``forward`` still runs. :func:`zero_pruned_channels` keeps the dense shapes and
zeroes the removed channels at their producers: both compute the same function, which is what
the equivalence tests check.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from prunetune.backend.attention import (
    projection_rows,
    prune_attention_heads,
    zero_attention_heads,
)
from prunetune.backend.graph import (
    PROJECTIONS,
    ChannelGraph,
    ChannelSegment,
    LayerInfo,
    NormInfo,
    ScaleInfo,
    per_output_parameters,
)
from prunetune.backend.spec import SubnetSpec

__all__ = ["feature_indices", "output_major", "prune_model", "zero_pruned_channels"]


def feature_indices(
    segments: Sequence[ChannelSegment],
    kept: dict[str, tuple[int, ...]],
    sizes: dict[str, int],
) -> Tensor:
    """Indices of the kept features along a layer's input (or a norm's) channel dimension.

    Segments lie one after the other in the dense layout; each channel spans ``multiplier``
    consecutive features (a linear after flattening an ``H x W`` map).
    """
    parts: list[Tensor] = []
    offset = 0
    for segment in segments:
        channels = torch.tensor(kept[segment.group], dtype=torch.long)
        span = torch.arange(segment.multiplier, dtype=torch.long)
        parts.append((offset + channels[:, None] * segment.multiplier + span).flatten())
        offset += sizes[segment.group] * segment.multiplier
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _parameter(value: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def output_major(module: nn.Module) -> Tensor:
    """``module.weight`` with the output channels along dim 0 (a view: transposed convs keep
    theirs along dim 1)."""
    if isinstance(module, nn.MultiheadAttention):  # its stacked q, k and v projections
        return projection_rows(module)
    weight: Tensor = module.weight  # type: ignore[assignment]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return weight.transpose(0, 1)
    return weight


def _prune_conv(conv: nn.Module, layer: LayerInfo, kept_out: Tensor, kept_in: Tensor) -> None:
    """Shrink ``conv`` (a built-in conv or a subclass of one) in place to the kept channels."""
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise TypeError(f"layer {layer.name!r} is a {type(conv).__name__}, expected a conv")
    weight = conv.weight.detach()
    if layer.transposed:
        groups = 1
        new_weight = weight[kept_in][:, kept_out]
        in_channels = len(kept_in)
    elif layer.depthwise:  # kept_out: the kept input features; each has a block of outputs
        groups = len(kept_out)
        multiplier = conv.out_channels // conv.groups
        kept_out = (kept_out[:, None] * multiplier + torch.arange(multiplier)).flatten()
        new_weight = weight[kept_out]
        in_channels = groups
    elif conv.groups == 1:
        groups = 1
        new_weight = weight[kept_out][:, kept_in]
        in_channels = len(kept_in)
    else:
        groups = conv.groups
        in_per_group = conv.in_channels // groups
        out_per_group = conv.out_channels // groups
        blocks = []
        for index in range(groups):
            rows = kept_out[(kept_out // out_per_group) == index]
            columns = kept_in[(kept_in // in_per_group) == index] - index * in_per_group
            blocks.append(weight[rows][:, columns])
        new_weight = torch.cat(blocks)
        in_channels = len(kept_in)
    conv.weight = _parameter(new_weight, conv.weight)
    if conv.bias is not None:
        conv.bias = _parameter(conv.bias.detach()[kept_out], conv.bias)
    _prune_per_output(conv, kept_out)
    conv.in_channels, conv.out_channels, conv.groups = in_channels, len(kept_out), groups


def _prune_per_output(layer: nn.Module, kept_out: Tensor) -> None:
    """Keep the kept outputs' entries of a subclass's own per-output-channel parameters (the
    gain of a scaled weight-standardised conv); called before the layer's sizes change."""
    for name in per_output_parameters(layer):
        parameter = getattr(layer, name)
        setattr(layer, name, _parameter(parameter.detach()[kept_out], parameter))


def _prune_linear(linear: nn.Module, kept_out: Tensor, kept_in: Tensor) -> None:
    """Shrink ``linear`` (an ``nn.Linear`` or a subclass) in place to the kept features."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    linear.weight = _parameter(linear.weight.detach()[kept_out][:, kept_in], linear.weight)
    if linear.bias is not None:
        linear.bias = _parameter(linear.bias.detach()[kept_out], linear.bias)
    _prune_per_output(linear, kept_out)
    linear.in_features, linear.out_features = len(kept_in), len(kept_out)


def _prune_functional(
    model: nn.Module, layer: LayerInfo, kept_out: Tensor, kept_in: Tensor
) -> None:
    """Keep the rows and columns of a functional layer's weight (``F.conv2d(x, self.weight)``,
    ``F.linear``; ungrouped, weight ``[out, in, *kernel]``) and the entries of its bias."""
    _replace(model, layer.weight, lambda weight: weight[kept_out][:, kept_in])
    if layer.bias_parameter:
        _replace(model, layer.bias_parameter, lambda bias: bias[kept_out])


def _replace(model: nn.Module, name: str, keep: Callable[[Tensor], Tensor]) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    parameter = getattr(owner, attribute)
    setattr(owner, attribute, _parameter(keep(parameter.detach()), parameter))


def _prune_norm(norm: nn.Module, kept: Tensor) -> None:
    """Shrink a BatchNorm layer (or a subclass) in place: affine, running statistics, size; or
    a GroupNorm, whose kept channels are whole groups: affine, channels and groups."""
    if isinstance(norm, nn.GroupNorm):
        per_group = norm.num_channels // norm.num_groups
        if norm.weight is not None and norm.bias is not None:
            norm.weight = _parameter(norm.weight.detach()[kept], norm.weight)
            norm.bias = _parameter(norm.bias.detach()[kept], norm.bias)
        norm.num_channels, norm.num_groups = len(kept), len(kept) // per_group
        return
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm layer, got {type(norm).__name__}")
    if norm.weight is not None and norm.bias is not None:
        norm.weight = _parameter(norm.weight.detach()[kept], norm.weight)
        norm.bias = _parameter(norm.bias.detach()[kept], norm.bias)
    if norm.running_mean is not None and norm.running_var is not None:
        norm.running_mean = norm.running_mean.detach()[kept].clone()
        norm.running_var = norm.running_var.detach()[kept].clone()
    norm.num_features = len(kept)


def prune_model(model: nn.Module, graph: ChannelGraph, spec: SubnetSpec) -> nn.Module:
    """A physically smaller copy of ``model`` keeping the channels ``spec`` says.

    Every conv, linear and BatchNorm layer of ``graph`` is shrunk in place, in a deep copy, to
    the kept weights, biases and running statistics, with its channel counts updated (depthwise
    convs get ``groups`` = their new width; grouped convs keep ``groups`` and take the kept
    channels of each conv group). Shrinking in place keeps each module's class, so subclasses
    (a conv that pads itself, a BatchNorm that applies its activation) keep their behaviour, and
    a module shared under several names stays one. Attention heads are pruned as whole heads (the
    q, k and v rows of a head and the output projection's columns), and the attributes the
    forward reshapes them with (``num_heads``) are set to the heads kept; a list attribute the
    forward splits channels at (MixConv's ``splits``) is set to the channels kept of each piece.
    An ``nn.MultiheadAttention`` that loses heads is replaced by a
    :class:`~prunetune.backend.attention.PrunedMultiheadAttention` holding the kept heads'
    weights (its parameters keep their names); one that keeps every head stays. ``model`` itself
    is left untouched; the copy has no masks or hooks added.

    Args:
        model: the dense model ``graph`` was traced from (or one with the same structure).
        graph: the model's channel graph.
        spec: the subnet to build.

    Returns:
        The pruned model, in the same training mode as ``model``.

    Raises:
        SpecError: ``spec`` does not fit ``graph``.
    """
    kept = {
        name: torch.tensor(v, dtype=torch.long) for name, v in spec.kept_channels(graph).items()
    }
    kept_tuples = {name: tuple(v.tolist()) for name, v in kept.items()}
    sizes = {group.name: group.size for group in graph.groups}
    pruned = copy.deepcopy(model)
    attention = _attention_heads(pruned, graph)
    replaced = {f"{name}.{projection}" for name in attention for projection in PROJECTIONS}
    for layer in graph.layers:
        if layer.name in replaced:
            continue  # the module is replaced below
        kept_in = feature_indices(layer.in_segments, kept_tuples, sizes)
        if layer.depthwise:  # the kept input features, each with its block of outputs
            kept_out = kept_in
        else:  # an output cut into pieces keeps each piece's channels
            kept_out = feature_indices(layer.outputs, kept_tuples, sizes)
        if layer.weight:
            _prune_functional(pruned, layer, kept_out, kept_in)
        elif layer.kind == "conv":
            _prune_conv(pruned.get_submodule(layer.name), layer, kept_out, kept_in)
        else:
            _prune_linear(pruned.get_submodule(layer.name), kept_out, kept_in)
    for norm in graph.norms:
        indices = feature_indices(_norm_segments(norm), kept_tuples, sizes)
        _prune_norm(pruned.get_submodule(norm.name), indices)
    for scale in graph.scales:
        factor = 1.0
        if scale.rescale_power:  # it multiplies channels a statistic across channels rescaled
            dense = sum(sizes[s.group] * s.multiplier for s in scale.rescale_segments)
            left = sum(len(kept_tuples[s.group]) * s.multiplier for s in scale.rescale_segments)
            factor = (dense / left) ** scale.rescale_power
        _prune_scale(pruned, scale, feature_indices(scale.segments, kept_tuples, sizes), factor)
    for head in graph.head_attributes:  # the forward reshapes to the kept heads
        heads = sum(len(kept_tuples[segment.group]) for segment in head.segments)
        setattr(pruned.get_submodule(head.module), head.attribute, heads * head.per_head)
    for name, group in attention.items():
        if len(kept_tuples[group]) < sizes[group]:  # with every head kept, the module stays
            _set_submodule(pruned, name, prune_attention_heads(
                pruned.get_submodule(name), kept_tuples[group]  # type: ignore[arg-type]
            ))  # fmt: skip
    if "torchvision.models.swin_transformer" in sys.modules:  # its window attentions
        from prunetune.backend._window_attention import follow_pruned_heads

        for head in graph.head_attributes:
            follow_pruned_heads(pruned.get_submodule(head.module))
    for split in graph.split_attributes:  # the forward splits at the kept sizes (MixConv)
        owner = pruned.get_submodule(split.module)
        kept_sizes = [
            sum(len(kept_tuples[s.group]) * s.multiplier for s in piece) for piece in split.pieces
        ]
        dense_sizes = getattr(owner, split.attribute)
        setattr(owner, split.attribute, type(dense_sizes)(kept_sizes))
    return pruned


def _attention_heads(model: nn.Module, graph: ChannelGraph) -> dict[str, str]:
    """The ``nn.MultiheadAttention`` modules whose heads ``graph`` prunes, with their head
    group (the input group of their output projection's layer record)."""
    layers = {layer.name: layer for layer in graph.layers}
    found = {}
    for name, module in model.named_modules():
        record = layers.get(f"{name}.out_proj")
        if isinstance(module, nn.MultiheadAttention) and f"{name}.q_proj" in layers and record:
            found[name] = record.in_segments[0].group
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attribute, module)
    if isinstance(owner, nn.TransformerEncoderLayer):
        # nn.TransformerEncoder's fast path turns padded batches into nested tensors, which
        # only its fused layers read
        for parent in model.modules():
            if isinstance(parent, nn.TransformerEncoder) and any(
                layer is owner for layer in parent.layers
            ):
                parent.use_nested_tensor = False


def _prune_scale(model: nn.Module, scale: ScaleInfo, kept: Tensor, factor: float = 1.0) -> None:
    """Keep the entries of a per-channel parameter or buffer (layer scale, PReLU slopes) of the
    kept channels, along its channel dim, multiplied by ``factor`` (the ``C / C'`` a global
    response norm's ``gamma`` takes, see ``ScaleInfo.rescale_power``)."""
    owner_name, _, attribute = scale.name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    tensor = getattr(owner, attribute)
    smaller = tensor.detach().index_select(scale.dim, kept).clone()
    if factor != 1.0:
        smaller *= factor
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attribute, _parameter(smaller, tensor))
    else:
        owner.register_buffer(attribute, smaller, persistent=attribute in owner.state_dict())
    if isinstance(owner, nn.PReLU):
        owner.num_parameters = len(kept)


def _norm_segments(norm: NormInfo) -> tuple[ChannelSegment, ...]:
    return norm.segments or (ChannelSegment(norm.group),)


def zero_pruned_channels(model: nn.Module, graph: ChannelGraph, spec: SubnetSpec) -> nn.Module:
    """A dense copy of ``model`` whose removed channels are zeroed where they are produced.

    For every prunable group, the removed channels' rows (and biases) of each producing conv or
    linear are zeroed, and so are the weight and bias of the group's BatchNorm channels (and the
    running mean of non-affine ones), so removed channels are exactly zero downstream of every
    producer. Its output equals :func:`prune_model`'s as long as no op between a producer and its
    consumers turns zeros into non-zeros (ReLU-like activations, pooling and sums do not).

    Raises:
        SpecError: ``spec`` does not fit ``graph``.
    """
    kept = spec.kept_channels(graph)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for group in graph.prunable_groups:
            removed_channels = sorted(set(range(group.size)) - set(kept[group.name]))
            if not removed_channels:
                continue
            removed = torch.tensor(removed_channels, dtype=torch.long)
            for member in group.members:
                module = zeroed.get_submodule(member.module)
                span = torch.arange(member.multiplier, dtype=torch.long)
                rows = (member.offset + removed[:, None] * member.multiplier + span).flatten()
                if member.role == "out" and isinstance(module, nn.MultiheadAttention):
                    zero_attention_heads(module, rows)
                elif member.role == "out":
                    output_major(module)[rows] = 0
                    _zero(module, "bias", rows)
                elif member.role == "norm":
                    if getattr(module, "weight", None) is not None:
                        _zero(module, "weight", rows)
                        _zero(module, "bias", rows)
                    else:
                        _zero(module, "running_mean", rows)
        sizes = {group.name: group.size for group in graph.groups}
        for scale in graph.scales:  # an added bias would turn zeros into non-zeros
            owner_name, _, attribute = scale.name.rpartition(".")
            tensor = getattr(zeroed.get_submodule(owner_name) if owner_name else zeroed, attribute)
            keep = feature_indices(scale.segments, kept, sizes)
            removed = torch.ones(tensor.shape[scale.dim], dtype=torch.bool)
            removed[keep] = False
            tensor.index_fill_(scale.dim, removed.nonzero().flatten(), 0)
    return zeroed


def _zero(module: nn.Module, attribute: str, rows: Tensor) -> None:
    tensor = getattr(module, attribute, None)
    if isinstance(tensor, Tensor):
        tensor[rows] = 0
