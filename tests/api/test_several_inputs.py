"""Models whose forward takes several tensors: a tuple of example inputs through inspect,
prune, export (model.pt2 and ONNX parity), reload, and the CLI's repeated --input-shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import prunetune
from prunetune.cli import main
from prunetune.estimators import FlopsModel
from tests.factories import TwoInputNet

EXAMPLE = (torch.randn(1, 3, 16, 16), torch.randn(1, 10))


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, 16, 16), torch.randn(batch, 10)


def test_a_two_input_model_is_costed_pruned_exported_and_reloaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoInputNet().eval()
    found = prunetune.inspect(model, EXAMPLE)
    assert found.graph.input_shapes == ((1, 3, 16, 16), (1, 10))
    assert {g.name for g in found.prunable_groups} == {"conv1", "conv2"}  # conv2 meets side
    assert "input 1x3x16x16, 1x10" in str(found)
    assert found.costs["flops"] == FlopsModel.from_graph(found.graph).dense
    result = prunetune.prune(model, EXAMPLE, "flops<=60%")
    assert result.flops == result.costs["flops"] <= 0.6 * result.dense_flops
    assert result.spec.extra_input_shapes == ((1, 10),)
    out = result.export(tmp_path / "subnet")
    record = json.loads((out / "subnet.json").read_text())
    assert record["spec"]["extra_input_shapes"] == [[1, 10]]
    assert record["metrics"]["flops"] == result.flops
    assert max(record["parity"].values()) <= 1e-4
    x = _inputs(3)
    expected = result.model(*x).detach()
    for back in (prunetune.load(out), prunetune.load(out, model=TwoInputNet())):
        torch.testing.assert_close(back.model(*x), expected, atol=1e-5, rtol=1e-4)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input", "input.1"]
    (got,) = session.run(None, {"input": x[0].numpy(), "input.1": x[1].numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_one_example_for_two_inputs_says_how_to_give_both() -> None:
    with pytest.raises(ValueError, match=r"takes 2 inputs \(image, features\).*\(x1, x2\)"):
        prunetune.inspect(TwoInputNet(), EXAMPLE[0])
    with pytest.raises(ValueError, match="--input-shape once per input"):
        prunetune.prune(TwoInputNet(), EXAMPLE[0], "flops<=50%")
    with pytest.raises(TypeError, match=r"example_input\[1\] must be a torch.Tensor"):
        prunetune.inspect(TwoInputNet(), (EXAMPLE[0], [1.0] * 10))
    with pytest.raises(ValueError, match="empty tuple"):
        prunetune.inspect(TwoInputNet(), ())


def test_the_cli_takes_one_input_shape_per_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", "tests.factories:TwoInputNet"]
    shapes = ["--input-shape", "1,3,16,16", "--input-shape", "1,10"]
    assert main(["inspect", *model, *shapes, "--json"]) == 0
    assert {g["name"] for g in json.loads(capsys.readouterr().out)["groups"] if g["prunable"]} == {
        "conv1",
        "conv2",
    }
    out = tmp_path / "out"
    assert main(["prune", *model, *shapes, "--flops", "60%", "--out", str(out)]) == 0
    assert "wrote model.onnx" in capsys.readouterr().err
    assert main(["inspect", *model, "--checkpoint", str(out)]) == 0  # shapes from the export
    assert "input 1x3x16x16, 1x10" in capsys.readouterr().out
    assert main(["inspect", *model, "--input-shape", "1,3,16,16"]) == 2
    assert "--input-shape once per input" in capsys.readouterr().err
    assert main(["profile", *model, *shapes, "--out", str(tmp_path / "p.json")]) == 2
    assert "times models of one input" in capsys.readouterr().err
