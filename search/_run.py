"""``run_search``: a whole search, from a config to an exported, reported best subnet.

Order matters: every check that can refuse the search (names, target, profile, run directory,
cluster) runs before anything is written, so a refused search leaves nothing behind. Then the run
directory is created, the dense model trained if needed, the trials run under Ray Tune, and the
best subnet finetuned, exported and reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from prunetune.backend.errors import PrunetuneError
from prunetune.backend.io import (
    OutputError,
    atomic_write,
    check_writable,
    clear_stale_temporaries,
)
from prunetune.search._cluster import ray_session
from prunetune.search._config import SearchConfig
from prunetune.search._final import BEST_DIR, finish
from prunetune.search._report import REPORT_FILE
from prunetune.search._result import SearchResult, TrialRecord
from prunetune.search._setup import Prepared, prepare, train_dense
from prunetune.search._signals import (
    SESSION_FILE,
    Stops,
    end_leftover_ray,
    record_ray_session,
    stops,
)
from prunetune.search._trial import TrialPayload
from prunetune.search._tuner import EXPERIMENT, can_resume, make_tuner, trial_records

__all__ = ["CONFIG_FILE", "RunExistsError", "load_run_settings", "run_search"]

CONFIG_FILE = "search.json"
# settings a resumed search must share with the run it continues
_RESUME_FIXED = (
    "model", "dataset", "data_dir", "checkpoint", "profile", "spaces", "trials", "sampler", "seed",
    "pareto", "inner_epochs", "space_options", "score_steps", "dense_epochs", "distill",
    "batch_size", "round_to", "image_size", "loss", "metric", "output",
)  # fmt: skip


class RunExistsError(PrunetuneError):
    """The run directory holds a search already, or none to resume."""


def run_search(
    config: SearchConfig,
    say: Callable[[str], None] | None = None,
    *,
    module: nn.Module | None = None,
    data: object = None,
) -> SearchResult:
    """Run a search end to end and return its result.

    Args:
        config: the search.
        say: receives progress messages (default: stderr). The live trial line goes to stderr.
        module: the dense model as a module object (its weights count as trained); it reaches
            every trial through Ray's object store, so its class must be importable on the
            workers or defined where cloudpickle can ship it by value.
        data: with ``config.dataset == "python"``, the splits as ``Dataset``/``DataLoader``
            objects (``{"train", "val"[, "test"]}`` or a tuple); shipped to the trials like
            ``module``.

    Returns:
        The best subnet's figures, its export and report, and every trial.

    Raises:
        PrunetuneError: bad input (before anything is written), an unreachable cluster, or no
            trial meeting the target.

    Example:
        >>> from prunetune.estimators import Target
        >>> config = SearchConfig(model="small_cnn", target=Target.parse("flops<=50%"),
        ...                       spaces=("ratios",), trials=4, name="demo")
        >>> result = run_search(config)  # doctest: +SKIP
        >>> result.metrics["test_acc"], result.export_dir  # doctest: +SKIP
    """
    say = say or _stderr
    started, cpu_started = time.monotonic(), time.process_time()
    check_writable(config.run_dir, directory=True)
    _check_run_state(config)
    prepared = prepare(config, module, data)
    end_leftover_ray(config.run_dir)  # of a search of this run that was killed (kill -9)
    with stops(config.name, config.runs_dir) as interrupts:
        try:
            records = _trials(config, prepared, interrupts, say)
        finally:
            (config.run_dir / SESSION_FILE).unlink(missing_ok=True)  # Ray is shut down
        return finish(
            prepared,
            records,
            say,
            lambda: time.monotonic() - started,
            lambda: time.process_time() - cpu_started,
        )


def _trials(
    config: SearchConfig, prepared: Prepared, interrupts: Stops, say: Callable[[str], None]
) -> list[TrialRecord]:
    """Start Ray, write the run's settings, train the dense model if needed, run the trials.

    Raises:
        SearchInterrupted: SIGINT or SIGTERM came; the state is saved for ``--resume``.
        OutputError: the run's files could not be written (a full disk).
    """
    with ray_session(config.address) as cluster, _quiet_tune():
        interrupts.rearm()
        concurrency = cluster.concurrency(config.cpus_per_trial, config.gpus_per_trial)
        if config.overwrite:
            _clear(config)
        # what a killed run left half-written (a hidden .best.* export, .search.json.*)
        clear_stale_temporaries(config.run_dir)
        try:
            config.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.wrap(exc, config.run_dir) from exc
        record_ray_session(config.run_dir)
        text = json.dumps(config.to_dict(), indent=2) + "\n"
        atomic_write(config.run_dir / CONFIG_FILE, lambda path: _write_text(path, text))
        if not prepared.trained:
            train_dense(prepared, say)
        verb = "resuming" if config.resume else "searching"
        say(
            f"{verb} {', '.join(config.spaces)} for {config.target}: {config.trials} trials, "
            f"up to {min(concurrency, config.trials)} at a time on {cluster.nodes} node(s) "
            f"({cluster.address}); results in {config.run_dir}"
        )
        tuner = make_tuner(config, payload_of(prepared), prepared.graph, concurrency)
        try:
            with interrupts.trials():
                results = tuner.fit()
            return trial_records(results, config.task.metric_name)
        except OSError as exc:  # the experiment state or a trial result could not be written
            raise OutputError.wrap(
                exc,
                config.run_dir / EXPERIMENT,
                f"no result was exported, the trials so far are kept for --resume --name "
                f"{config.name}",
            ) from exc
        except (EOFError, pickle.UnpicklingError) as exc:
            raise OutputError(
                f"the trial results in {str(config.run_dir / EXPERIMENT)!r} are truncated "
                f"({type(exc).__name__}): was the disk full? free space and pass --resume"
            ) from exc


def payload_of(prepared: Prepared) -> TrialPayload:
    """What every trial gets through the object store."""
    config = prepared.config
    return TrialPayload(
        model_ref=prepared.ref.to_dict(),
        module=None if prepared.ref.buildable else prepared.model,
        state_dict={k: v.detach().cpu().clone() for k, v in prepared.model.state_dict().items()},
        input_shape=prepared.input_shape,
        target=config.target.to_dict(),
        data=prepared.data_source,
        base_spec=prepared.base_spec.to_dict() if prepared.base_spec else None,
        profile=prepared.profile,
        seed=config.seed,
        threads=max(1, int(config.cpus_per_trial)),
        batch_size=config.batch_size,
        round_to=config.round_to,
        score_steps=config.score_steps,
        distill_weight=config.distill_weight if config.distill else 0.0,
        finetune_lr=config.finetune_lr,
        task=config.task,
        runtime=config.runtime,
        fixed_options={name: config.fixed_options(name) for name in config.spaces},
    )


def load_run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings an earlier search of this run was started with (``{}`` if none).

    Raises:
        RunExistsError: the settings file exists but cannot be read.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunExistsError(f"cannot read the settings of run {str(path)!r}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _check_run_state(config: SearchConfig) -> None:
    """Refuse to mix a new search into an old one, or to resume nothing."""
    exists = can_resume(config.run_dir)
    where = str(config.run_dir)
    if config.resume:
        if not exists:
            raise RunExistsError(
                f"nothing to resume: {where!r} holds no search; start it without --resume"
            )
        stored = load_run_settings(config.run_dir)
        if stored:
            current = config.to_dict()
            for key in _RESUME_FIXED:
                if key in stored and stored[key] != current.get(key):
                    raise RunExistsError(
                        f"run {config.name!r} was started with {key}={stored[key]!r}, not "
                        f"{current.get(key)!r}; a resumed search keeps its settings"
                    )
            old = SearchConfig.from_mapping(stored).target
            if old != config.target:
                raise RunExistsError(
                    f"run {config.name!r} was started with target {old}, not {config.target}; "
                    "a resumed search keeps its settings"
                )
    elif exists and not config.overwrite:
        raise RunExistsError(
            f"run {config.name!r} already exists in {where!r}: pass --resume to continue it, "
            "--overwrite to start it again, or choose another --name"
        )


def _clear(config: SearchConfig) -> None:
    """Remove an earlier run's results, keeping the cached dense model."""
    for name in (EXPERIMENT, BEST_DIR):
        shutil.rmtree(config.run_dir / name, ignore_errors=True)
    for name in (REPORT_FILE, CONFIG_FILE, "pareto.png", "widths.png"):
        (config.run_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Keep Tune's console to our progress line: its tables, tracebacks and Optuna's logs off.

    Trial errors stay in the results (and in each trial's ``error.txt``).
    """
    import optuna

    # the old console output obeys verbose=0; save the experiment state every 2 s (not 10 s),
    # so an interrupted driver loses few finished trials
    settings = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    unset = [name for name in settings if name not in os.environ]
    for name in unset:
        os.environ[name] = settings[name]
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    levels = [logger.level for logger in loggers]
    verbosity = optuna.logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        optuna.logging.set_verbosity(verbosity)
        for name in unset:
            os.environ.pop(name, None)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
