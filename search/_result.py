"""What a search hands back: one record per trial, and the best subnet's final figures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from prunetune.backend.spec import SubnetSpec
from prunetune.estimators import format_metric

__all__ = ["Candidate", "SearchResult", "TrialRecord", "TrialStatus", "format_score"]

TrialStatus = Literal["finished", "stopped", "failed", "unfinished"]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as Tune recorded it.

    Attributes:
        trial_id: Tune's trial id.
        space: the space it searched.
        status: ``finished`` (scored its subnet), ``stopped`` (stopped early by ASHA),
            ``failed`` (raised, or its worker died more often than retried) or ``unfinished``.
        score: the search metric on the validation split after the common score finetune (the
            last intermediate value for a stopped trial), ``None`` when it reported nothing.
        flops: FLOPs of its subnet, measured on the pruned model.
        params: parameters of its subnet.
        latency_ms: predicted latency (NaN without a profile).
        feasible: whether the scored subnet meets every target.
        error: the error of a failed trial, on one line.
        node_id: the Ray node that ran it last.
        config: the hyper-parameters Tune gave it.
        spec_json: the subnet of a finished trial, as JSON.
        weights: the file holding a finished trial's scored subnet weights, if it was kept.
        metric: the search metric's name (``acc`` for top-1 accuracy).
        cpu_s: CPU seconds the trial's process spent on it, up to its last report (``None``
            when it reported nothing).
    """

    trial_id: str
    space: str
    status: TrialStatus
    score: float | None = None
    flops: float | None = None
    params: float | None = None
    latency_ms: float = math.nan
    feasible: bool = False
    error: str | None = None
    node_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    spec_json: str | None = None
    weights: str | None = None
    metric: str = "acc"
    cpu_s: float | None = None

    @property
    def spec(self) -> SubnetSpec | None:
        """The subnet of a finished trial."""
        return SubnetSpec.from_dict(json.loads(self.spec_json)) if self.spec_json else None

    def row(self) -> list[str]:
        """Cells of the results table: id, space, status, metric, FLOPs, params, fits, note."""
        acc = format_score(self.metric, self.score) if self.score is not None else "-"
        flops = format_metric("flops", self.flops) if self.flops is not None else "-"
        params = format_metric("params", self.params) if self.params is not None else "-"
        fits = "yes" if self.feasible else "no" if self.status == "finished" else "-"
        return [self.trial_id, self.space, self.status, acc, flops, params, fits, self.error or ""]


@dataclass(frozen=True)
class Candidate:
    """A trial in the running for the best subnet, as the final choice saw it.

    Attributes:
        trial_id: the trial.
        space: the space it searched.
        score: its validation metric after the common score finetune.
        rescore: its validation metric after the second, longer finetune (``rescore_top``);
            ``None`` when it was not scored again.
        flops: FLOPs of its subnet.
        chosen: whether it was chosen.
    """

    trial_id: str
    space: str
    score: float
    rescore: float | None
    flops: float | None
    chosen: bool = False


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`prunetune.search.run_search`.

    Attributes:
        name: the run's name.
        run_dir: ``runs/<name>``.
        best: the chosen trial (best metric among those meeting every target).
        spec: its subnet, relative to the dense model (as exported).
        metrics: the exported subnet's figures: ``val_<metric>``, ``test_<metric>`` (e.g.
            ``test_acc``, ``test_miou``), ``flops``, ``params``, ``latency_ms`` and the dense
            model's ``dense_*`` counterparts.
        export_dir: ``runs/<name>/best``, the backend's export of the finetuned subnet.
        report_path: ``runs/<name>/report.md``.
        trials: every trial, in the order Tune created them.
        elapsed_s: seconds the whole run took.
        model: the finetuned pruned module (eval mode), as exported; ``None`` only for results
            rebuilt from disk.
        candidates: the best feasible trials by score (the chosen one and its runners-up),
            best first, with their second scores when they were scored again.
        val_size: examples in the validation split every score was measured on.
        start_state: the weights the final finetune started from (the chosen trial's scored
            weights, after its second finetune when it had one); ``None`` when it started from
            the dense weights or for results rebuilt from disk.
        driver_cpu_s: CPU seconds this process spent on the search (``time.process_time``:
            Tune's driver loop, re-scoring, the final finetune, export and report).
    """

    name: str
    run_dir: Path
    best: TrialRecord
    spec: SubnetSpec
    metrics: dict[str, float]
    export_dir: Path
    report_path: Path
    trials: tuple[TrialRecord, ...]
    elapsed_s: float
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    metric: str = "acc"
    candidates: tuple[Candidate, ...] = ()
    val_size: int = 0
    start_state: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    driver_cpu_s: float = 0.0

    @property
    def trials_cpu_s(self) -> float:
        """CPU seconds all trials' processes spent (each up to its last report)."""
        return sum(t.cpu_s or 0.0 for t in self.trials)

    @property
    def counts(self) -> dict[str, int]:
        """Trials by status."""
        counts = {"finished": 0, "stopped": 0, "failed": 0, "unfinished": 0}
        for trial in self.trials:
            counts[trial.status] += 1
        return counts

    def summary(self) -> str:
        """The final summary: the trials table, then the chosen subnet's figures."""
        name = self.metric
        headers = ["trial", "space", "status", f"val {name}", "flops", "params", "fits", "error"]
        lines = [format_table(headers, [t.row() for t in self.trials], mark=self.best.trial_id)]
        m = self.metrics
        lines.append(
            f"best: trial {self.best.trial_id} ({self.best.space}), test {name} "
            f"{format_score(name, m[f'test_{name}'])} "
            f"(dense {format_score(name, m[f'dense_test_{name}'])}), "
            f"flops {format_metric('flops', m['flops'])} of "
            f"{format_metric('flops', m['dense_flops'])} "
            f"({100 * m['flops'] / m['dense_flops']:.1f}%), "
            f"params {format_metric('params', m['params'])} of "
            f"{format_metric('params', m['dense_params'])}"
        )
        if not math.isnan(m.get("measured_latency_ms", math.nan)):
            lines.append(
                f"latency: predicted {m['predicted_latency_ms']:.3f} ms, measured "
                f"{m['measured_latency_ms']:.3f} ms"
            )
        lines.append(f"exported to {self.export_dir}, report {self.report_path}")
        return "\n".join(lines)


PERCENT_METRICS = ("acc", "miou", "pixel_acc")


def format_score(metric: str, value: float) -> str:
    """A metric's value for people: built-in shares as percentages, others as numbers."""
    return f"{100 * value:.2f}%" if metric in PERCENT_METRICS else f"{value:.4g}"


def format_table(headers: list[str], rows: list[list[str]], mark: str | None = None) -> str:
    """A plain-text table; the row whose first cell is ``mark`` gets a ``*``."""
    cells = [headers, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str], flag: str) -> str:
        return (flag + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()

    out = [line(headers, "  ")]
    out += [line(row, "* " if row[0] == mark else "  ") for row in rows]
    return "\n".join(out)
