"""Attention heads of ``nn.MultiheadAttention`` pruned by replacing the module.

``nn.MultiheadAttention`` (the multi-head attention of Vaswani et al., "Attention Is All You
Need", NeurIPS 2017) sizes its query, key and value projections (``in_proj_weight``, or
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``) and its output projection by
``embed_dim``, the width it also reads and returns, and its functional forward checks that
``num_heads * head_dim == embed_dim``. Removing heads, as Michel et al. ("Are Sixteen Heads
Really Better than One?", NeurIPS 2019) do, while keeping the embed width therefore cannot be done
by slicing its parameters in place: :func:`prune_attention_heads` builds a
:class:`PrunedMultiheadAttention` holding the kept heads' rows of the projections (and their
biases) and the output projection's columns of those heads, computing what the dense module
computes with every other head's output set to zero.

:class:`MaskedMultiheadAttention` runs a dense module with one gate per head multiplying that
head's output before the output projection (Michel et al.'s head mask): gates of ones and zeros
compute what the pruned module does. :func:`zero_attention_heads` zeroes the removed heads' query,
key and value rows and biases in place: each such head's value rows then are zero, so its output
(attention weights times values) is zero whatever its weights, and the zeroed module computes what
the pruned one does as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MaskedMultiheadAttention",
    "PrunedMultiheadAttention",
    "projection_rows",
    "prune_attention_heads",
    "zero_attention_heads",
]

_PARTS = ("q", "k", "v")


class _AttentionCall(nn.Module):
    """The call of ``nn.MultiheadAttention``, on the weights of :meth:`_weights` with the head
    gates of :meth:`_gate`."""

    def _weights(self) -> nn.Module:
        return self

    def _gate(self) -> Tensor | None:
        return None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` to ``key`` and ``value`` over the heads (each times its gate).

        Args and returns as ``nn.MultiheadAttention.forward``: ``query`` ``[B, L, E]`` (``[L,
        B, E]`` unless ``batch_first``; ``[L, E]`` unbatched), ``key`` and ``value``
        ``[B, S, kdim]`` / ``[B, S, vdim]`` alike; ``key_padding_mask`` ``[B, S]``;
        ``attn_mask`` ``[L, S]`` or ``[B * dense_heads, L, S]`` (boolean: ``True`` may not be
        attended; float: added to the scores). Returns the output, shaped as ``query``, and the
        attention weights ``[B, L, S]`` (``[B, num_heads, L, S]`` without
        ``average_attn_weights``) when ``need_weights``, else ``None``.

        Raises:
            RuntimeError: ``is_causal`` without an ``attn_mask``, as ``nn.MultiheadAttention``.
        """
        return attend(
            self._weights(),
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            gate=self._gate(),
        )


class PrunedMultiheadAttention(_AttentionCall):
    """``nn.MultiheadAttention`` keeping some of its heads, with the same call and return.

    Built by :func:`prune_attention_heads` from a dense module; its parameters have the dense
    module's names (``in_proj_weight`` ``[3 * num_heads * head_dim, embed_dim]`` or
    ``q_proj_weight`` ``[num_heads * head_dim, embed_dim]``, ``k_proj_weight``
    ``[num_heads * head_dim, kdim]``, ``v_proj_weight`` ``[num_heads * head_dim, vdim]``;
    ``in_proj_bias`` ``[3 * num_heads * head_dim]``; ``out_proj`` ``Linear(num_heads * head_dim,
    embed_dim)``), ``num_heads`` being the heads kept. ``kept_heads`` are their indices among the
    dense module's ``dense_heads`` (a 3-D ``attn_mask`` with one ``[L, S]`` mask per head of the
    dense module is cut to them).

    Without ``need_weights`` it computes with ``F.scaled_dot_product_attention``; with them,
    explicitly, as ``F.multi_head_attention_forward`` does. The weights it returns are those of
    the kept heads (averaged over them with ``average_attn_weights``).

    ``_qkv_same_embed_dim`` is ``False`` so that the fused kernels of ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder`` (made for packed weights of ``embed_dim`` rows each) are not
    used with these pruned ones.

    Args:
        embed_dim: the width of the query and of the output, ``E``.
        num_heads: heads kept.
        head_dim: features per head (the dense module's ``embed_dim // num_heads``).
        kdim: the width of the key.
        vdim: the width of the value.
        packed: one ``in_proj_weight`` (the dense module's ``_qkv_same_embed_dim``).
        bias: projections with biases.
        add_bias_kv: a learned key and value appended to the keys and values (``bias_k``,
            ``bias_v``, ``[1, 1, num_heads * head_dim]``).
        add_zero_attn: a zero key and value appended to the keys and values.
        dropout: dropout probability on the attention weights (in training).
        batch_first: inputs and output are ``[batch, sequence, feature]``; otherwise
            ``[sequence, batch, feature]``.
        kept_heads: the kept heads' indices in the dense module.
        dense_heads: the dense module's head count.

    Raises:
        ValueError: ``num_heads`` is not between 1 and ``dense_heads``, or ``kept_heads`` does
            not hold ``num_heads`` distinct heads of the dense module.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        packed: bool = True,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        kept_heads: Sequence[int] | None = None,
        dense_heads: int | None = None,
    ) -> None:
        super().__init__()
        dense_heads = num_heads if dense_heads is None else dense_heads
        kept = tuple(range(num_heads)) if kept_heads is None else tuple(int(h) for h in kept_heads)
        if not 1 <= num_heads <= dense_heads:
            raise ValueError(
                f"num_heads={num_heads} must be between 1 and dense_heads={dense_heads}"
            )
        if len(set(kept)) != num_heads or not all(0 <= h < dense_heads for h in kept):
            raise ValueError(
                f"kept_heads={kept} must be {num_heads} distinct heads in 0..{dense_heads - 1}"
            )
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = False  # no fused fast path (see the class docstring)
        self.packed, self.add_zero_attn = packed, add_zero_attn
        self.dropout, self.batch_first = dropout, batch_first
        self.kept_heads, self.dense_heads = kept, dense_heads
        self.in_proj_weight: nn.Parameter | None = None
        self.q_proj_weight: nn.Parameter | None = None
        self.k_proj_weight: nn.Parameter | None = None
        self.v_proj_weight: nn.Parameter | None = None
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.bias_k = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight):
            if weight is not None:  # replaced by the dense module's rows when built from one
                nn.init.xavier_uniform_(weight)
        if self.v_proj_weight is not None:
            nn.init.xavier_uniform_(self.v_proj_weight)


class MaskedMultiheadAttention(_AttentionCall):
    """A dense ``nn.MultiheadAttention`` (shared, not copied) with one gate per head.

    Each head's output (``[B, L, head_dim]``, attention weights times values) is multiplied by
    its gate before the output projection, Michel et al.'s (2019) head mask; ``gate`` ``None``
    computes the dense module. Call and return as ``nn.MultiheadAttention``.

    Args:
        attention: the dense module.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention
        self.gate: Tensor | None = None

    def _weights(self) -> nn.Module:
        return self.attention

    def _gate(self) -> Tensor | None:
        return self.gate


def attend(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    gate: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention with the weights of ``module`` (an ``nn.MultiheadAttention`` or a
    :class:`PrunedMultiheadAttention`), as ``F.multi_head_attention_forward`` computes it.

    Written here rather than calling ``F.multi_head_attention_forward`` because that function
    requires ``num_heads * head_dim == embed_dim``, which pruned heads break, and takes no
    per-head gate.

    Args:
        module: the weights' holder (``num_heads``, ``head_dim``, ``batch_first``, ``dropout``,
            ``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``,
            ``bias_v``, ``add_zero_attn``, ``out_proj``; a pruned one's ``kept_heads`` and
            ``dense_heads``).
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal: as ``nn.MultiheadAttention.forward``.
        gate: ``[num_heads]``, multiplies each head's output; ``None``: no gate.

    Returns:
        ``(output, weights)`` as ``nn.MultiheadAttention.forward`` (``weights`` ``None``
        without ``need_weights``).

    Raises:
        RuntimeError: ``is_causal`` without an ``attn_mask``.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif getattr(module, "batch_first", False):
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    # [L, B, E] from here on, as F.multi_head_attention_forward
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    batch, length = query.shape[1], query.shape[0]  # symbolic under torch.export
    q_weight, k_weight, v_weight = _projection_weights(module)
    bias = module.in_proj_bias
    biases = tuple(bias.chunk(3)) if bias is not None else (None, None, None)
    q = F.linear(query, q_weight, biases[0])
    k = F.linear(key, k_weight, biases[1])
    v = F.linear(value, v_weight, biases[2])
    mask = _float_mask(attn_mask, q.dtype)
    padding = _float_mask(key_padding_mask, q.dtype)
    causal = is_causal and padding is None and not need_weights
    if causal:
        mask = None
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.repeat(1, batch, 1)])
        v = torch.cat([v, module.bias_v.repeat(1, batch, 1)])
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        padding = F.pad(padding, (0, 1)) if padding is not None else None
    # [B, heads, L or S, head_dim]
    q, k, v = (x.reshape(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
    if module.add_zero_attn:
        zeros = q.new_zeros(batch, heads, 1, head_dim)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        padding = F.pad(padding, (0, 1)) if padding is not None else None
    mask = _per_head(mask, module, batch)
    if padding is not None:
        padding = padding.view(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    dropout = float(module.dropout) if module.training else 0.0
    weights: Tensor | None = None
    if need_weights:
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = torch.matmul(weights, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
    if gate is not None:
        out = out * gate.to(out.dtype).view(1, heads, 1, 1)
    out = module.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim))
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    elif getattr(module, "batch_first", False):
        out = out.transpose(0, 1)
    return out, weights


def _projection_weights(module: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The query, key and value projections' weights of ``module``."""
    if module.in_proj_weight is not None:
        q, k, v = module.in_proj_weight.chunk(3)
        return q, k, v
    return module.q_proj_weight, module.k_proj_weight, module.v_proj_weight


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: not attended) as ``-inf`` where set, ``0`` elsewhere."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf")
    )


def _per_head(mask: Tensor | None, module: Any, batch: int) -> Tensor | None:
    """An ``attn_mask`` as ``[1, 1, L, S]``, or ``[B, heads, L, S]`` from one of ``[B *
    dense_heads, L, S]`` (the kept heads' masks)."""
    if mask is None or mask.dim() == 2:
        return None if mask is None else mask.view(1, 1, *mask.shape)
    dense = int(getattr(module, "dense_heads", module.num_heads))
    mask = mask.view(batch, dense, *mask.shape[1:])
    kept = getattr(module, "kept_heads", None)
    if kept is not None and len(kept) != dense:
        mask = mask[:, list(kept)]
    return mask


def projection_rows(attention: nn.MultiheadAttention) -> Tensor:
    """The query, key and value projections' weights of ``attention`` stacked, ``[3 * E,
    max(E, kdim, vdim)]`` (narrower ones padded with zero columns): one row per output feature,
    as the importance criteria read a layer's weight rows. A copy unless the weights are packed
    (``in_proj_weight`` itself)."""
    if attention.in_proj_weight is not None:
        return attention.in_proj_weight  # type: ignore[no-any-return]
    weights = _projection_weights(attention)
    width = max(int(w.shape[1]) for w in weights)
    return torch.cat([F.pad(w, (0, width - int(w.shape[1]))) for w in weights])


def zero_attention_heads(attention: nn.MultiheadAttention, rows: Tensor) -> None:
    """Zero, in place, rows ``rows`` of the stacked query, key and value projections
    (:func:`projection_rows`' layout) and of ``in_proj_bias``; a head whose value rows are zero
    outputs zero."""
    with torch.no_grad():
        if attention.in_proj_weight is not None:
            attention.in_proj_weight[rows] = 0
        else:
            embed = attention.embed_dim
            for index, weight in enumerate(_projection_weights(attention)):
                local = rows[(rows >= index * embed) & (rows < (index + 1) * embed)]
                weight[local - index * embed] = 0
        if attention.in_proj_bias is not None:
            attention.in_proj_bias[rows] = 0
        if attention.bias_k is not None and attention.bias_v is not None:
            embed = attention.embed_dim
            for index, bias in ((1, attention.bias_k), (2, attention.bias_v)):
                local = rows[(rows >= index * embed) & (rows < (index + 1) * embed)]
                bias[..., local - index * embed] = 0


def prune_attention_heads(
    attention: nn.MultiheadAttention, kept_heads: Sequence[int]
) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` with heads ``kept_heads`` of ``attention``.

    Keeps those heads' rows of the query, key and value projections and of their biases (and of
    ``bias_k``/``bias_v``), and the output projection's columns of those heads; the output
    projection's bias is kept whole. ``attention`` is left untouched.

    Args:
        attention: the dense module (exactly ``nn.MultiheadAttention``).
        kept_heads: indices of the heads to keep, in ``0..num_heads - 1``.

    Returns:
        The smaller module, on ``attention``'s device and dtype, in its training mode.

    Raises:
        ValueError: ``kept_heads`` is empty, repeats a head or names one out of range.
    """
    heads = [int(h) for h in kept_heads]
    dense, head_dim = attention.num_heads, attention.head_dim
    embed = attention.embed_dim
    features = (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).flatten()
    stacked = torch.cat([features + part * embed for part in range(len(_PARTS))])
    pruned = PrunedMultiheadAttention(
        embed,
        len(heads),
        head_dim,
        kdim=attention.kdim,
        vdim=attention.vdim,
        packed=attention.in_proj_weight is not None,
        bias=attention.in_proj_bias is not None,
        add_bias_kv=attention.bias_k is not None,
        add_zero_attn=attention.add_zero_attn,
        dropout=attention.dropout,
        batch_first=attention.batch_first,
        kept_heads=heads,
        dense_heads=dense,
    )
    reference = attention.out_proj.weight
    pruned.to(device=reference.device, dtype=reference.dtype)

    def keep(name: str, value: Tensor) -> None:
        old = getattr(attention, name)
        setattr(pruned, name, nn.Parameter(value.detach().clone(), old.requires_grad))

    if attention.in_proj_weight is not None:
        keep("in_proj_weight", attention.in_proj_weight[stacked])
    else:
        for part in _PARTS:
            keep(f"{part}_proj_weight", getattr(attention, f"{part}_proj_weight")[features])
    if attention.in_proj_bias is not None:
        keep("in_proj_bias", attention.in_proj_bias[stacked])
    if attention.bias_k is not None and attention.bias_v is not None:
        keep("bias_k", attention.bias_k[..., features])
        keep("bias_v", attention.bias_v[..., features])
    out = attention.out_proj
    pruned.out_proj.weight = nn.Parameter(
        out.weight.detach()[:, features].clone(), out.weight.requires_grad
    )
    if out.bias is not None:
        pruned.out_proj.bias = nn.Parameter(out.bias.detach().clone(), out.bias.requires_grad)
    pruned.train(attention.training)
    return pruned
