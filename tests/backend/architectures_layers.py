"""Test architectures for the layer kinds: transposed, 1-d and 3-d convs, token and
channels-last Linears, layers subclassed from torch's or written functionally, weight
standardisation, blocks whose FLOPs depend on where they run (shared heads, auxiliary heads,
attention on activations). Registered in ``architectures.ARCHITECTURES``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(
    in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class TransposedConvNet(nn.Module):
    """A decoder-style conv -> conv-transpose (upsampling) -> conv, with a BN after each."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.down = conv_bn(3, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2, bias=False)
        self.up_bn = nn.BatchNorm2d(12)
        self.conv = conv_bn(12, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.up_bn(self.up(self.down(x))))
        return self.fc(self.conv(x).mean((2, 3)))


class NonLocalNet(nn.Module):
    """A non-local (self-attention) block on a conv map: einsum, matmul and bmm on activations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.theta = nn.Conv2d(16, 8, 1)
        self.phi = nn.Conv2d(16, 8, 1)
        self.g = nn.Conv2d(16, 8, 1)
        self.out = nn.Conv2d(8, 16, 1, bias=False)
        self.out_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [n, 8, hw]
        phi = self.phi(x).flatten(2)
        g = self.g(x).flatten(2)
        attention = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi), dim=-1)
        y = torch.bmm(g, attention.transpose(1, 2))  # [n, 8, hw]
        y = torch.matmul(y, torch.eye(h * w)).view(n, 8, h, w)
        x = F.relu(x + self.out_bn(self.out(y)))
        return self.fc(x.mean((2, 3)))


class TokenMLPNet(nn.Module):
    """A tiny vision transformer block: patch conv, tokens [batch, tokens, channels], LayerNorm,
    an MLP of two Linears over the channel (last) dim with a residual, and a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.fc2(F.gelu(self.fc1(self.norm(tokens))))
        return self.head(tokens.mean(1))


class ChannelsLastLinearNet(nn.Module):
    """A Linear applied to a channels-last map (ConvNeXt's pointwise layers), between convs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.pointwise = nn.Linear(16, 24)
        self.conv = conv_bn(24, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pointwise(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.conv(x).mean((2, 3)))


class PyramidHeadNet(nn.Module):
    """One head module shared across two pyramid levels of different resolution."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.level1 = conv_bn(3, 16)
        self.level2 = conv_bn(16, 16, stride=2)
        self.head = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        p1 = self.level1(x)
        p2 = self.level2(p1)
        pooled = self.head(p1).mean((2, 3)) + self.head(p2).mean((2, 3))
        return self.fc(pooled)


class AuxHeadNet(nn.Module):
    """An auxiliary classifier and a drop-path that run only in training mode."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = conv_bn(16, 16)
        self.aux = nn.Sequential(nn.Flatten(), nn.Linear(16 * 32 * 32, num_classes))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        branch = self.block(x)
        if self.training:
            keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.1).to(x.dtype)
            branch = branch * keep
        x = x + branch
        logits = self.fc(x.mean((2, 3)))
        if self.training:
            return logits + self.aux(x)
        return logits


class Conv3dNet(nn.Module):
    """Video-style Conv3d layers with BatchNorm3d, on a [batch, 3, time, H, W] clip made from the
    image by repeating it twice along a new time dim."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(8)
        self.conv2 = nn.Conv3d(8, 12, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        clip = x.unsqueeze(2).expand(-1, -1, 2, -1, -1)
        x = F.relu(self.bn1(self.conv1(clip)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3, 4)))


class SamePadConv2d(nn.Conv2d):
    """A Conv2d subclass that pads itself "same" from the input size (TF-style), as model
    libraries write it: Python shape logic in ``forward``."""

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h = max(
            (-(-height // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - height, 0
        )
        pad_w = max(
            (-(-width // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - width, 0
        )
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass that applies its activation (timm's BatchNormAct2d)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class PlainLinear(nn.Linear):
    """A Linear subclass with its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class SubclassedLayersNet(nn.Module):
    """A network built only from subclasses of Conv2d, BatchNorm2d and Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = SamePadConv2d(3, 16, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(16)
        self.conv2 = SamePadConv2d(16, 16, 3, groups=16, bias=False)
        self.bn2 = BatchNormAct2d(16)
        self.conv3 = SamePadConv2d(16, 24, 1)
        self.bn3 = BatchNormAct2d(24)
        self.fc = PlainLinear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x)) + x
        return self.fc(self.bn3(self.conv3(x)).mean((2, 3)))


class DictOutputNet(nn.Module):
    """A segmentation-style model returning ``{"out": map, "aux": logits}``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 16), conv_bn(16, 24, stride=2))
        self.out = nn.Conv2d(24, num_classes, 1)
        self.aux = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        return {"out": self.out(features), "aux": self.aux(features.mean((2, 3)))}


class _FunctionalConv(nn.Module):
    """A conv written as ``F.conv2d(x, self.weight, self.bias)`` in a plain module."""

    def __init__(self, inp: int, oup: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(oup, inp, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, oup))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)


class _FunctionalLinear(nn.Module):
    """A linear layer written as ``F.linear(x, self.weight)`` in a plain module."""

    def __init__(self, inp: int, oup: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(oup, inp) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class FunctionalWeightNet(nn.Module):
    """Layers written as functions of parameters in plain modules (``F.conv2d(x, self.weight,
    self.bias)``, ``F.linear``), pruned like the built-ins; and one reading a root parameter
    under another name (kept whole, counted)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = _FunctionalConv(16, 16)
        self.kernel = nn.Parameter(torch.randn(16, 16, 1, 1) * 0.1)
        self.conv = conv_bn(16, 24)
        self.hidden = _FunctionalLinear(24, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.block(self.stem(x)))
        x = F.relu(F.conv2d(x, self.kernel))
        return self.fc(F.relu(self.hidden(self.conv(x).mean((2, 3)))))


class Conv1dNet(nn.Module):
    """Sequence-style Conv1d layers with BatchNorm1d on the flattened map ``[batch, C, H*W]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv1 = nn.Conv1d(8, 16, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 24, 3, stride=2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).flatten(2)
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(2))


class StdConv2d(nn.Conv2d):
    """A Conv2d subclass that standardises its weight per output channel and scales it by a
    learned gain of one value per output channel (timm's ``ScaledStdConv2d``, NFNets)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        gain = self.gain.view(-1)
        weight = F.batch_norm(flat, None, None, gain, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(
            x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding,
            self.dilation, self.groups,
        )  # fmt: skip


class GroupNormAct(nn.GroupNorm):
    """A GroupNorm subclass that applies its activation (timm's ``GroupNormAct``)."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__(groups, channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class BiTStyleNet(nn.Module):
    """Weight-standardised convs and GroupNorm-with-activation subclasses, as in BiT
    (ResNetV2): whole networks of such layers must prune like plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 32, 3, padding=1)
        self.norm1 = GroupNormAct(8, 32)
        self.conv = StdConv2d(32, 32, 3, padding=1)
        self.norm2 = GroupNormAct(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.stem(x))
        x = x + self.norm2(self.conv(x))
        return self.head(x.mean((2, 3)))
