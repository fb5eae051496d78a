"""Test architectures whose blocks take statistics across their channels to rescale them:
ConvNeXt-V2's global response norm (channels-last and channels-first) and an RMS norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GlobalResponseNorm(nn.Module):
    """GRN as ConvNeXt V2 (Woo et al., 2023) and timm's ``GlobalResponseNorm`` write it:
    ``x + addcmul(beta, gamma, x * Gx / (mean_c Gx + eps))``, ``Gx`` the L2 norm over the
    positions; ``[N, H, W, C]`` when ``channels_last``, else ``[N, C, H, W]``."""

    def __init__(self, dim: int, channels_last: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.spatial_dim = (1, 2) if channels_last else (2, 3)
        self.channel_dim = -1 if channels_last else 1
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.5, dim))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.3, dim))

    def forward(self, x: Tensor) -> Tensor:
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        return x + torch.addcmul(
            self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n
        )


class ConvNeXtV2StyleNet(nn.Module):
    """A patchify stem, a ConvNeXt V2 block on the channels-last map (depthwise conv,
    LayerNorm, Linear to 4x, GELU, GRN, Linear, residual), one on the channels-first map as
    timm's ``conv_mlp`` writes it (1x1 convs, GRN over dim 1), then a 1x1 conv whose output is
    RMS-normalised across its channels (``x * rsqrt(mean_c x^2 + eps) * weight``) before the
    classifier.

    The pruned model matches the zeroed one up to ``eps`` relative to the statistic; the RMS
    norm's statistic is per position, and at one kept channel it can be as small as a single
    activation squared, so its ``eps`` is 1e-12 (as ``F.normalize`` takes) to keep that within
    the tests' tolerance."""

    def __init__(self, num_classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.grn = GlobalResponseNorm(4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.conv1 = nn.Conv2d(dim, 3 * dim, 1)
        self.grn2 = GlobalResponseNorm(3 * dim, channels_last=False)
        self.conv2 = nn.Conv2d(3 * dim, dim, 1)
        self.head = nn.Conv2d(dim, 24, 1)
        self.rms_weight = nn.Parameter(torch.linspace(0.5, 2.0, 24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.fc2(self.grn(F.gelu(self.fc1(y))))
        x = x + y.permute(0, 3, 1, 2)
        x = x + self.conv2(self.grn2(F.gelu(self.conv1(x))))
        h = self.head(x)
        h = (
            h
            * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-12)
            * self.rms_weight.view(1, -1, 1, 1)
        )
        return self.fc(F.gelu(h).mean((2, 3)))
