"""Options and set-up that several subcommands share."""

from __future__ import annotations

import argparse
import sys

import torch

from prunetune.backend.data import DatasetSplits, list_datasets
from prunetune.backend.datasources import IMAGEFOLDER, DataSource
from prunetune.backend.models import ModelRef, dataset_kwargs
from prunetune.backend.training import METRICS, PRECISIONS, Runtime, Task

__all__ = [
    "DATASET_HELP",
    "add_data_options",
    "add_device_options",
    "add_task_options",
    "dataset_from_args",
    "model_ref_for",
    "runtime_from_args",
    "say",
    "set_threads",
    "task_from_args",
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


def add_task_options(parser: argparse.ArgumentParser, metric_use: str) -> None:
    """``--loss``, ``--metric``, ``--output`` and ``--ignore-index`` (all default None)."""
    task = parser.add_argument_group("loss and metric")
    task.add_argument(
        "--loss", help="cross_entropy (default) or package.module:function(outputs, targets)"
    )
    task.add_argument(
        "--metric",
        help=f"{', '.join(METRICS)} (default top1, reported as acc) or package.module:Class; "
        + metric_use,
    )
    task.add_argument(
        "--output", help="the model output the loss and metric use: a dict key or tuple index"
    )
    task.add_argument("--ignore-index", type=int, help="target value the loss and metric skip")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--precision`` and ``--channels-last`` (all default None)."""
    device = parser.add_argument_group("device")
    device.add_argument(
        "--device", help="auto (default: the GPU Ray gives a trial, else the CPU), cpu, cuda[:i]"
    )
    device.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), bf16 or fp16")
    device.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="NHWC memory layout (faster convolutions on GPU tensor cores)",
    )


def task_from_args(args: argparse.Namespace) -> Task:
    """The :class:`Task` that :func:`add_task_options`' flags name (defaults where unset).

    Raises:
        ValueError: a loss or metric that cannot be imported.
    """
    return Task.from_names(
        args.loss or "cross_entropy",
        args.metric or "top1",
        args.output,
        -100 if args.ignore_index is None else args.ignore_index,
    )


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    """The :class:`Runtime` that :func:`add_device_options`' flags name (``auto`` by default).

    Raises:
        ValueError: an unknown device name.
    """
    return Runtime(args.device or "auto", args.precision or "fp32", bool(args.channels_last))


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
