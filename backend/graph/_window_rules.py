"""torchvision's Swin attention: a call of its ``torch.fx.wrap``-ped ``shifted_window_attention``
(Swin v1 and v2, Liu et al., ICCV 2021 and CVPR 2022, as ``torchvision.models.swin_transformer``
writes them), which the trace does not enter::

    shifted_window_attention(x, self.qkv.weight, self.proj.weight, bias, self.window_size,
                             self.num_heads, ..., qkv_bias=self.qkv.bias,
                             proj_bias=self.proj.bias, logit_scale=self.logit_scale)

It is recognised by the function's identity, in the forward of torchvision's own
``ShiftedWindowAttention`` or ``ShiftedWindowAttentionV2`` (a subclass may have another forward),
on the module's own parameters. Its qkv and proj are then two functional Linear layers: qkv's
rows cut into q, k and v, each pruned in whole heads and coupled head by head, proj's columns
with them; the residual width (the input's channels and proj's rows) stays as the rest of the
model has it. Pruned with each head: its relative position bias (``bias``, a table's column in
v1; in v2 the output of ``cpb_mlp``'s last Linear, one per head) and its entry of v2's
``logit_scale`` ``[heads, 1, 1]``; ``num_heads`` (the call's argument) must be read from the
module's attribute, which surgery updates, giving the module a forward that takes the head dim
from the qkv weight (``prunetune.backend._window_attention``). Its MACs are checked against
``FlopCounterMode``'s count of the call: qkv and proj over every padded token, and the two
matmuls of each head. A call that does not fit is kept whole with the reason.

A removed head's q, k and v rows are zero (or its proj columns masked), so its output is zero
whatever its bias and logit scale: the pruned, zeroed and masked models agree.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._head_bias import BiasSource, same_dim
from prunetune.backend.graph._heads import HeadRules
from prunetune.backend.graph._last import as_value
from prunetune.backend.graph._records import ChannelMember
from prunetune.backend.graph._scales import attribute
from prunetune.backend.graph._state import HeadSite, Last, LayerRecord
from prunetune.backend.graph._trace import node_shape

__all__ = ["WindowAttentionRules", "is_window_attention"]

_TORCHVISION_SWIN = "torchvision.models.swin_transformer"
_ARGUMENTS = (
    "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
    "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale",
    "training",
)  # fmt: skip
_NUM_HEADS = _ARGUMENTS.index("num_heads")


def _window_api() -> ModuleType | None:
    """``prunetune.backend._window_attention`` once torchvision's Swin is imported (a model
    built from it), else ``None``: no call in a graph can then be one of its functions."""
    if _TORCHVISION_SWIN not in sys.modules:
        return None
    return importlib.import_module("prunetune.backend._window_attention")


def is_window_attention(node: fx.Node) -> bool:
    """Whether ``node`` calls a Swin window attention function that prunes heads."""
    api = _window_api()
    return api is not None and node.op == "call_function" and node.target in api.ATTENTION_FUNCTIONS


class WindowAttentionRules(HeadRules):
    """The rules for torchvision's window attention calls and their relative position bias."""

    def _window_call(self, node: fx.Node, name: str | None, what: str) -> Any | None:
        """The value of a window attention call, of its bias lookup, or of the view of
        ``cpb_mlp``'s output into that lookup; ``None`` for any other node."""
        api = _window_api()
        if api is None or node.op not in ("call_function", "call_method"):
            return None
        if node.target is api.BIAS_FUNCTION:
            return self._bias_lookup(node, what)
        if node.target in api.ATTENTION_FUNCTIONS:
            value = self._window_attention(node, api, what)
            return value if not isinstance(value, str) else self._unknown(node, f"{what} ({value})")
        users = list(node.users)
        into_bias = len(users) == 1 and users[0].target is api.BIAS_FUNCTION
        if name in ("view", "reshape") and into_bias and users[0].args[:1] == (node,):
            return self._bias_table_view(node)  # cpb_mlp(coords).view(-1, heads)
        return None

    def _bias_table_view(self, node: fx.Node) -> Any | None:
        """``cpb_mlp(coords).view(-1, self.num_heads)``: the Linear's channels stay the last
        dim (its literal head count is checked where the heads are coupled)."""
        source = node.args[0]
        last = self.last(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if last is None or in_shape is None or out_shape is None:
            return None
        if same_dim(in_shape, out_shape, len(in_shape) - 1) != len(out_shape) - 1:
            return None
        return as_value(last, len(out_shape))

    def _bias_lookup(self, node: fx.Node, what: str) -> Any:
        """``_get_relative_position_bias(table, index, window_size)``: ``[entries, heads]`` ->
        ``[1, heads, N, N]``, the table's channels (if a layer made them) along dim 1."""
        table, index = node.args[0], node.args[1]
        channels = self.channels(table)
        out_shape = node_shape(node)
        if (
            channels is None
            or out_shape is None
            or not isinstance(index, fx.Node)
            or not self._constant(index)
            or sum(s.size * s.mult for s in channels) != out_shape[1]
        ):
            return self._unknown(node, what)
        return channels

    def _wrapped_bias_step(self, node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
        api = _window_api()
        if api is None or node.target is not api.BIAS_FUNCTION or dim != 1:
            return None
        table, index = node.args[0], node.args[1]
        shape = node_shape(table) if isinstance(table, fx.Node) else None
        if shape is None or not isinstance(index, fx.Node) or not self._constant(index):
            return None
        return table, len(shape) - 1  # type: ignore[return-value]

    def _window_attention(self, node: fx.Node, api: ModuleType, what: str) -> Any:
        """The call's value (the proj's channels, last), or why its heads stay whole."""
        stack = node.meta.get("nn_module_stack") or {}
        owner, kind = next(reversed(stack.values())) if stack else ("", None)
        if kind not in api.PRUNED_CLASSES:  # exactly those: a subclass may have its own forward
            return (
                "not in the forward of torchvision's ShiftedWindowAttention or "
                "ShiftedWindowAttentionV2, whose forward surgery can give fewer heads"
            )
        args = {key: rules.argument(node, i, key) for i, key in enumerate(_ARGUMENTS)}
        prefix = f"{owner}."
        own = {
            "qkv_weight": f"{prefix}qkv.weight",
            "proj_weight": f"{prefix}proj.weight",
            "qkv_bias": f"{prefix}qkv.bias",
            "proj_bias": f"{prefix}proj.bias",
            "logit_scale": f"{prefix}logit_scale",
        }
        for key, target in own.items():
            arg = args[key]
            if arg is None and key not in ("qkv_weight", "proj_weight"):
                continue
            if not isinstance(arg, fx.Node) or arg.op != "get_attr" or str(arg.target) != target:
                return f"its {key} is not the module's own {target.rpartition('.')[2]}"
            if len(arg.users) != 1:
                return f"its {key} is read elsewhere too"
        shape = node_shape(args["input"])
        qkv = attribute(self.module, own["qkv_weight"])
        proj = attribute(self.module, own["proj_weight"])
        heads, window = args["num_heads"], args["window_size"]
        if shape is None or len(shape) != 4 or not isinstance(heads, int):
            return "its input is not a [B, H, W, C] map"
        if not (isinstance(window, (list, tuple)) and all(isinstance(w, int) for w in window)):
            return "its window size is not a literal"
        width, inner = shape[3], qkv.shape[0] // 3
        if qkv.shape != (3 * inner, width) or proj.shape != (width, inner) or inner % heads:
            return "its qkv and proj weights do not fit its input width and head count"
        head_dim = inner // heads
        rows = shape[0] * -(-shape[1] // window[0]) * window[0] * -(-shape[2] // window[1])
        rows *= window[1]  # every padded token
        tokens = window[0] * window[1]
        macs = int(node.meta.get("flops", 0)) // 2
        if macs != rows * (4 * width * inner + 2 * tokens * inner) or rows % self.batch:
            return f"FlopCounterMode counted {macs} MACs, not those of qkv, proj and the heads"
        bias = self._bias_source(args["relative_position_bias"], 1)
        scale = args["logit_scale"]
        if bias is None:
            return "its relative position bias is not made from one table or Linear alone"
        if scale is not None and tuple(attribute(self.module, str(scale.target)).shape) != (
            heads,
            1,
            1,
        ):
            return "its logit_scale is not [heads, 1, 1]"
        return self._window_layers(node, args, prefix, rows // self.batch, (heads, head_dim), bias)

    def _window_layers(
        self,
        node: fx.Node,
        args: dict[str, Any],
        prefix: str,
        rows: int,
        heads: tuple[int, int],
        bias: BiasSource,
    ) -> Any:
        """Record qkv and proj as layers pruned in whole heads, and the heads' costs."""
        count, head_dim = heads
        width = node_shape(args["input"])[-1]  # type: ignore[index]
        channels = self.last(args["input"])
        if channels is None:  # the residual after an op that is not followed: kept whole
            reason = f"window attention '{prefix[:-1]}' reads features no traced layer produces"
            self._fix_value(self.values.get(args["input"]), reason)
            channels = (Segment(self.slots.new(width, f"{prefix}qkv", reason), width),)
        inner = count * head_dim
        qkv_name, proj_name = f"{prefix}qkv", f"{prefix}proj"
        if qkv_name in self.layers or proj_name in self.layers:
            return "its qkv or proj is called elsewhere too"
        outputs = self._output_slots(qkv_name, 3 * inner)
        pieces = self._pieces(outputs, [inner] * 3)
        if pieces is None or not all(self._in_blocks(p, head_dim) for p in pieces):
            reason = f"its q, k and v are not cut into whole heads of {head_dim} features"
            self._fix(outputs, reason)
            return reason  # a first pass: the cuts and blocks it asked for come in the next
        self._add_linear(qkv_name, channels, outputs, rows, args["qkv_bias"] is not None)
        joined = self._join(pieces[0], pieces[1], node, "window attention")
        joined = self._join(joined, pieces[2], node, "window attention")
        self.head_slots.update(s.slot for piece in pieces for s in piece)
        proj_out = self._output_slots(proj_name, width)
        self._add_linear(proj_name, joined, proj_out, rows, args["proj_bias"] is not None)
        self._record_bias(node, bias, joined, "window attention")
        if args["logit_scale"] is not None:
            scale: BiasSource = (str(args["logit_scale"].target), 0, [])
            self._record_bias(node, scale, joined, "window attention")
        owner = rules.owner_of(node)
        self.head_sites.append(HeadSite(node.name, _NUM_HEADS - 1, joined, 1, owner))
        tokens = args["window_size"][0] * args["window_size"][1]
        self.head_costs.append((node, joined, 2 * rows * tokens * head_dim))
        self.mask_points.append((args["proj_weight"], joined))  # proj's columns of each head
        self.mask_points.append((node, proj_out))
        return Last(proj_out)

    def _add_linear(
        self, name: str, inputs: Channels, outputs: Channels, rows: int, bias: bool
    ) -> None:
        """Record functional Linear ``name`` (its ``weight`` and ``bias`` parameters) reading
        ``inputs`` and making ``outputs`` at ``rows`` positions per example."""
        offset = 0
        for segment in inputs:
            self.slots.add_member(segment.slot, ChannelMember(name, "in", offset, segment.mult))
            offset += segment.size * segment.mult
        size = sum(s.size * s.mult for s in inputs), sum(s.size * s.mult for s in outputs)
        with torch.device("meta"):
            stand_in = nn.Linear(*size, bias=bias)
        record = LayerRecord(name, "linear", stand_in, inputs, outputs, False, (), ())
        record.positions, record.weight = rows, f"{name}.weight"
        record.bias = f"{name}.bias" if bias else ""
        self.layers[name] = record
