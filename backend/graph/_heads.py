"""Attention heads: a token projection's output viewed as heads, scaled dot-product attention on
them, and the view back, as a ViT's self-attention computes it (timm's ``Attention``)::

    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)  # or (q * scale @ k.mT).softmax(-1) @ v
    x = self.proj(x.transpose(1, 2).reshape(B, N, -1))

A reshape of a token Linear's output (a :class:`Last` value) to ``[..., heads, head_dim]`` (or
``[..., parts, heads, head_dim]`` for a fused projection) makes a :class:`Heads` value: the
projection's output is cut into its parts and pruned in blocks of ``head_dim`` features, one
block per head. Permutes, ``unbind`` of the parts, scaling, softmax over the keys and dropout carry
it; a matmul with the heads as a batch dim, or ``F.scaled_dot_product_attention``, couples the
heads of its operands one to one (head i of q, k and v go together); merging heads and head dim
back into the last dim gives the output projection's input channels, one per head. Anything else
on a :class:`Heads` value keeps its heads whole.

Pruning head i removes its q, k and v rows and the output projection's columns of that head.
Zeroing those rows (or masking the projection's output) makes that head's output exactly zero:
a value that still has its head dim (``inner``) is zero for a removed head (it comes from the
zeroed projection through ops that keep zeros and products with such a value), whatever its
attention weights are, so the pruned, zeroed and masked models agree. Ops that would turn those
zeros into non-zeros (adding a constant, a softmax over head features) keep the heads whole.
A bias per head added to the scores (Swin's relative position bias) and reshapes of the scores
that keep the heads are ``_head_bias.py``'s.

The head count written in the reshapes must follow the pruned model: each literal size there that
counts heads (or the width, heads * head_dim) is recorded as a :class:`HeadSite`, and
``_head_probe.py`` checks, by tracing that module again on its own, that the forward reads it from
an attribute of the module (which surgery then updates); ``-1`` needs nothing; a size read from a
tensor's shape (``C`` of ``B, N, C = x.shape``) keeps the heads whole.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels
from prunetune.backend.graph._head_bias import HeadBiasRules
from prunetune.backend.graph._last import as_value
from prunetune.backend.graph._rules import owner_of, reshape_sizes
from prunetune.backend.graph._state import Heads, HeadSite, Many
from prunetune.backend.graph._trace import node_shape

__all__ = ["HeadRules"]

# Ops that keep zeros zero, on a value whose head dim is still there.
_ZERO_KEEPING = frozenset(
    (
        "mul", "mul_", "imul", "truediv", "div", "div_", "itruediv", "neg", "contiguous",
        "clone", "detach", "to", "float", "half", "double", "bfloat16", "type_as", "cpu",
        "cuda", "requires_grad_", "relu", "relu_", "gelu", "silu", "tanh", "dropout",
    )
)  # fmt: skip
_DIVISIONS = frozenset({"truediv", "div", "div_", "itruediv"})
# Modules that keep zeros zero and the shape (dropout in eval mode is the identity).
_ZERO_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh,
)  # fmt: skip


class HeadRules(HeadBiasRules):
    """The rules for :class:`Heads` values, used by the channel analysis."""

    def _heads_of(self, node: Any) -> Heads | None:
        value = self.values.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, Heads) else None

    def _split_heads(self, node: fx.Node, name: str, what: str) -> Any | None:
        """A ``view``/``reshape`` of a token Linear's output into heads; ``None`` when the
        reshape does not look like one (the reshape rule then applies)."""
        source = node.args[0]
        channels = self.last(source)
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if name not in ("view", "reshape"):
            return None
        if channels is None or in_shape is None or out_shape is None:
            return None
        rank = len(in_shape)
        if len(out_shape) not in (rank + 1, rank + 2) or out_shape[: rank - 1] != in_shape[:-1]:
            return None
        heads, head_dim = out_shape[-2:]
        parts = out_shape[rank - 1] if len(out_shape) == rank + 2 else 1
        sizes = reshape_sizes(node)
        if heads < 2 or parts * heads * head_dim != in_shape[-1] or len(sizes) != len(out_shape):
            return None
        if any(isinstance(size, fx.Node) for size in sizes[rank - 1 :]):
            return self._unknown(
                node,
                f"{what} (splits attention heads with a head count or head dim read from a "
                "tensor's shape, which would not follow pruned heads: use an attribute such as "
                "self.num_heads, a literal head dim, or -1)",
            )
        pieces = [channels] if parts == 1 else self._pieces(channels, [heads * head_dim] * parts)
        if pieces is None:
            return self._unknown(node, f"{what} (splits heads where no layer's output is cut)")
        aligned = [self._in_blocks(piece, head_dim) for piece in pieces]
        if not all(aligned) or any(s.mult != head_dim for piece in pieces for s in piece):
            return self._unknown(node, f"{what} (splits heads across coupled channel blocks)")
        position = len(sizes) - 2
        if sizes[position] != -1:
            for piece in pieces:
                self.head_sites.append(HeadSite(node.name, position, piece, 1, owner_of(node)))
        self.head_slots.update(s.slot for piece in pieces for s in piece)
        if len(out_shape) == rank + 2:
            return Heads(tuple(pieces), rank, rank + 1, rank - 1)
        return Heads(tuple(pieces), rank - 1, rank)

    def _heads_module(self, node: fx.Node, module: nn.Module) -> Any | None:
        """A module call on a :class:`Heads` value (dropout, identity, softmax); ``None`` when
        its input is not one."""
        value = self._heads_of(node.args[0] if node.args else None)
        if value is None:
            return None
        if node_shape(node) != node_shape(node.args[0]):  # type: ignore[arg-type]
            return self._unknown(node, f"module '{node.target}'")
        if isinstance(module, _ZERO_KEEPING_MODULES):
            return value
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            return self._heads_softmax(node, value, module.dim)
        return self._unknown(node, f"module '{node.target}' ({type(module).__name__})")

    def _heads_call(self, node: fx.Node, name: str, what: str) -> Any | None:
        """A function or method call with a :class:`Heads` input; ``None`` when it has none."""
        if not any(self._heads_of(source) for source in node.all_input_nodes):
            return None
        value = self._heads_of(node.args[0] if node.args else None)
        result: Any = None
        if name in ("view", "reshape") and value is not None and value.inner is None:
            result = self._reshape_scores(node, value, what)
        elif name in ("view", "reshape", "flatten") and value is not None:
            result = self._merge_heads(node, name, value, what)
        elif name in rules.PERMUTE_OPS and value is not None:
            order = self._permute_order(node, name, len(node_shape(node) or ()))
            if order is not None:
                result = _moved(value, order)
        elif name in ("unbind", "getitem") and value is not None:
            result = self._pick_part(node, name, value)
        elif name == "matmul":
            result = self._heads_matmul(node, what)
        elif name == "scaled_dot_product_attention":
            result = self._attention(node, what)
        elif name in rules.SOFTMAX_OPS and value is not None:
            result = self._heads_softmax(node, value, rules.argument(node, 1, "dim"))
        elif name in rules.ELEMENTWISE_OPS:
            result = self._heads_elementwise(node, name, what)
        return result if result is not None else self._unknown(node, what)

    def _heads_softmax(self, node: fx.Node, value: Heads, dim: Any) -> Heads | None:
        """A softmax over attention scores (no head dim left), along another dim than heads."""
        rank = len(node_shape(node) or ())
        dims = rules.normalise_dims(dim, rank)
        if value.inner is not None or dims is None or value.head in dims:
            return None
        return value

    def _pick_part(self, node: fx.Node, name: str, value: Heads) -> Any | None:
        """``unbind`` along the parts (q, k, v of a fused projection), or one of them by index."""
        if value.part is None:
            return None
        rank = len(node_shape(node.args[0]) or ())  # type: ignore[arg-type]
        if name == "unbind":
            dim = rules.normalise_dims(rules.argument(node, 1, "dim", 0), rank)
            if dim != (value.part,) or len(value.parts) < 2:
                return None
            return Many(tuple(_without_part(value, index) for index in range(len(value.parts))))
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        leading, picked = items[: value.part], items[value.part : value.part + 1]
        if any(item != slice(None) for item in leading) or len(items) != value.part + 1:
            return None
        if not picked or not isinstance(picked[0], int) or isinstance(picked[0], bool):
            return None
        if not -len(value.parts) <= picked[0] < len(value.parts):
            return None
        return _without_part(value, picked[0] % len(value.parts))

    def _merge_heads(self, node: fx.Node, name: str, value: Heads, what: str) -> Any | None:
        """Heads and head dim merged back into the last dim: the output projection's input."""
        in_shape = node_shape(node.args[0])  # type: ignore[arg-type]
        out_shape = node_shape(node)
        if in_shape is None or out_shape is None or value.part is not None:
            return None
        rank = len(in_shape)
        if (value.head, value.inner) != (rank - 2, rank - 1):
            return None
        if out_shape != (*in_shape[:-2], in_shape[-2] * in_shape[-1]):
            return None
        channels = value.parts[0]
        if name == "flatten":
            start = rules.normalise_dims(rules.argument(node, 1, "start_dim", 0), rank)
            end = rules.normalise_dims(rules.argument(node, 2, "end_dim", -1), rank)
            if start != (rank - 2,) or end != (rank - 1,):
                return None
            return as_value(channels, len(out_shape))
        sizes = reshape_sizes(node)
        width = sizes[-1] if len(sizes) == len(out_shape) else None
        if isinstance(width, fx.Node):
            self._fix(
                channels,
                f"{what} at node '{node.name}' merges the attention heads back to a width read "
                "from a tensor's shape (such as C of B, N, C = x.shape), which keeps the dense "
                "width when heads are pruned: reshape to -1 (or an attribute) to let them be",
            )
        elif width != -1:
            if not isinstance(width, int):
                return None
            self.head_sites.append(
                HeadSite(node.name, len(sizes) - 1, channels, in_shape[-1], owner_of(node))
            )
        return as_value(channels, len(out_shape))

    def _heads_matmul(self, node: fx.Node, what: str) -> Heads | None:
        """``a @ b`` of two :class:`Heads` values with the heads as a batch dim (q @ k^T,
        attention @ v): their heads are coupled one to one."""
        a, b = (self._heads_of(arg) for arg in node.args[:2])
        shapes = [node_shape(arg) for arg in node.args[:2] if isinstance(arg, fx.Node)]
        if a is None or b is None or len(shapes) != 2 or None in shapes:
            return None
        first, second = shapes
        rank = len(first or ())
        if a.part is not None or b.part is not None or len(second or ()) != rank or rank < 3:
            return None
        if (first or ())[:-2] != (second or ())[:-2] or a.head != b.head or a.head >= rank - 2:
            return None
        kept_a = a.inner if a.inner == rank - 2 else None  # b's dims: rank - 2 is contracted
        kept_b = b.inner if b.inner == rank - 1 else None
        if kept_a is not None and kept_b is not None:
            return None  # an outer product of two heads' features
        joined = self._join(a.parts[0], b.parts[0], node, what)
        if not self._head_cost(node, joined):
            return None
        return Heads((joined,), a.head, kept_a if kept_a is not None else kept_b)

    def _attention(self, node: fx.Node, what: str) -> Heads | None:
        """``F.scaled_dot_product_attention(q, k, v, attn_mask)`` on heads: q, k and v coupled
        head by head; a mask may not differ between heads."""
        names = ("query", "key", "value")
        arguments = [rules.argument(node, i, key) for i, key in enumerate(names)]
        values = [self._heads_of(arg) for arg in arguments]
        shape = node_shape(node)
        if shape is None or any(v is None or v.part is not None for v in values):
            return None
        found = [v for v in values if v is not None]
        rank = len(shape)
        if {(v.head, v.inner) for v in found} != {(found[0].head, rank - 1)}:
            return None
        head = found[0].head
        if head >= rank - 2 or rules.argument(node, 7, "enable_gqa", False) is not False:
            return None
        joined = found[0].parts[0]
        for other in found[1:]:
            joined = self._join(joined, other.parts[0], node, what)
        mask = rules.argument(node, 3, "attn_mask")
        if isinstance(mask, fx.Node) and "tensor_meta" in mask.meta:  # else None when run
            mask_shape = node_shape(mask)
            if mask_shape is None:
                return None
            position = head - (rank - len(mask_shape))
            if position >= 0 and mask_shape[position] != 1:  # a bias per head (Swin's)
                scores = Heads((joined,), head, None)
                if not self._scores_bias(node, mask, scores, what):
                    return None
            elif not self._constant(mask):
                return None  # a mask made from the input or a layer's channels
        if not self._head_cost(node, joined):
            return None
        return Heads((joined,), head, rank - 1)

    def _heads_elementwise(self, node: fx.Node, name: str, what: str) -> Heads | None:
        """Scaling, masking and sums of :class:`Heads` values (all the same heads): any op on
        scores; on values with a head dim, only ops that keep zeros zero."""
        out_shape = node_shape(node)
        found = [(s, self._heads_of(s)) for s in node.all_input_nodes]
        heads = [h for _, h in found if h is not None]
        first = heads[0]
        if out_shape is None or any(
            (h.head, h.inner, h.part, len(h.parts)) != (first.head, first.inner, first.part, 1)
            for h in heads
        ):
            return None
        if first.inner is not None and name not in _ZERO_KEEPING:
            return None
        if first.inner is not None and name in _DIVISIONS and self._heads_of(node.args[0]) is None:
            return None  # dividing by a zeroed head does not keep zeros
        joined = first.parts[0]
        for source, value in found:
            shape = node_shape(source)
            if value is not None:
                if shape != out_shape:
                    return None
                joined = self._join(joined, value.parts[0], node, what)
                continue
            if first.inner is not None and name not in ("mul", "mul_", "imul", *_DIVISIONS):
                return None  # adding a tensor to a head's features
            if shape is None:
                return None
            position = first.head - (len(out_shape) - len(shape))
            if position >= 0 and shape[position] != 1:
                if self._scores_bias(node, source, first, what):
                    continue
                return self._unknown(
                    node,
                    f"{what} (combines the attention heads with a tensor of one entry per "
                    "head that is not a bias computed from one parameter or buffer alone, as "
                    "Swin's relative position bias is, so it cannot be pruned with them)",
                )
            if not self._constant(source):
                return None  # made from the input or a layer's channels: they would need coupling
        return Heads((joined,), first.head, first.inner)

    def _head_cost(self, node: fx.Node, channels: Channels) -> bool:
        """Record the MACs ``FlopCounterMode`` counted for ``node`` per head and example;
        ``False`` when they do not split evenly among the heads."""
        macs = int(node.meta.get("flops", 0)) // 2
        heads = sum(segment.size for segment in channels)
        if macs % (self.batch * heads):
            return False
        if macs:
            self.head_costs.append((node, channels, macs // (self.batch * heads)))
        return True


def _moved(value: Heads, order: tuple[int, ...]) -> Heads:
    """``value`` after a permute by ``order`` (new dim i is old dim ``order[i]``)."""

    def where(axis: int | None) -> int | None:
        return None if axis is None else order.index(axis)

    head = order.index(value.head)
    return Heads(value.parts, head, where(value.inner), where(value.part))


def _without_part(value: Heads, index: int) -> Heads:
    """Part ``index`` of a fused projection's heads, its part dim removed."""
    part = value.part if value.part is not None else -1

    def shifted(axis: int | None) -> int | None:
        return None if axis is None else axis - (axis > part)

    head = value.head - (value.head > part)
    return Heads((value.parts[index],), head, shifted(value.inner))
