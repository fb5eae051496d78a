"""Searches on the user's own data, loss and metric, through the Python API (local Ray session).

A module object searched on ``Dataset`` splits with a user metric (top-2, by name in the report);
a segmentation net returning a dict, with its own loss, searched on mean IoU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import prunetune
from prunetune.backend.measure import count_flops
from prunetune.backend.models import create_model
from prunetune.search._cluster import ray_session
from tests import factories

pytestmark = [pytest.mark.ray, pytest.mark.slow]

QUICK: dict[str, Any] = {
    "finetune_epochs": 1,
    "score_steps": 10,
    "inner_epochs": 1,
    "cpus_per_trial": 1,
    "workers": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray session for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        with ray_session(None, num_cpus=2):
            yield


def test_a_module_searched_on_user_datasets_by_a_user_metric(
    local_ray: None, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1)
    dense_flops = count_flops(net, torch.zeros(1, 1, 8, 8))
    splits = factories.digits_datasets()
    result = prunetune.run_search(
        net, "flops<=50%", data=(splits["train"], splits["val"]), metric=factories.Top2,
        spaces=("ratios",), trials=2, name="objects", runs_dir=str(tmp_path), options=QUICK,
    )  # fmt: skip
    assert result.model is not None
    assert count_flops(result.model, torch.zeros(1, 1, 8, 8)) <= 0.5 * dense_flops
    assert result.metric == "top2" and 0.0 <= result.metrics["test_top2"] <= 1.0
    assert all(t.metric == "top2" and t.score is not None for t in result.trials)
    report = result.report_path.read_text()
    assert "- test top2: **" in report and "| val top2 |" in report
    assert "val top2" in result.summary()


def test_a_segmentation_net_with_a_dict_output_is_searched_on_mean_iou(
    local_ray: None, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = factories.TinySegNet()
    dense_flops = count_flops(net, torch.zeros(1, 1, 8, 8))
    result = prunetune.run_search(
        net, "flops<=60%", data=factories.blob_datasets(), loss=factories.blob_loss,
        metric="miou", output="out", spaces=("ratios", "dais"), trials=2, name="segment",
        runs_dir=str(tmp_path), options={**QUICK, "ignore_index": factories.IGNORE},
    )  # fmt: skip
    assert result.metric == "miou"
    assert 0.3 < result.metrics["test_miou"] <= 1.0  # two classes, a bright square: learnable
    assert result.model is not None
    assert count_flops(result.model, torch.zeros(1, 1, 8, 8)) <= 0.6 * dense_flops
    assert set(result.model(torch.zeros(2, 1, 8, 8))) == {"out", "aux"}
    assert "- test miou: **" in result.report_path.read_text()
