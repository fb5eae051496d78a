"""Small test architectures built on ``nn.MultiheadAttention``: ``nn.TransformerEncoder`` stacks
(batch first and sequence first, with a causal mask), a cross-attention block whose key and value
have their own widths, and a ``nn.TransformerDecoderLayer``; their heads are pruned."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DIM = 32
HEADS = 4


class _Tokens(nn.Module):
    """A patch embedding: ``[B, 3, 32, 32]`` to ``[B, 16, DIM]`` tokens plus positions."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, 8, stride=8)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, DIM) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed


class EncoderStackNet(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` (batch first, post-norm) in an
    ``nn.TransformerEncoder``, a causal ``mask`` passed through, mean-pooled tokens."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.tokens = _Tokens()
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(16))
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.encoder(self.tokens(x), mask=self.causal, is_causal=True)
        return self.head(tokens.mean(1))


class SequenceFirstEncoderNet(nn.Module):
    """Sequence-first ``nn.TransformerEncoderLayer`` blocks (``batch_first=False``, pre-norm,
    GELU): tokens ``[16, B, DIM]``, a boolean key padding mask passed through."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.tokens = _Tokens()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                DIM, HEADS, 2 * DIM, dropout=0.0, activation="gelu", norm_first=True
            )
            for _ in range(2)
        )
        padding = torch.zeros(1, 16, dtype=torch.bool)
        padding[:, -1] = True  # the last token is never attended to
        self.register_buffer("padding", padding)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.tokens(x).transpose(0, 1)
        padding = torch.zeros_like(tokens[..., 0].t(), dtype=torch.bool) | self.padding  # [B, 16]
        for block in self.blocks:
            tokens = block(tokens, src_key_padding_mask=padding)
        return self.head(tokens.mean(0))


class CrossAttentionNet(nn.Module):
    """Patch tokens attend to a coarser memory whose key and value have their own widths
    (``kdim``, ``vdim``: separate q/k/v weights, no biases), weights requested but unused."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.tokens = _Tokens()
        self.memory = nn.Conv2d(3, 16, 16, stride=16)
        self.value = nn.Linear(16, 24)
        self.attention = nn.MultiheadAttention(
            DIM, HEADS, kdim=16, vdim=24, bias=False, batch_first=True
        )
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        query = self.tokens(x)
        memory = self.memory(x).flatten(2).transpose(1, 2)
        attended, _ = self.attention(query, memory, self.value(memory))
        return self.head(self.norm(query + attended).mean(1))


class DecoderNet(nn.Module):
    """One sequence-first ``nn.TransformerDecoderLayer``: self-attention over patch tokens,
    cross-attention to a memory of coarser tokens."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.tokens = _Tokens()
        self.memory = nn.Conv2d(3, DIM, 16, stride=16)
        self.decoder = nn.TransformerDecoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        target = self.tokens(x).transpose(0, 1)
        memory = self.memory(x).flatten(2).permute(2, 0, 1)
        return self.head(self.decoder(target, memory).mean(0))


MHA_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mha_encoder_stack": EncoderStackNet,
    "mha_sequence_first": SequenceFirstEncoderNet,
    "mha_cross_attention": CrossAttentionNet,
    "mha_decoder": DecoderNet,
}
"""Architectures whose ``nn.MultiheadAttention`` heads are pruned."""
