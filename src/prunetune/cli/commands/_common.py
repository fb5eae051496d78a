"""Options and set-up that several subcommands share."""

from __future__ import annotations

import argparse
import sys

import torch

from prunetune.backend.data import DatasetSplits, list_datasets, load_dataset
from prunetune.backend.models import ModelRef, dataset_kwargs

__all__ = ["add_data_options", "dataset_from_args", "model_ref_for", "say", "set_threads"]


def say(message: str) -> None:
    """Progress and summaries go to stderr, so stdout stays clean for ``--json`` output."""
    print(message, file=sys.stderr, flush=True)


def add_data_options(parser: argparse.ArgumentParser, dataset_default: str = "digits") -> None:
    """``--dataset``, ``--data-dir``, ``--seed`` and ``--threads``."""
    parser.add_argument(
        "--dataset",
        default=dataset_default,
        help=f"dataset name: {', '.join(list_datasets())} (default: {dataset_default})",
    )
    parser.add_argument("--data-dir", help="directory of the mnist or cifar10 files")
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
    data = load_dataset(args.dataset, root=args.data_dir, seed=args.seed)
    say(data.summary())
    return data


def model_ref_for(name: str, data: DatasetSplits) -> ModelRef:
    """The model reference for zoo or user model ``name`` sized for ``data``."""
    return ModelRef(name, dataset_kwargs(name, data.num_classes, data.in_channels))
