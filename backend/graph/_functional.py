"""Layers written as functions of parameters: ``F.conv1d/2d/3d(x, self.weight, self.bias, ...)``
and ``F.linear(x, self.weight, self.bias)`` in a plain module.

Such a call is recognised by what it computes and the parameters it reads, and pruned like the
built-in layer: the analysis sees a stand-in ``nn.Conv2d`` or ``nn.Linear`` on the meta device
with the call's configuration, and the layer is named after the module holding its weight (read
as ``self.weight``, and ``self.bias``), whose rows and columns surgery keeps. Grouped calls,
parameters named otherwise, and weights that are computed rather than read (a standardised
weight) stay whole: the call is then counted as it is.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._scales import attribute
from prunetune.backend.graph._state import AnalysisState
from prunetune.backend.graph._trace import node_shape

__all__ = ["FUNCTIONAL_LAYERS", "FunctionalRules"]

_CONVS: dict[str, type[nn.Module]] = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
FUNCTIONAL_LAYERS = frozenset({*_CONVS, "linear"})


class FunctionalRules(AnalysisState):
    """The rule for functional conv and linear calls, used by the channel analysis."""

    def _stand_in(self, node: fx.Node, name: str) -> tuple[nn.Module, str, str] | None:
        """A meta-device layer computing what the call does, with the weight's and the bias's
        qualified names; ``None`` when the call is not an ungrouped layer on parameters."""
        weight = rules.argument(node, 1, "weight")
        bias = rules.argument(node, 2, "bias")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return None
        if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
            return None
        owner, _, attribute_name = str(weight.target).rpartition(".")
        tensor = attribute(self.module, str(weight.target))
        if not owner or attribute_name != "weight" or not isinstance(tensor, nn.Parameter):
            return None  # named like a layer's: ``self.weight`` of a submodule
        bias_name = str(bias.target) if bias is not None else ""
        if bias is not None and bias_name != f"{owner}.bias":
            return None
        shape = tuple(tensor.shape)
        layer: nn.Module
        with torch.device("meta"):
            if name == "linear":
                if len(shape) != 2:
                    return None
                layer = nn.Linear(shape[1], shape[0], bias=bias is not None)
            else:
                settings = [rules.argument(node, i, key, default) for i, key, default in (
                    (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1),
                )]  # fmt: skip
                if any(isinstance(a, fx.Node) for a in settings) or settings[3] != 1:
                    return None
                stride, padding, dilation, _ = settings
                layer = _CONVS[name](
                    shape[1], shape[0], shape[2:], stride, padding, dilation, bias=bias is not None
                )
        return layer, str(weight.target), bias_name

    def _functional_stand_in(self, node: fx.Node, name: str) -> nn.Module | None:
        """The stand-in layer a functional call is analysed as (the call's layer name is then
        its weight's), ``None`` when it is not a layer call to prune."""
        found = self._stand_in(node, name)
        out_shape = node_shape(node)
        if found is None or out_shape is None:
            return None
        layer, weight, bias = found
        if rules.unlike_its_layer(layer, out_shape, int(node.meta.get("flops", 0)) // 2):
            return None
        owner = weight.rpartition(".")[0]
        self.functional[node] = owner
        self._functional_bias[owner] = bias
        return layer

    def _name_parameters(self, node: fx.Node) -> None:
        """After the layer rule ran: record the weight's and bias's names on the layer."""
        owner = self.functional[node]
        record = self.layers.get(owner)
        if record is not None:
            record.weight, record.bias = f"{owner}.weight", self._functional_bias[owner]
