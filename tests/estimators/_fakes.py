"""Hand-made channel graphs (the records a trace would give) and models to check them against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunetune.backend.graph import (
    ChannelGroup,
    ChannelMember,
    ChannelSegment,
    LayerInfo,
    NormInfo,
)


@dataclass(frozen=True)
class FakeGraph:
    """The attributes of ``ChannelGraph`` that estimators read."""

    groups: tuple[ChannelGroup, ...]
    layers: tuple[LayerInfo, ...]
    norms: tuple[NormInfo, ...]
    other_params: int
    input_shape: tuple[int, ...]
    other_flops: int = 0

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        return tuple(group for group in self.groups if group.prunable)

    def dense_widths(self) -> dict[str, int]:
        return {group.name: group.size for group in self.prunable_groups}


def _group(name: str, size: int, prunable: bool = True, step: int = 1) -> ChannelGroup:
    member = (ChannelMember(module=name, role="out"),)
    reason = None if prunable else "fixed for the test"
    return ChannelGroup(name, size, member, prunable=prunable, reason=reason, step=step)


def _conv(
    name: str,
    inp: str,
    out: str,
    cin: int,
    cout: int,
    k: int,
    s: int,
    hw_in: int,
    groups: int = 1,
    depthwise: bool = False,
    bias: bool = False,
) -> LayerInfo:
    pad = k // 2
    hw_out = (hw_in + 2 * pad - k) // s + 1
    return LayerInfo(
        name=name,
        kind="conv",
        in_segments=(ChannelSegment(inp),),
        out_group=out,
        in_channels=cin,
        out_channels=cout,
        kernel_size=(k, k),
        stride=(s, s),
        padding=(pad, pad),
        dilation=(1, 1),
        groups=groups,
        depthwise=depthwise,
        input_hw=(hw_in, hw_in),
        output_hw=(hw_out, hw_out),
        bias=bias,
    )


class TinyNet(nn.Module):
    """Every case the cost models must handle, at given widths.

    stem conv (biased) -> BN -> depthwise conv -> BN -> grouped stride-2 conv (groups=2, an odd
    3x3 output so its per-channel coefficient is fractional) -> BN -> residual 1x1 conv whose
    input and output are one group -> concat with a 1x1 branch -> BN over the concat (two
    groups) -> flatten -> linear (biased)
    -> non-affine BN1d -> linear (logits). Plus one free parameter.
    """

    def __init__(self, stem: int = 16, mid: int = 12, branch: int = 8, hidden: int = 20) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=True)
        self.bn_stem = nn.BatchNorm2d(stem)
        self.dw = nn.Conv2d(stem, stem, 3, padding=1, groups=stem, bias=False)
        self.bn_dw = nn.BatchNorm2d(stem)
        self.gconv = nn.Conv2d(stem, mid, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn_g = nn.BatchNorm2d(mid)
        self.res = nn.Conv2d(mid, mid, 1, bias=False)
        self.branch = nn.Conv2d(stem, branch, 1, stride=2, bias=False)
        self.bn_cat = nn.BatchNorm2d(mid + branch)
        self.fc1 = nn.Linear((mid + branch) * 9, hidden)
        self.bn_fc = nn.BatchNorm1d(hidden, affine=False)
        self.fc2 = nn.Linear(hidden, 10)
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        y = self.bn_g(self.gconv(x))
        y = y + self.res(y)
        z = self.bn_cat(torch.cat([y, self.branch(x)], dim=1)).flatten(1)
        return self.fc2(torch.relu(self.bn_fc(self.fc1(z)))) * self.gamma


TINY_INPUT = (1, 3, 6, 6)


def tiny_graph() -> FakeGraph:
    """The graph a trace of ``TinyNet()`` on a ``TINY_INPUT`` image would give."""
    groups = (
        _group("input", 3, prunable=False),
        _group("stem", 16, step=2),
        _group("mid", 12, step=2),
        _group("branch", 8),
        _group("hidden", 20),
        _group("logits", 10, prunable=False),
    )
    layers = (
        _conv("stem", "input", "stem", 3, 16, 3, 1, 6, bias=True),
        _conv("dw", "stem", "stem", 16, 16, 3, 1, 6, groups=16, depthwise=True),
        _conv("gconv", "stem", "mid", 16, 12, 3, 2, 6, groups=2),
        _conv("res", "mid", "mid", 12, 12, 1, 1, 3),
        _conv("branch", "stem", "branch", 16, 8, 1, 2, 6),
        LayerInfo(
            name="fc1",
            kind="linear",
            in_segments=(ChannelSegment("mid", 9), ChannelSegment("branch", 9)),
            out_group="hidden",
            in_channels=180,
            out_channels=20,
            bias=True,
        ),
        LayerInfo(
            name="fc2",
            kind="linear",
            in_segments=(ChannelSegment("hidden"),),
            out_group="logits",
            in_channels=20,
            out_channels=10,
            bias=True,
        ),
    )
    norms = (
        NormInfo("bn_stem", "stem", affine=True, input_hw=(6, 6)),
        NormInfo("bn_dw", "stem", affine=True, input_hw=(6, 6)),
        NormInfo("bn_g", "mid", affine=True, input_hw=(3, 3)),
        NormInfo(
            "bn_cat",
            "mid",
            affine=True,
            input_hw=(3, 3),
            segments=(ChannelSegment("mid"), ChannelSegment("branch")),
        ),
        NormInfo("bn_fc", "hidden", affine=False),
    )
    return FakeGraph(groups, layers, norms, other_params=1, input_shape=TINY_INPUT)


def tiny_net(widths: dict[str, int]) -> TinyNet:
    """``TinyNet`` physically at ``widths`` (group name -> width; missing groups dense)."""
    full = {"stem": 16, "mid": 12, "branch": 8, "hidden": 20, **widths}
    return TinyNet(full["stem"], full["mid"], full["branch"], full["hidden"])


def chain_graph(sizes: tuple[int, ...] = (8, 16, 32), hw: int = 8) -> FakeGraph:
    """A plain conv chain: image (3 channels) -> convs of ``sizes`` -> linear to 10 logits."""
    groups = [_group("input", 3, prunable=False)]
    layers = []
    previous, channels = "input", 3
    for position, size in enumerate(sizes):
        name = f"conv{position}"
        groups.append(_group(name, size))
        layers.append(_conv(name, previous, name, channels, size, 3, 1, hw))
        previous, channels = name, size
    groups.append(_group("logits", 10, prunable=False))
    layers.append(
        LayerInfo(
            name="fc",
            kind="linear",
            in_segments=(ChannelSegment(previous),),
            out_group="logits",
            in_channels=channels,
            out_channels=10,
            bias=True,
        )
    )
    norms = tuple(
        NormInfo(f"bn{i}", f"conv{i}", affine=True, input_hw=(hw, hw)) for i in range(len(sizes))
    )
    return FakeGraph(tuple(groups), tuple(layers), norms, 0, (1, 3, hw, hw))
