"""Layers recognised by what they compute: subclasses of conv, linear and BatchNorm layers prune
like the built-ins, and what must stay whole is named with its reason and FLOPs share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunetune
from prunetune.backend.errors import InfeasibleTargetError, UnsupportedModelError
from prunetune.backend.export import ExportParityError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from tests.backend.architectures import UntraceableNet, build

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_subclassed_layers_prune_like_the_builtins() -> None:
    model = build("subclassed_layers")
    graph = ChannelGraph.trace(model, X)
    assert {layer.name for layer in graph.layers} == {"conv1", "conv2", "conv3", "fc"}
    assert {norm.name for norm in graph.norms} == {"bn1", "bn2", "bn3"}
    assert graph.layer("conv2").depthwise
    assert [g.name for g in graph.prunable_groups] == ["conv1", "conv3"]
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == result.costs["flops"] <= 0.5 * result.dense_flops
    assert type(result.model.conv1).__name__ == "SamePadConv2d"
    assert result.model.conv1.out_channels < 16


class _StdConv2d(nn.Conv2d):
    """Weight standardisation (BiT, NFNets): the weight is normalised per output channel."""

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-5
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class _DoubleConv(nn.Conv2d):
    """A subclass that runs its conv twice: not what its weight alone computes."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + super().forward(x)


def test_a_standardised_conv_prunes_and_one_that_computes_more_is_named() -> None:
    model = nn.Sequential(
        _StdConv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
        _DoubleConv(16, 8, 3, padding=1),
    ).eval()  # fmt: skip
    graph = ChannelGraph.trace(model, X)
    assert graph.group("0").prunable
    assert "computes 2359296 MACs where the layer alone computes 1179648" in graph.unprunable["4"]
    found = prunetune.inspect(model, X)
    assert found.costs["flops"] == count_flops(model, X)
    assert "% of FLOPs" in found.kept_whole["4"]


def test_inspect_names_what_is_counted_as_a_constant_and_its_share() -> None:
    found = prunetune.inspect(build("non_local"), X)
    assert "% of FLOPs" in found.kept_whole["einsum"]
    assert "einsum" in str(found)


def test_transposed_convs_prune_both_dims_and_grouped_ones_are_counted_whole() -> None:
    model = build("transposed_conv")
    graph = ChannelGraph.trace(model, X)
    up = graph.layer("up")
    assert up.transposed and up.total_positions == 16 * 16
    assert {"down.0", "up"} <= {g.name for g in graph.prunable_groups}
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == result.costs["flops"] <= 0.5 * result.dense_flops
    pruned_up = result.model.up
    assert tuple(pruned_up.weight.shape[:2]) == (pruned_up.in_channels, pruned_up.out_channels)
    assert pruned_up.in_channels < 16 or pruned_up.out_channels < 12
    grouped = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
    ).eval()
    found = prunetune.inspect(grouped, X)
    assert found.costs["flops"] == count_flops(grouped, X)
    assert "grouped transposed convs" in found.kept_whole["2"]
    assert "% of FLOPs" in found.kept_whole["2"]


def test_a_model_with_nothing_prunable_says_so_and_exports_dense(tmp_path: Path) -> None:
    model = nn.Conv2d(3, 8, 3).eval()
    found = prunetune.inspect(model, X)
    assert not found.prunable_groups
    assert "nothing can be pruned" in str(found)
    with pytest.raises(InfeasibleTargetError, match=r"nothing in Conv2d can be pruned.*conv2d"):
        prunetune.prune(model, X, "flops<=50%")
    result = prunetune.prune(model, X, "flops<=100%")
    back = prunetune.load(result.export(tmp_path / "dense"))
    with torch.no_grad():
        torch.testing.assert_close(back.model(X), model(X))


def test_a_batchnorm_without_running_stats_is_named_before_export(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.Conv2d(8, 4, 3)
    ).eval()
    found = prunetune.inspect(model, X)
    assert any("BatchNorm '1' has no running statistics" in note for note in found.notes)
    result = prunetune.prune(model, X, "flops<=60%")
    with pytest.raises(ExportParityError, match="BatchNorm '1' has no running statistics"):
        result.export(tmp_path / "subnet")


def test_token_mlps_and_channels_last_linears_prune_along_the_last_dim() -> None:
    graph = ChannelGraph.trace(build("token_mlp"), X)
    assert [g.name for g in graph.prunable_groups] == ["fc1"]  # the MLP's hidden width
    assert "LayerNorm 'norm' normalises across these channels" in (
        graph.group("patch").reason or ""
    )
    assert graph.layer("fc1").total_positions == 64  # 8 x 8 tokens
    assert any(point.last for point in graph.mask_points)
    model = build("channels_last_linear")
    graph = ChannelGraph.trace(model, X)
    assert {g.name for g in graph.prunable_groups} >= {"stem.0", "pointwise"}
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == result.costs["flops"] <= 0.5 * result.dense_flops
    assert result.model.pointwise.in_features < 16 or result.model.pointwise.out_features < 24


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.conv(x) + self.conv(y)


def test_refusals_point_to_what_the_api_offers() -> None:
    with pytest.raises(ValueError, match=r"takes 2 inputs \(x, y\).*prune\(model, \(x1, x2\)"):
        prunetune.inspect(_TwoInputs(), X)
    found = prunetune.inspect(_TwoInputs(), (X, X))  # what the refusal says to do
    assert found.costs["flops"] == count_flops(_TwoInputs(), (X, X))
    with pytest.raises(UnsupportedModelError, match=r"leaf_modules=\[ThatModule\]"):
        prunetune.inspect(UntraceableNet(), X)
