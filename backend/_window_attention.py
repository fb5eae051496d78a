"""torchvision's Swin window attention with fewer heads than its input has channels / head dim.

torchvision's ``shifted_window_attention`` (``torchvision.models.swin_transformer``, Swin v1 and
v2: Liu et al., ICCV 2021 and CVPR 2022) takes its head dim as ``C // num_heads``, ``C`` the
width of its input, and merges the heads back to ``C`` features: it computes only attentions
whose heads span the whole residual width. A Swin whose heads were pruned keeps its residual
width, so its attention modules get the forward below instead: the same computation, op for op,
with the head dim read from the qkv weight (``3 * heads * head_dim`` rows) and the heads merged
to ``heads * head_dim`` features. On an unpruned module it computes what torchvision's does,
bit for bit. Surgery (``prune_model``) gives the subclasses here to the attention modules whose
heads it prunes, so the pruned model still runs and exports; the state dict is unchanged but for
the smaller tensors.

This module imports torchvision: import it only where torchvision is installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_transformer as tv

__all__ = [
    "ATTENTION_FUNCTIONS",
    "BIAS_FUNCTION",
    "PRUNED_CLASSES",
    "PrunedShiftedWindowAttention",
    "PrunedShiftedWindowAttentionV2",
    "follow_pruned_heads",
    "shifted_window_attention",
]


def shifted_window_attention(
    input: Tensor,  # torchvision's argument names, so calls read the same
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """Window multi-head self-attention, torchvision's ``shifted_window_attention`` (whose
    code this follows line by line) with the head dim ``qkv_weight.shape[0] // (3 *
    num_heads)`` instead of ``C // num_heads``.

    Args:
        input: ``[B, H, W, C]``.
        qkv_weight: ``[3 * num_heads * head_dim, C]``.
        proj_weight: ``[C, num_heads * head_dim]``.
        relative_position_bias: ``[1, num_heads, N, N]``, ``N`` the tokens of a window.
        window_size: window height and width.
        num_heads: attention heads.
        shift_size: cyclic shift of the windows (0 where the map fits in one window).
        attention_dropout: dropout of the attention weights.
        dropout: dropout of the output.
        qkv_bias: ``[3 * num_heads * head_dim]``, or ``None``.
        proj_bias: ``[C]``, or ``None``.
        logit_scale: Swin v2's cosine attention scale, ``[num_heads, 1, 1]``; ``None`` for v1.
        training: whether dropout is applied.

    Returns:
        ``[B, H, W, C]``.
    """
    B, H, W, C = input.shape
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(
        B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * head_dim**-0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(
            num_windows, window_size[0] * window_size[1]
        )
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * head_dim)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(
        B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("shifted_window_attention")  # traced as one call, as torchvision's is


def _forward(module: tv.ShiftedWindowAttention, x: Tensor, logit_scale: Tensor | None) -> Tensor:
    """torchvision's forward of a window attention module, calling the function above."""
    return shifted_window_attention(
        x,
        module.qkv.weight,
        module.proj.weight,
        module.get_relative_position_bias(),
        module.window_size,
        module.num_heads,
        shift_size=module.shift_size,
        attention_dropout=module.attention_dropout,
        dropout=module.dropout,
        qkv_bias=module.qkv.bias,
        proj_bias=module.proj.bias,
        logit_scale=logit_scale,
        training=module.training,
    )


class PrunedShiftedWindowAttention(tv.ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` with heads pruned (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``, as torchvision's forward."""
        return _forward(self, x, None)


class PrunedShiftedWindowAttentionV2(tv.ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` with heads pruned (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``, as torchvision's forward."""
        return _forward(self, x, self.logit_scale)


_PRUNED: dict[type[nn.Module], type[nn.Module]] = {  # each class -> its forward with fewer heads
    tv.ShiftedWindowAttention: PrunedShiftedWindowAttention,
    tv.ShiftedWindowAttentionV2: PrunedShiftedWindowAttentionV2,
    PrunedShiftedWindowAttention: PrunedShiftedWindowAttention,
    PrunedShiftedWindowAttentionV2: PrunedShiftedWindowAttentionV2,
}
PRUNED_CLASSES = frozenset(_PRUNED)
"""The attention modules whose heads prune: torchvision's and the two above."""
ATTENTION_FUNCTIONS = (tv.shifted_window_attention, shifted_window_attention)
"""The window attention functions whose calls prune heads: torchvision's and the one above."""
BIAS_FUNCTION = tv._get_relative_position_bias
"""torchvision's relative position bias lookup: ``table[index].view(N, N, -1).permute(2, 0, 1)
.contiguous().unsqueeze(0)``, from ``[entries, heads]`` to ``[1, heads, N, N]``."""


def follow_pruned_heads(module: nn.Module) -> None:
    """Give ``module``, one of torchvision's window attentions whose heads were pruned (its
    weights already smaller, ``num_heads`` set), the forward above, and its qkv and proj
    Linears their new sizes; nothing for any other module or one whose heads are all kept."""
    pruned = _PRUNED.get(type(module))
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if pruned is None or not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return
    qkv.out_features, qkv.in_features = qkv.weight.shape
    proj.out_features, proj.in_features = proj.weight.shape
    if proj.in_features != proj.out_features:
        module.__class__ = pruned
