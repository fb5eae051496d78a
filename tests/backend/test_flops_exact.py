"""FLOPs and parameters of the cost models equal FlopCounterMode / 2 and the parameter count, on
the dense model and on every pruned one, for every op FlopCounterMode counts."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunetune
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.surgery import prune_model
from prunetune.estimators import FlopsModel, ParamsModel
from tests.backend.architectures import ARCHITECTURES, build
from tests.backend.test_surgery import random_spec

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FAST_ZOO = ["small_cnn", "resnet20"]


@pytest.mark.parametrize("name", [*ARCHITECTURES, *FAST_ZOO])
def test_costs_equal_flop_counter_dense_and_pruned(name: str) -> None:
    model = build(name)
    graph = ChannelGraph.trace(model, X)
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    assert flops.dense == count_flops(model, X)
    assert params.dense == count_params(model)
    rng = random.Random(name)
    for _ in range(3):
        spec = random_spec(graph, name, rng)
        pruned = prune_model(model, graph, spec)
        assert flops.evaluate(spec) == count_flops(pruned, X)
        assert params.evaluate(spec) == count_params(pruned)


@pytest.mark.parametrize(
    ("name", "constant", "share"),
    [
        ("non_local", "einsum", 0.9),
    ],
)
def test_ops_outside_layer_records_are_counted_and_targets_hold(
    name: str, constant: str, share: float
) -> None:
    model = build(name)
    found = prunetune.inspect(model, X)
    assert found.costs["flops"] == count_flops(model, X)
    assert found.graph.constant_flops[constant] > 0
    result = prunetune.prune(model, X, {"flops": f"{100 * share:g}%"})
    assert result.dense_flops == result.dense_costs["flops"]
    assert result.flops == result.costs["flops"] <= share * result.dense_flops


def test_a_module_called_at_two_resolutions_costs_each_call() -> None:
    graph = ChannelGraph.trace(build("pyramid_head"), X)
    head = graph.layer("head")
    assert head.calls == 2 and head.total_positions == 32 * 32 + 16 * 16


def test_training_only_branches_are_neither_traced_nor_costed() -> None:
    model = build("aux_head").train()
    graph = ChannelGraph.trace(model, X)
    assert all(not layer.name.startswith("aux") for layer in graph.layers)
    assert FlopsModel.from_graph(graph).dense == count_flops(model, X)
    assert model.training and all(m.training for m in model.modules())
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == result.costs["flops"] <= 0.5 * result.dense_flops


class _ActivatedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass that also applies its activation, as timm's BatchNormAct2d does
    (traced into, not a leaf: ``self.training`` is read at trace time)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            0.1,
            self.eps,
        )
        return F.relu(x)


def test_tracing_a_model_in_training_mode_leaves_it_unchanged() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), _ActivatedBatchNorm(8), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)
    ).train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    ChannelGraph.trace(model, X)
    prunetune.inspect(model, X)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"tracing changed {key}"
    assert all(m.training for m in model.modules())
