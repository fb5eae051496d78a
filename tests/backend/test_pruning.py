"""Importance criteria and one-shot pruning to a target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunetune.backend.data import DatasetSplits, TensorLoader
from prunetune.backend.errors import InfeasibleTargetError
from prunetune.backend.graph import ChannelGraph, ChannelGroup
from prunetune.backend.importance import IMPORTANCE_CRITERIA, channel_importance
from prunetune.backend.models import create_model
from prunetune.backend.pruning import alignment, one_shot_widths, ratio_widths
from prunetune.estimators import FlopsModel, ParamsModel, Target


@pytest.fixture(scope="module")
def resnet20() -> tuple[torch.nn.Module, ChannelGraph]:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.1, 1.0)
    return model, ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("criterion", IMPORTANCE_CRITERIA)
def test_every_criterion_scores_every_prunable_channel(
    criterion: str, resnet20: tuple[torch.nn.Module, ChannelGraph], digits: DatasetSplits
) -> None:
    model, graph = resnet20
    batches = [b for _, b in zip(range(2), TensorLoader(digits.train, 32))]
    scores = channel_importance(model, graph, criterion, batches)
    assert set(scores) == {g.name for g in graph.prunable_groups}
    for group in graph.prunable_groups:
        assert scores[group.name].shape == (group.size,)
        assert bool((scores[group.name] >= 0).all()) and float(scores[group.name].sum()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_l1_ranks_a_zeroed_channel_last(resnet20: tuple[torch.nn.Module, ChannelGraph]) -> None:
    model, graph = resnet20
    group = graph.group("layer1.0.conv1")
    with torch.no_grad():
        saved = model.layer1[0].conv1.weight[3].clone()
        model.layer1[0].conv1.weight[3].zero_()
    try:
        scores = channel_importance(model, graph, "l1")[group.name]
    finally:
        with torch.no_grad():
            model.layer1[0].conv1.weight[3].copy_(saved)
    assert int(scores.argmin()) == 3


def test_bn_criterion_reads_gamma(resnet20: tuple[torch.nn.Module, ChannelGraph]) -> None:
    model, graph = resnet20
    scores = channel_importance(model, graph, "bn")["layer1.0.conv1"]
    torch.testing.assert_close(scores, model.layer1[0].bn1.weight.detach().abs())


def test_unknown_criterion(resnet20: tuple[torch.nn.Module, ChannelGraph]) -> None:
    model, graph = resnet20
    with pytest.raises(ValueError, match="unknown importance criterion 'l3'; valid: l1, l2"):
        channel_importance(model, graph, "l3")
    with pytest.raises(ValueError, match="taylor criterion needs data"):
        channel_importance(model, graph, "taylor")


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("share", [0.8, 0.5, 0.2])
def test_one_shot_meets_the_target_tightly(
    allocation: str, share: float, resnet20: tuple[torch.nn.Module, ChannelGraph]
) -> None:
    model, graph = resnet20
    costs = {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}
    budget = Target.parse(f"flops<={100 * share}%").resolve(costs)
    scores = channel_importance(model, graph, "l1")
    widths = one_shot_widths(graph, budget.fits, allocation, scores)
    flops = costs["flops"].evaluate(widths)
    assert flops <= budget.limits["flops"]
    assert flops >= 0.9 * budget.limits["flops"]
    if allocation == "uniform":
        ratios = [widths[g.name] / g.size for g in graph.prunable_groups]
        assert max(ratios) - min(ratios) <= 0.2  # one ratio, up to rounding and refill


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_round_to_keeps_widths_aligned_and_meets_the_target(
    allocation: str, resnet20: tuple[torch.nn.Module, ChannelGraph]
) -> None:
    model, graph = resnet20
    flops = FlopsModel.from_graph(graph)
    budget = Target.parse("flops<=50%").resolve({"flops": flops})
    scores = channel_importance(model, graph, "l1")
    widths = one_shot_widths(graph, budget.fits, allocation, scores, round_to=8)
    assert all(w % 8 == 0 for w in widths.values())
    assert 0.35 * flops.dense <= flops.evaluate(widths) <= budget.limits["flops"]
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        one_shot_widths(graph, budget.fits, allocation, scores, round_to=0)


def test_cost_allocation_cuts_where_the_cost_falls_most(
    resnet20: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    model, graph = resnet20
    flops = FlopsModel.from_graph(graph)
    budget = Target.parse("flops<=60%").resolve({"flops": flops})
    scores = channel_importance(model, graph, "l1")
    stage1 = np.asarray([g.name.startswith(("conv1", "layer1")) for g in graph.prunable_groups])

    def stage1_cost(widths: np.ndarray) -> np.ndarray:  # only stage-1 channels cost anything
        return (widths * stage1).sum(axis=1).astype(float)

    widths = one_shot_widths(graph, budget.fits, "cost", scores, round_to=4, cost=stage1_cost)
    assert flops.evaluate(widths) <= budget.limits["flops"]
    assert all(w % 4 == 0 for w in widths.values())
    kept = {g.name: widths[g.name] / g.size for g in graph.prunable_groups}
    cheap = [r for g, r in kept.items() if not g.startswith(("conv1", "layer1"))]
    assert max(kept[g] for g in kept if g.startswith(("conv1", "layer1"))) < min(cheap)
    same_as_flops = one_shot_widths(graph, budget.fits, "cost", scores, cost=flops.evaluate)
    assert 0.9 * budget.limits["flops"] <= flops.evaluate(same_as_flops) <= budget.limits["flops"]
    with pytest.raises(ValueError, match="cost allocation needs a cost"):
        one_shot_widths(graph, budget.fits, "cost", scores)
    with pytest.raises(InfeasibleTargetError, match="even the smallest subnet"):
        one_shot_widths(graph, lambda w: False, "cost", scores, cost=flops.evaluate)


def test_alignment_falls_back_to_the_step_for_narrow_groups() -> None:
    assert alignment(ChannelGroup("g", 64, (), step=1), 8) == 8
    assert alignment(ChannelGroup("g", 48, (), step=3), 8) == 24
    assert alignment(ChannelGroup("g", 6, (), step=2), 8) == 2


def test_one_shot_infeasible(resnet20: tuple[torch.nn.Module, ChannelGraph]) -> None:
    _, graph = resnet20
    with pytest.raises(InfeasibleTargetError, match="even the smallest subnet"):
        one_shot_widths(graph, lambda widths: False, "uniform")
    with pytest.raises(ValueError, match="unknown allocation 'random'"):
        one_shot_widths(graph, lambda widths: True, "random")


def test_ratio_widths_round_down_to_alignment_within_bounds(
    resnet20: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    _, graph = resnet20
    groups = graph.prunable_groups
    assert ratio_widths(graph, 1.0) == {g.name: g.size for g in groups}
    assert ratio_widths(graph, 0.0) == {g.name: g.min_width for g in groups}
    half = ratio_widths(graph, 0.55, round_to=8)
    for group in groups:  # 16 -> 8, 32 -> 16, 64 -> 32: 0.55 of the size, down to a multiple of 8
        assert half[group.name] == group.size * 0.55 // 8 * 8
