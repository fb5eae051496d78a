"""``scripts/bench_models.py``'s records (``scripts/_bench_models_page.py``): a prunetune-only
rerun, and the runs on record (no model is built)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torchvision")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "_bench_models_page.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_models_page", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_prunetune_only_rerun_keeps_the_peers_earlier_column() -> None:
    bench = _script()
    earlier = {"model": "swin_t", "commit": "aaa", "torch_pruning": {"status": "crashed"}}
    rerun = {"model": "swin_t", "commit": "bbb", "prunetune": {"status": "ok"}}
    bench.keep_peer_column(rerun, earlier, ("prunetune",))
    assert rerun["torch_pruning"] == {"status": "crashed"}
    assert rerun["torch_pruning_commit"] == "aaa"
    assert "swin_t" in bench.kept_peer_columns([rerun])
    # a full rerun measures the peer again, and a first run has nothing to keep
    full = {"model": "swin_t", "commit": "bbb", "torch_pruning": {"status": "ok"}}
    bench.keep_peer_column(full, earlier, ("prunetune", "torch_pruning"))
    assert full["torch_pruning"] == {"status": "ok"} and "torch_pruning_commit" not in full
    first = {"model": "vgg11", "commit": "bbb", "prunetune": {"status": "ok"}}
    bench.keep_peer_column(first, None, ("prunetune",))
    assert "torch_pruning" not in first and bench.kept_peer_columns([first]) == ""


def test_a_resumed_run_adds_itself_to_the_runs_on_record() -> None:
    bench = _script()
    earlier = {"runs": [{"command": "first", "commit": "aaa"}], "elapsed_s": 600.0}
    meta = bench.run_meta(["--resume"], "bbb", 120.0, 2, (3, 40, 86), earlier)
    assert [run["commit"] for run in meta["runs"]] == ["aaa", "bbb"]
    assert meta["runs"][-1]["models"] == 3 and meta["runs"][-1]["minutes"] == 2.0
    assert meta["elapsed_s"] == 720.0 and "40 of 86" in meta["elapsed"]
