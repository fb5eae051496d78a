"""What a search hands back: one record per trial, and the best subnet's final figures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from prunetune.backend.spec import SubnetSpec
from prunetune.estimators import format_metric

__all__ = ["SearchResult", "TrialRecord", "TrialStatus"]

TrialStatus = Literal["finished", "stopped", "failed", "unfinished"]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as Tune recorded it.

    Attributes:
        trial_id: Tune's trial id.
        space: the space it searched.
        status: ``finished`` (scored its subnet), ``stopped`` (stopped early by ASHA),
            ``failed`` (raised, or its worker died more often than retried) or ``unfinished``.
        acc: validation accuracy after the common score finetune (the last intermediate
            accuracy for a stopped trial), ``None`` when it reported nothing.
        flops: FLOPs of its subnet, measured on the pruned model.
        params: parameters of its subnet.
        latency_ms: predicted latency (NaN without a profile).
        feasible: whether the scored subnet meets every target.
        error: the error of a failed trial, on one line.
        node_id: the Ray node that ran it last.
        config: the hyper-parameters Tune gave it.
        spec_json: the subnet of a finished trial, as JSON.
        weights: the file holding a finished trial's scored subnet weights, if it was kept.
    """

    trial_id: str
    space: str
    status: TrialStatus
    acc: float | None = None
    flops: float | None = None
    params: float | None = None
    latency_ms: float = math.nan
    feasible: bool = False
    error: str | None = None
    node_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    spec_json: str | None = None
    weights: str | None = None

    @property
    def spec(self) -> SubnetSpec | None:
        """The subnet of a finished trial."""
        return SubnetSpec.from_dict(json.loads(self.spec_json)) if self.spec_json else None

    def row(self) -> list[str]:
        """Cells of the results table: id, space, status, accuracy, FLOPs, params, fits, note."""
        acc = f"{100 * self.acc:.2f}%" if self.acc is not None else "-"
        flops = format_metric("flops", self.flops) if self.flops is not None else "-"
        params = format_metric("params", self.params) if self.params is not None else "-"
        fits = "yes" if self.feasible else "no" if self.status == "finished" else "-"
        return [self.trial_id, self.space, self.status, acc, flops, params, fits, self.error or ""]


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`prunetune.search.run_search`.

    Attributes:
        name: the run's name.
        run_dir: ``runs/<name>``.
        best: the chosen trial (best accuracy among those meeting every target).
        spec: its subnet, relative to the dense model (as exported).
        metrics: the exported subnet's figures: ``val_acc``, ``test_acc``, ``flops``,
            ``params``, ``latency_ms`` and the dense model's ``dense_*`` counterparts.
        export_dir: ``runs/<name>/best``, the backend's export of the finetuned subnet.
        report_path: ``runs/<name>/report.md``.
        trials: every trial, in the order Tune created them.
        elapsed_s: seconds the whole run took.
        model: the finetuned pruned module (eval mode), as exported; ``None`` only for results
            rebuilt from disk.
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

    @property
    def counts(self) -> dict[str, int]:
        """Trials by status."""
        counts = {"finished": 0, "stopped": 0, "failed": 0, "unfinished": 0}
        for trial in self.trials:
            counts[trial.status] += 1
        return counts

    def summary(self) -> str:
        """The final summary: the trials table, then the chosen subnet's figures."""
        headers = ["trial", "space", "status", "val acc", "flops", "params", "fits", "error"]
        lines = [format_table(headers, [t.row() for t in self.trials], mark=self.best.trial_id)]
        m = self.metrics
        lines.append(
            f"best: trial {self.best.trial_id} ({self.best.space}), test accuracy "
            f"{100 * m['test_acc']:.2f}% (dense {100 * m['dense_test_acc']:.2f}%), "
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


def format_table(headers: list[str], rows: list[list[str]], mark: str | None = None) -> str:
    """A plain-text table; the row whose first cell is ``mark`` gets a ``*``."""
    cells = [headers, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str], flag: str) -> str:
        return (flag + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()

    out = [line(headers, "  ")]
    out += [line(row, "* " if row[0] == mark else "  ") for row in rows]
    return "\n".join(out)
