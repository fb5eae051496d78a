"""Test architectures that split their channels at sizes kept in a list attribute, as MixConv
(Tan & Le, BMVC 2019) does in timm's ``MixedConv2d``, written out without depending on timm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _split_channels(channels: int, pieces: int) -> list[int]:
    """timm's split of ``channels`` into ``pieces``: equal, the first taking the remainder."""
    sizes = [channels // pieces] * pieces
    sizes[0] += channels - sum(sizes)
    return sizes


class MixedConv(nn.Module):
    """timm's ``MixedConv2d``: the input split at ``self.splits``, one conv per piece with its
    own kernel size (depthwise, or a plain conv from the piece to its share of the outputs),
    the outputs concatenated. ``as_tuple`` keeps the sizes in a tuple instead of a list."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernels: list[int],
        depthwise: bool = False,
        as_tuple: bool = False,
    ) -> None:
        super().__init__()
        in_splits = _split_channels(in_channels, len(kernels))
        out_splits = _split_channels(out_channels, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, padding=k // 2, groups=i if depthwise else 1, bias=False)
            for i, o, k in zip(in_splits, out_splits, kernels, strict=True)
        )
        self.splits: list[int] | tuple[int, ...] = tuple(in_splits) if as_tuple else in_splits

    def forward(self, x: Tensor) -> Tensor:
        pieces = torch.split(x, self.splits, 1)
        return torch.cat([conv(pieces[i]) for i, conv in enumerate(self.convs)], 1)


class MixConvNet(nn.Module):
    """A MixNet block (inverted residual): a pointwise MixedConv of two plain 1x1 convs (16 ->
    26 channels, pieces of 8 and 8 in, 13 and 13 out), a depthwise MixedConv with 3x3, 5x5 and
    7x7 kernels over pieces of 10, 8 and 8 (not where the pointwise pieces end, so their outputs
    are cut too), a projection back added to the stem; then a depthwise MixedConv whose sizes
    are a tuple."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = MixedConv(16, 26, [1, 1])
        self.bn1 = nn.BatchNorm2d(26)
        self.dw = MixedConv(26, 26, [3, 5, 7], depthwise=True)
        self.bn2 = nn.BatchNorm2d(26)
        self.pwl = nn.Conv2d(26, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = MixedConv(16, 16, [3, 5], depthwise=True, as_tuple=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.pw(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.pwl(y))
        return self.fc(self.head(x).mean((2, 3)))


class LiteralMixConvNet(nn.Module):
    """A MixConv whose forward splits at sizes written in the code, though the module keeps
    the same sizes in an attribute it never reads: the pieces are kept whole."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.splits = [8, 4]
        self.small = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.large = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(self.stem(x), [8, 4], 1)
        return self.fc(torch.cat([self.small(a), self.large(b)], 1).mean((2, 3)))


class _CheckedMixedConv(MixedConv):
    """A MixedConv that checks its input's width against its sizes in Python, so its forward
    traces only on a real input (the model then traces concretely)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != sum(self.splits):
            raise ValueError(f"expected {sum(self.splits)} channels, got {x.shape[1]}")
        return super().forward(x)


class CheckedMixConvNet(nn.Module):
    """A depthwise MixConv whose forward checks its input width in Python: where its split
    sizes come from cannot be checked by a symbolic trace, so its pieces are kept whole."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = _CheckedMixedConv(12, 12, [3, 5], depthwise=True)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dw(self.stem(x)).mean((2, 3)))
