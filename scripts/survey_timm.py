"""A quick coverage survey over timm architectures: does prunetune find what is prunable, and are
its FLOPs exact?

timm writes its layers the way model libraries do (weight-standardised convs, "same" padding
computed in ``forward``, norm-plus-activation subclasses, ghost and split-attention blocks,
token mixers), which torchvision's models exercise less. For each model, with random weights,
batch 1, at 96 x 96 where it runs there (else its default input size), one thread:

- ``prunetune.inspect``: prunable channel groups, kept-whole reasons, and whether the dense
  FLOPs equal ``FlopCounterMode`` total / 2;
- ``prunetune.prune`` to 50% FLOPs: the pruned model's FLOPs by ``FlopCounterMode``, and
  whether the claimed figure equals it.

No export and no Torch-Pruning column: ``scripts/bench_models.py`` does the full round trip on
torchvision's models. timm is not a dependency: ``pip install --no-deps timm huggingface_hub
safetensors`` into the venv first (``--no-deps`` keeps the pinned torch). Each model runs in a
forked process, so a crash or hang is one row::

    PYTHONPATH=src .venv/bin/python scripts/survey_timm.py --out docs/models_timm.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODELS = (
    "resnet18d",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "convnextv2_atto",
    "regnetx_002",
    "ghostnet_100",
    "mixnet_s",
    "rexnet_100",
    "nf_resnet26",
    "resnetv2_50x1_bit",
    "cspresnet50",
    "dla34",
    "dpn68b",
    "hrnet_w18_small",
    "ese_vovnet19b_dw",
    "levit_128s",
    "mobilevit_xxs",
    "efficientformer_l1",
    "poolformer_s12",
    "deit_tiny_patch16_224",
    "resmlp_12_224",
    "gmlp_ti16_224",
    "tinynet_e",
    "lcnet_050",
    "fbnetc_100",
    "semnasnet_075",
    "tf_efficientnet_b0",
    "res2net50_14w_8s",
    "resnest14d",
    "selecsls42b",
    "cs3darknet_focus_s",
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "edgenext_xx_small",
    "inception_next_tiny",
    "efficientvit_b0",
    "ghostnetv2_100",
    "hgnetv2_b0",
    "mobilenetv4_conv_small",
    "densenet121",
    "xception41",
    "nasnetalarge",
)
SIDE = 96
LIMIT_S = 600.0


def survey_one(name: str) -> dict[str, Any]:
    """One model's row (never raises)."""
    import timm

    import prunetune
    from prunetune.backend.errors import InfeasibleTargetError
    from prunetune.backend.measure import count_flops

    torch.set_num_threads(1)
    start = time.perf_counter()
    row: dict[str, Any] = {"model": name}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        side = SIDE
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, side, side))
        except Exception:  # a fixed input size (a ViT): use the model's own
            side = int(model.default_cfg["input_size"][-1])
        x = torch.randn(1, 3, side, side)
        found = prunetune.inspect(model, x)
        dense = count_flops(model, x)
        heads = [g for g in found.graph.prunable_groups if g.unit == "heads"]
        row.update(
            side=side,
            groups=len(found.prunable_groups),
            head_groups=len(heads),
            dense_exact=found.costs["flops"] == dense,
            kept_whole=len(found.kept_whole),
        )
        if found.prunable_groups:
            result = prunetune.prune(model, x, "flops<=50%")
            pruned = count_flops(result.model, x)
            row["flops_after"] = pruned / dense
            row["exact"] = result.flops == pruned == result.costs["flops"]
            if heads:  # attention heads kept of all, over every head group
                kept = sum(result.spec.widths[g.name] for g in heads)
                row["heads_kept"] = f"{kept}/{sum(g.size for g in heads)}"
    except InfeasibleTargetError as exc:  # a clear refusal: the smallest subnet is above 50%
        row["refused"] = str(exc).split("; ")[0][:160]
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        row["error"] = f"{type(exc).__name__}: {first}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(name: str, conn: Any) -> None:
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        conn.send(survey_one(name))
    conn.close()


def survey_isolated(name: str) -> dict[str, Any]:
    """:func:`survey_one` in a forked process, ended after :data:`LIMIT_S`."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, send))
    process.start()
    send.close()
    row = receive.recv() if receive.poll(LIMIT_S) else None
    process.join(5)
    if process.is_alive():
        process.kill()
    return row or {"model": name, "error": f"no answer in {LIMIT_S:.0f} s"}


def _outcome(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    if "refused" in row:
        return f"refused: {row['refused']}"
    if not row["groups"]:
        return "nothing prunable"
    if "flops_after" not in row:
        return "not pruned"
    return f"{100 * row['flops_after']:.1f}%" + ("" if row["exact"] else " (claim off)")


def write_page(rows: list[dict[str, Any]], out: Path, commit: str, seconds: float) -> None:
    """The Markdown page of the survey."""
    pruned = sum(1 for r in rows if r.get("flops_after", 1.0) <= 0.5 + 1e-9)
    exact = sum(1 for r in rows if r.get("dense_exact") and r.get("exact", True))
    nothing = [r["model"] for r in rows if r.get("groups") == 0]
    errors = [r["model"] for r in rows if "error" in r]
    refused = [r["model"] for r in rows if "refused" in r]
    lines = [
        "# timm architectures: coverage survey",
        "",
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        f"Commit `{commit}`, {len(rows)} models in {seconds / 60:.0f} min: command "
        "`PYTHONPATH=src .venv/bin/python scripts/survey_timm.py`.",
        "",
        f"- pruned to at most 50% of their FLOPs: **{pruned} of {len(rows)}**",
        f"- FLOPs claims equal to `FlopCounterMode` (dense, and pruned where pruned): "
        f"**{exact} of {len(rows)}**",
        f"- nothing prunable: {', '.join(nothing) or 'none'}",
        f"- refused at 50% (their smallest subnet is larger): {', '.join(refused) or 'none'}",
        f"- errors: {', '.join(errors) or 'none'}",
        "",
        "| model | input | prunable groups | of them attention heads | kept whole | "
        "FLOPs after a 50% prune | heads kept | seconds |",
        "|---|--:|--:|--:|--:|---|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('side', '-')} | {r.get('groups', '-')} | "
            f"{r.get('head_groups', '-')} | {r.get('kept_whole', '-')} | {_outcome(r)} | "
            f"{r.get('heads_kept', '-')} | {r.get('seconds', '-')} |"
        )
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated timm names (default: the survey's)")
    parser.add_argument("--out", default="docs/models_timm.md", help="page to write")
    args = parser.parse_args(argv)
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed: pip install --no-deps timm huggingface_hub safetensors")
        return 2
    names = args.models.split(",") if args.models else list(MODELS)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    start = time.perf_counter()
    rows = []
    for index, name in enumerate(names, 1):
        row = survey_isolated(name)
        rows.append(row)
        print(f"[{index}/{len(names)}] {json.dumps(row)}", flush=True)
    write_page(rows, Path(args.out), commit or "?", time.perf_counter() - start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
