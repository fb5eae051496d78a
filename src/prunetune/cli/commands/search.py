"""``prunetune search``: the whole search, from a model name to an exported, reported subnet.

Settings come from, in rising order of precedence: the run's own ``search.json`` (with
``--resume``), the ``--config`` YAML file, and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from prunetune.cli.commands._common import (
    DATASET_HELP,
    add_device_options,
    add_task_options,
    say,
)
from prunetune.search._config import SAMPLERS, SearchConfig, read_yaml

_EPILOG = """\
Ray: without --address (and RAY_ADDRESS) Ray starts on this machine, bound to 127.0.0.1.
With --address auto | HOST:PORT | ray://HOST:PORT the trials run on that cluster; then the
run directory and any --data-dir must be at the same path on every node (a shared disk).
Results go to RUNS_DIR/NAME/: Tune's experiment (tune/), the dense model (dense.pt), the best
subnet's export (best/), report.md, pareto.png and widths.png.
"""


def register(subparsers: Any) -> None:
    """Add the ``search`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "search",
        help="search pruned subnets under a target with Ray Tune, export the best",
        description="Search the union of the chosen spaces with Ray Tune (Optuna + ASHA), "
        "then finetune the most accurate subnet that meets every target, export it and write "
        "a report.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="zoo name or package.module:factory")
    parser.add_argument("--dataset", help=f"{DATASET_HELP} (default: digits)")
    parser.add_argument("--data-dir", help="directory of the mnist/cifar10 files or image folder")
    parser.add_argument("--image-size", type=int, help="imagefolder: crop side in pixels (224)")
    parser.add_argument("--workers", type=int, help="DataLoader workers for streamed data (2)")
    add_task_options(parser, "the search optimises and chooses by it")
    add_device_options(parser)
    parser.add_argument(
        "--checkpoint", help="dense checkpoint (default: train the dense model first)"
    )
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        default=None,
        help="build the package.module:factory --checkpoint names even when it is not --model "
        "(importing it runs its code; zoo models never need this)",
    )
    group = parser.add_argument_group("target (one or several)")
    group.add_argument("--flops", help="FLOPs (MACs) target, e.g. 50%% or 20M")
    group.add_argument("--params", help="parameter target, e.g. 30%% or 0.3M")
    group.add_argument("--latency", help="latency target, e.g. 2ms (needs --profile)")
    group.add_argument("--profile", help="latency profile written by prunetune profile")
    trials = parser.add_argument_group("trials")
    trials.add_argument("--spaces", help="comma-separated spaces (default: all registered)")
    trials.add_argument("--trials", type=int, help="trials in all (default 16)")
    trials.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="how Optuna proposes trials: tpe (default) or random (a baseline)",
    )
    trials.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    trials.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial, fractions allowed: 0.25 runs 4 trials per GPU (default 0)",
    )
    trials.add_argument(
        "--inner-epochs", type=float, help="length of every space's inner run (default: its own)"
    )
    trials.add_argument(
        "--space-option",
        action="append",
        metavar="SPACE.OPTION=VALUE",
        help="fix one option of a space instead of searching it (repeatable), e.g. dsa.epochs=2",
    )
    trials.add_argument("--score-steps", type=int, help="steps of every trial's score finetune")
    trials.add_argument(
        "--rescore-top",
        type=int,
        help="score the best N trials again with a longer finetune before choosing (default 3; "
        "0: choose on the trials' scores)",
    )
    trials.add_argument(
        "--rescore-steps", type=int, help="steps of that second finetune (default: --score-steps)"
    )
    trials.add_argument(
        "--round-to",
        type=int,
        help="keep widths at multiples of this, e.g. 8: faster kernels (default 1: any width)",
    )
    trials.add_argument(
        "--pareto", action="store_true", default=None, help="multi-objective: accuracy vs FLOPs"
    )
    trials.add_argument(
        "--grace-period", type=int, help="reports before ASHA may stop a trial (default 2)"
    )
    trials.add_argument("--max-failures", type=int, help="retries of a trial whose worker dies")
    run = parser.add_argument_group("run")
    run.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    run.add_argument("--name", help="run name (default: search)")
    run.add_argument("--runs-dir", help="folder of all runs (default: runs)")
    run.add_argument(
        "--resume", action="store_true", default=None, help="continue an interrupted search"
    )
    run.add_argument(
        "--overwrite", action="store_true", default=None, help="start an existing run again"
    )
    run.add_argument("--config", help="YAML file of settings (flags win)")
    run.add_argument("--seed", type=int, help="seed of the split, training and search")
    run.add_argument("--dense-epochs", type=float, help="epochs of dense training (default 15)")
    run.add_argument(
        "--finetune-epochs", type=float, help="epochs of the best subnet's finetune (default 10)"
    )
    run.add_argument(
        "--finetune-lr", type=float, help="peak lr of the score and final finetunes (0.01)"
    )
    run.add_argument(
        "--distill-weight", type=float, help="share of the finetunes' loss from distillation (0.7)"
    )
    run.add_argument(
        "--no-distill",
        dest="distill",
        action="store_false",
        default=None,
        help="finetune without distillation from the dense model",
    )
    run.add_argument(
        "--fold-normalization",
        action="store_true",
        default=None,
        help="build (x - mean) / std into model.pt2 and model.onnx: they take raw pixels in [0, 1]",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run_command)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The search the flags, the ``--config`` file and (with ``--resume``) the run describe.

    Raises:
        ValueError: a flag or setting the config rejects.
        PrunetuneError: an unreadable ``--config`` file.
    """
    from prunetune.search._run import RunExistsError, load_run_settings

    flags = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key not in ("command", "run", "config", "json", "space_option")
    }
    if args.space_option:
        flags["space_options"] = _space_options(args.space_option)
    from_file = read_yaml(args.config) if args.config else {}
    settings: dict[str, Any] = {**from_file, **flags}
    if settings.get("resume"):
        stored = load_run_settings(_run_dir(settings))
        if not stored:
            raise RunExistsError(
                f"nothing to resume: {str(_run_dir(settings))!r} holds no search (check --name "
                "and --runs-dir); start it without --resume"
            )
        stored = {k: v for k, v in stored.items() if k not in ("resume", "overwrite", "address")}
        if any(k in settings for k in ("flops", "params", "latency", "target")):
            stored = {k: v for k, v in stored.items() if k not in ("flops", "params", "latency")}
        settings = {**stored, **settings}
    return SearchConfig.from_mapping(settings)


def run_command(args: argparse.Namespace) -> int:
    """Run the search and print the summary (or JSON)."""
    from prunetune.search._run import run_search

    config = config_from_args(args)
    result = run_search(config, say=say)
    if args.json:
        print(
            json.dumps(
                {
                    "name": result.name,
                    "export_dir": str(result.export_dir),
                    "report": str(result.report_path),
                    "best_trial": result.best.trial_id,
                    "space": result.best.space,
                    "metrics": {k: v for k, v in result.metrics.items() if not math.isnan(v)},
                    "trials": result.counts,
                    "elapsed_s": result.elapsed_s,
                }
            )
        )
    else:
        print(result.summary())
    return 0


def _run_dir(settings: dict[str, Any]) -> Path:
    """The run directory the settings name, before the whole config is checked."""
    loose = {str(k).replace("-", "_"): v for k, v in settings.items()}
    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    return Path(str(loose.get("runs_dir", defaults["runs_dir"]))) / str(
        loose.get("name", defaults["name"])
    )


def _space_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["dsa.epochs=2", "ratios.lr=0.02"]`` -> ``{"dsa": {"epochs": 2}, ...}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        space, dot, option = key.partition(".")
        if not (sep and dot and space and option):
            raise ValueError(f"--space-option {item!r} must read SPACE.OPTION=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        options.setdefault(space.strip(), {})[option.strip()] = value
    return options
