"""What ``bench_search.py`` writes: the figures (``results.json``, rewritten after every seed),
the page and the plot from them, their provenance (command, commit, machine), and the merge of
several runs' figures (``--render``).

Kept apart from the run itself: everything here works on the rows the run produced.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _bench_search_methods import BATCH_SIZE, DISTILL_WEIGHT, FINETUNE_LR, BenchError, Settings
from _bench_search_page import page, plot, reading, summary
from _provenance import code_commit

from prunetune.backend.io import atomic_write
from prunetune.estimators import DeviceInfo


def provenance(wall_s: float, finished: bool) -> str:
    """Which command and commit wrote the page, when, on what machine, how long it took."""
    command = "python scripts/bench_search.py " + shlex.join(sys.argv[1:])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = DeviceInfo.current(1)
    machine = f"{device.cpu_model}, {os.cpu_count()} CPUs, torch {device.torch_version}"
    return (
        f"Written by `{command.strip()}` at commit `{code_commit()}` on {date}, on {machine}; "
        + (f"the run took {wall_s / 60:.1f} min." if finished else
           f"**partial: written after {wall_s / 60:.1f} min, before the run finished.**")
    )  # fmt: skip


def facts(settings: Settings, dense: dict[int, dict[str, float]]) -> list[str]:
    """The settings and the dense models, one line each, for the page."""
    s = settings
    accs = ", ".join(f"seed {k}: {100 * v['test_acc']:.2f}%" for k, v in sorted(dense.items()))
    return [
        f"task: MNIST test set, shrunk to {s.image_size}x{s.image_size} pixels, per seed split "
        f"into {s.train_images} train / {s.val_images} val / "
        f"{10_000 - s.train_images - s.val_images} test images",
        f"model: resnet20 trained dense for {s.dense_epochs:g} epochs per seed; dense test "
        f"accuracy {accs}",
        f"equal finetune: {s.finetune_epochs:g} epochs (lr {FINETUNE_LR}, batch {BATCH_SIZE}, "
        f"distilled at {DISTILL_WEIGHT}); searches: {s.trials} trials, inner length "
        f"{s.inner_epochs:g} epochs, {s.score_steps} score steps, the best {s.rescore_top} scored "
        f"again after {s.rescore_steps} more steps",
        "compute: CPU seconds of one-thread processes (search driver + trials + finetune); equal "
        f"compute gives the full search's subnet {s.compute_epochs:g} epochs of finetune and "
        "every other method the full search's total (search + that finetune)",
        *(f"{m} skipped: {why}" for m, why in s.skipped.items()),
    ]


def write(
    settings: Settings,
    rows: list[dict[str, Any]],
    dense: dict[int, dict[str, float]],
    wall_s: float,
    finished: bool,
) -> dict[str, Any]:
    """Write results.json, then the page and the plot, from the rows so far; return the figures.

    The figures are saved first: if the page cannot be written, ``--render`` writes it later
    from them.
    """
    stats = summary(rows)
    figures = {
        "benchmark": "search",
        "finished": finished,
        "provenance": provenance(wall_s, finished),
        "facts": facts(settings, dense),
        "settings": {k: v for k, v in vars(settings).items() if not isinstance(v, Path)},
        "dense": {str(k): v for k, v in dense.items()},
        "summary": stats,
        "rows": rows,
        "reading": reading(stats, settings),
        "wall_s": round(wall_s, 1),
    }
    blob = json.dumps(figures, default=str)
    atomic_write(settings.work_dir / "results.json", lambda p: p.write_text(blob, encoding="utf-8"))
    render(figures, settings.out_dir)
    return figures


def render(figures: dict[str, Any], out_dir: Path) -> None:
    """``bench_search.md`` and ``bench_search.png`` in ``out_dir`` from saved figures."""
    text = page(
        figures["provenance"], figures["facts"], figures["summary"], figures["rows"],
        figures["reading"],
    )  # fmt: skip
    atomic_write(out_dir / "bench_search.md", lambda p: p.write_text(text, "utf-8"))
    plot(figures["summary"], out_dir / "bench_search.png")


def merged(paths: list[Path]) -> dict[str, Any]:
    """The figures of several runs of one grid (``--first-seed``), as one: their rows and dense
    models together, the summary and reading recomputed, every run's provenance kept.

    Raises:
        BenchError: a file cannot be read, or two runs hold the same seed.
    """
    try:
        runs = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read results: {exc}") from None
    dense: dict[str, Any] = {}
    for run in runs:
        twice = set(dense) & set(run["dense"])
        if twice:
            raise BenchError(f"seed {min(twice)} is in more than one results file")
        dense.update(run["dense"])
    rows = [row for run in runs for row in run["rows"]]
    stats = summary(rows)
    accs = ", ".join(f"seed {k}: {100 * v['test_acc']:.2f}%" for k, v in sorted(dense.items()))
    facts = [
        (line.split("; dense test accuracy")[0] + f"; dense test accuracy {accs}")
        if line.startswith("model:") else line
        for line in runs[0]["facts"]
    ]  # fmt: skip
    return {
        **runs[0],
        "finished": all(run["finished"] for run in runs),
        "provenance": " ".join(run["provenance"] for run in runs),
        "facts": facts,
        "dense": dense,
        "summary": stats,
        "rows": rows,
        "reading": reading(stats, None),
        "wall_s": max(run["wall_s"] for run in runs),
    }
