"""ONNX that one exporter cannot write: the dynamo exporter takes over, and where no exporter
can, the other formats are still written and the export says which one is missing and why."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

import prunetune
from prunetune.cli import main
from tests.factories import OddPoolNet

X = torch.randn(1, 3, 12, 12)


def _pruned() -> prunetune.PruneResult:
    torch.manual_seed(0)
    return prunetune.prune(OddPoolNet().eval(), X, "flops<=70%")


def test_the_dynamo_exporter_writes_what_torchscript_cannot(tmp_path: Path) -> None:
    result = _pruned()
    out = result.export(tmp_path / "subnet")
    record = json.loads((out / "subnet.json").read_text())
    assert record["onnx_exporter"] == "dynamo"
    assert "missing_formats" not in record
    assert record["parity"]["onnx"] <= 1e-4
    x = torch.randn(3, 3, 12, 12)  # another batch size than the export's: the batch is dynamic
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, result.model(x).detach().numpy(), atol=1e-4)


def _without_onnx(tmp_path: Path, progress: Any = None) -> tuple[Path, dict[str, Any]]:
    out = _pruned().export(tmp_path / "subnet", progress=progress)
    return out, json.loads((out / "subnet.json").read_text())


def test_without_onnxscript_the_other_formats_are_written_and_onnx_is_said_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.warns(UserWarning, match="model.onnx not written: the TorchScript exporter"):
        out, record = _without_onnx(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "subnet.json", "weights.pt"]
    reason = record["missing_formats"]["onnx"]
    assert "adaptive_avg_pool2d" in reason and "onnxscript, which is not installed" in reason
    back = prunetune.load(out, model=OddPoolNet())
    assert back.model(torch.randn(2, 3, 12, 12)).shape == (2, 4)


def test_when_both_exporters_fail_the_progress_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = torch.onnx.export

    def dynamo_fails(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dynamo"):
            raise RuntimeError("unsupported op in this test\nsecond line")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    said: list[str] = []
    out, record = _without_onnx(tmp_path, said.append)
    assert not (out / "model.onnx").exists() and (out / "model.pt2").is_file()
    reason = record["missing_formats"]["onnx"]
    assert reason.endswith("so did the dynamo exporter (unsupported op in this test)")
    assert any(line.startswith("model.onnx not written:") for line in said)
    assert "model.onnx" not in record["files"]
    assert prunetune.load(out).model(X).shape == (1, 4)  # from model.pt2, no source needed


def test_the_cli_prints_which_format_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    argv = ["prune", "--model", "tests.factories:OddPoolNet", "--input-shape", "1,3,12,12"]
    assert main([*argv, "--flops", "70%", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "model.onnx not written: the TorchScript exporter failed" in err
    assert "wrote model.pt2" in err
