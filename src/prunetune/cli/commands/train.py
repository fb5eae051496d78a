"""``prunetune train``: a dense baseline checkpoint that every later command can start from."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from prunetune.backend.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunetune.backend.io import check_new_file
from prunetune.backend.models import create_model
from prunetune.backend.train import TrainConfig, evaluate, train
from prunetune.cli.commands._common import (
    add_data_options,
    add_device_options,
    add_task_options,
    dataset_from_args,
    model_ref_for,
    runtime_from_args,
    say,
    set_threads,
    task_from_args,
)
from prunetune.search._result import format_score


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train a dense model and save a checkpoint",
        description="Train a dense model from the zoo (or package.module:factory) on a dataset.",
    )
    parser.add_argument("--model", required=True, help="zoo name or package.module:factory")
    add_data_options(parser)
    parser.add_argument("--epochs", type=float, default=10.0, help="passes over the train split")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--checkpoint", help="start from this checkpoint instead of from scratch")
    parser.add_argument("--out", required=True, help="checkpoint file to write (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_task_options(parser, "reported every epoch and at the end")
    add_device_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate on the test split, save the checkpoint."""
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    out = check_new_file(args.out, args.overwrite)
    task, runtime = task_from_args(args), runtime_from_args(args)
    runtime.torch_device  # noqa: B018 (a missing GPU fails before the data is read)
    set_threads(args.threads)
    create_model(args.model) if ":" not in args.model else None  # unknown names fail first
    data = dataset_from_args(args)
    ref = model_ref_for(args.model, data)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, expect=ref)  # only ever --model
    else:
        torch.manual_seed(args.seed)
        model = ref.build()
    model(torch.zeros(data.input_shape(2)))  # shape errors surface before training
    say(f"training {args.model} for {args.epochs:g} epochs on {runtime.torch_device}")
    result = train(
        model, data, config, on_epoch=lambda report: say(report.line()), task=task, runtime=runtime
    )
    _, test_score = evaluate(model, data.test, task, runtime, workers=data.workers)
    model.cpu()
    info = Checkpoint(
        model=ref,
        input_shape=data.input_shape(1),
        dataset=data.name,
        metrics={"val_acc": result.val_acc, "test_acc": test_score},  # the task's metric
        preprocessing=data.preprocessing(),
    )
    save_checkpoint(out, model, info)
    say(f"test {task.metric_name} {format_score(task.metric_name, test_score)}  ->  {out}")
    return 0
