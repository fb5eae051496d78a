"""DDPNAS: width options, the theta update and pruning, the constrained choice, and short runs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from prunetune.backend.data import DatasetSplits
from prunetune.backend.graph import ChannelGraph, ChannelGroup
from prunetune.backend.models import ModelRef
from prunetune.backend.train import TrainConfig, train
from prunetune.estimators import FlopsModel, ParamsModel, Target
from prunetune.spaces import SpaceContext, create_space
from prunetune.spaces._ddpnas import (
    DDPNASOptions,
    constrained_choice,
    history_scores,
    option_widths,
    prune_lowest,
    round_plan,
    update_theta,
)
from tests.spaces.conftest import ContextFactory

QUICK: dict[str, Any] = {"rounds": 1, "steps_per_sample": 1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest, and most predictably on a shared machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_graph() -> ChannelGraph:
    model = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1}).build()
    return ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))


def _costs(graph: ChannelGraph) -> dict[str, Any]:
    return {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}


def test_option_widths_round_to_step_and_drop_duplicates() -> None:
    groups = [
        ChannelGroup("wide", 64, ()),
        ChannelGroup("grouped", 16, (), step=4),
        ChannelGroup("tiny", 2, ()),
    ]
    graph: Any = SimpleNamespace(prunable_groups=groups)
    widths, valid = option_widths(graph, DDPNASOptions().keep_ratios)
    assert widths[0].tolist() == [16, 24, 32, 40, 48, 56, 64]
    assert valid[0].all()
    assert all(w % 4 == 0 for w in widths[1]) and widths[1].min() >= 4
    assert widths[1][valid[1]].tolist() == sorted(set(widths[1].tolist()))
    assert widths[2][valid[2]].tolist() == [1, 2]  # 0.25 * 2 rounds to 0, clipped to min width


def test_update_theta_matches_the_rule_on_a_toy_reward() -> None:
    active = np.array([[True, True, True], [True, False, True]])
    theta = np.array([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.0, 0.5]])
    rewards = np.array(
        [[[0.90, 0.92, 0.91], [0.80, 9.99, 0.82]], [[0.90, 0.94, 0.91], [0.80, np.nan, 0.80]]]
    )
    new = update_theta(theta, active, rewards, scale=100.0, decay=0.5)

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(100 * (v - v.max()))
        return e / e.sum()

    expected0 = (softmax(rewards[0, 0]) + softmax(rewards[1, 0])) / 2 + 0.5 * theta[0]
    np.testing.assert_allclose(new[0], expected0 / expected0.sum())
    pair = (softmax(rewards[0, 1, [0, 2]]) + softmax(rewards[1, 1, [0, 2]])) / 2 + 0.25
    np.testing.assert_allclose(new[1, [0, 2]], pair / pair.sum())
    assert new[1, 1] == 0.0  # a pruned option stays pruned, whatever its reward slot holds
    np.testing.assert_allclose(new.sum(axis=1), 1.0)
    assert np.argmax(new[0]) == 1


def test_prune_lowest_drops_one_option_per_group_and_renormalises() -> None:
    theta = np.array([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.4, 0.0, 0.6]])
    active = theta > 0
    new, still, dropped = prune_lowest(theta, active)
    assert dropped.tolist() == [0, -1, 0]
    assert still.sum(axis=1).tolist() == [2, 1, 1]
    np.testing.assert_allclose(new.sum(axis=1), 1.0)
    np.testing.assert_allclose(new[0], [0.0, 0.625, 0.375])
    assert (new[~still] == 0).all()
    tied = np.array([[0.25, 0.25, 0.5]])
    assert prune_lowest(tied, tied > 0)[2].tolist() == [1]  # the wider of equals goes


def test_round_plan_tries_every_active_option_once() -> None:
    active = np.array([[True] * 5, [True, False, True, False, False], [False] * 4 + [True]])
    plan = round_plan(active, np.random.default_rng(0))
    assert plan.shape == (3, 5)
    assert sorted(plan[0].tolist()) == [0, 1, 2, 3, 4]
    assert set(plan[1].tolist()) == {0, 2}  # padded with draws among its own active options
    assert plan[2].tolist() == [4] * 5


@pytest.mark.parametrize("target", ["flops<=30%", "flops<=50%", "flops<=40%,params<=35%"])
def test_constrained_choice_is_feasible_and_optimal(small_graph: ChannelGraph, target: str) -> None:
    budget = Target.parse(target).resolve(_costs(small_graph))
    widths, _ = option_widths(small_graph, DDPNASOptions().keep_ratios)
    rows, count = np.arange(len(widths)), widths.shape[1]
    every = np.asarray(list(itertools.product(range(count), repeat=len(widths))))
    fits = budget.fits(widths[rows, every])
    # a naive choice: the widest common keep ratio that fits
    naive = max(k for k in range(count) if budget.fits(widths[:, k]))
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = np.log(rng.dirichlet(np.full(count, 0.5), size=len(widths)))
        scores += np.linspace(0, 2, count)  # lean wide, so the argmax does not fit
        choice = constrained_choice(scores, widths, budget)
        assert budget.fits(widths[rows, choice])
        total = scores[rows, choice].sum()
        assert total == pytest.approx(scores[rows, every].sum(axis=1)[fits].max())
        assert total >= scores[:, naive].sum()


def test_pruned_options_are_a_last_resort(small_graph: ChannelGraph) -> None:
    budget = Target.parse("flops<=50%").resolve(_costs(small_graph))
    widths, valid = option_widths(small_graph, DDPNASOptions().keep_ratios)
    rows = np.arange(len(widths))
    pruned_theta = np.tile(np.linspace(0.05, 0.2, widths.shape[1]), (len(widths), 1))
    active = np.zeros_like(valid)
    active[:, 2] = True  # survivors at keep ratio 0.5 fit the budget ...
    theta = active.astype(float)
    choice = constrained_choice(
        history_scores(theta, active, valid, pruned_theta, widths), widths, budget
    )
    assert choice.tolist() == [2] * len(widths)  # ... so no wider, pruned option is taken
    active[:] = False
    active[:, -1] = True  # the dense survivors do not fit: pruned options must fill in
    scores = history_scores(active.astype(float), active, valid, pruned_theta, widths)
    choice = constrained_choice(scores, widths, budget)
    assert budget.fits(widths[rows, choice])
    assert (choice == widths.shape[1] - 1).sum() >= 1  # keeps survivors where it can


def test_options_are_checked_where_they_enter() -> None:
    with pytest.raises(ValueError, match=r"keep_ratios must hold at least two values in \(0, 1\]"):
        create_space("ddpnas", keep_ratios=(0.5, 1.5))
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        create_space("ddpnas", rounds=0)
    with pytest.raises(ValueError, match="max_epochs must be None or an integer >= 1"):
        create_space("ddpnas", max_epochs=0)
    with pytest.raises(ValueError, match="evaluation must be 'train_mode' or 'recalibrate'"):
        create_space("ddpnas", evaluation="eval")
    assert create_space("ddpnas", keep_ratios=[1.0, 0.5]).options.keep_ratios == (0.5, 1.0)


def test_run_prunes_one_option_per_group_per_epoch(make_context: ContextFactory) -> None:
    context = make_context("flops<=50%")
    before = {k: v.clone() for k, v in context.model.state_dict().items()}
    reports: list[dict[str, Any]] = []
    result = create_space("ddpnas", **QUICK).run(context, report=reports.append)
    groups, options = len(context.group_names), len(DDPNASOptions().keep_ratios)
    per_epoch = [r["active_options"] for r in reports[:-1]]
    assert per_epoch == [groups * (options - e) for e in range(options - 1)]
    assert reports[-1]["active_options"] == groups  # one option left per group
    assert reports[-1]["entropy"] == pytest.approx(0.0)
    assert all(r["feasible"] for r in reports)
    steps = [r["step"] for r in reports]
    assert steps == sorted(steps) and steps[-1] > 0
    assert context.budget.fits(result.spec.widths)
    assert result.metrics["flops"] >= 0.9 * context.budget.limits["flops"]
    assert result.state_dict is not None and set(result.state_dict) == set(before)
    for key, value in context.model.state_dict().items():
        assert torch.equal(value, before[key])
    assert result.metrics["acc"] > 0.5


def test_max_epochs_stops_early_and_recalibrated_scoring_is_deterministic(
    make_context: ContextFactory,
) -> None:
    options = {**QUICK, "max_epochs": 1, "evaluation": "recalibrate"}
    first = create_space("ddpnas", **options).run(make_context("flops<=60%,params<=40%"))
    again = create_space("ddpnas", **options).run(make_context("flops<=60%,params<=40%"))
    assert first.spec == again.spec
    assert first.metrics["epoch"] == 1
    assert first.metrics["active_options"] > len(first.spec.widths)
    assert first.metrics["feasible"] is True


def test_runs_on_resnet20_with_residual_groups(digits: DatasetSplits) -> None:
    ref = ModelRef("resnet20", {"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    model = ref.build()
    train(model, digits, TrainConfig(epochs=1, batch_size=64))
    graph = ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))
    budget = Target.parse("flops<=40%,params<=50%").resolve(_costs(graph))
    context = SpaceContext(model=model, graph=graph, model_ref=ref, data=digits, budget=budget)
    reports: list[dict[str, Any]] = []
    space = create_space("ddpnas", **QUICK, max_epochs=2)
    result = space.run(context, report=reports.append)
    assert len(reports) == 3
    assert budget.fits(result.spec.widths)
    assert result.metrics["flops"] >= 0.9 * budget.limits["flops"] or (
        result.metrics["params"] >= 0.9 * budget.limits["params"]
    )
    assert {"expected_flops", "chosen_flops", "expected_params"} <= set(result.metrics)
