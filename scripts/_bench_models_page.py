"""``scripts/bench_models.py``'s records: the result rows (one JSON line per model), the
record of its runs (``models.meta.json``) and the page written from them (``docs/models.md``)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

TARGET = 0.5
"""The FLOPs share every model is pruned to."""


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["model"]] = row
    return rows


def _millions(count: int | None) -> str:
    return "" if count is None else f"{count / 1e6:.1f}M"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def _cell(outcome: dict[str, Any] | None) -> tuple[str, str, str]:
    """status, seconds, FLOPs after, for one tool's outcome."""
    if outcome is None:
        return "not run", "", ""
    status = outcome["status"]
    if status == "ok":
        checks = []
        if not outcome.get("shapes_match", True):
            checks.append("output shapes differ")
        if outcome.get("flops_exact") is False:
            checks.append("FLOPs claim off")
        if outcome.get("missing_formats"):
            checks.append("no " + ", ".join(outcome["missing_formats"]))
        if outcome["flops_after"] > TARGET + 1e-9:
            checks.append("above 50%")
        status = "ok" + (f" ({'; '.join(checks)})" if checks else "")
    else:
        status = f"{status}: {outcome.get('error', '')[:120]}"
    after = _pct(outcome.get("flops_after"))
    return status.replace("|", "\\|"), f"{outcome.get('seconds', '')}", after


def _totals(rows: list[dict[str, Any]], tool: str) -> str:
    counted = [r for r in rows if "skipped" not in r]
    outcomes = [r.get(tool) for r in counted]
    ok = sum(1 for o in outcomes if o and o["status"] == "ok")
    refused = sum(1 for o in outcomes if o and o["status"] == "refused")
    crashed = sum(1 for o in outcomes if o is None or o["status"] in ("crashed",))
    other = len(outcomes) - ok - refused - crashed
    met = sum(1 for o in outcomes if o and o["status"] == "ok" and o["flops_after"] <= TARGET)
    line = f"{ok} OK, {refused} refused, {crashed} crashed or timed out"
    if other:
        line += f", {other} not run"
    return f"{line}; {met} of {len(outcomes)} met 50% FLOPs"


def _row_commits(rows: list[dict[str, Any]]) -> str:
    """The commits the rows were measured at, with how many rows each."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("commit", "?")] = counts.get(row.get("commit", "?"), 0) + 1
    return ", ".join(f"`{commit}` {n}" for commit, n in counts.items())


def keep_peer_column(
    row: dict[str, Any], previous: dict[str, Any] | None, tools: tuple[str, ...]
) -> None:
    """A rerun of prunetune's column alone (``--no-torch-pruning``) keeps the peer's earlier
    result, which does not depend on prunetune's code, and says from which commit it came."""
    if "torch_pruning" in tools or not previous or not previous.get("torch_pruning"):
        return
    row["torch_pruning"] = previous["torch_pruning"]
    row["torch_pruning_commit"] = previous.get("torch_pruning_commit", previous.get("commit"))


def kept_peer_columns(rows: list[dict[str, Any]]) -> str:
    """Which rows show a Torch-Pruning result kept from an earlier run (``keep_peer_column``)."""
    kept = [r["model"] for r in rows if r.get("torch_pruning_commit")]
    if not kept:
        return ""
    return (
        f" Rerun with `--no-torch-pruning` after prunetune changed, {len(kept)} rows keep "
        f"Torch-Pruning's earlier result: {', '.join(kept)}."
    )


def write_page(
    rows: dict[str, dict[str, Any]],
    page: Path,
    meta: dict[str, Any],
    sides: tuple[int, ...],
    all_models: list[str],
) -> None:
    """``docs/models.md`` from the result rows; ``sides`` are the input sides tried and
    ``all_models`` every model the benchmark covers."""
    ordered = [rows[name] for name in sorted(rows)]
    benched = [r for r in ordered if "skipped" not in r]
    skipped = [r for r in ordered if "skipped" in r]
    exact = sum(1 for r in benched if (r.get("prunetune") or {}).get("flops_exact"))
    lines = [
        "# torchvision models: prunetune and Torch-Pruning at 50% FLOPs",
        "",
        "Every classification and segmentation model of torchvision "
        f"{meta['torchvision']} with random weights (no download), batch 1, at the smallest "
        f"input side it runs on from {', '.join(map(str, sides))}; one-shot pruned to 50% of "
        "its FLOPs (multiply-accumulates, `FlopCounterMode` total / 2), no training. Written "
        "by `scripts/bench_models.py`; accuracy is not measured here (random weights).",
        "",
        '- **prunetune**: `inspect`, `prune(model, x, {"flops": "50%"})` (importance l1, '
        "global allocation), export (`model.pt2` and ONNX with their parity checks), reload "
        "from the export with `prunetune.load(dir, model=dense)`, outputs against the pruned "
        "model, output shapes against the dense model, and the FLOPs prunetune claims (dense "
        "and pruned) against `FlopCounterMode`.",
        "- **Torch-Pruning** "
        f"{meta.get('torch_pruning') or '(not installed)'}: its documented global-magnitude "
        "recipe, `MetaPruner(model, x, importance=GroupMagnitudeImportance(p=2), "
        "global_pruning=True, pruning_ratio=0.95, iterative_steps=20, ignored_layers=[the "
        "classifier])`, stepped until `FlopCounterMode` measures at most 50% of the dense "
        "FLOPs; then the output shapes. No export.",
        "",
        "## Totals",
        "",
        f"- Models benchmarked: {len(benched)} (skipped: {len(skipped)}, listed below).",
        f"- prunetune: {_totals(benched, 'prunetune')}; FLOPs claims equal to "
        f"`FlopCounterMode` (dense and pruned) on {exact} of {len(benched)}.",
        f"- Torch-Pruning: {_totals(benched, 'torch_pruning')}.",
        f"- Time: {meta.get('elapsed', '?')} on {meta['machine']}, 1 torch thread per model. "
        f"Rows by commit: {_row_commits(ordered)}." + kept_peer_columns(ordered),
        "- Runs (each `--resume` adds one):",
        *(
            f"  - `{run['command']}` at `{run['commit']}`: {run['models']} models, "
            f"{run['jobs']} at once, {run.get('minutes') or '?'} min"
            for run in meta.get("runs", [])
        ),
        "",
        "Columns: *side* is the input side; *prunable* the share of the dense FLOPs that "
        "depends on a prunable channel group; *min* the FLOPs left with every prunable group "
        "at its narrowest; *kept whole* how many groups or layers are kept whole (the model's "
        "input and output included); *after* the pruned model's FLOPs as a share of the dense "
        "model's, by `FlopCounterMode`.",
        "",
        "| model | side | params | prunetune | s | prunable | min | kept whole | after "
        "| Torch-Pruning | s | after |",
        "| --- | --: | --: | --- | --: | --: | --: | --: | --: | --- | --: | --: |",
    ]
    for row in benched:
        ours = row.get("prunetune")
        theirs = row.get("torch_pruning")
        if "error" in row and ours is None:
            ours = {"status": "crashed", "error": row["error"], "seconds": row.get("wall_s")}
        status, seconds, after = _cell(ours)
        tp_status, tp_seconds, tp_after = _cell(theirs)
        ours = ours or {}
        lines.append(
            f"| {row['model']} | {row.get('side', '')} | {_millions(row.get('params'))} "
            f"| {status} | {seconds} | {_pct(ours.get('prunable_share'))} "
            f"| {_pct(ours.get('min_share'))} | {ours.get('kept_whole', '')} | {after} "
            f"| {tp_status} | {tp_seconds} | {tp_after} |"
        )
    reasons: dict[str, list[str]] = {}
    for row in benched:
        for reason in (row.get("prunetune") or {}).get("kept_whole_reasons", []):
            if not reason.startswith(("model input", "model output")):  # every model has them
                reasons.setdefault(reason, []).append(row["model"])
    lines += ["", "## Why layers are kept whole", ""]
    lines += ["| reason | models |", "| --- | --- |"]
    for reason, models in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(models[:8]) + (f", ... ({len(models)})" if len(models) > 8 else "")
        lines.append(f"| {reason.replace('|', '/')} | {shown} |")
    lines += ["", "## Skipped", ""]
    lines += [f"- {row['model']}: {row['skipped']}" for row in skipped] or ["- none"]
    missing = sorted(set(all_models) - set(rows))
    if missing:
        lines += ["", "## Not run yet", "", f"{len(missing)} models: {', '.join(missing)}."]
    page.write_text("\n".join(lines) + "\n")


def run_meta(
    argv: list[str] | None,
    commit: str,
    run_s: float,
    jobs: int,
    counts: tuple[int, int, int],
    previous: dict[str, Any],
) -> dict[str, Any]:
    """What the page says about the runs: versions, machine, and for each run (a ``--resume``
    adds one) its command, commit, models, jobs and minutes. ``counts``: models this run
    finished, models with results, models in all."""
    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = None
    return {
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "torch_pruning": tp_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "runs": [
            *previous.get("runs", []),
            {
                "command": "PYTHONPATH=src python scripts/bench_models.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "commit": commit,
                "models": counts[0],
                "jobs": jobs,
                "minutes": round(run_s / 60, 1),
            },
        ],
        "commit": commit,
        "elapsed_s": run_s + float(previous.get("elapsed_s", 0)),
        "elapsed": f"{(run_s + float(previous.get('elapsed_s', 0))) / 60:.0f} min in all for "
        f"{counts[1]} of {counts[2]} models",
    }
