"""An export that deploys alone: subnet.json records the inputs' preprocessing, estimate shows
it, and the normalisation can be folded into model.pt2 and model.onnx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import prunetune
from prunetune.backend.data import DatasetSplits
from prunetune.cli import main


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.2", "--out", str(path)]) == 0
    return path


def test_preprocessing_is_recorded_and_shown(
    tmp_path: Path, dense: Path, digits: DatasetSplits, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    assert main(["prune", "--checkpoint", str(dense), "--flops", "60%", "--out", str(out)]) == 0
    recorded = json.loads((out / "subnet.json").read_text())["preprocessing"]
    assert recorded["input_shape"] == [1, 8, 8] and recorded["channel_order"] == "grayscale"
    assert recorded["value_range"] == [0.0, 1.0] and recorded["normalization"] == "caller"
    assert recorded["mean"] == pytest.approx(digits.mean) and recorded["std"] == pytest.approx(
        digits.std
    )
    capsys.readouterr()
    assert main(["estimate", "--subnet", str(out)]) == 0
    shown = capsys.readouterr().out
    assert (
        "inputs: 1x8x8 grayscale pixels scaled to [0, 1], then normalised (x - mean) / std" in shown
    )
    # an export of the export carries it on
    again = tmp_path / "again"
    assert main(["prune", "--checkpoint", str(out), "--flops", "50%", "--out", str(again)]) == 0
    assert (
        json.loads((again / "subnet.json").read_text())["preprocessing"]["mean"] == recorded["mean"]
    )


def test_folded_normalisation_takes_raw_pixels(
    tmp_path: Path, dense: Path, digits: DatasetSplits, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "folded"
    argv = ["prune", "--checkpoint", str(dense), "--flops", "60%", "--fold-normalization"]
    assert main([*argv, "--out", str(out)]) == 0
    mean = torch.tensor(digits.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits.std).view(1, -1, 1, 1)
    raw = digits.test.x[:16] * std + mean  # back to pixels in [0, 1]
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    loaded = prunetune.load(out)  # weights.pt: the model itself, normalised inputs
    assert loaded.preprocessing is not None and loaded.preprocessing["normalization"] == "caller"
    expected = loaded.model(digits.test.x[:16]).detach().numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    (onnx_out,) = session.run(None, {"input": raw.numpy()})
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4)
    program = torch.export.load(out / "model.pt2").module()
    np.testing.assert_allclose(program(raw).detach().numpy(), expected, atol=1e-4)
    capsys.readouterr()
    assert main(["estimate", "--subnet", str(out)]) == 0
    assert "model.pt2 and model.onnx normalise them themselves" in capsys.readouterr().out


def test_folding_needs_known_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--flops", "50%"]
    assert main([*argv, "--fold-normalization", "--out", str(tmp_path / "o")]) == 2
    assert "fold_normalization needs the inputs' mean and std" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert (
        main([*argv, "--dataset", "digits", "--fold-normalization", "--out", str(tmp_path / "o")])
        == 0
    )
