"""After the trials: pick the best subnet, finetune it fully, export it, check it, report.

The best subnet is the one with the highest metric (after the common score finetune; ``acc`` by
default, or the task's own) of the trials whose subnet meets every target; ties go to fewer FLOPs.
With ``rescore_top`` of 2 or more, the best that many are first scored again: each continues from
the weights its trial scored for ``rescore_steps`` more steps of the same finetune and is measured
on the validation split again, and the best after that is chosen (a short score finetune on a few
hundred validation images ties often: this second, longer look is successive halving's last rung).
The chosen subnet continues from the weights its trial scored (after its second finetune, if
any; the dense model's, pruned, when they cannot be read), is finetuned for ``finetune_epochs``
(distilled from the dense model by default), evaluated on the test split and exported to
``runs/<name>/best``. The export is then reloaded and its FLOPs and parameters measured again: a
subnet that misses a target is an error, never a result.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunetune.backend.data import split_length
from prunetune.backend.errors import InfeasibleTargetError, PrunetuneError
from prunetune.backend.export import export_subnet, load_export
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, train
from prunetune.backend.training import evaluate
from prunetune.estimators import cost_models, format_metric, measure_latency
from prunetune.search._report import write_report
from prunetune.search._result import Candidate, SearchResult, TrialRecord, format_score
from prunetune.search._setup import Prepared
from prunetune.search._trial import finetune_and_score

__all__ = ["NoFeasibleTrialError", "choose_best", "finish", "ranked", "rescore"]

BEST_DIR = "best"
RUNNERS_UP = 4
"""Runners-up the result and the report list beside the chosen trial."""


class NoFeasibleTrialError(PrunetuneError):
    """No trial ended with a subnet that meets every target."""


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """The finished trials whose subnet meets every target, best metric first (fewer FLOPs on
    ties).

    Raises:
        NoFeasibleTrialError: none qualifies; the message counts trials by status.
    """
    candidates = [r for r in records if r.status == "finished" and r.feasible]
    if not candidates:
        counts: dict[str, int] = {}
        for record in records:
            counts[record.status] = counts.get(record.status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        errors = [r.error for r in records if r.error]
        hint = f"; first error: {errors[0]}" if errors else ""
        raise NoFeasibleTrialError(
            f"no trial produced a subnet that meets every target ({summary}){hint}"
        )
    return sorted(candidates, key=lambda r: (-(r.score or 0.0), r.flops or 0.0))


def choose_best(records: list[TrialRecord]) -> TrialRecord:
    """The finished trial with the best metric whose subnet meets every target (fewer FLOPs on
    ties).

    Raises:
        NoFeasibleTrialError: none qualifies; the message counts trials by status.
    """
    return ranked(records)[0]


@dataclass
class _Start:
    """A candidate's subnet, loaded with its trial's weights (and its second score, if any)."""

    record: TrialRecord
    subnet: torch.nn.Module
    start: str
    problem: str
    rescore: float | None = None


def rescore(prepared: Prepared, top: list[TrialRecord], say: Callable[[str], None]) -> list[_Start]:
    """Score ``top`` again: ``rescore_steps`` more steps of the score finetune from each trial's
    weights, then the validation metric; returns them in the order given, with that score.

    A trial whose weights cannot be read restarts from the dense weights, pruned (and says so).
    """
    config = prepared.config
    steps = config.rescore_steps or config.score_steps
    say(
        f"scoring the best {len(top)} trials again: {steps} more finetune steps each, then "
        f"{split_length(prepared.data.val)} validation examples"
    )
    started = []
    for record in top:
        one = _start(prepared, record)
        one.rescore = finetune_and_score(
            one.subnet,
            prepared.model,
            prepared.data,
            steps=steps,
            batch_size=config.batch_size,
            lr=config.finetune_lr,
            distill_weight=config.distill_weight if config.distill else 0.0,
            seed=config.seed,
            task=config.task,
            runtime=config.runtime,
        )
        one.subnet.cpu()
        say(
            f"  trial {record.trial_id} ({record.space}): "
            f"{format_score(record.metric, record.score or 0.0)} -> "
            f"{format_score(record.metric, one.rescore)}"
            + (f" (from the dense weights: {one.problem})" if one.problem else "")
        )
        started.append(one)
    prepared.model.cpu()
    return started


def _start(prepared: Prepared, record: TrialRecord) -> _Start:
    """``record``'s subnet with the weights its trial scored (the dense ones if unreadable)."""
    spec = record.spec
    if spec is None:  # a finished record always has its spec
        raise NoFeasibleTrialError(f"trial {record.trial_id} reported no subnet")
    spec.validate(prepared.graph)
    subnet = prune_model(prepared.model, prepared.graph, spec)
    start, why = _load_trial_weights(subnet, record)
    return _Start(record, subnet, start, why)


def _choose(
    prepared: Prepared, records: list[TrialRecord], say: Callable[[str], None]
) -> tuple[_Start, tuple[Candidate, ...]]:
    """The chosen trial, loaded, and the candidates list (the chosen one and its runners-up)."""
    ranking = ranked(records)
    top = ranking[: prepared.config.rescore_top] if prepared.config.rescore_top > 1 else []
    if len(top) > 1:
        again = rescore(prepared, top, say)
        chosen = max(again, key=lambda one: (one.rescore or 0.0, -(one.record.flops or 0.0)))
        second = {one.record.trial_id: one.rescore for one in again}
    else:
        chosen, second = _start(prepared, ranking[0]), {}
    listed = [chosen.record, *[r for r in ranking if r is not chosen.record][:RUNNERS_UP]]
    candidates = tuple(
        Candidate(
            trial_id=r.trial_id,
            space=r.space,
            score=r.score or 0.0,
            rescore=second.get(r.trial_id),
            flops=r.flops,
            chosen=r is chosen.record,
        )
        for r in listed
    )
    return chosen, candidates


def finish(
    prepared: Prepared,
    records: list[TrialRecord],
    say: Callable[[str], None],
    elapsed: Callable[[], float],
    cpu: Callable[[], float] = lambda: 0.0,
) -> SearchResult:
    """Choose (re-scoring the best trials), finetune, export, verify and report a subnet.

    ``elapsed`` and ``cpu`` give the run's wall-clock and driver CPU seconds so far.
    """
    config = prepared.config
    chosen, candidates = _choose(prepared, records, say)
    best, subnet, start, why = chosen.record, chosen.subnet, chosen.start, chosen.problem
    spec = best.spec
    assert spec is not None  # checked by _start
    dense = prepared.model
    start_state = None if why else {k: v.detach().clone() for k, v in subnet.state_dict().items()}
    if why:
        say(f"  cannot start from the trial's weights ({why}); using the dense ones")
    say(
        f"best trial {best.trial_id} ({best.space}, val {best.metric} "
        f"{format_score(best.metric, best.score or 0.0)}): "
        f"finetuning for {config.finetune_epochs:g} epochs from {start}"
        + (", distilled from the dense model" if config.distill else "")
    )
    task, runtime, data = config.task, config.runtime, prepared.data
    train(
        subnet,
        data,
        TrainConfig(
            epochs=config.finetune_epochs,
            lr=config.finetune_lr,
            batch_size=config.batch_size,
            distill_weight=config.distill_weight if config.distill else 0.0,
            seed=config.seed,
        ),
        teacher=dense if config.distill else None,
        on_epoch=lambda report: say("  " + report.line()),
        task=task,
        runtime=runtime,
    )
    _, val_acc = evaluate(subnet, data.val, task, runtime, workers=data.workers)
    _, test_acc = evaluate(subnet, data.test, task, runtime, workers=data.workers)
    _, dense_test_acc = evaluate(
        runtime.model(dense), data.test, task, runtime, workers=data.workers
    )
    subnet.cpu()
    dense.cpu()
    costs = cost_models(prepared.graph, prepared.profile)
    dense_costs = prepared.dense_costs
    name = task.metric_name
    metrics: dict[str, Any] = {
        f"val_{name}": float(val_acc),
        f"test_{name}": float(test_acc),
        "latency_ms": float(costs["latency_ms"].evaluate(spec.widths))
        if "latency_ms" in costs
        else float("nan"),
        f"dense_test_{name}": float(dense_test_acc),
        **{f"dense_{m}": v for m, v in dense_costs.items()},
        "trial_id": best.trial_id,
        "space": best.space,
        "target": str(config.target),
        "start": start + (" after its second score finetune" if chosen.rescore else ""),
        "start_problem": why,
    }
    if prepared.profile is not None:
        metrics["predicted_latency_ms"] = metrics["latency_ms"]
        metrics["measured_latency_ms"] = measure_subnet(subnet, prepared)
        say(latency_line(metrics, prepared))
    exported_spec = prepared.base_spec.compose(spec) if prepared.base_spec else spec
    export_dir = config.run_dir / BEST_DIR
    export_subnet(
        export_dir,
        subnet,
        exported_spec,
        metrics=metrics,
        preprocessing=prepared.data.preprocessing(),
        fold_normalization=config.fold_normalization,
    )
    measured = _verify(prepared, export_dir, metrics["latency_ms"])
    metrics.update(measured)
    say(f"exported to {export_dir}: " + prepared.budget.describe(spec.widths))
    report = write_report(prepared, records, best, metrics, spec, candidates)
    return SearchResult(
        name=config.name,
        run_dir=config.run_dir,
        best=best,
        spec=exported_spec,
        metrics={k: v for k, v in metrics.items() if isinstance(v, float)},
        export_dir=export_dir,
        report_path=report,
        trials=tuple(records),
        elapsed_s=elapsed(),
        model=subnet.eval(),
        metric=name,
        candidates=candidates,
        val_size=split_length(data.val),
        start_state=start_state,
        driver_cpu_s=cpu(),
    )


def measure_subnet(model: torch.nn.Module, prepared: Prepared) -> float:
    """The subnet's latency measured now, as the profile measured its dense model: its batch
    size, threads and statistic.

    Args:
        model: the subnet, as exported.
        prepared: the search (its profile and input shape).

    Returns:
        Milliseconds per forward pass.
    """
    profile = prepared.profile
    assert profile is not None  # only called with a profile
    example = torch.randn(profile.batch_size, *prepared.input_shape[1:])
    threads = profile.device.threads
    if profile.settings.get("statistic") == "min":
        return measure_latency(model, example, threads=threads, statistic="min")
    return measure_latency(model, example, threads=threads, statistic="median")


def latency_line(metrics: dict[str, Any], prepared: Prepared) -> str:
    """Predicted and measured latency of the chosen subnet side by side, labelled; and advice
    when the measurement misses the latency target the prediction met.

    Args:
        metrics: holding ``predicted_latency_ms`` and ``measured_latency_ms``.
        prepared: the search (its profile and budget).

    Returns:
        The line to show.
    """
    profile = prepared.profile
    assert profile is not None
    predicted, measured = metrics["predicted_latency_ms"], metrics["measured_latency_ms"]
    line = (
        f"latency of the chosen subnet at batch {profile.batch_size}, "
        f"{profile.device.threads} thread(s): predicted {predicted:.3f} ms, measured "
        f"{measured:.3f} ms ({100 * (measured / predicted - 1):+.0f}%)"
    )
    limit = prepared.budget.limits.get("latency_ms")
    if limit is not None and measured > limit:
        line += (
            f"; the measurement is above the {limit:.3f} ms target: the profile no longer "
            "holds on this machine (refresh it: prunetune profile --recalibrate PROFILE, on "
            "a quiet machine)"
        )
    return line


def _load_trial_weights(subnet: torch.nn.Module, best: TrialRecord) -> tuple[str, str]:
    """Load the best trial's scored weights (from its Tune checkpoint) into ``subnet``.

    A missing or unreadable checkpoint (an older run, storage this driver cannot read) is not
    an error: the subnet then starts from the dense model's weights, as pruned, and the report
    says why.

    Returns:
        (where the finetune starts from, why not from the trial's weights; ``""`` when it does).
    """
    if not best.weights:
        return "the dense weights", "the trial left no checkpoint readable from this driver"
    try:
        state = torch.load(best.weights, map_location="cpu", weights_only=True)
        subnet.load_state_dict(state)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return "the dense weights", f"{type(exc).__name__}: {first}"
    return "the trial's weights", ""


def _verify(prepared: Prepared, export_dir: Path, latency_ms: float) -> dict[str, float]:
    """Reload the export and check every target on the model as it was written.

    Raises:
        InfeasibleTargetError: the exported model misses a target (a bug, never silent).
    """
    # a module object has no factory: rebuild from it (a zoo model or factory is rebuilt alone,
    # which also checks an export of an export against the original dense model)
    dense = None if prepared.ref.buildable else prepared.model
    loaded = load_export(export_dir, dense=dense, expect=prepared.ref)
    measured = {
        "flops": float(count_flops(loaded.model, torch.zeros(prepared.input_shape))),
        "params": float(count_params(loaded.model)),
        "latency_ms": latency_ms,
    }
    for metric, limit in prepared.budget.limits.items():
        if not measured[metric] <= limit * (1 + 1e-9):
            raise InfeasibleTargetError(
                f"the exported subnet has {format_metric(metric, measured[metric])} {metric}, "
                f"above the target's {format_metric(metric, limit)}"
            )
    return measured
