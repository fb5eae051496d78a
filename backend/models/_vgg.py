"""VGG-16 with batch norm, CIFAR variant: 13 conv-BN-ReLU layers, one linear classifier."""

from __future__ import annotations

from torch import Tensor, nn

from prunetune.backend.models._registry import register_model

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """VGG for small images: the feature stack, global average pooling and one linear layer.

    Global pooling and ceil-mode max-pools make it accept any input size, 8x8 digits included.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """VGG-16 with BN for CIFAR (about 313M FLOPs at 32x32)."""
    return CifarVGG(num_classes, in_channels)
