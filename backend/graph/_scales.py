"""Per-channel tensors applied to activations: layer scale (``x * self.gamma``, ``gamma`` of shape
``[C]``, ``[C, 1, 1]`` or viewed so), a bias added to a map, the slopes of ``PReLU(C)``.

Such a tensor is pruned with the channels it meets: its entries follow the channels kept, so it
needs no coupling of its own. It is recognised by what it is (a parameter or buffer read in
``forward``, possibly viewed, unsqueezed or indexed with ``None``) and by how it broadcasts: one
entry per channel of the result, every other dim of size 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._state import AnalysisState
from prunetune.backend.graph._trace import node_shape

__all__ = ["ScaleRules", "attribute"]

_VIEWS = rules.RESHAPE_OPS | {"getitem", "to", "type_as", "contiguous", "float", "half", "clone"}


class ScaleRules(AnalysisState):
    """Finding per-channel tensors among an elementwise op's operands."""

    def _scale_of(
        self, source: fx.Node, out_shape: tuple[int, ...], axis: int
    ) -> tuple[str, int] | None:
        """``(qualified name, dim)`` of the parameter or buffer that ``source`` reads, when it
        broadcasts one entry per channel along ``axis`` of ``out_shape``; ``None`` otherwise."""
        shape = node_shape(source)
        channels = out_shape[axis] if 0 <= axis < len(out_shape) else 0
        if shape is None or channels < 2 or len(shape) > len(out_shape):
            return None
        position = axis - (len(out_shape) - len(shape))
        if position < 0 or shape[position] != channels or math.prod(shape) != channels:
            return None
        node = source
        while node.op != "get_attr":
            name = rules.op_name(node)
            if name not in _VIEWS or not node.args or not isinstance(node.args[0], fx.Node):
                return None
            sizes = [a for a in node.args[1:] if isinstance(a, int)]
            if name in rules.RESHAPE_OPS and channels in sizes:
                return None  # a literal width would not follow the pruned one
            node = node.args[0]
        target = str(node.target)
        tensor = attribute(self.module, target)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != channels:
            return None
        dims = [i for i, size in enumerate(tensor.shape) if size == channels]
        return (target, dims[0]) if len(dims) == 1 else None


def attribute(module: torch.nn.Module, target: str) -> Any:
    """The attribute ``target`` (a qualified name) of ``module``, ``None`` if there is none."""
    owner_name, _, attribute = target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return getattr(owner, attribute, None)
