"""The search benchmark's page: the table, the reading, the plot (``bench_search.py``'s output).

Kept apart from the benchmark itself, which only prunes, finetunes and measures: everything
here works on the rows it produced (plain dicts) and writes nothing but ``page``'s caller and
:func:`plot`'s file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunetune.backend.io import atomic_write

__all__ = ["page", "plot", "reading", "table"]


def reading(rows: list[dict[str, Any]], trials: int, startup: int) -> list[str]:
    """Per target: does the full search beat both one-shot baselines and random search?

    To beat is to score a strictly higher test accuracy (one test image is 0.05%); every method
    at or above the full search is named.
    """
    lines = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        at = {r["method"]: r for r in rows if r["target"] == target and "test_acc" in r}
        if "search" not in at:
            lines.append(f"{target:g}% FLOPs: no full-search result to compare.")
            continue
        best = at["search"]["test_acc"]
        rivals = [m for m in ("uniform", "global-l1", "random-search") if m in at]
        lost = [m for m in rivals if at[m]["test_acc"] >= best]
        others = [m for m in at if m not in (*rivals, "search") and at[m]["test_acc"] >= best]
        verdict = (
            f"does NOT beat {_listing(at, lost)}"
            if lost
            else f"beats {', '.join(rivals) or 'no baseline run'}"
        )
        line = f"{target:g}% FLOPs: the full search ({100 * best:.2f}%) {verdict}"
        if others:
            line += f"; also at or above it: {_listing(at, others)}"
        lines.append(line + ".")
    lines.append(
        f"Of the full search's {trials} trials, the first {startup} are TPE's random start-up "
        "(one per space, then a quarter of the rest); the others are proposed by TPE."
    )
    return lines


def _listing(at: dict[str, dict[str, Any]], methods: list[str]) -> str:
    return ", ".join(f"{m} ({100 * at[m]['test_acc']:.2f}%)" for m in methods)


def page(
    title: str, provenance: str, facts: list[str], rows: list[dict[str, Any]], lines: list[str]
) -> str:
    """The markdown page: how it was produced, the settings, the table, the reading, the plot."""
    return "\n".join(
        [
            f"# {title}",
            "",
            provenance,
            "",
            *(f"- {fact}" for fact in facts),
            "",
            table(rows),
            "",
            "## Reading",
            "",
            *(f"- {line}" for line in lines),
            "",
            "![test accuracy vs FLOPs kept, one line per method](bench_search.png)",
            "",
        ]
    )


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (a failed method keeps its row, with its note)."""
    head = (
        "| FLOPs target | method | test acc | FLOPs | kept | estimator = counter | params | "
        "ms bs 1 | ms bs 32 | prune/search s | finetune s | note |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "test_acc" not in r:
            out.append(f"| {r['target']:g}% | {r['method']} |" + " - |" * 9 + f" {r['note']} |")
            continue
        out.append(
            f"| {r['target']:g}% | {r['method']} | {100 * r['test_acc']:.2f}% | "
            f"{r['flops'] / 1e6:.2f}M | {r['flops_pct']:.1f}% | "
            f"{'yes' if r['flops_agree'] else 'NO'} | {r['params'] / 1e3:.1f}k | "
            f"{r['latency_bs1_ms']:.2f} | {r['latency_bs32_ms']:.1f} | {r['prune_s']:.1f} | "
            f"{r['finetune_s']:.1f} | {r['note'].replace('|', '/')} |"
        )
    return "\n".join(out)


def plot(
    rows: list[dict[str, Any]], methods: tuple[str, ...], dense_acc: float, path: Path
) -> None:
    """Test accuracy vs FLOPs kept, one line per method, the dense model as a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>Ph*X"
    scored = [r for r in rows if "test_acc" in r]
    for index, method in enumerate(m for m in methods if any(r["method"] == m for r in scored)):
        points = sorted(
            (r["flops_pct"], 100 * r["test_acc"]) for r in scored if r["method"] == method
        )
        axes.plot(*zip(*points, strict=True), marker=markers[index % len(markers)], label=method)
    axes.axhline(100 * dense_acc, color="black", linestyle="--", label="dense")
    axes.set_xlabel("FLOPs kept (% of the dense model, measured)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("ResNet-20 on MNIST: pruned and finetuned with the same budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)
