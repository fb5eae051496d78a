"""Small things a new user meets: round_to beyond every group, models with nothing to prune
(an activation alone, a lone Linear) and one-line trace errors from the Python API."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import prunetune
from prunetune.backend.errors import InfeasibleTargetError, UnsupportedModelError

NET = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
X = torch.randn(1, 3, 12, 12)


def test_round_to_larger_than_every_group_is_refused_and_smaller_ones_apply() -> None:
    with pytest.raises(ValueError, match=r"round_to=32 is larger than every prunable channel "):
        prunetune.prune(NET, X, "flops<=50%", round_to=32)
    with pytest.raises(ValueError, match=r"widest has 16 channels.*at most 16"):
        prunetune.prune(NET, X, "flops<=50%", round_to=17)
    result = prunetune.prune(NET, X, "flops<=50%", round_to=8)
    assert result.spec.widths["0"] % 8 == 0 and result.spec.widths["0"] < 16


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Linear(8, 4)], ids=["relu", "linear"])
def test_a_model_with_nothing_to_prune_is_refused_below_100_and_exported_at_100(
    model: nn.Module,
) -> None:
    x = torch.randn(1, 8)
    with pytest.raises(InfeasibleTargetError, match=f"nothing in {type(model).__name__} can be"):
        prunetune.prune(model, x, "flops<=50%")
    result = prunetune.prune(model, x, "flops<=100%")
    assert result.flops == result.dense_flops


class _Multiline(nn.Module):
    def forward(self, x: Tensor) -> Tensor:  # fails while traced, as deep fx errors do
        raise RuntimeError("the first line of a long report\nsecond line\nthird line")


def test_api_trace_errors_have_one_clear_line_and_keep_the_details_chained() -> None:
    with pytest.raises(UnsupportedModelError) as caught:
        prunetune.inspect(_Multiline(), X)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot trace _Multiline with torch.fx: RuntimeError: the first line")
    assert "second line" in str(caught.value.__cause__)
