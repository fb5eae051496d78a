"""Checkpoints: atomic round trip, weights_only loading, clear errors for the wrong file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunetune.backend.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from prunetune.backend.errors import CheckpointError
from prunetune.backend.models import ModelRef


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    ref = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1})
    model = ref.build()
    path = save_checkpoint(tmp_path / "dense.pt", model, Checkpoint(ref, (1, 1, 8, 8), "digits"))
    return path, model


def test_round_trip(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, info = load_checkpoint(path)
    assert info.model.name == "small_cnn" and info.input_shape == (1, 1, 8, 8)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert [p.name for p in tmp_path.iterdir()] == ["dense.pt"]  # no temporary left behind


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="is for model 'small_cnn', not 'resnet20'"):
        load_checkpoint(path, expect=ModelRef("resnet20"))


def test_weights_of_another_shape(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["features.0.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"features.0.weight has shape \(3, 1, 3, 3\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_not_a_checkpoint(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"cannot be read|not a PyTorch file|not a prunetune"):
        load_checkpoint(path)
