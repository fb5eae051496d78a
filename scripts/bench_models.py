"""Coverage of torchvision's classification and segmentation models: prunetune against
Torch-Pruning, each model one-shot pruned to 50% of its FLOPs at a small input, no weights.

For every model of ``torchvision.models.list_models`` (classification and segmentation;
those over 150M parameters are listed and skipped), at the smallest input side it accepts
from a short ascending list:

- prunetune: ``inspect`` (prunable share of FLOPs, layers kept whole), ``prune`` to
  ``flops<=50%``, export (``model.pt2``, ONNX, parity checked by the export), reload from the
  export directory, outputs of the reloaded model against the pruned one, output shapes against
  the dense model, and the claimed FLOPs (dense and pruned) against ``FlopCounterMode`` / 2.
- Torch-Pruning (when installed): its documented global-magnitude recipe (``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)``, ``global_pruning=True``, the classifier ignored), stepped
  with ``iterative_steps`` until ``FlopCounterMode`` measures at most 50% of the dense FLOPs;
  then the output shapes. It is not a dependency of prunetune; install it into the venv for the
  benchmark only, without letting pip replace torch:

      .venv/bin/pip install torch-pruning --no-deps

  Without it, the Torch-Pruning column says "not installed" and prunetune's column still runs.

Every model runs in a forked child process with a time limit, so one model's crash or hang is
one row with its error. Results go to a JSON-lines file as each model finishes; a rerun with
``--resume`` skips the models already there. The page (``docs/models.md``) is written from that
file at the end (or alone with ``--page-only``).

Usage:
    PYTHONPATH=src .venv/bin/python scripts/bench_models.py              # everything
    PYTHONPATH=src .venv/bin/python scripts/bench_models.py --resume     # continue a run
    PYTHONPATH=src .venv/bin/python scripts/bench_models.py --jobs 8     # 8 models at once
    PYTHONPATH=src .venv/bin/python scripts/bench_models.py --models resnet18,vit_b_32 \
        --results /tmp/r.jsonl --page /tmp/models.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torchvision
from _bench_models_page import TARGET, keep_peer_column, read_rows, run_meta, write_page
from _provenance import code_commit
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import prunetune
from prunetune.backend.errors import PrunetuneError
from prunetune.estimators import FlopsModel

ROOT = Path(__file__).resolve().parent.parent
MAX_PARAMS = 150_000_000
SIDES = (32, 64, 96, 128, 160, 224, 256, 299)
TOOLS = ("prunetune", "torch_pruning")


def list_models() -> list[str]:
    """Every classification and segmentation model of torchvision, sorted."""
    classification = torchvision.models.list_models(module=torchvision.models)
    segmentation = torchvision.models.list_models(module=torchvision.models.segmentation)
    return sorted(set(classification) | set(segmentation))


def build(name: str) -> nn.Module:
    """``name`` with random weights (no download), in eval mode."""
    extra: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        extra["init_weights"] = False  # scipy's truncated normal is slow and not needed
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        extra["weights_backbone"] = None
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """``FlopCounterMode`` total / 2 of one forward pass in eval mode: the reference.

    ``nn.MultiheadAttention``'s fused fast path is off while counting (as in prunetune's own
    trace): ``FlopCounterMode`` counts nothing inside that fused CPU kernel, and off, the same
    function runs as separate ops that it counts.
    """
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model.eval()(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) // 2


def output_shapes(output: Any) -> list[list[int]]:
    """The shapes of every tensor in an output (a tensor, a tuple or a dict of them)."""
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def smallest_side(model: nn.Module) -> int:
    """The smallest side of :data:`SIDES` the model runs on (batch 1, eval mode).

    Raises:
        ValueError: it runs on none of them.
    """
    errors = []
    for side in SIDES:
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, side, side))
            return side
        except Exception as exc:  # any failure means "not this size"
            errors.append(f"{side}: {str(exc).splitlines()[0][:80] if str(exc) else exc!r}")
    raise ValueError("runs on no input side of " + ", ".join(map(str, SIDES)) + f" ({errors[-1]})")


def run_prunetune(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Inspect, prune to 50% FLOPs, export, reload and check one model."""
    row: dict[str, Any] = {}
    found = prunetune.inspect(model, x)
    dense_ref = flop_counter_macs(model, x)
    flops = FlopsModel.from_graph(found.graph)
    row["dense_flops"] = dense_ref
    row["dense_flops_claimed"] = int(found.costs["flops"])
    row["prunable_share"] = 1 - flops.quadratic_form.F0 / flops.dense if flops.dense else 0
    row["min_share"] = flops.minimum / flops.dense if flops.dense else 1
    row["kept_whole"] = len(found.kept_whole)
    row["kept_whole_reasons"] = sorted({_reason_kind(r) for r in found.kept_whole.values()})
    result = prunetune.prune(model, x, {"flops": f"{100 * TARGET:g}%"})
    pruned_ref = flop_counter_macs(result.model, x)
    row["flops_after"] = pruned_ref / dense_ref if dense_ref else 1.0
    row["flops_after_claimed"] = int(result.costs["flops"])
    row["flops_exact"] = (
        row["dense_flops_claimed"] == dense_ref and row["flops_after_claimed"] == pruned_ref
    )
    with torch.no_grad():
        dense_shapes = output_shapes(model(x))
        pruned_out = result.model(x)
    row["shapes_match"] = output_shapes(pruned_out) == dense_shapes
    with tempfile.TemporaryDirectory() as tmp:
        out = result.export(Path(tmp) / "subnet")
        record = json.loads((out / "subnet.json").read_text())
        row["formats"] = sorted(record["files"])
        row["missing_formats"] = record.get("missing_formats", {})
        back = prunetune.load(out, model=model)
        with torch.no_grad():
            reloaded = back.model(x)
    got = torch.utils._pytree.tree_flatten(reloaded)[0]
    want = torch.utils._pytree.tree_flatten(pruned_out)[0]
    row["reload_parity"] = max(
        (float((a - b).abs().max()) for a, b in zip(want, got, strict=True) if a.numel()),
        default=0.0,
    )
    return row


def _reason_kind(reason: str) -> str:
    """A kept-whole reason without the layer-specific figures, for the page's summary."""
    head = reason.split(" (")[0].split(";")[0]
    head = re.sub(r"'[^']*'", "'...'", head)
    return re.sub(r"\b(Linear|Conv\dd|BatchNorm\dd) '\.\.\.'", r"\1", head)[:90]


def classifier_layers(model: nn.Module, dense_shapes: list[list[int]]) -> list[nn.Module]:
    """The layers that produce the classes: Torch-Pruning's recipe leaves them out."""
    classes = {shape[1] for shape in dense_shapes if len(shape) >= 2}
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features in classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels in classes and m.kernel_size == (1, 1))
    ]


def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Torch-Pruning's global-magnitude recipe, stepped until FLOPs <= 50% of dense."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    dense = flop_counter_macs(model, x)
    with torch.no_grad():
        dense_shapes = output_shapes(model(x))
    steps = 20
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=0.95,
        iterative_steps=steps,
        ignored_layers=classifier_layers(model, dense_shapes),
    )
    flops = dense
    taken = 0
    while taken < steps and flops > TARGET * dense:
        pruner.step()
        taken += 1
        flops = flop_counter_macs(model, x)
    with torch.no_grad():
        shapes = output_shapes(model(x))
    return {
        "dense_flops": dense,
        "flops_after": flops / dense if dense else 1.0,
        "steps": taken,
        "shapes_match": shapes == dense_shapes,
    }


def _status(exc: BaseException) -> str:
    return "refused" if isinstance(exc, PrunetuneError) else "crashed"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def bench_one(name: str, tools: tuple[str, ...], report: Any = None) -> dict[str, Any]:
    """One row: the model's size and input, then each tool's outcome (never raises).

    ``report``, when given, is called with ``("start", tool, row)`` before each tool runs and
    ``("row", None, row)`` after, so a parent that kills a hung child still has the finished
    tools' outcomes and knows which tool hung."""
    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    tell = report or (lambda kind, tool, row: None)
    try:
        model = build(name)
        row["params"] = sum(p.numel() for p in model.parameters())
        if row["params"] > MAX_PARAMS:
            row["skipped"] = f"{row['params'] / 1e6:.0f}M parameters (> 150M)"
            return row
        row["side"] = smallest_side(model)
    except Exception as exc:
        row["skipped"] = f"cannot build or run: {_first_line(exc)}"
        return row
    x = torch.randn(1, 3, row["side"], row["side"])
    runners = {"prunetune": run_prunetune, "torch_pruning": run_torch_pruning}
    for tool in tools:
        tell("start", tool, row)
        start = time.perf_counter()
        try:
            outcome = {"status": "ok", **runners[tool](model, x)}
        except ImportError as exc:
            outcome = {"status": "not installed", "error": _first_line(exc)}
        except Exception as exc:
            outcome = {"status": _status(exc), "error": _first_line(exc)}
            outcome["trace"] = traceback.format_exc(limit=-3)[-1500:]
        outcome["seconds"] = round(time.perf_counter() - start, 2)
        row[tool] = outcome
        tell("row", None, row)
    return row


def _child(name: str, tools: tuple[str, ...], conn: Any) -> None:
    def report(kind: str, tool: str | None, row: dict[str, Any]) -> None:
        conn.send((kind, tool, row))

    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        conn.send(("done", None, bench_one(name, tools, report)))
    conn.close()


def bench_isolated(name: str, tools: tuple[str, ...], limit_s: float) -> dict[str, Any]:
    """:func:`bench_one` in a forked process: a hang or a hard crash is one row.

    The child reports each tool as it starts and ends: when the time limit (for the whole
    model) runs out, the tool that was running is the one marked as timed out, and the tools
    that finished keep their outcomes."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, tools, send))
    start = time.perf_counter()
    process.start()
    send.close()
    row: dict[str, Any] | None = None
    done = False
    running: tuple[str, float] | None = None
    while not done:
        left = limit_s - (time.perf_counter() - start)
        if left <= 0 or not receive.poll(left):
            break
        try:
            kind, tool, row = receive.recv()
        except EOFError:
            break
        done = kind == "done"
        running = (tool, time.perf_counter()) if kind == "start" else None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if not done:
        timed_out = process.exitcode in (None, -9)
        why = (
            f"timed out after {limit_s:.0f} s"
            if timed_out
            else f"the process died (exit code {process.exitcode})"
        )
        if running is not None and row is not None:  # charge it to the tool that was running
            tool, since = running
            row[tool] = {
                "status": "crashed",
                "error": why,
                "seconds": round(time.perf_counter() - since, 1),
            }
        else:
            row = {"model": name, "error": why}
    assert row is not None
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (default: all of them)")
    parser.add_argument("--results", default=str(ROOT / "docs" / "models.jsonl"))
    parser.add_argument("--page", default=str(ROOT / "docs" / "models.md"))
    parser.add_argument("--resume", action="store_true", help="skip models already in --results")
    parser.add_argument("--limit-s", type=float, default=900, help="per model and both tools")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from results")
    parser.add_argument("--no-torch-pruning", action="store_true", help="prunetune's column only")
    parser.add_argument(
        "--jobs", type=int, default=1, help="models at once, one process each (1 thread each)"
    )
    args = parser.parse_args(argv)
    results = Path(args.results)
    names = args.models.split(",") if args.models else list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"not torchvision models: {', '.join(unknown)}")
    tools = ("prunetune",) if args.no_torch_pruning else TOOLS
    meta_path = results.with_suffix(".meta.json")
    rows = read_rows(results) if (args.resume or args.page_only) else {}
    commit = code_commit()
    if not args.page_only:
        if not args.resume:
            results.write_text("")
        # --resume skips the models already done; models named with --models are run again
        todo = names if args.models else [n for n in names if n not in rows]
        start = time.perf_counter()
        previous = json.loads(meta_path.read_text()) if args.resume and meta_path.is_file() else {}
        # each model runs in its own forked process; --jobs of them at once (threads only wait)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            running = {pool.submit(bench_isolated, name, tools, args.limit_s) for name in todo}
            for index, future in enumerate(concurrent.futures.as_completed(running), 1):
                row = future.result()
                row["commit"] = commit
                keep_peer_column(row, rows.get(row["model"]), tools)
                rows[row["model"]] = row
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                ours = (row.get("prunetune") or {}).get(
                    "status", row.get("skipped", row.get("error"))
                )
                theirs = (row.get("torch_pruning") or {}).get("status", "")
                print(
                    f"[{index}/{len(todo)}] {row['model']}: {row['wall_s']} s: prunetune {ours}; "
                    f"torch-pruning {theirs}",
                    flush=True,
                )
                # after every model, so an interrupted run still has its figures and a page
                total = len(set(rows) | set(names))
                counts = (index, len(rows), total)
                run_s = time.perf_counter() - start
                meta = run_meta(argv, commit, run_s, args.jobs, counts, previous)
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    meta = json.loads(meta_path.read_text())
    write_page(rows, Path(args.page), meta, SIDES, list_models())
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
