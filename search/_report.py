"""``runs/<name>/report.md`` with its two figures, ``pareto.png`` and ``widths.png``.

Every file is written atomically; the figures use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunetune.backend.data import split_length
from prunetune.backend.io import atomic_write
from prunetune.backend.spec import SubnetSpec
from prunetune.estimators import format_metric
from prunetune.search._result import PERCENT_METRICS, Candidate, TrialRecord, format_score

if TYPE_CHECKING:
    from prunetune.search._setup import Prepared

__all__ = ["REPORT_FILE", "write_report"]

REPORT_FILE = "report.md"


def write_report(
    prepared: Prepared,
    records: list[TrialRecord],
    best: TrialRecord,
    metrics: dict[str, Any],
    spec: SubnetSpec,
    candidates: tuple[Candidate, ...] = (),
) -> Path:
    """Write the report and its figures into the run directory; returns the report's path."""
    run_dir = prepared.config.run_dir
    _plot_pareto(run_dir / "pareto.png", records, best, prepared.budget.limits.get("flops"))
    dense = {g.name: g.size for g in prepared.graph.prunable_groups}
    _plot_widths(run_dir / "widths.png", dense, spec.widths)
    text = render(prepared, records, best, metrics, candidates)
    return atomic_write(run_dir / REPORT_FILE, lambda path: _write_text(path, text))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def render(
    prepared: Prepared,
    records: list[TrialRecord],
    best: TrialRecord,
    metrics: dict[str, Any],
    candidates: tuple[Candidate, ...] = (),
) -> str:
    """The report's Markdown."""
    config = prepared.config
    name = best.metric
    label = "accuracy" if name == "acc" else name  # the metric in sentences
    figures = []
    for metric in ("flops", "params", "latency_ms"):
        value, dense = metrics.get(metric), metrics.get(f"dense_{metric}")
        if value is None or dense is None or math.isnan(value):
            continue
        limit = prepared.budget.limits.get(metric)
        figures.append(
            [
                "latency_ms (predicted)" if metric == "latency_ms" else metric,
                format_metric(metric, dense),
                format_metric(metric, value),
                f"{100 * value / dense:.1f}%",
                format_metric(metric, limit) if limit is not None else "-",
            ]
        )
    measured = metrics.get("measured_latency_ms")
    if isinstance(measured, float) and not math.isnan(measured):
        limit = prepared.budget.limits.get("latency_ms")
        dense_ms = prepared.profile.model_ms if prepared.profile else None
        figures.append(
            [
                "latency_ms (measured, exported subnet)",
                format_metric("latency_ms", dense_ms) + " (profiled)" if dense_ms else "-",
                format_metric("latency_ms", measured),
                "-",
                format_metric("latency_ms", limit) if limit is not None else "-",
            ]
        )
    rows = [[*r.row()[:-1], (r.error or "").replace("|", "/")] for r in records]
    lines = [
        f"# prunetune search `{config.name}`",
        "",
        f"- model: `{prepared.ref.name}` ({prepared.source}), dataset `{prepared.data.name}`",
        f"- target: `{config.target}`",
        f"- spaces: {', '.join(config.spaces)}; {len(records)} trials"
        + (" (Pareto sweep: accuracy vs FLOPs)" if config.pareto else ""),
        "",
        "## Best subnet",
        "",
        f"Trial `{best.trial_id}` ({best.space}), exported to `{config.run_dir / 'best'}`.",
        "",
        f"- test {label}: **{format_score(name, metrics[f'test_{name}'])}** "
        f"(dense model: {format_score(name, metrics[f'dense_test_{name}'])})",
        f"- validation {label}: {format_score(name, metrics[f'val_{name}'])} after "
        f"{config.finetune_epochs:g} epochs of finetuning from {metrics['start']}"
        + (" distilled from the dense model" if config.distill else ""),
        *(
            [
                f"- **the final finetune could not start from the best trial's weights** "
                f"({metrics['start_problem']}); it started from the dense weights, pruned"
            ]
            if metrics.get("start_problem")
            else []
        ),
        "",
        _markdown_table(["metric", "dense", "subnet", "share", "target"], figures),
        "",
        f"![{name} vs FLOPs of every trial](pareto.png)",
        "",
        "![per-group widths, dense vs chosen](widths.png)",
        "",
        *_runners_up(prepared, candidates, label),
        "## Trials",
        "",
        f"Validation {label} after the common score finetune "
        f"({config.score_steps} steps); `*` marks the chosen trial.",
        "",
        _markdown_table(
            ["trial", "space", "status", f"val {name}", "flops", "params", "fits", "error"],
            [[("*" if r[0] == best.trial_id else "") + r[0], *r[1:]] for r in rows],
        ),
        "",
    ]
    return "\n".join(lines)


def _runners_up(prepared: Prepared, candidates: tuple[Candidate, ...], label: str) -> list[str]:
    """How sure the choice is: the chosen trial and its runners-up, their scores, and how many
    validation examples measured them (one example is ``1 / n`` of an accuracy)."""
    if not candidates:
        return []
    config = prepared.config
    chosen = next(c for c in candidates if c.chosen)
    name = best_metric = _metric_of(label)
    rescored = any(c.rescore is not None for c in candidates)
    n = split_length(prepared.data.val)
    lines = [
        "## How sure the choice is",
        "",
        f"Every score below is the validation {label} on the same **{n} validation examples** "
        + (f"(one example is {100 / n:.2f} points of accuracy)" if name == "acc" and n else "")
        + f", after the common score finetune ({config.score_steps} steps)"
        + (
            f"; the best {sum(c.rescore is not None for c in candidates)} were then scored again "
            f"after {config.rescore_steps or config.score_steps} more steps, and the choice "
            "follows that second score"
            if rescored
            else ""
        )
        + ".",
        "",
    ]
    rows = []
    for c in candidates:
        cells = [
            ("*" if c.chosen else "") + c.trial_id,
            c.space,
            format_score(best_metric, c.score),
        ]
        if rescored:
            cells.append(format_score(best_metric, c.rescore) if c.rescore is not None else "-")
        cells.append(format_metric("flops", c.flops) if c.flops is not None else "-")
        rows.append(cells)
    headers = ["trial", "space", f"val {name}"]
    if rescored:
        headers.append(f"val {name}, scored again")
    lines += [_markdown_table([*headers, "flops"], rows), ""]
    runners = [c for c in candidates if not c.chosen]
    if runners:
        key = (lambda c: c.rescore or 0.0) if rescored else (lambda c: c.score)
        margin = key(chosen) - max(key(c) for c in runners)
        lines += [
            f"The chosen trial leads its best runner-up by "
            f"{format_score(best_metric, margin)}"
            + (f" ({round(margin * n)} validation examples)" if name == "acc" and n else "")
            + ": a lead of a few examples is within the noise of one validation split.",
            "",
        ]
    return lines


def _metric_of(label: str) -> str:
    return "acc" if label == "accuracy" else label


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    return pyplot


def _plot_pareto(
    path: Path, records: list[TrialRecord], best: TrialRecord, flops_limit: float | None
) -> None:
    pyplot = _figure()
    figure, axes = pyplot.subplots(figsize=(6.4, 4.4))
    scored = [r for r in records if r.score is not None and r.flops is not None]
    name = best.metric
    scale = 100 if name in PERCENT_METRICS else 1
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, space in enumerate(sorted({r.space for r in scored})):
        mine = [r for r in scored if r.space == space]
        for finished, marker in ((True, "o"), (False, "x")):
            points = [r for r in mine if (r.status == "finished") == finished]
            if points:
                axes.scatter(
                    [r.flops for r in points],
                    [scale * (r.score or 0) for r in points],
                    marker=marker,
                    color=colors[index % len(colors)],
                    label=f"{space}" + ("" if finished else " (stopped early, last report)"),
                    alpha=0.8,
                )
    if best.flops is not None and best.score is not None:
        axes.scatter(
            [best.flops], [scale * best.score], marker="*", s=300, c="gold", edgecolors="black",
            label="chosen", zorder=5,
        )  # fmt: skip
    if flops_limit is not None:
        axes.axvline(flops_limit, color="grey", linestyle="--", label="FLOPs target")
    axes.set_xlabel("FLOPs (MACs)")
    axes.set_ylabel(f"validation {name}" + (" (%)" if scale == 100 else ""))
    axes.set_title(f"{name} vs FLOPs of every trial")
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    pyplot.close(figure)


def _plot_widths(path: Path, dense: dict[str, int], chosen: dict[str, int]) -> None:
    pyplot = _figure()
    names = list(dense)
    figure, axes = pyplot.subplots(figsize=(max(6.4, 0.35 * len(names) + 2), 4.4))
    positions = range(len(names))
    axes.bar(positions, [dense[n] for n in names], color="lightgrey", label="dense")
    axes.bar(positions, [chosen.get(n, dense[n]) for n in names], color="tab:blue", label="chosen")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=60, ha="right", fontsize="small")
    axes.set_ylabel("channels")
    axes.set_title("per-group widths: dense vs chosen")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    pyplot.close(figure)
