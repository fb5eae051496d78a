"""After the trials: pick the best subnet, finetune it fully, export it, check it, report.

The best subnet is the one with the highest metric (after the common score finetune; ``acc`` by
default, or the task's own) of the trials whose subnet meets every target; ties go to fewer FLOPs.
It continues from the weights its trial scored (kept in the trial's folder; the dense model's,
pruned, when they cannot be read), is finetuned for ``finetune_epochs`` (distilled from the dense
model by default), evaluated on the test split and exported to ``runs/<name>/best``. The export is
then reloaded and its FLOPs and parameters measured again: a subnet that misses a target is an
error, never a result.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunetune.backend.errors import InfeasibleTargetError, PrunetuneError
from prunetune.backend.export import export_subnet, load_export
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, train
from prunetune.backend.training import evaluate
from prunetune.estimators import cost_models, format_metric, measure_latency
from prunetune.search._report import write_report
from prunetune.search._result import SearchResult, TrialRecord, format_score
from prunetune.search._setup import Prepared

__all__ = ["NoFeasibleTrialError", "choose_best", "finish"]

BEST_DIR = "best"


class NoFeasibleTrialError(PrunetuneError):
    """No trial ended with a subnet that meets every target."""


def choose_best(records: list[TrialRecord]) -> TrialRecord:
    """The finished trial with the best metric whose subnet meets every target (fewer FLOPs on
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
    return max(candidates, key=lambda r: (r.score or 0.0, -(r.flops or 0.0)))


def finish(
    prepared: Prepared,
    records: list[TrialRecord],
    say: Callable[[str], None],
    elapsed: Callable[[], float],
) -> SearchResult:
    """Finetune, export, verify and report the best trial's subnet."""
    config = prepared.config
    best = choose_best(records)
    spec = best.spec
    if spec is None:  # a finished record always has its spec
        raise NoFeasibleTrialError(f"trial {best.trial_id} reported no subnet")
    spec.validate(prepared.graph)
    dense = prepared.model
    subnet = prune_model(dense, prepared.graph, spec)
    start, why = _load_trial_weights(subnet, best)
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
        "start": start,
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
    report = write_report(prepared, records, best, metrics, spec)
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
