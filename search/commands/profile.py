"""``prunetune profile``: measure a model's per-layer latency tables on this machine."""

from __future__ import annotations

import argparse
from typing import Any

from backend.io import check_writable
from estimators import ProfileProgress, profile_model
from search.commands._common import say
from search.commands._models import add_model_options, resolve_model


def register(subparsers: Any) -> None:
    """Add the ``profile`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "profile",
        help="measure latency tables of a model's layers on this machine",
        description="Time every layer configuration the model's channel groups can produce, "
        "over a grid of widths, and write a table that predicts any subnet's latency on this "
        "machine, thread count and batch size.",
    )
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="batch size to measure at")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--grid", type=int, default=7, help="widths per axis (default 7)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per point")
    parser.add_argument(
        "--calibration-subnets",
        type=int,
        default=12,
        help="pruned subnets of assorted sizes timed whole to calibrate the tables (default 12)",
    )
    parser.add_argument(
        "--channel-block",
        type=int,
        default=None,
        help="channel block to probe conv kernels for (default: this CPU's SIMD width in "
        "floats, 16 with AVX-512); 1 turns the probe off",
    )
    parser.add_argument("--out", required=True, help="profile JSON file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Profile and save."""
    out = check_writable(args.out)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    resolved = resolve_model(args)
    graph = resolved.trace()

    def show(progress: ProfileProgress) -> None:
        say(f"profiling {progress.done}/{progress.total}: {progress.description}")

    profile = profile_model(
        resolved.model,
        graph,
        args.batch_size,
        threads=args.threads,
        widths_grid=args.grid,
        repeats=args.repeats,
        calibration_subnets=args.calibration_subnets,
        channel_block=args.channel_block,
        model_id=resolved.ref.name,
        progress=show,
    )
    profile.save(out)
    blocked = sum(1 for table in profile.tables.values() if max(table.blocks) > 1)
    say(
        f"wrote {out} ({len(profile.tables)} tables, {blocked} with blocked channels; "
        f"allocator {profile.settings['allocator']})"
    )
    return 0
