"""Heads of ``nn.MultiheadAttention`` calls, as one channel group of heads.

A call of an ``nn.MultiheadAttention`` module (one fx node: torch.nn modules are leaves) is
analysed as four layers and a group of heads (Vaswani et al., 2017, multi-head attention; heads
pruned as whole units, as Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS
2019):

- ``<name>.q_proj``, ``<name>.k_proj``, ``<name>.v_proj``: the query, key and value projections
  (rows of ``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``, and
  of ``in_proj_bias``), each reading its input's embed width and making the heads;
- ``<name>.out_proj``: the output projection, reading the heads and making the embed width;
- the group ``<name>`` of ``num_heads`` heads, each ``head_dim`` features of those layers: its
  members are the stacked q, k and v rows of the module (offsets 0, ``E`` and ``2 E``) and the
  output projection's columns.

The embed widths the module reads and returns are kept whole (the replacement keeps them).
FLOPs: the four layers' MACs as any linear layer's; the rest of what ``FlopCounterMode`` counts
in the call (``q @ k^T`` and ``attention @ v``, or the fused attention) is recorded per head as a
head cost. Surgery replaces a module that loses heads by a ``PrunedMultiheadAttention``
(``prunetune.backend.attention``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._records import ChannelMember
from prunetune.backend.graph._state import AnalysisState, Last, LayerRecord, Many, is_multi
from prunetune.backend.graph._trace import node_shape

__all__ = ["PROJECTIONS", "MultiheadAttentionRules"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""The layer names, after the module's own name, that a pruned ``nn.MultiheadAttention``'s
projections are recorded under."""

_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


class MultiheadAttentionRules(AnalysisState):
    """The rule for ``nn.MultiheadAttention`` calls, used by the channel analysis."""

    def _multihead_attention(self, node: fx.Node, module: nn.MultiheadAttention) -> Any:
        """A call of ``module``: its heads as one group (see the module docstring), or the
        module kept whole with the reason where that cannot be done."""
        name = str(node.target)
        reason = self._unsupported_attention(node, module)
        if reason is not None:
            self.unknown_modules[name] = reason
            return self._unknown(node, f"module '{name}' (MultiheadAttention: {reason})")
        query, key, value = (rules.argument(node, i, arg) for i, arg in enumerate(_ARGUMENTS[:3]))
        kept = (
            f"MultiheadAttention '{name}' keeps the embed width it reads and returns (its heads "
            "are pruned, not its embed_dim)"
        )
        for source in node.all_input_nodes:
            self._fix_value(self.values.get(source), kept)
        heads, head_dim, embed = module.num_heads, module.head_dim, module.embed_dim
        slot = self.slots.new(heads, name)
        self.head_slots.add(slot)
        for index in range(3):  # q, k and v rows, stacked as in in_proj_weight
            self.slots.add_member(slot, ChannelMember(name, "out", index * embed, head_dim))
        self.slots.add_member(slot, ChannelMember(f"{name}.out_proj", "in", 0, head_dim))
        head_channels: Channels = (Segment(slot, heads, head_dim),)
        packed = module.in_proj_weight is not None
        bias = f"{name}.in_proj_bias" if module.in_proj_bias is not None else ""
        seen: dict[Any, Any] = {}
        for part, source in zip(("q", "k", "v"), (query, key, value), strict=True):
            width = {"q": embed, "k": module.kdim, "v": module.vdim}[part]
            weight = f"{name}.in_proj_weight" if packed else f"{name}.{part}_proj_weight"
            inputs = self._embed(source, width, f"{name}.{part}_proj", kept, seen)
            positions = _positions(source, self.batch)
            with torch.device("meta"):  # what the layer computes, as a functional layer's
                stand_in = nn.Linear(width, embed, bias=bool(bias))
            self.layers[f"{name}.{part}_proj"] = LayerRecord(
                f"{name}.{part}_proj", "linear", stand_in, inputs, head_channels, False, (), (),
                positions=positions, weight=weight, bias=bias,
            )  # fmt: skip
        out_name = f"{name}.out_proj"
        outputs = self._output_slots(out_name, embed)
        self._fix(outputs, kept)
        self.layers[out_name] = LayerRecord(
            out_name, "linear", module.out_proj, head_channels, outputs, False, (), (),
            positions=_positions(query, self.batch),
        )  # fmt: skip
        self.head_costs.append((node, head_channels, self._attention_macs(node, module)))
        self.mask_points.append((node, head_channels))
        rank = len(node_shape(query) or ())  # type: ignore[arg-type]
        meta = node.meta.get("tensor_meta")
        weights = self._fresh_weights(node, meta)
        return Many((Last(outputs) if rank == 3 else outputs, weights))

    def _unsupported_attention(self, node: fx.Node, module: nn.MultiheadAttention) -> str | None:
        """Why the heads of this call are kept whole, ``None`` when they can be pruned."""
        if type(module) is not nn.MultiheadAttention:
            return (
                f"{type(module).__name__} subclasses MultiheadAttention, whose forward may "
                "differ from the one prunetune replaces it by"
            )
        first = self.layers.get(f"{node.target}.out_proj")
        if first is not None:  # a second call: both calls' heads are kept
            reason = "it is called more than once"
            self._fix(first.inputs, f"MultiheadAttention '{node.target}': {reason}")
            return reason
        if module.num_heads < 2:
            return "it has one head"
        if module.bias_k is not None:
            return (
                "add_bias_kv=True: its learned key and value biases (bias_k, bias_v) are not "
                "costed per head yet"
            )
        sources = [rules.argument(node, i, arg) for i, arg in enumerate(_ARGUMENTS[:3])]
        shapes = [node_shape(s) if isinstance(s, fx.Node) else None for s in sources]
        if any(shape is None or len(shape) not in (2, 3) for shape in shapes):
            return "its query, key and value are not all traced [batch, tokens, features] tensors"
        if any(_positions(s, self.batch) == 0 for s in sources):
            return "its tokens are not a whole number per example of the model's input"
        meta = node.meta.get("tensor_meta")
        if not is_multi(meta) or len(meta) != 2:
            return "its call does not return (output, weights)"
        weights = [u for u in node.users if rules.op_name(u) == "getitem" and u.args[1] == 1]
        if any(user.users for user in weights) or any(
            rules.op_name(u) != "getitem" for u in node.users
        ):
            return (
                "the attention weights it returns are used, and a pruned module's would be those "
                "of the kept heads only"
            )
        macs = self._attention_macs(node, module)
        if macs < 0:
            return (
                "FlopCounterMode counts MACs in its call that do not split into its projections "
                "and an equal share per head"
            )
        return None

    def _attention_macs(self, node: fx.Node, module: nn.MultiheadAttention) -> int:
        """MACs per head and example that the call adds to its four projections (the attention
        matmuls, as ``FlopCounterMode`` counted them; 0 for a fused kernel it does not count);
        -1 when they do not split evenly among the heads."""
        query, key, value = (rules.argument(node, i, arg) for i, arg in enumerate(_ARGUMENTS[:3]))
        embed = module.embed_dim
        widths = (embed, module.kdim, module.vdim, embed)
        sources = (query, key, value, query)
        projections = sum(
            _positions(source, self.batch) * width * embed
            for source, width in zip(sources, widths, strict=True)
        )
        rest = int(node.meta.get("flops", 0)) // 2 - self.batch * projections
        if rest < 0 or rest % (self.batch * module.num_heads):
            return -1
        return rest // (self.batch * module.num_heads)

    def _embed(
        self, source: Any, width: int, layer: str, reason: str, seen: dict[Any, Any]
    ) -> Channels:
        """The channels a projection reads: its input's, when they are its last dim, else a new
        fixed group."""
        value = self.values.get(source) if isinstance(source, fx.Node) else None
        shape = node_shape(source) if isinstance(source, fx.Node) else None
        channels = value.channels if isinstance(value, Last) else None
        if channels is None and isinstance(value, tuple) and len(shape or ()) == 2:
            channels = value
        if channels is None or sum(s.size * s.mult for s in channels) != width:
            made = seen.get((source, width))  # key and value often read one tensor
            channels = made or (Segment(self.slots.new(width, layer, reason), width),)
            seen[(source, width)] = channels
        offset = 0
        for segment in channels:  # the module reads them (kept whole: they stay its width)
            member = ChannelMember(layer.rpartition(".")[0], "in", offset, segment.mult)
            if (segment.slot, member) not in seen:
                seen[(segment.slot, member)] = channels
                self.slots.add_member(segment.slot, member)
            offset += segment.size * segment.mult
        return channels

    def _fresh_weights(self, node: fx.Node, meta: Any) -> Any:
        """The returned attention weights (``None`` without ``need_weights``): fixed."""
        item = meta[1] if is_multi(meta) else None
        shape = getattr(item, "shape", None)
        if shape is None or len(shape) < 2:
            return None
        size = int(shape[1])
        reason = f"attention weights of '{node.target}'"
        return (Segment(self.slots.new(size, node.name, reason), size),)


def _positions(source: Any, batch: int) -> int:
    """Tokens per example of the model's input in ``source`` (``[B, N, E]``, ``[N, B, E]`` or
    ``[N, E]``); 0 when they are not a whole number."""
    shape = node_shape(source) if isinstance(source, fx.Node) else None
    if shape is None:
        return 0
    tokens = math.prod(shape[:-1])
    return tokens // batch if tokens % batch == 0 else 0
