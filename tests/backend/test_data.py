"""Datasets: deterministic splits, the real MNIST files, and clear errors for bad directories."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prunetune.backend.data import DatasetSplits, TensorLoader, load_dataset
from prunetune.backend.errors import DataError


def test_digits_splits_are_deterministic_and_disjoint(digits: DatasetSplits) -> None:
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(digits.train.x, again.train.x)
    assert not torch.equal(digits.train.y, other.train.y)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    rows = {tuple(r.tolist()) for r in digits.test.x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in digits.train.x.flatten(1))
    assert overlap < 5  # digits has a handful of exact duplicate images, nothing more


def test_mnist_test_set_splits_8000_2000(mnist_dir: Path) -> None:
    data = load_dataset("mnist", root=mnist_dir, seed=0)
    assert len(data.test) == 2000
    assert len(data.train) + len(data.val) == 8000
    assert data.image_shape == (1, 28, 28)
    assert abs(float(data.train.x.mean())) < 1e-3  # normalised on the train part


def _write_idx(path: Path, array: np.ndarray, corrupt: bool = False) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(payload[:-10] if corrupt else payload)


def test_mnist_from_uncompressed_idx(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((50, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(50) % 10)
    data = load_dataset("mnist", root=tmp_path)
    assert len(data.test) == 10 and data.num_classes == 10


def test_mnist_truncated_file(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((50, 28, 28)), corrupt=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(50) % 10)
    with pytest.raises(DataError, match="truncated or malformed"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"not an idx file at all")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(50) % 10)
    with pytest.raises(DataError, match="bad magic"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("mnist", None, "does not exist"),
        ("mnist", "empty", "no MNIST IDX files"),
        ("cifar10", "empty", "lacks data_batch_1"),
        ("imagenet", None, "unknown dataset 'imagenet'; valid names: digits, mnist, cifar10"),
    ],
)
def test_bad_directories(tmp_path: Path, name: str, make: str | None, message: str) -> None:
    root = tmp_path / "data"
    if make == "empty":
        root.mkdir()
    with pytest.raises(DataError, match=message):
        load_dataset(name, root=root)


def test_missing_data_dir_for_mnist() -> None:
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("mnist")


def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (20, 3072)), b"labels": list(range(10)) * 2}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    data = load_dataset("cifar10", root=tmp_path)
    assert data.image_shape == (3, 32, 32) and len(data.test) == 20 and data.augment
    x, _ = next(iter(TensorLoader(data.train, 8, shuffle=True, augment=True)))
    assert x.shape == (8, 3, 32, 32)


def test_cifar10_corrupt_batch(tmp_path: Path) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset("cifar10", root=tmp_path)


def test_loader_covers_every_example_once(digits: DatasetSplits) -> None:
    seen = torch.cat([y for _, y in TensorLoader(digits.val, 32, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == sorted(digits.val.y.tolist())
