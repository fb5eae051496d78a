"""Small test-only architectures that exercise every channel-coupling pattern the graph handles."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunetune.backend.models import create_model, list_models
from tests.backend.architectures_layers import (
    AuxHeadNet,
    BiTStyleNet,
    ChannelsLastLinearNet,
    Conv1dNet,
    Conv3dNet,
    DictOutputNet,
    FunctionalWeightNet,
    NonLocalNet,
    PyramidHeadNet,
    SamePadConv2d,
    SubclassedLayersNet,
    TokenMLPNet,
    TransposedConvNet,
    conv_bn,
)
from tests.backend.architectures_splits import LiteralMixConvNet, MixConvNet
from tests.backend.architectures_stats import ConvNeXtV2StyleNet
from tests.backend.attention_architectures import (
    BorrowedWidthNet,
    CachedPositionViT,
    ClassTokenViT,
    FusedQkvViT,
    HeadBiasViT,
    InputWidthViT,
    LiteralHeadsViT,
    SdpaViT,
    SeparateQkvViT,
    ShapeLogicViT,
    SwinStyleNet,
)
from tests.backend.mha_architectures import (
    CrossAttentionNet,
    DecoderNet,
    EncoderStackNet,
    SequenceFirstEncoderNet,
)


class ResNeXtBlockNet(nn.Module):
    """Stem, one ResNeXt bottleneck (1x1, grouped 3x3 with groups=4, 1x1) with a residual."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.reduce = conv_bn(32, 64, kernel=1)
        self.grouped = conv_bn(64, 64, kernel=3, groups=4)
        self.expand = nn.Conv2d(64, 32, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        out = self.expand_bn(self.expand(self.grouped(self.reduce(x))))
        x = F.relu(out + x)
        return self.fc(self.pool(x).flatten(1))


class DenseNetStyle(nn.Module):
    """Two DenseNet layers (BN-ReLU-conv on ``cat([x, f(x)])``), then a transition conv."""

    def __init__(self, num_classes: int = 10, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, growth, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16 + growth)
        self.conv2 = nn.Conv2d(16 + growth, growth, 3, padding=1, bias=False)
        self.bn_transition = nn.BatchNorm2d(16 + 2 * growth)
        self.transition = nn.Conv2d(16 + 2 * growth, 16, 1, bias=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.conv1(F.relu(self.bn1(x)))], 1)
        x = torch.cat([x, self.conv2(F.relu(self.bn2(x)))], dim=1)
        x = self.transition(F.relu(self.bn_transition(x)))
        x = F.avg_pool2d(x, 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcitationNet(nn.Module):
    """A conv block with a squeeze-and-excitation gate ``x * sigmoid(fc(...))`` and a residual."""

    def __init__(self, num_classes: int = 10, reduction: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.squeeze = nn.Linear(32, 32 // reduction)
        self.excite = nn.Linear(32 // reduction, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        out = self.bn(self.conv(x))
        batch, channels = out.shape[0], out.shape[1]
        gate = F.adaptive_avg_pool2d(out, 1).view(batch, channels)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(gate))))
        out = out * gate.view(batch, channels, 1, 1)
        x = F.relu(out + x)
        return self.fc(x.mean((2, 3)))


class InceptionStyle(nn.Module):
    """An inception block: 1x1, 1x1-3x3 and pool-1x1 branches concatenated on channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.branch1 = conv_bn(16, 8, kernel=1)
        self.branch3_reduce = conv_bn(16, 8, kernel=1)
        self.branch3 = conv_bn(8, 12, kernel=3)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.branch_pool = conv_bn(16, 4, kernel=1)
        self.bn = nn.BatchNorm2d(24)
        self.head = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        branches = [
            self.branch1(x),
            self.branch3(self.branch3_reduce(x)),
            self.branch_pool(self.pool(x)),
        ]
        x = F.relu(self.bn(torch.cat(branches, 1)))
        x = F.relu(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalNet(nn.Module):
    """Activations and pooling written as functions and tensor methods instead of modules."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = self.conv3(x).relu()
        x = x * torch.sigmoid(x.mean(dim=[2, 3], keepdim=True))
        pooled = x.mean((2, 3)) + torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(F.dropout(pooled, 0.1, self.training))


class SharedConvNet(nn.Module):
    """One 3x3 conv module applied twice (with its own BN after each call)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.shared(x)))
        x = F.relu(self.bn2(self.shared(x)))
        x = F.relu(self.bn3(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class FlattenLinearNet(nn.Module):
    """A conv stack whose 4x4 map is flattened into a two-layer linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, stride=2), conv_bn(8, 12, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class ChannelShuffleNet(nn.Module):
    """A ShuffleNet-style channel shuffle (view-transpose-reshape) in four groups."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 16)
        self.conv2 = conv_bn(16, 16)
        self.conv3 = conv_bn(16, 24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.conv3(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class HardCodedViewNet(nn.Module):
    """A head that reshapes with a literal channel count, so its group must stay whole."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 8)
        self.conv2 = conv_bn(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        return self.fc(x.view(-1, 16))


class GatedSplitNet(nn.Module):
    """A conv whose output is cut in halves gated against each other (``a * sigmoid(b)``, GLU
    style) by ``Tensor.chunk``; one cut in thirds by ``torch.split`` at a size computed from
    the tensor, each third to its own conv; one split at literal sizes (kept whole)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.gate = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.gate_bn = nn.BatchNorm2d(32)
        self.mix = conv_bn(16, 24)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(16, 8, 1)
        self.literal = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.gate_bn(self.gate(self.stem(x))).chunk(2, dim=1)
        x = self.mix(a * torch.sigmoid(b))
        left, middle, right = torch.split(x, x.shape[1] // 3, dim=1)
        x = torch.cat([self.left(left), self.right(torch.cat([middle, right], 1))], 1)
        first, second = torch.split(self.literal(x), [4, 8], dim=1)
        return self.fc(torch.cat([second, first], 1).mean((2, 3)))


class _Bottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = conv_bn(channels, channels)
        self.cv2 = conv_bn(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C2fNet(nn.Module):
    """A YOLOv8 C2f block: a 1x1 conv split in two halves, bottlenecks on the second half, and a
    1x1 conv over the concat of both halves and every bottleneck's output."""

    def __init__(self, num_classes: int = 10, hidden: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.cv1 = conv_bn(16, 2 * hidden, kernel=1)
        self.m = nn.ModuleList(_Bottleneck(hidden) for _ in range(blocks))
        self.cv2 = conv_bn((2 + blocks) * hidden, 24, kernel=1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        first, second = self.cv1(self.stem(x)).chunk(2, 1)  # fx cannot trace list(proxy)
        y = [first, second]
        y.extend(m(y[-1]) for m in self.m)
        return self.fc(self.cv2(torch.cat(y, 1)).mean((2, 3)))


def _shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, c, h, w)


class _ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit: stride 2 runs two branches on the input, stride 1 one branch on
    the second half (``chunk``); both concatenate and shuffle the channels in two groups."""

    def __init__(self, inp: int, oup: int, stride: int, module: bool = False) -> None:
        super().__init__()
        half = oup // 2
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, 2, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                conv_bn(inp, half, kernel=1),
            )  # fmt: skip
        self.branch2 = nn.Sequential(
            conv_bn(inp if stride == 2 else half, half, kernel=1),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            conv_bn(half, half, kernel=1),
        )  # fmt: skip
        self.shuffle = nn.ChannelShuffle(2) if module else None

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out) if self.shuffle is not None else _shuffle(out, 2)


class ShuffleNetV2Style(nn.Module):
    """A stem, a ShuffleNetV2 stage (a stride-2 unit, two stride-1 units), a 1x1 conv and a
    classifier. (``nn.ChannelShuffle`` would not export: torch's ONNX exporter lacks it.)"""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.stage = nn.Sequential(
            _ShuffleUnit(16, 32, 2), _ShuffleUnit(32, 32, 1), _ShuffleUnit(32, 32, 1)
        )
        self.head = conv_bn(32, 48, kernel=1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.stage(self.stem(x))).mean((2, 3)))


class LayerScaleNet(nn.Module):
    """Per-channel parameters multiplied into activations: a ``PReLU(C)`` and a layer scale
    ``gamma`` of shape ``[C, 1, 1]`` in a residual block, one viewed as ``[1, C, 1, 1]`` from
    ``[C]``, and one of shape ``[C]`` on a channels-last map (ConvNeXt), with a bias buffer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.act = nn.PReLU(32, init=0.1)
        self.project = nn.Conv2d(32, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 16)[:, None, None])
        self.mid = nn.Conv2d(16, 24, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(-1.0, 1.0, 24))
        self.pointwise = nn.Linear(24, 24)
        self.last_scale = nn.Parameter(torch.linspace(0.1, 1.0, 24))
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.gamma * self.project(self.act(self.expand(x)))
        x = self.mid(x) * self.scale.view(1, -1, 1, 1)
        y = self.pointwise(x.permute(0, 2, 3, 1)) * self.last_scale + self.shift
        return self.fc(y.permute(0, 3, 1, 2).mean((2, 3)))


class PixelShuffleGroupNormNet(nn.Module):
    """GroupNorms (4 and 2 groups) between convs, and a super-resolution style head: a conv to
    ``4 * r^2`` channels, ``nn.PixelShuffle(2)``, a conv, ``F.pixel_shuffle`` and
    ``F.pixel_unshuffle``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.body_norm = nn.GroupNorm(2, 16)
        self.upsample = nn.Conv2d(16, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.refine = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.stem(x)))
        x = F.relu(self.body_norm(self.body(x)))
        x = self.refine(self.shuffle(self.upsample(x)))
        x = self.head(F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2))
        return self.fc(x.mean((2, 3)))


class _GhostModule(nn.Module):
    """GhostNet's module: a primary 1x1 conv, and a cheap depthwise conv of its output
    concatenated to it (then sliced to ``oup`` channels)."""

    def __init__(self, inp: int, oup: int, relu: bool = True) -> None:
        super().__init__()
        self.oup = oup
        init = oup // 2
        act: nn.Module = nn.ReLU() if relu else nn.Identity()
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init, 1, bias=False), nn.BatchNorm2d(init), act
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init), act
        )

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, : self.oup, :, :]


class GhostGRNNet(nn.Module):
    """A GhostNet bottleneck (ghost module, ghost module, residual), then a ConvNeXt V2 block
    on the channels-last map: Linear, GELU, global response norm (GRN), Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.ghost1 = _GhostModule(16, 32)
        self.ghost2 = _GhostModule(32, 16, relu=False)
        self.pwconv1 = nn.Linear(16, 48)
        self.grn_gamma = nn.Parameter(torch.linspace(-0.5, 0.5, 48).view(1, 1, 1, 48))
        self.grn_beta = nn.Parameter(torch.linspace(0.1, 0.2, 48).view(1, 1, 1, 48))
        self.pwconv2 = nn.Linear(48, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.ghost2(self.ghost1(x))
        y = F.gelu(self.pwconv1(x.permute(0, 2, 3, 1)))
        gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        y = self.grn_gamma * (y * nx) + self.grn_beta + y
        x = x + self.pwconv2(y).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def single_conv(num_classes: int = 10) -> nn.Module:
    """A model with nothing to prune: one conv from the image to the output."""
    return nn.Conv2d(3, num_classes, 3)


class UntraceableNet(nn.Module):
    """Data-dependent control flow: cannot be traced symbolically."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


class ShapeLogicNet(nn.Module):
    """Shape checks and shape-dependent branches in ``forward``, and "same" padding convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv2d(3, 16, 3, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.conv = SamePadConv2d(16, 24, 3, stride=2)
        self.head = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() == 4 and x.dtype.is_floating_point, "expects float NCHW"
        _, _, height, width = x.shape
        if x.device.type == "meta":  # as timm's efficientvit checks
            raise ValueError("needs real tensors")
        x = F.relu(self.bn(self.stem(x)))
        if height % 4 or width % 4:  # round odd sizes up, as MobileViT does before unfolding
            x = F.interpolate(x, size=(math.ceil(height / 4) * 2, math.ceil(width / 4) * 2))
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class FoldedPatchesNet(nn.Module):
    """MobileViT's unfolding: 2 x 2 patch positions folded into the batch dim, a token MLP over
    [batch * 4, patches, channels], folded back. The MLP's MACs grow with dim 0, not only the
    token count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x))
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1)
        tokens = patches.reshape(b * 4, (h // 2) * (w // 2), c)
        tokens = tokens + self.fc2(F.gelu(self.fc1(tokens)))
        x = tokens.reshape(b, 2, 2, h // 2, w // 2, c).permute(0, 5, 3, 1, 4, 2)
        return self.head(x.reshape(b, c, h, w)).mean((2, 3))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnext_block": ResNeXtBlockNet,
    "densenet_style": DenseNetStyle,
    "squeeze_excitation": SqueezeExcitationNet,
    "inception_style": InceptionStyle,
    "functional": FunctionalNet,
    "shared_conv": SharedConvNet,
    "flatten_linear": FlattenLinearNet,
    "transposed_conv": TransposedConvNet,
    "non_local": NonLocalNet,
    "token_mlp": TokenMLPNet,
    "channels_last_linear": ChannelsLastLinearNet,
    "pyramid_head": PyramidHeadNet,
    "aux_head": AuxHeadNet,
    "conv3d": Conv3dNet,
    "subclassed_layers": SubclassedLayersNet,
    "dict_output": DictOutputNet,
    "functional_weight": FunctionalWeightNet,
    "shape_logic": ShapeLogicNet,
    "folded_patches": FoldedPatchesNet,
    "bit_style": BiTStyleNet,
    "gated_split": GatedSplitNet,
    "c2f": C2fNet,
    "mixconv": MixConvNet,
    "mixconv_literal": LiteralMixConvNet,
    "shufflenet_v2_style": ShuffleNetV2Style,
    "channel_shuffle": ChannelShuffleNet,
    "layer_scale": LayerScaleNet,
    "pixel_shuffle_group_norm": PixelShuffleGroupNormNet,
    "ghost_grn": GhostGRNNet,
    "convnextv2_style": ConvNeXtV2StyleNet,
    "conv1d": Conv1dNet,
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
    "mha_encoder_stack": EncoderStackNet,
    "mha_sequence_first": SequenceFirstEncoderNet,
    "mha_cross_attention": CrossAttentionNet,
    "mha_decoder": DecoderNet,
    "swin_style": SwinStyleNet,
}
"""Test architectures that every graph, surgery and mask contract runs on."""

ALL_MODELS = [*list_models(), *ARCHITECTURES]


def build(name: str, seed: int = 0) -> nn.Module:
    """A zoo model (3 input channels) or test architecture in eval mode with random BN state.

    BatchNorm running statistics and affine parameters are random and non-trivial, so a channel
    that leaks through a BN shift would show in the equivalence tests.
    """
    torch.manual_seed(seed)
    model = (
        create_model(name, num_classes=10, in_channels=3)
        if name in list_models()
        else (ARCHITECTURES[name]())
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(size, generator=generator))
                module.bias.copy_(torch.randn(size, generator=generator))
    return model.eval()
