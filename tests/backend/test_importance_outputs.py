"""The taylor criterion on models that return a dict or a tuple: the loss is taken on the
output the task names (the training toolkit's convention), in the backend and the API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import prunetune
from prunetune.backend.errors import TrainingError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.training import Task
from prunetune.cli import main
from tests.factories import TinySegNet

X = torch.zeros(1, 1, 8, 8)


def _batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(8, 1, 8, 8, generator=generator),
            torch.randint(0, 2, (8, 8, 8), generator=generator),
        )
        for _ in range(2)
    ]


class _Only(nn.Module):
    """One entry of a dict-output model, as a plain tensor model (the same weights)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[self.key]  # type: ignore[no-any-return]


class _AsTuple(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(x)
        return out["aux"], out["out"]


def _scores(model: nn.Module, task: Task | None = None) -> dict[str, Tensor]:
    graph = ChannelGraph.trace(model, X)
    return {
        name.split(".", 1)[-1] if name.startswith("model.") else name: score
        for name, score in channel_importance(model, graph, "taylor", _batches(), task).items()
    }


def _close(score: Tensor, reference: Tensor) -> None:
    # squared gradient terms: same loss, float32 summation order may differ between the wraps
    torch.testing.assert_close(score, reference, rtol=1e-3, atol=1e-3 * float(reference.max()))


def test_taylor_takes_the_loss_on_the_named_output_of_a_dict_or_tuple() -> None:
    torch.manual_seed(0)
    model = TinySegNet().eval()
    on_out = _scores(_Only(model, "out"))
    on_aux = _scores(_Only(model, "aux"))
    for name, score in _scores(model).items():  # default: the dict's "out", as in training
        _close(score, on_out[name])
    for name, score in _scores(model, Task(output="aux")).items():
        _close(score, on_aux[name])
    for name, score in _scores(_AsTuple(model), Task(output=1)).items():
        _close(score, on_out[name])
    assert not torch.allclose(on_out["stem.0"], on_aux["stem.0"])
    with pytest.raises(TrainingError, match=r"name the output to use .* not 'logits'"):
        _scores(model, Task(output="logits"))


def test_prune_with_taylor_on_a_segmentation_model_and_its_output_option() -> None:
    torch.manual_seed(0)
    model = TinySegNet().eval()
    batches = _batches()
    result = prunetune.prune(model, X, "flops<=60%", importance="taylor", batches=batches)
    assert result.flops <= 0.6 * result.dense_flops
    aux = prunetune.prune(
        model, X, "flops<=60%", importance="taylor", batches=batches, output="aux"
    )
    assert aux.flops <= 0.6 * aux.dense_flops
    with pytest.raises(ValueError, match="needs importance='taylor'"):
        prunetune.prune(model, X, "flops<=60%", output="aux")


def test_the_cli_output_option_needs_taylor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", "--model", "tests.factories:TinySegNet", "--input-shape", "1,1,8,8"]
    assert main([*argv, "--flops", "60%", "--output", "aux", "--out", str(tmp_path / "o")]) == 2
    assert "add --importance taylor" in capsys.readouterr().err
