"""A small CNN sized for the embedded default (8x8 digits) that also does well on 28x28 MNIST."""

from __future__ import annotations

from torch import Tensor, nn

from prunetune.backend.models._registry import register_model


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (32, 64, 128 wide), two max-pools, global pooling, two linears."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The embedded default's model: a 3-conv CNN with a two-layer head."""
    return SmallCNN(num_classes, in_channels)
