"""torchvision's Swin window attention with fewer heads than its input has channels / head dim.

torchvision's ``shifted_window_attention`` (``torchvision.models.swin_transformer``, Swin v1 and
v2: Liu et al., ICCV 2021 and CVPR 2022) takes its head dim as ``C // num_heads``, ``C`` the
width of its input, and merges the heads back to ``C`` features: it computes only attentions
whose heads span the whole residual width. A Swin whose heads were pruned keeps its residual
width, so its attention modules get the forward below instead: the same computation, written
here after the paper, with the head dim read from the qkv weight (``3 * heads * head_dim``
rows) and the heads merged to ``heads * head_dim`` features. On an unpruned module it computes
what torchvision's does, to float rounding (tested). Surgery (``prune_model``) gives the
subclasses here to the attention modules whose heads it prunes, so the pruned model still runs
and exports; the state dict is unchanged but for the smaller tensors.

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


def _region_labels(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """``[size]`` region of each row (or column) of a cyclically shifted map: after a shift,
    the last window band holds rows from both ends of the unshifted map; rows from different
    regions may not attend to each other. ``shift == 0``: one region but for the last band,
    which never shares a window with the rest."""
    index = torch.arange(size, device=device)
    return (index >= size - window).long() + (index >= size - shift).long()


def _to_windows(x: Tensor, window: list[int]) -> Tensor:
    """``[B, H, W, C]`` (``H``, ``W`` multiples of the window) -> ``[B * windows, N, C]``, the
    windows in row-major order and ``N = window[0] * window[1]`` tokens each, row-major."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def _from_windows(x: Tensor, batch: int, height: int, width: int, window: list[int]) -> Tensor:
    """The inverse of :func:`_to_windows`: ``[B * windows, N, C]`` -> ``[B, H, W, C]``."""
    x = x.view(batch, height // window[0], width // window[1], window[0], window[1], -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def _shift_mask(
    height: int, width: int, window: list[int], shift: list[int], like: Tensor
) -> Tensor:
    """``[windows, N, N]``: 0 between tokens of one region, -100 across regions (Swin's mask of
    a shifted window, added to the scores before the softmax)."""
    rows = _region_labels(height, window[0], shift[0], like.device)
    cols = _region_labels(width, window[1], shift[1], like.device)
    labels = (rows[:, None] * 3 + cols[None, :]).to(like.dtype)[None, :, :, None]
    labels = _to_windows(labels, window).squeeze(-1)  # [windows, N]
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.zeros_like(differ, dtype=like.dtype).masked_fill(differ, -100.0)


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
    """Multi-head self-attention within (shifted) windows, Swin v1 and v2 (Liu et al., ICCV 2021,
    sec. 3.2, and CVPR 2022, sec. 3.2), with the call and the results of torchvision's
    ``shifted_window_attention`` but the head dim read from the weights: ``qkv_weight.shape[0]
    // (3 * num_heads)``, not ``C // num_heads``, so the heads may span fewer than ``C`` features.

    The map is padded to whole windows (right and bottom), cyclically shifted up-left by
    ``shift_size`` (no shift along a side that fits in one window), cut into windows; each window
    attends within itself, with ``relative_position_bias`` added to the scores and, when
    shifted, a mask that keeps tokens from different regions of the unshifted map apart; then
    the windows are put back, shifted back and the padding cropped. v2 (``logit_scale`` given):
    cosine scores scaled by ``exp(min(logit_scale, log 100))``, and the key bias is zero.

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
    batch, height, width, _ = input.shape
    window = list(window_size)
    padded = F.pad(input, (0, 0, 0, -width % window[1], 0, -height % window[0]))  # right and bottom
    _, padded_h, padded_w, _ = padded.shape
    shift = [s if w < size else 0 for s, w, size in zip(shift_size, window, (padded_h, padded_w))]
    shifted = sum(shift) > 0
    if shifted:
        padded = torch.roll(padded, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = _to_windows(padded, window)  # [B * nW, N, C]
    if logit_scale is not None and qkv_bias is not None:  # v2: no key bias
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat((qkv_bias[:third], torch.zeros_like(qkv_bias[third:-third]),
                              qkv_bias[-third:]))  # fmt: skip
    tokens = windows.shape[1]
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    qkv = F.linear(windows, qkv_weight, qkv_bias).reshape(-1, tokens, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B * nW, heads, N, head_dim]
    if logit_scale is None:
        scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    else:
        scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    scores = scores + relative_position_bias
    if shifted:
        mask = _shift_mask(padded_h, padded_w, window, shift, scores)  # [nW, N, N]
        scores = scores.view(batch, mask.shape[0], num_heads, tokens, tokens) + mask[:, None]
        scores = scores.view(-1, num_heads, tokens, tokens)
    weights = F.dropout(scores.softmax(dim=-1), p=attention_dropout, training=training)
    heads = (weights @ v).transpose(1, 2).reshape(-1, tokens, num_heads * head_dim)
    out = F.dropout(F.linear(heads, proj_weight, proj_bias), p=dropout, training=training)
    out = _from_windows(out, batch, padded_h, padded_w, window)
    if shifted:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


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
