"""Small ViT-style test architectures whose self-attention heads can be pruned (and a few whose
heads cannot), written in the style of timm's ``Attention`` without depending on timm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FusedQkvAttention(nn.Module):
    """timm's ``Attention``: one fused qkv Linear, ``num_heads``/``head_dim``/``attn_dim``
    attributes read in the reshapes, explicit ``softmax(q * scale @ k^T) @ v``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


class SeparateQkvAttention(nn.Module):
    """Separate q, k and v Linears, heads viewed with ``-1`` and merged back with ``-1``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) / self.head_dim**0.5).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, -1))


class SdpaAttention(nn.Module):
    """Fused qkv through ``F.scaled_dot_product_attention``, ``qkv[0]`` indexing, flatten back."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).flatten(2))


class InputWidthAttention(nn.Module):
    """Merges the heads back with ``reshape(B, N, C)``, ``C`` read from the input's shape: the
    width would not follow pruned heads, so they are kept whole."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class HeadBiasAttention(FusedQkvAttention):
    """Adds a learned bias per head to the attention scores, ``nn.Parameter([heads, N, N])`` on
    8 x 8 tokens: pruned with the heads."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.bias = nn.Parameter(torch.randn(num_heads, 64, 64) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale + self.bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class WindowAttention(nn.Module):
    """timm's ``WindowAttention`` (Swin): fused qkv, scores plus a relative position bias looked
    up in a ``[(2 * window - 1) ** 2, heads]`` table by an index buffer, and, for shifted
    windows, a mask of ``[windows, N, N]`` added with the windows split out of the batch."""

    def __init__(self, dim: int, num_heads: int, window: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_area = window * window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, num_heads) * 0.5
        )
        steps = torch.arange(window)
        coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij"))
        relative = (coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]).permute(1, 2, 0)
        index = (relative[..., 0] + window - 1) * (2 * window - 1) + relative[..., 1] + window - 1
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def _get_rel_pos_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.softmax(attn) @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj(x)


class SwinStyleNet(nn.Module):
    """Two Swin blocks (Liu et al., ICCV 2021) on 8 x 8 tokens of 48 channels in windows of
    4 x 4: the first in place, the second shifted by 2 with the shifted-window mask (a buffer),
    each with 4 heads of 12 and an MLP to 96, then mean pooling and a classifier."""

    def __init__(self, num_classes: int = 10, dim: int = 48, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.attns = nn.ModuleList(WindowAttention(dim, 4, window) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(2))
        self.head = nn.Linear(dim, num_classes)
        regions = torch.zeros(8, 8)
        for i, rows in enumerate((slice(0, -window), slice(-window, -2), slice(-2, None))):
            for j, cols in enumerate((slice(0, -window), slice(-window, -2), slice(-2, None))):
                regions[rows, cols] = 3 * i + j
        windows = self._partition(regions[None, :, :, None]).squeeze(-1)  # [windows, N]
        mask = windows.unsqueeze(1) - windows.unsqueeze(2)
        self.register_buffer("attn_mask", mask.masked_fill(mask != 0, -100.0), persistent=False)

    def _partition(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` -> ``[B * windows, window * window, C]``."""
        B, H, W, C = x.shape
        w = self.window
        x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, w * w, C)

    def _reverse(self, windows: Tensor, B: int) -> Tensor:
        w = self.window
        x = windows.view(B, 8 // w, 8 // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, 8, 8, -1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).permute(0, 2, 3, 1)  # [B, 8, 8, C]
        B = x.shape[0]
        for index, (attn, fc1, fc2) in enumerate(zip(self.attns, self.fc1, self.fc2)):
            shift = 2 * index
            shifted = torch.roll(self.norms[2 * index](x), (-shift, -shift), (1, 2))
            mask = self.attn_mask if shift else None
            out = self._reverse(attn(self._partition(shifted), mask), B)
            x = x + torch.roll(out, (shift, shift), (1, 2))
            x = x + fc2(F.gelu(fc1(self.norms[2 * index + 1](x))))
        return self.head(x.mean((1, 2)))


class LiteralHeadsAttention(SeparateQkvAttention):
    """Writes its head count as a literal in the forward: kept whole."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, 4, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, N, -1))


class TinyViT(nn.Module):
    """Patch conv to 48 channels (8 x 8 tokens of 4 x 4 pixels), one pre-norm transformer block
    (attention with 4 heads of 12, MLP to 96) with residuals, mean pooling and a classifier."""

    def __init__(self, attention: type[nn.Module], num_classes: int = 10, dim: int = 48) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, 4)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class FusedQkvViT(TinyViT):
    """:class:`TinyViT` with timm-style fused-qkv attention."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(FusedQkvAttention, num_classes)


class SeparateQkvViT(TinyViT):
    """:class:`TinyViT` with separate q, k and v Linears."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(SeparateQkvAttention, num_classes)


class SdpaViT(TinyViT):
    """:class:`TinyViT` with ``F.scaled_dot_product_attention``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(SdpaAttention, num_classes)


class ShapeLogicViT(TinyViT):
    """:class:`TinyViT` that pads odd image sizes in Python (traced on the example input only,
    as MobileViT is): its attention module alone traces symbolically, so its heads still prune."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(FusedQkvAttention, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 4:
            x = F.pad(x, (0, 4 - x.shape[-1] % 4, 0, 4 - x.shape[-2] % 4))
        return super().forward(x)


class InputWidthViT(TinyViT):
    """:class:`TinyViT` whose attention merges heads back to the input's width (kept whole)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(InputWidthAttention, num_classes)


class HeadBiasViT(TinyViT):
    """:class:`TinyViT` whose attention adds a bias per head to its scores (pruned with them)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(HeadBiasAttention, num_classes)


class LiteralHeadsViT(TinyViT):
    """:class:`TinyViT` whose attention hard-codes its head count (kept whole)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(LiteralHeadsAttention, num_classes)


class CachedPositionAttention(nn.Module):
    """ConViT's gated positional self-attention: its forward rebuilds a buffer of relative patch
    offsets when the token count changes (``self.rel_indices = ...``), typed like the qk weight,
    which neither the symbolic nor the concrete tracer follows, so it is kept as one call."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("rel_indices", torch.zeros(1, 1, 1, 3), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        if self.rel_indices.shape[1] != N:
            self.rel_indices = self._offsets(N)
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = ((qk[0] @ qk[1].transpose(-2, -1)) * self.scale).softmax(-1)
        positions = self.pos_proj(self.rel_indices.expand(B, -1, -1, -1)).permute(0, 3, 1, 2)
        attn = 0.5 * (scores + positions.softmax(-1))
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    def _offsets(self, tokens: int) -> Tensor:
        """``[1, tokens, tokens, 3]``: x and y offset between two patches, squared distance."""
        side = int(tokens**0.5)
        steps = torch.arange(side, dtype=torch.float32)
        offset = steps.view(1, -1) - steps.view(-1, 1)
        dx = offset.repeat(side, side)
        dy = offset.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
        offsets = torch.stack((dx, dy, dx**2 + dy**2), dim=-1).unsqueeze(0)
        return offsets.to(device=self.qk.weight.device, dtype=self.qk.weight.dtype)


class CachedPositionViT(TinyViT):
    """:class:`TinyViT` with ConViT-style attention that cannot be traced (kept as one call; the
    MLP still prunes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(CachedPositionAttention, num_classes)


class BorrowedWidthNet(nn.Module):
    """NextViT's token mixer after a conv stage: conv and BN (prunable on their own), the map
    read as tokens, then :class:`InputWidthAttention`, whose ``reshape(B, N, C)`` takes ``C``
    from its input, so the conv's width and the attention's are tied: both kept whole. A
    classifier on the mean token; 32 x 32 input, 8 x 8 tokens."""

    def __init__(self, num_classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, dim, 4, stride=4)
        self.bn = nn.BatchNorm2d(dim)
        self.attn = InputWidthAttention(dim, 4)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(F.relu(self.stem(x))))
        tokens = self.attn(x.flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


class _TokenStage(nn.Module):
    """PiT's transformer stage: takes and returns the tuple ``(tokens, class_tokens)``, joins
    them for one pre-norm attention block and splits them again."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = FusedQkvAttention(dim, num_heads)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, cls_tokens = inputs
        tokens = torch.cat((cls_tokens, x), dim=1)
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens[:, 1:], tokens[:, :1]


class _ClassAttention(nn.Module):
    """CaiT's class attention: the class token (a separate input) attends to itself and every
    patch token; only the class token is updated."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cls_tokens: Tensor) -> Tensor:
        u = self.norm(torch.cat((cls_tokens, x), dim=1))
        k, v = self.kv(u).chunk(2, dim=-1)
        attn = (self.q(u[:, :1]) @ k.transpose(-2, -1) * k.shape[-1] ** -0.5).softmax(-1)
        return cls_tokens + self.proj(attn @ v)


class ClassTokenViT(nn.Module):
    """PiT and CaiT's class-token plumbing: a learnt class token expanded to the batch and a
    position embedding, both handed to submodules as inputs (a tuple into a PiT stage, a second
    argument to CaiT's class attention); between them PiT's pooling, a strided depthwise conv
    on the token map with a Linear for the class token. 32 x 32 input, 8 x 8 then 4 x 4 tokens.
    """

    def __init__(self, num_classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, 8, 8) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.stage1 = _TokenStage(dim, 4)
        self.pool = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, groups=dim)
        self.pool_cls = nn.Linear(dim, 2 * dim)
        self.stage2 = _TokenStage(2 * dim, 4)
        self.class_attn = _ClassAttention(2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x) + self.pos_embed
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x, cls_tokens = self.stage1((x.flatten(2).transpose(1, 2), cls_tokens))
        x = x.transpose(1, 2).unflatten(2, (8, 8))
        x, cls_tokens = self.pool(x).flatten(2).transpose(1, 2), self.pool_cls(cls_tokens)
        x, cls_tokens = self.stage2((x, cls_tokens))
        cls_tokens = self.class_attn(x, cls_tokens)
        return self.head(self.norm(cls_tokens[:, 0]))


ATTENTION_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "vit_fused_qkv": FusedQkvViT,
    "vit_separate_qkv": SeparateQkvViT,
    "vit_sdpa": SdpaViT,
    "vit_shape_logic": ShapeLogicViT,
    "vit_input_width": InputWidthViT,
    "vit_literal_heads": LiteralHeadsViT,
    "vit_head_bias": HeadBiasViT,
    "vit_class_token": ClassTokenViT,
    "vit_cached_positions": CachedPositionViT,
    "vit_borrowed_width": BorrowedWidthNet,
    "swin_style": SwinStyleNet,
}
"""ViT-style architectures: heads pruned or kept whole with a reason."""
