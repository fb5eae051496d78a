"""User-side code the tests name as ``tests.factories:NAME``: data factories, a loss, a metric,
a segmentation model. Ray workers import it like any user module."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from prunetune.backend.data import load_dataset


def digits_datasets(root: str | None = None) -> dict[str, Any]:
    """The embedded digits as plain ``TensorDataset`` splits (streamed, not the fast path)."""
    data = load_dataset("digits", seed=0)
    return {
        "train": TensorDataset(data.train.x, data.train.y),
        "val": TensorDataset(data.val.x, data.val.y),
        "test": TensorDataset(data.test.x, data.test.y),
        "num_classes": 10,
    }


def train_only(root: str | None = None) -> dict[str, Any]:
    """A factory that forgets the validation split."""
    return {"train": digits_datasets()["train"]}


class Top2:
    """A user metric: top-2 accuracy, higher is better."""

    name = "top2"

    def __init__(self) -> None:
        self.hits, self.seen = 0, 0

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Count targets among the two best scores."""
        self.hits += int((outputs.topk(2, 1).indices == targets[:, None]).any(1).sum())
        self.seen += len(targets)

    def compute(self) -> float:
        """Hits / examples."""
        return self.hits / max(1, self.seen)


IGNORE = 255


def blobs(count: int, seed: int) -> TensorDataset:
    """Segmentation toy: 1 x 8 x 8 noisy images of a bright square; labels 0 (background),
    1 (square), ``IGNORE`` on the square's border."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(count, 1, 8, 8, generator=generator)
    labels = torch.zeros(count, 8, 8, dtype=torch.int64)
    for i in range(count):
        top, left = torch.randint(0, 5, (2,), generator=generator).tolist()
        images[i, 0, top : top + 4, left : left + 4] += 1.0
        labels[i, top : top + 4, left : left + 4] = 1
        labels[i, top, left : left + 4] = IGNORE
    return TensorDataset(images, labels)


def blob_datasets(root: str | None = None) -> dict[str, Any]:
    """Train, val and test splits of :func:`blobs`, 2 classes."""
    return {"train": blobs(256, 0), "val": blobs(64, 1), "test": blobs(64, 2), "num_classes": 2}


def blob_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The user's own loss: cross-entropy skipping the border label, plus a little smoothing."""
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE, label_smoothing=0.05)


class TinySegNet(nn.Module):
    """A fully convolutional net returning ``{"out": N x 2 x 8 x 8, "aux": ...}``, like
    torchvision's segmentation models."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Conv2d(width, 2, 1)
        self.aux = nn.Conv2d(width, 2, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Per-pixel class scores, and auxiliary ones from the stem."""
        stem = self.stem(x)
        return {"out": self.head(self.body(stem)), "aux": self.aux(stem)}


class OddPoolNet(nn.Module):
    """Adaptive pooling to 3 x 3 of a 10 x 10 map (for a 1 x 3 x 12 x 12 input): 3 does not
    divide 10, which torch's TorchScript ONNX exporter refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Linear(8 * 9, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class TwoInputNet(nn.Module):
    """An image and a vector of 10 side features (``forward(image, features)``), fused before
    the head: a model that needs two example inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.side = nn.Linear(10, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, image: Tensor, features: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.relu(self.conv2(x)).mean((2, 3))
        return self.head(x + self.side(features))


class PadToEven(nn.Module):
    """Pads a map of odd size to even: Python control flow on the input's size, which plain
    torch.fx cannot trace (prunetune's concrete tracing and torch.export can)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return x


class PaddedNet(nn.Module):
    """A CNN with a :class:`PadToEven` between its convs (input 1 x 3 x 17 x 17)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.pad = PadToEven()
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pad(F.relu(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.bn2(self.conv2(x)))))
        return self.head(x.mean((2, 3)))


class SignGate(nn.Module):
    """Flips the sign of a map by its mean's sign: data-dependent control flow, which neither
    torch.fx nor torch.export can capture."""

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return x
        return -x


class GatedNet(PaddedNet):
    """:class:`PaddedNet` with a :class:`SignGate` where the padding was."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = SignGate()
