"""Channel masks for the differentiable relaxations (DSA, DAIS, DDPNAS).

:class:`ChannelMasker` re-runs a model's traced graph with a multiplication by a per-group mask
wherever that group's channels are produced (after the BatchNorm that follows a conv or linear,
otherwise right after the layer), sharing every parameter with the model. Masks may require
gradients; they flow through the multiplication.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunetune.backend.attention import MaskedMultiheadAttention
from prunetune.backend.graph import ChannelGraph, ChannelSegment
from prunetune.backend.spec import SubnetSpec

__all__ = ["ChannelMasker", "masks_from_spec"]


class _MaskPoint(nn.Module):
    """Multiplies dim 1 (or the last dim) of its input by the masks of the groups there."""

    def __init__(
        self, segments: tuple[ChannelSegment, ...], sizes: dict[str, int], last: bool = False
    ) -> None:
        super().__init__()
        self.segments = segments
        self.last = last
        self.sizes = [sizes[segment.group] for segment in segments]
        self.masks: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        found = [self.masks.get(segment.group) for segment in self.segments]
        if all(mask is None for mask in found):
            return x
        parts = []
        for mask, segment, size in zip(found, self.segments, self.sizes, strict=True):
            if mask is None:
                mask = torch.ones(size, dtype=x.dtype, device=x.device)
            if segment.multiplier != 1:
                mask = mask.repeat_interleave(segment.multiplier)
            parts.append(mask.to(dtype=x.dtype))
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.last:
            return x * full
        return x * full.view(1, -1, *([1] * (x.ndim - 2)))


class _HeadMaskPoint(nn.Module):
    """Calls an ``nn.MultiheadAttention`` with each head's output multiplied by the mask of its
    head group (Michel et al., 2019's head mask; see ``prunetune.backend.attention``)."""

    def __init__(self, attention: nn.MultiheadAttention, group: str) -> None:
        super().__init__()
        self.attention = MaskedMultiheadAttention(attention)
        self.group = group
        self.masks: dict[str, Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.attention.gate = self.masks.get(self.group)
        return self.attention(*args, **kwargs)


class ChannelMasker(nn.Module):
    """A model's traced graph with a channel mask wherever a prunable group is produced.

    The masker shares parameters (the very same module objects) with ``model``: training the
    masker trains the model. With masks of zeros and ones built from a spec
    (:func:`masks_from_spec`), its output equals the pruned model's in eval mode, as long as no
    op between a producer and its consumers turns zeros into non-zeros (ReLU-like activations,
    pooling, residual sums and gates do not; a bare sigmoid before the next conv would). Where a
    channel passes two producers in a row (a conv, then the norm of another conv's group after a
    residual add), it is multiplied by its mask at each.

    Example:
        >>> import torch
        >>> from prunetune.backend.graph import ChannelGraph
        >>> from prunetune.backend.masks import ChannelMasker
        >>> from prunetune.backend.models import create_model
        >>> model, x = create_model("resnet20"), torch.randn(2, 3, 32, 32)
        >>> graph = ChannelGraph.trace(model, x[:1])
        >>> masker = ChannelMasker(model, graph)
        >>> alpha = torch.full((16,), 0.5, requires_grad=True)  # keep ratios of group conv1
        >>> masker.set_masks({"conv1": alpha})
        >>> masker(x).sum().backward()
        >>> alpha.grad.shape
        torch.Size([16])

    Args:
        model: the model ``graph`` was traced from (or one with the same module names).
        graph: the model's channel graph.

    Raises:
        ValueError: ``model`` does not trace to the graph's nodes.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph) -> None:
        super().__init__()
        module = graph.trace_module(model)
        nodes = {node.name: node for node in module.graph.nodes}
        missing = [point.node for point in graph.mask_points if point.node not in nodes]
        if missing:
            raise ValueError(
                f"model {type(model).__name__} does not match the channel graph (no nodes "
                f"{', '.join(missing[:5])}); pass the model the graph was traced from"
            )
        self._graph = graph
        self._sizes = {group.name: group.size for group in graph.groups}
        self._prunable = {group.name for group in graph.prunable_groups}
        self._points: list[_MaskPoint | _HeadMaskPoint] = []
        for index, point in enumerate(graph.mask_points):
            node = nodes[point.node]
            name = f"prunetune_mask_{index}"
            called = module.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(called, nn.MultiheadAttention):  # its heads: masked inside the call
                gate = _HeadMaskPoint(called, point.segments[0].group)
                module.add_submodule(name, gate)
                node.target = name
                self._points.append(gate)
                continue
            mask_point = _MaskPoint(point.segments, self._sizes, point.last)
            module.add_submodule(name, mask_point)
            with module.graph.inserting_after(node):
                masked = module.graph.call_module(name, (node,))
            node.replace_all_uses_with(
                masked, delete_user_cb=lambda user, new=masked: user is not new
            )
            self._points.append(mask_point)
        module.recompile()
        self.graph_module = module
        self._masks: dict[str, Tensor] = {}

    @property
    def masks(self) -> dict[str, Tensor]:
        """The masks now set, by group name (a copy of the mapping, same tensors)."""
        return dict(self._masks)

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Use these masks from now on; groups left out are not masked.

        Args:
            masks: one tensor of shape ``(size,)`` per prunable group, by group name; values in
                [0, 1] by convention; may require grad.

        Raises:
            KeyError: a name is not a prunable group.
            ValueError: a mask has the wrong shape or is not a floating-point tensor.
        """
        checked: dict[str, Tensor] = {}
        for name, mask in masks.items():
            if name not in self._prunable:
                raise KeyError(
                    f"no prunable channel group {name!r}; prunable groups: "
                    f"{', '.join(g.name for g in self._graph.prunable_groups)}"
                )
            if not isinstance(mask, Tensor) or not mask.is_floating_point():
                raise ValueError(f"mask of group {name!r} must be a floating-point tensor")
            if tuple(mask.shape) != (self._sizes[name],):
                raise ValueError(
                    f"mask of group {name!r} must have shape ({self._sizes[name]},), "
                    f"got {tuple(mask.shape)}"
                )
            checked[name] = mask.to(self._device())
        self._masks = checked
        for point in self._points:
            point.masks = checked

    def _device(self) -> torch.device:
        """Where the model's weights are (masks follow them); the CPU for a weightless model."""
        parameter = next(self.graph_module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def clear_masks(self) -> None:
        """Remove every mask (the masker then computes the dense model)."""
        self.set_masks({})

    def forward(self, x: Tensor) -> Tensor:
        """Run the model with the masks applied."""
        return self.graph_module(x)  # type: ignore[no-any-return]


def masks_from_spec(
    graph: ChannelGraph, spec: SubnetSpec, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Masks of ones (kept) and zeros (removed) for every prunable group of ``spec``.

    Raises:
        SpecError: ``spec`` does not fit ``graph``.
    """
    kept = spec.kept_channels(graph)
    masks = {}
    for group in graph.prunable_groups:
        mask = torch.zeros(group.size, dtype=dtype)
        mask[list(kept[group.name])] = 1
        masks[group.name] = mask
    return masks
