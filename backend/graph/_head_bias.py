"""A bias per attention head added to the attention scores, and reshapes of the scores that keep
the heads: window attention as Swin computes it (Liu et al., "Swin Transformer: Hierarchical
Vision Transformer using Shifted Windows", ICCV 2021, eq. 4: ``SoftMax(Q K^T / sqrt(d) + B) V``
with ``B`` a relative position bias per head), in timm's ``WindowAttention``::

    attn = q * self.scale @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, self.num_heads, N, N).softmax(-1)

A tensor added to the scores (or given to ``F.scaled_dot_product_attention`` as its mask) with
one entry per head is followed back, op by op, to the parameter or buffer it is computed from:
through indexing of its other dims with a constant integer tensor (the table lookup), views and
reshapes that keep the head dim whole, permutes, unsqueezes, copies, and elementwise ops whose
other operands are constants that broadcast over the heads. Each node on the way must feed only
the next, so nothing else reads the entries that are removed. That tensor's dim of the heads is
then pruned with them (a per-channel tensor of the heads' group, entries ``[:, head]`` of the
table); a plain ``nn.Parameter(torch.zeros(heads, N, N))`` is the shortest such path. Anything
else per head (a bias made from the input, or from a layer's channels) keeps the heads whole.

The pruned, zeroed and masked models agree whatever the removed heads' bias is: a removed head's
``v`` rows (or its projection's mask) are zero, so its ``attention @ v`` is zero whatever its
scores are, and surgery removing its bias entries, zeroing them, or leaving them (masks) changes
nothing downstream.

A view or reshape of the scores that folds windows into the batch, or splits them out, keeps the
head dim where the same elements lie; a literal head count there (``self.num_heads``) is a
:class:`HeadSite` that must follow the kept heads, as a head count in the bias path's views is.
Masks that broadcast over the heads (Swin's shifted-window mask, ``[1, windows, 1, N, N]``) need
only be constants: computed from parameters and buffers without the input or any layer.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._last import ChannelsLastRules
from prunetune.backend.graph._scales import attribute
from prunetune.backend.graph._state import Heads, HeadSite, Last
from prunetune.backend.graph._trace import node_shape

__all__ = ["BiasSource", "HeadBiasRules", "same_dim"]

# Ops that copy a tensor or change its dtype or device, keeping its shape.
_COPIES = frozenset(
    ("contiguous", "clone", "detach", "to", "float", "half", "double", "bfloat16", "type_as")
)
_INDEX_DTYPES = (torch.int64, torch.int32)

BiasSource = tuple[str | Channels, int, list[tuple[fx.Node, int]]]
"""What a bias per head is computed from (see ``HeadBiasRules._bias_source``)."""


def same_dim(source: tuple[int, ...], target: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``target`` (a view of ``source``, or the reverse) that is dim ``dim`` of
    ``source`` unchanged: as many elements before it and the same size; ``None`` when the view
    splits it or merges it with another dim (a size of 1 or less matches nothing)."""
    before = math.prod(source[:dim])
    if source[dim] < 2:
        return None
    for index, size in enumerate(target):
        if size == source[dim] and math.prod(target[:index]) == before:
            return index
    return None


class HeadBiasRules(ChannelsLastRules):
    """Per-head biases of attention scores, constant masks, and reshapes of the scores."""

    def _scores_bias(self, node: fx.Node, source: fx.Node, scores: Heads, what: str) -> bool:
        """Whether ``source``, combined with the attention ``scores`` at ``node``, is a bias
        with one entry per head computed from one parameter or buffer; if so, that tensor's
        head dim is recorded to be pruned with the heads (and a literal head count on the way
        as a head site)."""
        shape, out_shape = node_shape(source), node_shape(node)
        if shape is None or out_shape is None or scores.inner is not None:
            return False
        dim = scores.head - (len(out_shape) - len(shape))
        if dim < 0 or len(scores.parts) != 1:
            return False
        found = self._bias_source(source, dim)
        if found is None:
            return False
        self._record_bias(node, found, scores.parts[0], what)
        return True

    def _record_bias(self, node: fx.Node, found: BiasSource, channels: Channels, what: str) -> None:
        """Prune what :meth:`_bias_source` found with the heads of ``channels``: a tensor's
        head dim as a per-channel tensor, or a layer's output channels coupled to the heads; and
        the literal head counts on the way as head sites."""
        source, axis, sites = found
        for site, position in sites:
            self.head_sites.append(HeadSite(site.name, position, channels, 1, rules.owner_of(site)))
        per_head = tuple(Segment(segment.slot, segment.size) for segment in channels)
        if not isinstance(source, str):
            self._join(per_head, source, node, what)
            return
        known = self.scales.get(source)
        if known is None:
            self.scales[source] = (per_head, axis)
        else:  # the same tensor biasing two attentions: their heads go together
            self._join(known[0], per_head, node, what)

    def _reshape_scores(self, node: fx.Node, scores: Heads, what: str) -> Heads | None:
        """A ``view``/``reshape`` of attention scores (no head dim left) that keeps the heads a
        dim of their own, as Swin's shifted-window mask needs; ``None`` when it splits or merges
        them."""
        source = node.args[0]
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if scores.inner is not None or scores.part is not None or None in (in_shape, out_shape):
            return None
        head = same_dim(in_shape, out_shape, scores.head)  # type: ignore[arg-type]
        sizes = rules.reshape_sizes(node)
        if head is None or len(sizes) != len(out_shape):  # type: ignore[arg-type]
            return None
        literal = sizes[head]
        if isinstance(literal, fx.Node):
            return self._unknown(
                node,
                f"{what} (reshapes attention scores with a head count read from a tensor's "
                "shape, which would not follow pruned heads: use an attribute such as "
                "self.num_heads, or -1)",
            )
        if literal != -1:
            if not isinstance(literal, int):
                return None
            for part in scores.parts:
                self.head_sites.append(HeadSite(node.name, head, part, 1, rules.owner_of(node)))
        return Heads(scores.parts, head, None)

    def _constant(self, node: fx.Node, layers: bool = False) -> bool:
        """Whether ``node`` is computed from parameters, buffers and literals only: neither
        the model's input nor (unless ``layers``) any conv or linear layer, whose channels may
        be pruned, is among its inputs, however far back."""
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder":
                return False
            layer = current.op == "call_module" and str(current.target) in self.layers
            if not layers and (layer or current in self.functional):
                return False
            stack.extend(current.all_input_nodes)
        return True

    def _bias_source(self, node: fx.Node, dim: int) -> BiasSource | None:
        """``(source, dim, sites)``: what dim ``dim`` of ``node`` is computed from, followed
        back through ops that keep it, each feeding only the next: a parameter or buffer
        (``source`` its qualified name, ``dim`` its dim), or the output channels of a Linear on
        constants (Swin v2's ``cpb_mlp``, ``source`` those channels); ``sites`` the views on
        the way that write the head count (node, size position)."""
        sites: list[tuple[fx.Node, int]] = []
        while node.op != "get_attr":
            if len(node.users) != 1:
                return None
            if node.op == "call_module" and str(node.target) in self.layers:
                value = self.values.get(node)
                last = dim == len(node_shape(node) or ()) - 1
                if isinstance(value, Last) and last and self._constant(node, layers=True):
                    return value.channels, dim, sites
                return None
            step = self._bias_step(node, dim, sites)
            if step is None:
                return None
            node, dim = step
        tensor = attribute(self.module, str(node.target))
        if len(node.users) != 1 or not isinstance(tensor, torch.Tensor) or dim >= tensor.dim():
            return None
        return str(node.target), dim, sites

    def _bias_step(
        self, node: fx.Node, dim: int, sites: list[tuple[fx.Node, int]]
    ) -> tuple[fx.Node, int] | None:
        """The input of ``node`` and its dim that become dim ``dim`` of ``node``'s output."""
        wrapped = self._wrapped_bias_step(node, dim)
        if wrapped is not None:
            return wrapped
        name = rules.op_name(node)
        shape = node_shape(node)
        if name in rules.ELEMENTWISE_OPS and name not in _COPIES and shape is not None:
            return self._bias_operand(node, shape, dim)
        source = node.args[0] if node.args else None
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        if name is None or shape is None or in_shape is None or not isinstance(source, fx.Node):
            return None
        rank, result = len(shape), None
        if name in _COPIES:
            result = dim if in_shape == shape else None
        elif name == "unsqueeze":
            added = rules.normalise_dims(rules.argument(node, 1, "dim"), rank)
            result = None if added is None or added[0] == dim else dim - (added[0] < dim)
        elif name in rules.PERMUTE_OPS:
            order = self._permute_order(node, name, rank)
            result = None if order is None else order[dim]
        elif name in ("view", "reshape"):
            result = same_dim(shape, in_shape, dim)
            sizes = rules.reshape_sizes(node)
            literal = sizes[dim] if len(sizes) == rank else None
            if isinstance(literal, int) and not isinstance(literal, bool) and literal >= 0:
                sites.append((node, dim))
            elif literal != -1:
                return None  # read from a tensor's shape: it would not follow the heads
        elif name == "getitem":  # table[index]: a lookup along dim 0 by a constant index
            index = node.args[1]
            meta = index.meta.get("tensor_meta") if isinstance(index, fx.Node) else None
            if meta is None or meta.dtype not in _INDEX_DTYPES or dim < len(meta.shape):
                return None
            if not self._constant(index):  # type: ignore[arg-type]
                return None
            result = dim - len(meta.shape) + 1
        if result is None or in_shape[result] != shape[dim]:
            return None
        return source, result

    def _wrapped_bias_step(self, node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
        """The step back through a call of a library's bias function that the trace does not
        enter (torchvision's, in ``_window_rules.py``); ``None`` here."""
        return None

    def _bias_operand(
        self, node: fx.Node, shape: tuple[int, ...], dim: int
    ) -> tuple[fx.Node, int] | None:
        """The one operand of an elementwise op that holds the heads along ``dim`` of its
        result (and its dim); every other operand must be a constant that broadcasts there."""
        holding = []
        for operand in node.all_input_nodes:
            operand_shape = node_shape(operand)
            if operand_shape is None:
                return None
            position = dim - (len(shape) - len(operand_shape))
            if position >= 0 and operand_shape[position] != 1:
                if operand_shape[position] != shape[dim]:
                    return None
                holding.append((operand, position))
            elif not self._constant(operand):
                return None
        return holding[0] if len(holding) == 1 else None
