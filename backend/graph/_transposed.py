"""Transposed convs (decoders, upsampling heads): both weight dims prunable, MACs by input."""

from __future__ import annotations

import math
from typing import Any, cast

from torch import fx, nn

from prunetune.backend.graph._state import AnalysisState
from prunetune.backend.graph._trace import node_shape

__all__ = ["TransposedConvRules"]


class TransposedConvRules(AnalysisState):
    """The rule for ``ConvTranspose1d/2d/3d`` calls, used by the channel analysis."""

    def _transposed_conv(self, node: fx.Node, module: nn.Module) -> Any:
        """A transposed conv: weight ``[in, out / groups, *kernel]``, both dims prunable; its
        MACs are ``prod(input positions) * prod(kernel) * in * out / groups``."""
        name = str(node.target)
        conv = cast(nn.ConvTranspose2d, module)
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        positions = self.per_example(node, math.prod(in_shape[2:])) if in_shape is not None else 0
        counted = int(node.meta.get("flops", 0)) // 2
        expected = self.batch * positions * math.prod(conv.kernel_size)
        expected *= conv.in_channels * conv.out_channels // conv.groups
        reason = None
        if channels is None or in_shape is None or out_shape is None:
            reason = "its input is not a traced tensor"
        elif conv.groups != 1:
            reason = "grouped transposed convs are not supported for pruning yet"
        elif any(s.mult != 1 for s in channels) or out_shape[1] != conv.out_channels:
            reason = "its input or output does not hold whole channels along dim 1"
        elif counted != expected:
            reason = f"its forward computes {counted} MACs where the layer computes {expected}"
        if reason is not None or channels is None or in_shape is None or out_shape is None:
            self.unknown_modules[name] = reason or ""
            return self._unknown(node, f"module '{name}' ({type(conv).__name__}: {reason})")
        shared = self._record_call(node, name, channels, f"shared module '{name}'", positions)
        if shared is not None:
            return shared
        shape = (in_shape[2:], out_shape[2:], positions)
        return self._add_layer(node, module, channels, conv.out_channels, shape)
