"""torchvision models (random weights, no downloads): FLOPs and parameters exactly
FlopCounterMode / 2 and the parameter count, dense and one-shot pruned, at small inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import prunetune
from prunetune.backend.export import output_tensors
from prunetune.backend.measure import count_params
from prunetune.estimators import FlopsModel

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

# name -> smallest-ish input side it takes (inception_v3 at 96 needs eval-mode tracing: its
# training-only auxiliary head cannot take that size)
MODELS = {
    "resnet18": 32,
    "mobilenet_v3_small": 32,
    "efficientnet_b0": 32,
    "shufflenet_v2_x0_5": 32,
    "densenet121": 32,
    "squeezenet1_1": 32,
    "squeezenet1_0": 32,
    "regnet_x_400mf": 32,
    "mnasnet0_5": 32,
    "googlenet": 32,
    "inception_v3": 96,
    "convnext_tiny": 32,
    "swin_t": 64,
    "vit_b_32": 224,
    "alexnet": 63,
    "lraspp_mobilenet_v3_large": 32,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> torch.nn.Module:
    extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name.startswith(("lraspp", "fcn", "deeplab")):
        extra["weights_backbone"] = None
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **extra).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_costs_are_exact_dense_and_pruned(name: str) -> None:
    model = _build(name)
    x = torch.randn(1, 3, MODELS[name], MODELS[name])
    found = prunetune.inspect(model, x)
    result = prunetune.prune(model, x, "flops<=100%")
    assert found.costs["flops"] == result.dense_flops
    assert found.costs["params"] == count_params(model)
    flops = FlopsModel.from_graph(found.graph)
    share = round(max(0.5, min(1.0, flops.minimum / flops.dense + 0.05)), 3)
    if name in ("convnext_tiny", "swin_t", "vit_b_32"):
        assert found.prunable_groups  # the MLP hidden widths, along the last dim
    result = prunetune.prune(model, x, {"flops": f"{100 * share:.1f}%"})
    assert result.flops == result.costs["flops"] <= share * result.dense_flops
    assert result.params == result.costs["params"]


# diverse kinds for the whole path: plain, depthwise + SE, channel shuffle, fire modules,
# channels-last blocks, a dict output (segmentation) and adaptive pooling that the TorchScript
# ONNX exporter refuses (alexnet at 63: 1 x 1 -> 6 x 6, so the dynamo exporter writes it)
EXPORTED = (
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "convnext_tiny",
    "lraspp_mobilenet_v3_large",
    "alexnet",
)


@pytest.mark.parametrize("name", EXPORTED)
def test_torchvision_half_flops_exports_reloads_and_keeps_output_shapes(
    name: str, tmp_path: Path
) -> None:
    model = _build(name)
    side = MODELS[name]
    x = torch.randn(1, 3, side, side)
    result = prunetune.prune(model, x, "flops<=50%")
    assert result.flops == result.costs["flops"] <= 0.5 * result.dense_flops
    out = result.export(tmp_path / "subnet")
    record = json.loads((out / "subnet.json").read_text())
    assert "missing_formats" not in record and max(record["parity"].values()) <= 1e-4
    assert record["onnx_exporter"] == ("dynamo" if name == "alexnet" else "torchscript")
    batch = torch.randn(2, 3, side, side)
    with torch.no_grad():
        dense = output_tensors(model(batch))
        pruned = output_tensors(result.model(batch))
        reloaded = output_tensors(prunetune.load(out, model=_build(name)).model(batch))
    assert [(k, v.shape) for k, v in pruned] == [(k, v.shape) for k, v in dense]
    for (_, want), (_, got) in zip(pruned, reloaded, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
