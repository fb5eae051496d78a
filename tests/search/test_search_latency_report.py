"""A latency-targeted search measures its chosen subnet at the end and reports predicted and
measured latency side by side, each labelled."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from prunetune.backend.models import create_model
from prunetune.cli import main
from prunetune.search._final import latency_line, measure_subnet
from prunetune.search._report import render
from prunetune.search._result import TrialRecord


def _prepared(limit: float | None) -> Any:
    profile = SimpleNamespace(
        batch_size=2, device=SimpleNamespace(threads=1), settings={"statistic": "min"}, model_ms=2.0
    )
    config = SimpleNamespace(
        name="lat", target="latency<=0.45ms", spaces=("ratios",), pareto=False,
        run_dir=Path("runs/lat"), finetune_epochs=1, distill=False, score_steps=10,
    )  # fmt: skip
    return SimpleNamespace(
        profile=profile,
        budget=SimpleNamespace(limits={} if limit is None else {"latency_ms": limit}),
        input_shape=(1, 1, 8, 8),
        config=config,
        ref=SimpleNamespace(name="small_cnn"),
        source="dense.pt",
        data=SimpleNamespace(name="digits"),
    )


def test_the_chosen_subnet_is_measured_as_profiled() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    threads = torch.get_num_threads()
    ms = measure_subnet(model, _prepared(None))
    assert ms > 0 and torch.get_num_threads() == threads


def test_predicted_and_measured_side_by_side() -> None:
    metrics = {"predicted_latency_ms": 0.419, "measured_latency_ms": 0.53}
    line = latency_line(metrics, _prepared(None))
    assert line == (
        "latency of the chosen subnet at batch 2, 1 thread(s): predicted 0.419 ms, "
        "measured 0.530 ms (+26%)"
    )
    missed = latency_line(metrics, _prepared(0.45))
    assert "above the 0.450 ms target: the profile no longer holds" in missed
    assert "prunetune profile --recalibrate" in missed


def test_report_labels_predicted_and_measured_latency() -> None:
    best = TrialRecord("t1", "ratios", "finished", score=0.9, flops=1.0, params=1.0, feasible=True)
    metrics = {
        "test_acc": 0.9, "dense_test_acc": 0.95, "val_acc": 0.9,
        "flops": 1.0, "dense_flops": 2.0, "params": 1.0, "dense_params": 2.0,
        "latency_ms": 0.419, "dense_latency_ms": 2.0, "measured_latency_ms": 0.53,
        "start": "the trial's weights", "start_problem": "",
    }  # fmt: skip
    text = render(_prepared(0.45), [best], best, metrics)
    assert "| latency_ms (predicted) | 2ms | 0.419ms | 20.9% | 0.45ms |" in text
    assert "| latency_ms (measured, exported subnet) | 2ms (profiled) | 0.53ms | - |" in text


@pytest.mark.ray
@pytest.mark.slow
def test_latency_search_reports_measured_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.json"
    argv = ["profile", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--threads", "1"]
    argv += ["--grid", "2", "--repeats", "1", "--calibration-subnets", "2"]
    assert main([*argv, "--out", str(profile)]) == 0
    argv = ["search", "--model", "small_cnn", "--latency", "95%", "--profile", str(profile)]
    argv += ["--spaces", "ratios", "--trials", "2", "--inner-epochs", "1", "--score-steps", "20"]
    argv += ["--dense-epochs", "0.5", "--finetune-epochs", "0.5", "--name", "lat"]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert "latency of the chosen subnet at batch 1, 1 thread(s): predicted " in captured.err
    assert "latency: predicted " in captured.out and " ms, measured " in captured.out
    record = json.loads((tmp_path / "runs" / "lat" / "best" / "subnet.json").read_text())
    assert record["metrics"]["measured_latency_ms"] > 0
    assert record["metrics"]["predicted_latency_ms"] == record["metrics"]["latency_ms"]
    report = (tmp_path / "runs" / "lat" / "report.md").read_text()
    assert "latency_ms (predicted)" in report and "latency_ms (measured" in report
