"""Fixtures shared by every test package: the real MNIST test set and the embedded digits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prunetune.backend.data import DatasetSplits, load_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PRUNETUNE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tests run on one torch thread: on a shared 2-core machine two threads per process are
    many times slower, and results do not depend on the count."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST test set (IDX, gzip) beside the repository, in ``../shared/data/mnist-t10k``."""
    directory = SHARED_DATA / "mnist-t10k"
    if not directory.is_dir():
        pytest.skip(f"MNIST test set not found at {directory} (set PRUNETUNE_SHARED_DATA)")
    return directory


@pytest.fixture(scope="session")
def digits() -> DatasetSplits:
    """The embedded default dataset, split with seed 0."""
    return load_dataset("digits", seed=0)
