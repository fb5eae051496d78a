"""The search benchmark's page: the summary over seeds, both tables, the reading and the plot
(``bench_search.py``'s output).

Kept apart from the benchmark itself, which only prunes, finetunes and measures: everything here
works on the rows it produced (plain dicts, one per seed, target, method and comparison) and
writes nothing but :func:`plot`'s file.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from prunetune.backend.io import atomic_write

__all__ = ["page", "plot", "reading", "summary"]

ORDER = ("uniform", "global-l1", "torch-pruning", "random-search", "search")
TABLES = {
    "finetune": "Equal finetune: every method's subnet gets the same finetune",
    "compute": "Equal compute: every method's pruning (or search) plus finetune costs what the "
    "full search plus its long finetune cost",
}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds, per comparison, target and method.

    ``std`` is 0.0 for a single seed.
    """
    out = []
    for table in TABLES:
        for target in sorted({r["target"] for r in rows}, reverse=True):
            for method in ORDER:
                runs = [
                    r for r in rows
                    if r["target"] == target and r["method"] == method and r["table"] == table
                    and "test_acc" in r
                ]  # fmt: skip
                if not runs:
                    continue
                accs = [100 * r["test_acc"] for r in runs]
                out.append(
                    {
                        "table": table,
                        "target": target,
                        "method": method,
                        "n": len(runs),
                        "seeds": sorted(r["seed"] for r in runs),
                        "mean": round(statistics.fmean(accs), 3),
                        "std": round(statistics.stdev(accs), 3) if len(accs) > 1 else 0.0,
                        "cpu_s": round(statistics.fmean(r["total_cpu_s"] for r in runs), 1),
                        "wall_s": round(statistics.fmean(r["total_s"] for r in runs), 1),
                        "epochs": round(statistics.fmean(r["finetune_epochs"] for r in runs), 2),
                        "flops_pct": round(statistics.fmean(r["flops_pct"] for r in runs), 2),
                    }
                )
    return out


def reading(stats: list[dict[str, Any]], settings: Any) -> list[str]:
    """Per target and comparison: does the full search's mean beat every baseline's by more
    than one standard deviation (the larger of the two methods' std over seeds)?"""
    lines = []
    for table in TABLES:
        for target in sorted({s["target"] for s in stats if s["table"] == table}, reverse=True):
            at = {s["method"]: s for s in stats if s["table"] == table and s["target"] == target}
            if "search" not in at:
                lines.append(f"{table}, {target:g}% FLOPs: no full-search result.")
                continue
            mine = at["search"]
            rivals = [at[m] for m in ORDER if m != "search" and m in at]
            short = [r for r in rivals if mine["mean"] - r["mean"] <= max(mine["std"], r["std"])]
            best = max(rivals, key=lambda r: r["mean"], default=None)
            head = (
                f"{table}, {target:g}% FLOPs (n={mine['n']}): the full search "
                f"{mine['mean']:.2f} ± {mine['std']:.2f}%"
            )
            if not short:
                lines.append(
                    f"{head} beats every baseline by more than one std (best baseline: "
                    f"{_named(best)})."
                )
                continue
            verdict = ", ".join(_named(r) for r in short)
            winner = (
                f"; the best method is {best['method']}, {best['mean'] - mine['mean']:+.2f} "
                "points against the search"
                if best is not None and best["mean"] > mine["mean"]
                else "; the search has the best mean, but not by more than one std"
            )
            lines.append(f"{head} does NOT beat by more than one std: {verdict}{winner}.")
    return lines


def _named(s: dict[str, Any] | None) -> str:
    return "none" if s is None else f"{s['method']} {s['mean']:.2f} ± {s['std']:.2f}%"


def tables(stats: list[dict[str, Any]]) -> list[str]:
    """Both comparisons as markdown: test accuracy mean ± std (n) per target and method, then
    the compute each method used (mean total CPU seconds, wall seconds, finetune epochs)."""
    out = []
    targets = sorted({s["target"] for s in stats}, reverse=True)
    for table, title in TABLES.items():
        at = {(s["target"], s["method"]): s for s in stats if s["table"] == table}
        head = "| method | " + " | ".join(f"{t:g}% FLOPs" for t in targets) + " |"
        lines = [f"### {title}", "", "Test accuracy, mean ± std over seeds (n seeds):", "", head]
        lines.append("|" + "---|" * (len(targets) + 1))
        cost = ["", "Compute per run, mean: total CPU-s / wall s / finetune epochs:", "", head]
        cost.append("|" + "---|" * (len(targets) + 1))
        for method in ORDER:
            cells = [at.get((t, method)) for t in targets]
            if not any(cells):
                continue
            lines.append(
                f"| {method} | "
                + " | ".join(
                    f"{c['mean']:.2f} ± {c['std']:.2f} ({c['n']})" if c else "-" for c in cells
                )
                + " |"
            )
            cost.append(
                f"| {method} | "
                + " | ".join(
                    f"{c['cpu_s']:.0f} / {c['wall_s']:.0f} / {c['epochs']:g}" if c else "-"
                    for c in cells
                )
                + " |"
            )
        out += [*lines, *cost, ""]
    return out


def runs_table(rows: list[dict[str, Any]]) -> str:
    """Every run's own figures (a failed one keeps its row, with its note)."""
    head = (
        "| seed | target | method | comparison | test acc | FLOPs kept | params | prune CPU-s | "
        "prune s | finetune epochs | finetune CPU-s | finetune s | note |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (-r["target"], r["seed"], ORDER.index(r["method"]),
                                         r["table"])):  # fmt: skip
        lead = f"| {r['seed']} | {r['target']:g}% | {r['method']} | {r['table']} |"
        if "test_acc" not in r:
            out.append(lead + " - |" * 8 + f" {r['note']} |")
            continue
        out.append(
            f"{lead} {100 * r['test_acc']:.2f}% | {r['flops_pct']:.1f}% | "
            f"{r['params'] / 1e3:.1f}k | {r['prune_cpu_s']:.1f} | {r['prune_s']:.1f} | "
            f"{r['finetune_epochs']:g} | {r['finetune_cpu_s']:.1f} | {r['finetune_s']:.1f} | "
            f"{r['note'].replace('|', '/')} |"
        )
    return "\n".join(out)


def page(
    provenance: str,
    facts: list[str],
    stats: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    lines: list[str],
) -> str:
    """The markdown page: provenance, settings, both tables, the reading, the plot, every run."""
    return "\n".join(
        [
            "# Search benchmark: the full search vs one-shot, Torch-Pruning and random search",
            "",
            provenance,
            "",
            *(f"- {fact}" for fact in facts),
            "",
            *tables(stats),
            "## Reading",
            "",
            "To beat is to have a mean more than one standard deviation (the larger of the two "
            "methods') above.",
            "",
            *(f"- {line}" for line in lines),
            "",
            "![test accuracy vs FLOPs target, mean and std over seeds](bench_search.png)",
            "",
            "## Every run",
            "",
            runs_table(rows),
            "",
        ]
    )


def plot(stats: list[dict[str, Any]], path: Path) -> None:
    """Both comparisons side by side: mean test accuracy vs FLOPs target, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # each pane its own accuracy range: equal compute spans about 5 points, equal finetune 60
    figure, panes = plt.subplots(1, 2, figsize=(12, 5))
    markers = "osD^*"
    for axes, (table, title) in zip(panes, TABLES.items(), strict=True):
        for index, method in enumerate(ORDER):
            points = sorted(
                (s["target"], s["mean"], s["std"])
                for s in stats
                if s["table"] == table and s["method"] == method
            )
            if not points:
                continue
            x, y, err = zip(*points, strict=True)
            offset = [v * (1 + 0.02 * (index - 2)) for v in x]  # keep the bars apart
            axes.errorbar(offset, y, yerr=err, marker=markers[index], capsize=3, label=method)
        axes.set_xscale("log")
        ticks = sorted({s["target"] for s in stats})
        axes.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        axes.minorticks_off()
        axes.set_xlabel("FLOPs target (% of the dense model, log scale)")
        axes.set_title(title.split(":")[0], fontsize=10)
        axes.grid(alpha=0.3)
    for axes in panes:
        axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    panes[0].legend(fontsize=8)
    figure.suptitle("ResNet-20 on the small-MNIST task (bench_search.py)", fontsize=11)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
