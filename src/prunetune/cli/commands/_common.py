"""Options and set-up that several subcommands share."""

from __future__ import annotations

import argparse
import sys

import torch

from prunetune.backend.data import DatasetSplits, list_datasets
from prunetune.backend.datasources import IMAGEFOLDER, DataSource
from prunetune.backend.models import ModelRef, dataset_kwargs

__all__ = [
    "DATASET_HELP",
    "add_data_options",
    "dataset_from_args",
    "model_ref_for",
    "say",
    "set_threads",
]

DATASET_HELP = (
    f"data: {', '.join(list_datasets())} (in memory), {IMAGEFOLDER} (--data-dir holds train/, "
    "val/ and optionally test/ folders of class folders) or package.module:factory returning "
    "the splits as Datasets"
)


def say(message: str) -> None:
    """Progress and summaries go to stderr, so stdout stays clean for ``--json`` output."""
    print(message, file=sys.stderr, flush=True)


def add_data_options(parser: argparse.ArgumentParser, dataset_default: str = "digits") -> None:
    """``--dataset``, ``--data-dir``, ``--seed`` and ``--threads``."""
    parser.add_argument(
        "--dataset", default=dataset_default, help=f"{DATASET_HELP} (default: {dataset_default})"
    )
    parser.add_argument("--data-dir", help="directory of the mnist/cifar10 files or image folder")
    parser.add_argument(
        "--image-size", type=int, default=224, help="imagefolder: crop side in pixels (224)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for streamed data (2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads``."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def dataset_from_args(args: argparse.Namespace) -> DatasetSplits:
    """Load the dataset the options name, and say what it is."""
    source = DataSource(
        name=args.dataset,
        root=args.data_dir,
        seed=args.seed,
        image_size=args.image_size,
        workers=args.workers,
    )
    data = source.check()
    say(data.summary())
    return data


def model_ref_for(name: str, data: DatasetSplits) -> ModelRef:
    """The model reference for zoo or user model ``name`` sized for ``data``."""
    return ModelRef(name, dataset_kwargs(name, data.num_classes, data.in_channels))
