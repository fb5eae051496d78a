"""Models with several outputs (tuples, lists, dicts of tensors) prune, export and reload, and
export parity compares every output tensor in model.pt2 and ONNX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import prunetune
from prunetune.backend.export import ExportParityError, output_tensors
from prunetune.backend.export._record import _output_error


class _TwoHeads(nn.Module):
    """A backbone with a segmentation-style dict output or a detection-style tuple/list."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.out = nn.Conv2d(16, 4, 1)
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x: Tensor) -> object:
        features = self.backbone(x)
        out, aux = self.out(features), self.aux(features).mean((2, 3))
        if self.kind == "dict":
            return {"out": out, "aux": aux}
        if self.kind == "list":
            return [out, (aux, out.amax(1))]
        return out, aux


@pytest.mark.parametrize("kind", ["dict", "tuple", "list"])
@pytest.mark.parametrize("target", ["flops<=100%", "flops<=60%"])
def test_several_outputs_prune_export_and_reload(kind: str, target: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoHeads(kind).eval()
    x = torch.randn(1, 3, 12, 12)
    result = prunetune.prune(model, x, target)
    out = result.export(tmp_path / "subnet")
    back = prunetune.load(out, model=_TwoHeads(kind))
    check = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = output_tensors(result.model(check))
        assert len(expected) == (3 if kind == "list" else 2)
        assert _output_error(expected, output_tensors(back.model(check)), "reload") < 1e-5
        program = prunetune.load(out)  # the torch.export program, no source needed
        assert _output_error(expected, output_tensors(program.model(check)), "pt2") < 1e-5
    if target == "flops<=100%":
        with torch.no_grad():
            dense = output_tensors(model(check))
        assert _output_error(dense, expected, "dense") < 1e-5


def test_parity_names_the_output_that_differs() -> None:
    expected = [("out", torch.zeros(2, 3)), ("aux", torch.zeros(2))]
    with pytest.raises(ExportParityError, match="returns 1 tensors where the model returns 2"):
        _output_error(expected, expected[:1], "model.pt2")
    with pytest.raises(ExportParityError, match="output 'aux' has shape"):
        _output_error(expected, [expected[0], ("aux", torch.zeros(3))], "model.pt2")
    assert _output_error(expected, [expected[0], ("aux", torch.ones(2))], "x") == 1.0
    with pytest.raises(ExportParityError, match="holds a str at name"):
        output_tensors({"name": "cat"})
