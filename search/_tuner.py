"""The Ray Tune side of a search: one Tuner over the union of the chosen spaces.

The searcher is Optuna with a define-by-run space: it first picks the space (categorical), then
that space's own hyper-parameters, so each space keeps its conditional options (names are
prefixed ``<space>/`` and arrive as ``config = {"space": s, s: {...}}``). Optuna's sampler is TPE,
or with ``sampler="random"`` independent random draws (a baseline for the search itself). The
first trials run each chosen space once (``points_to_evaluate``), so a short search still tries
them all. Everything ranks by the task's metric under its own name (``acc`` for top-1, ``miou``,
a user metric's ``name``; higher is better). ASHA stops weak trials on the spaces' intermediate
reports of it, separately for each space (see :mod:`prunetune.search._scheduler`). With
``pareto`` the searcher is multi-objective (the metric up, ``flops`` down); ASHA then still ranks
on the metric alone, and Optuna sees only final results (Ray's OptunaSearch skips intermediate
values for several objectives).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from prunetune.backend.graph import ChannelGraph
from prunetune.search._config import SearchConfig
from prunetune.search._progress import ProgressLine
from prunetune.search._result import TrialRecord
from prunetune.search._scheduler import PerSpaceASHA
from prunetune.search._trial import WEIGHTS_FILE, TrialPayload, run_trial
from prunetune.spaces import create_space

__all__ = ["EXPERIMENT", "DefineByRun", "make_sampler", "make_tuner", "trial_records"]

EXPERIMENT = "tune"
_PRIMITIVE = (type(None), bool, int, float, str)


class DefineByRun:
    """Optuna's define-by-run space over several Tune spaces (picklable, for Tune's state).

    Args:
        spaces: by space name, its Tune domains (``Space.search_space(graph)``), possibly nested.
    """

    def __init__(self, spaces: Mapping[str, Mapping[str, Any]]) -> None:
        from ray.tune.search.sample import Categorical

        self.distributions: dict[str, dict[str, Any]] = {}
        self.constants: dict[str, dict[str, Any]] = {}
        self.indexed: dict[str, list[Any]] = {}  # choices Optuna cannot hold, by option name
        for name, domains in spaces.items():
            self.distributions[name], self.constants[name] = {}, {}
            for key, value in _flatten(domains).items():
                if not _is_domain(value):
                    self.constants[name][key] = value
                    continue
                if isinstance(value, Categorical) and not all(
                    isinstance(c, _PRIMITIVE) for c in value.categories
                ):
                    self.indexed[f"{name}/{key}"] = list(value.categories)
                    value = tune.choice(list(range(len(value.categories))))
                converted = OptunaSearch.convert_search_space({"option": value})
                self.distributions[name][key] = converted["option"]

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        """Suggest the space, then its options; returns the values Optuna cannot hold itself."""
        space = trial.suggest_categorical("space", sorted(self.distributions))
        fixed = {f"{space}/{k}": v for k, v in self.constants[space].items()}
        for key, dist in self.distributions[space].items():
            name = f"{space}/{key}"
            if isinstance(dist, optuna.distributions.FloatDistribution):
                trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                choice = trial.suggest_categorical(name, list(dist.choices))
                if name in self.indexed:  # Optuna holds only plain values: hand back the value
                    fixed[name] = self.indexed[name][choice]
        return fixed or None


def space_domains(config: SearchConfig, graph: ChannelGraph) -> dict[str, dict[str, Any]]:
    """Each chosen space's Tune domains, without the options the config fixes."""
    domains = {}
    for name in config.spaces:
        declared = type(create_space(name)).search_space(graph)
        fixed = config.fixed_options(name)
        domains[name] = {k: v for k, v in declared.items() if k not in fixed}
    return domains


def trainable(config: SearchConfig, payload: TrialPayload) -> Any:
    """The trial function with its payload in the object store and its resources attached."""
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, payload=payload), resources)


def make_tuner(
    config: SearchConfig,
    payload: TrialPayload,
    graph: ChannelGraph,
    concurrency: int,
) -> tune.Tuner:
    """A new Tuner for ``config``, or the interrupted one restored when ``config.resume``.

    Results go to ``runs/<name>/tune`` (Tune's experiment folder).
    """
    storage = config.run_dir.resolve()
    if config.resume:
        return tune.Tuner.restore(
            str(storage / EXPERIMENT),
            trainable=trainable(config, payload),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    name = config.task.metric_name
    metric: Any = [name, "flops"] if config.pareto else name
    mode: Any = ["max", "min"] if config.pareto else "max"
    first = [{"space": name} for name in config.spaces[: config.trials]]
    searcher = OptunaSearch(
        space=DefineByRun(space_domains(config, graph)),
        metric=metric,
        mode=mode,
        points_to_evaluate=first,
        sampler=make_sampler(config),
    )
    scheduler = PerSpaceASHA(metric=name, mode="max", grace_period=config.grace_period)
    return tune.Tuner(
        trainable(config, payload),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=config.trials,
            max_concurrent_trials=min(config.trials, concurrency),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            callbacks=[ProgressLine(config.trials, metric=name)],
            verbose=0,
        ),
    )


def make_sampler(config: SearchConfig) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``config.sampler`` names, seeded by ``config.seed``.

    ``tpe`` is TPE with :func:`startup_trials` random start-up trials; both samplers are built
    here so they get their seed the same way (OptunaSearch ignores ``seed`` next to a sampler).
    A resumed search restores the sampler, with its state, from Tune's checkpoint.
    """
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=startup_trials(config))


def startup_trials(config: SearchConfig) -> int:
    """Trials TPE leaves to random draws before it models the results.

    Optuna's default of 10 would make any search of 10 trials or fewer a random search; here the
    first trial of each space (``points_to_evaluate``) and a quarter of the rest are start-up,
    never more than Optuna's 10.
    """
    spaces = min(len(config.spaces), config.trials)
    return min(10, spaces + (config.trials - spaces) // 4)


def can_resume(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a Tune experiment to continue."""
    return tune.Tuner.can_restore(str(run_dir.resolve() / EXPERIMENT))


def trial_dirname(trial: Any) -> str:
    """``trial_<id>``: trial folders named by id alone."""
    return f"trial_{trial.trial_id}"


def trial_records(results: tune.ResultGrid, metric: str = "acc") -> list[TrialRecord]:
    """One record per trial of a finished ``Tuner.fit``; ``metric`` names the search metric."""
    records = []
    for index in range(len(results)):
        result = results[index]
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        if result.error is not None:
            status = "failed"
        elif "spec_json" in metrics:
            status = "finished"
        elif metrics:
            status = "stopped"
        else:
            status = "unfinished"
        records.append(
            TrialRecord(
                trial_id=trial_id,
                space=str(config.get("space", metrics.get("space", "?"))),
                status=status,  # type: ignore[arg-type]
                score=_number(metrics.get(metric)),
                metric=metric,
                flops=_number(metrics.get("flops")),
                params=_number(metrics.get("params")),
                latency_ms=_number(metrics.get("latency_ms")) or math.nan,
                feasible=bool(metrics.get("feasible")) and status == "finished",
                error=_error_line(result.error) if result.error is not None else None,
                node_id=metrics.get("node_id"),
                config=config,
                spec_json=metrics.get("spec_json") if status == "finished" else None,
                weights=_weights_file(result) if status == "finished" else None,
                cpu_s=_number(metrics.get("cpu_s")),
            )
        )
    return records


def _weights_file(result: Any) -> str | None:
    """The scored subnet weights in the trial's Tune checkpoint, read through Tune's storage.

    A checkpoint on a filesystem this process cannot read directly (cloud storage) is
    downloaded first. ``None`` when the trial left no checkpoint, or it cannot be read.
    """
    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    path = Path(checkpoint.path) / WEIGHTS_FILE
    if path.is_file():
        return str(path)
    try:
        path = Path(checkpoint.to_directory()) / WEIGHTS_FILE
    except Exception:  # storage unreachable from here: the final finetune says so
        return None
    return str(path) if path.is_file() else None


def _error_line(error: BaseException) -> str:
    """The user's exception on one line, without Ray's wrapping."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(error, RayActorError):
        return "the trial's worker process died (retries exhausted)"
    cause = error.cause if isinstance(error, RayTaskError) else error
    if cause is None:
        cause = error
    lines = str(cause).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    return text.removeprefix("TrialFailedError: ")


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _flatten(domains: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in domains.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _is_domain(value: Any) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain)
