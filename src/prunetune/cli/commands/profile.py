"""``prunetune profile``: measure a model's per-layer latency tables on this machine."""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

from prunetune.backend.io import check_new_file, check_writable
from prunetune.backend.training import Runtime
from prunetune.cli.commands._common import say
from prunetune.cli.commands._models import ResolvedModel, add_model_options, resolve_model
from prunetune.estimators import (
    LatencyProfile,
    ProfileMismatchWarning,
    ProfileProgress,
    profile_model,
    recalibrate_profile,
)


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
    parser.add_argument("--batch-size", type=int, help="batch size to measure at (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to measure: cpu (default), cuda or cuda:<index> (CUDA event times; the "
        "GPU's name, driver and CUDA version are recorded)",
    )
    parser.add_argument("--grid", type=int, help="widths per axis (default 7)")
    parser.add_argument("--repeats", type=int, help="timed runs per point (default 7)")
    parser.add_argument(
        "--calibration-subnets",
        type=int,
        help="pruned subnets of assorted sizes timed whole to calibrate the tables (default 12)",
    )
    parser.add_argument(
        "--channel-block",
        type=int,
        default=None,
        help="channel block to probe conv kernels for (default: this CPU's SIMD width in "
        "floats, 16 with AVX-512); 1 turns the probe off",
    )
    parser.add_argument(
        "--recalibrate",
        metavar="PROFILE",
        help="keep this profile's tables and time only the dense model and its calibration "
        "subnets again (seconds, not minutes), for when whole models now run at another "
        "speed than when it was measured; its own batch size, threads and settings are used",
    )
    parser.add_argument(
        "--out", help="profile JSON file to write (with --recalibrate: default, that file)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Profile (or recalibrate) and save."""
    if args.recalibrate:
        return _recalibrate(args)
    if args.out is None:
        raise ValueError("--out is required: the profile JSON file to write")
    out = check_new_file(args.out, args.overwrite)
    batch_size = 1 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    resolved = _one_input(resolve_model(args))
    graph = resolved.trace()
    profile = profile_model(
        resolved.model,
        graph,
        batch_size,
        threads=args.threads,
        widths_grid=7 if args.grid is None else args.grid,
        repeats=7 if args.repeats is None else args.repeats,
        calibration_subnets=12 if args.calibration_subnets is None else args.calibration_subnets,
        channel_block=args.channel_block,
        model_id=resolved.ref.name,
        progress=_show,
        device=str(Runtime(device=args.device).torch_device),
    )
    profile.save(out)
    _advise(profile)
    blocked = sum(1 for table in profile.tables.values() if max(table.blocks) > 1)
    say(
        f"wrote {out} ({len(profile.tables)} tables, {blocked} with blocked channels; "
        f"allocator {profile.settings['allocator']})"
    )
    return 0


def _advise(profile: LatencyProfile) -> None:
    """Say so when many table points stayed unsteady (a busy machine): they were kept at their
    fastest run, which predicts worse than a steady median."""
    points = int(profile.settings.get("points", 0))
    unsteady = int(profile.settings.get("unsteady_points", 0))
    if points and unsteady > points / 4:
        say(
            f"warning: {unsteady} of {points} table points varied by more than 100% between "
            "repeats even measured again (a busy machine): their fastest runs were kept. For "
            "steadier tables, profile on a quiet machine with --threads 1"
        )


def _show(progress: ProfileProgress) -> None:
    say(f"profiling {progress.done}/{progress.total}: {progress.description}")


def _recalibrate(args: argparse.Namespace) -> int:
    """Time the whole models of an existing profile again; keep its tables."""
    fixed = [
        f"--{name.replace('_', '-')}"
        for name in ("grid", "repeats", "calibration_subnets", "channel_block")
        if getattr(args, name) is not None
    ]
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot change with --recalibrate, which keeps the profile's "
            "tables and settings; leave them out, or measure a new profile without --recalibrate"
        )
    in_place = args.out is None or Path(args.out).resolve() == Path(args.recalibrate).resolve()
    out = check_writable(args.recalibrate) if in_place else check_new_file(args.out, args.overwrite)
    with warnings.catch_warnings():
        # the profile's own threads and batch size are used; another machine raises below
        warnings.simplefilter("ignore", ProfileMismatchWarning)
        old = LatencyProfile.load(args.recalibrate, device=args.device)
    for option, asked, own in (
        ("--batch-size", args.batch_size, old.batch_size),
        ("--threads", args.threads, old.device.threads),
    ):
        if asked is not None and asked != own:
            raise ValueError(
                f"{option} {asked} differs from the profile's {own}; --recalibrate measures "
                f"with the profile's own (leave {option} out)"
            )
    resolved = _one_input(resolve_model(args))
    profile = recalibrate_profile(old, resolved.model, resolved.trace(), progress=_show)
    profile.save(out)
    pairs = [(new, was) for (_, new), (_, was) in zip(profile.calibration, old.calibration)]
    if old.model_ms and profile.model_ms:
        pairs.append((profile.model_ms, old.model_ms))
    drift = statistics.median(new / was for new, was in pairs) if pairs else math.nan
    say(
        f"wrote {out}: {len(pairs)} whole models timed again now take {drift:.3f}x what they "
        f"took when profiled (median); dense model {profile.model_ms:.3f} ms"
    )
    return 0


def _one_input(resolved: ResolvedModel) -> ResolvedModel:
    """Latency profiles time models of one input tensor; refuse several in one line."""
    if len(resolved.input_shapes) > 1:
        raise ValueError(
            f"prunetune profile times models of one input, and {len(resolved.input_shapes)} "
            "--input-shape were given; profile a model of one input (inspect and prune take "
            "several)"
        )
    return resolved
