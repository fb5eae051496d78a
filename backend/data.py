"""Datasets by name, never downloaded: ``digits`` (embedded), ``mnist`` (IDX files), ``cifar10``.

Every dataset is held in memory as tensors and split deterministically from a seed into train,
validation and test parts. Searches optimise on ``val``; ``test`` is only for final reporting.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.errors import DataError

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "Split",
    "TensorLoader",
    "list_datasets",
    "load_dataset",
    "split_length",
]

DATASETS = ("digits", "mnist", "cifar10")
_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}
_CHANNEL_ORDER = {"digits": "grayscale", "mnist": "grayscale", "cifar10": "RGB"}


def list_datasets() -> list[str]:
    """Return the dataset names :func:`load_dataset` accepts."""
    return list(DATASETS)


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, C, H, W) float32, normalised, and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, count: int) -> Split:
        """Return the first ``count`` examples (the split is already shuffled)."""
        return Split(self.x[:count], self.y[:count])


def split_length(split: Any) -> int:
    """Examples in a split: an in-memory :class:`Split`, a ``Dataset`` or a ``DataLoader``."""
    dataset = getattr(split, "dataset", split) if not isinstance(split, Split) else split
    return len(dataset)


def _first_input(split: Any) -> Tensor:
    if isinstance(split, Split):
        return split.x[0]
    if hasattr(split, "dataset") and hasattr(split, "batch_size"):  # a DataLoader
        x = next(iter(split))[0]
        return x[0]
    x = split[0][0]
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's three splits and its shape facts.

    A split is an in-memory :class:`Split` (the built-ins: sliced into batches, the fast path), a
    ``torch.utils.data.Dataset`` of (input, target) pairs (streamed by ``workers`` DataLoader
    processes) or a ``DataLoader`` (used as it is).
    """

    name: str
    train: Any
    val: Any
    test: Any
    num_classes: int
    augment: bool = False
    workers: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def preprocessing(self) -> dict[str, Any]:
        """What a deployed model's inputs must be, as ``subnet.json`` records it.

        Returns:
            ``input_shape`` (C, H, W), ``channel_order``, ``value_range`` of the raw pixels
            (every loader scales them to [0, 1]), and the per-channel ``mean`` and ``std`` of
            the training split that inputs are normalised with: ``(x - mean) / std``.
        """
        return {
            "input_shape": list(self.image_shape),
            "channel_order": _CHANNEL_ORDER.get(self.name, "unknown"),
            "value_range": [0.0, 1.0],
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def in_channels(self) -> int:
        """Channels of one image."""
        return self.image_shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image (of the first training example)."""
        return tuple(int(n) for n in _first_input(self.train).shape)  # type: ignore[return-value]

    def input_shape(self, batch_size: int = 1) -> tuple[int, int, int, int]:
        """The shape of a batch of ``batch_size`` images, as models are traced with."""
        return (batch_size, *self.image_shape)

    def summary(self) -> str:
        """One line: name, split sizes, image shape, classes."""
        return (
            f"{self.name}: {split_length(self.train)} train / {split_length(self.val)} val / "
            f"{split_length(self.test)} test, "
            f"images {'x'.join(map(str, self.image_shape))}, {self.num_classes} classes"
        )


class TensorLoader:
    """Batches of an in-memory split; reshuffled each epoch from a seeded generator.

    Much faster than ``DataLoader`` over a ``TensorDataset`` for small images, since batches are
    sliced, not collated one example at a time.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            x = self.split.x[index]
            if self.augment:
                x = _crop_and_flip(x, self._generator)
            yield x, self.split.y[index]


def _crop_and_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Standard CIFAR augmentation on a batch: random crop after zero padding, random h-flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def load_dataset(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DatasetSplits:
    """Load a dataset by name and split it deterministically.

    Args:
        name: ``digits`` (scikit-learn's bundled 8x8 digits, needs no ``root``), ``mnist`` (a
            directory of IDX files, gzipped or not: ``train-*`` and/or ``t10k-*``) or ``cifar10``
            (the standard ``cifar-10-batches-py`` directory).
        root: the data directory for ``mnist`` and ``cifar10``.
        seed: the seed of the split (and of nothing else).
        val_fraction: share of the training part held out for validation.
        test_fraction: share held out for testing when the directory has no separate test set
            (the embedded digits, or an MNIST directory with one IDX pair only).

    Returns:
        The three splits, normalised with the training part's mean and standard deviation.

    Raises:
        DataError: unknown name, missing ``root``, missing or malformed files.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{label} must be between 0 and 1 (exclusive), got {fraction}")
    if name == "digits":
        x, y = _load_digits()
        parts = [(x, y)]
    else:
        if root is None:
            raise DataError(f"dataset {name!r} needs a data directory: pass --data-dir DIR")
        directory = Path(root)
        if directory.exists() and not directory.is_dir():
            raise DataError(
                f"data directory {str(directory)!r} for {name!r} is a file, not a directory; "
                "pass the folder that holds the dataset's files"
            )
        if not directory.is_dir():
            raise DataError(f"data directory {str(directory)!r} for {name!r} does not exist")
        parts = _load_mnist(directory) if name == "mnist" else _load_cifar10(directory)
    return _split(name, parts, seed, val_fraction, test_fraction, augment=name == "cifar10")


def _split(
    name: str,
    parts: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    augment: bool,
) -> DatasetSplits:
    classes = _CLASSES[name]
    for _, labels in parts:
        outside = labels[(labels < 0) | (labels >= classes)]
        if outside.size:
            raise DataError(
                f"{name} labels must be 0..{classes - 1}, but {outside.size} are outside "
                f"(e.g. {int(outside[0])}): the label files are corrupt or of another dataset"
            )
    rng = np.random.default_rng(seed)
    if len(parts) == 2:  # a separate test set: split only the training part
        (x_trainval, y_trainval), (x_test, y_test) = parts
    else:
        x_all, y_all = parts[0]
        order = rng.permutation(len(y_all))
        n_test = round(len(y_all) * test_fraction)
        x_test, y_test = x_all[order[:n_test]], y_all[order[:n_test]]
        x_trainval, y_trainval = x_all[order[n_test:]], y_all[order[n_test:]]
    order = rng.permutation(len(y_trainval))
    n_val = max(1, round(len(y_trainval) * val_fraction))
    val_index, train_index = order[:n_val], order[n_val:]
    x_train = x_trainval[train_index].astype(np.float32)
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6

    def make(x: np.ndarray, y: np.ndarray) -> Split:
        normalised = (x.astype(np.float32) - mean) / std
        return Split(torch.from_numpy(normalised), torch.from_numpy(y.astype(np.int64)))

    return DatasetSplits(
        name=name,
        train=make(x_trainval[train_index], y_trainval[train_index]),
        val=make(x_trainval[val_index], y_trainval[val_index]),
        test=make(x_test, y_test),
        num_classes=classes,
        augment=augment,
        mean=tuple(float(v) for v in mean.ravel()),
        std=tuple(float(v) for v in std.ravel()),
    )


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # the embedded default; bundled, never downloaded

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    return images, digits.target.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{str(path)!r} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{str(path)!r} is truncated or malformed: header says {expected} bytes of data, "
            f"file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, prefix: str, kind: str) -> Path | None:
    for suffix in ("", ".gz"):
        for sep in ("-", "."):
            candidate = directory / f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte"
            candidate = candidate.with_name(candidate.name + suffix)
            if candidate.is_file():
                return candidate
    return None


def _load_mnist(directory: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    parts = []
    for prefix in ("train", "t10k"):
        images_path = _find_idx(directory, prefix, "images")
        labels_path = _find_idx(directory, prefix, "labels")
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            raise DataError(
                f"MNIST directory {str(directory)!r} has {prefix} "
                f"{'labels' if images_path is None else 'images'} but not the matching "
                f"{'images' if images_path is None else 'labels'} file"
            )
        images, labels = _read_idx(images_path), _read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"MNIST files in {str(directory)!r} do not match: images {images.shape}, "
                f"labels {labels.shape}"
            )
        parts.append(((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)))
    if not parts:
        raise DataError(
            f"no MNIST IDX files in {str(directory)!r}; expected t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz] (and/or the train-* pair)"
        )
    return parts


# what a CIFAR-10 python batch may reference: numpy's array reconstruction (numpy 1 and 2 module
# names) and the codec Python 3 pickles bytes with; dicts, lists, bytes, str and ints need none
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that admits only what CIFAR-10 batches hold: arrays, lists, dicts, strings.

    Any other global (``os.system``, ``builtins.eval``...) is refused before it is looked up, so
    a crafted batch cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it references {module}.{name}, which a CIFAR-10 batch never holds (refused: "
                "unpickling it could run code)"
            )
        return super().find_class(module, name)


def _load_cifar10(directory: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with path.open("rb") as handle:
                batch = _BatchUnpickler(handle, encoding="bytes").load()
            if not isinstance(batch, dict):
                raise ValueError(f"it holds a {type(batch).__name__}, not a dict")
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (
            OSError,
            pickle.UnpicklingError,
            KeyError,
            ValueError,
            EOFError,
            TypeError,
            AttributeError,
            IndexError,
        ) as exc:
            raise DataError(f"{str(path)!r} is not a CIFAR-10 python batch: {exc}") from exc
        return images.astype(np.float32) / 255.0, labels

    train_paths = [directory / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_paths, directory / "test_batch"] if not p.is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 directory {str(directory)!r} lacks {', '.join(missing)}; point --data-dir "
            "at the extracted cifar-10-batches-py folder"
        )
    batches = [read_batch(p) for p in train_paths]
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return [train, read_batch(directory / "test_batch")]
