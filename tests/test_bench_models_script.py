"""``scripts/bench_models.py``'s bookkeeping of a prunetune-only rerun (no model is built)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torchvision")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_models.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_prunetune_only_rerun_keeps_the_peers_earlier_column() -> None:
    bench = _script()
    earlier = {"model": "swin_t", "commit": "aaa", "torch_pruning": {"status": "crashed"}}
    rerun = {"model": "swin_t", "commit": "bbb", "prunetune": {"status": "ok"}}
    bench._keep_peer_column(rerun, earlier, ("prunetune",))
    assert rerun["torch_pruning"] == {"status": "crashed"}
    assert rerun["torch_pruning_commit"] == "aaa"
    assert "swin_t" in bench._kept_peer_columns([rerun])
    # a full rerun measures the peer again, and a first run has nothing to keep
    full = {"model": "swin_t", "commit": "bbb", "torch_pruning": {"status": "ok"}}
    bench._keep_peer_column(full, earlier, bench.TOOLS)
    assert full["torch_pruning"] == {"status": "ok"} and "torch_pruning_commit" not in full
    first = {"model": "vgg11", "commit": "bbb", "prunetune": {"status": "ok"}}
    bench._keep_peer_column(first, None, ("prunetune",))
    assert "torch_pruning" not in first and bench._kept_peer_columns([first]) == ""
