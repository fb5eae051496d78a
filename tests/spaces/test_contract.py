"""The contract every registered space meets, run against each of them on the embedded default.

Each space runs with its quickest sensible options (``FAST``) so the suite stays in minutes; the
contract does not depend on the inner budget.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prunetune.backend.errors import InfeasibleTargetError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.surgery import prune_model
from prunetune.estimators import FlopsModel, ParamsModel, Target
from prunetune.spaces import SpaceResult, create_space, list_spaces
from tests.spaces.conftest import ContextFactory

FAST: dict[str, dict[str, Any]] = {
    "ratios": {"finetune_epochs": 0.5},
    "dsa": {"epochs": 2},
    "dais": {"epochs": 2},
    "ddpnas": {"rounds": 1},
}
STANDARD = ("acc", "flops", "params", "latency_ms", "feasible")


def _fast(name: str) -> dict[str, Any]:
    return dict(FAST.get(name, {}))


def _run(name: str, context: Any) -> tuple[SpaceResult, list[dict[str, Any]]]:
    reports: list[dict[str, Any]] = []
    result = create_space(name, **_fast(name)).run(context, report=reports.append)
    return result, reports


def test_the_four_spaces_are_registered() -> None:
    assert {"dsa", "dais", "ddpnas", "ratios"} <= set(list_spaces())


@pytest.mark.slow
@pytest.mark.parametrize("name", list_spaces())
def test_space_contract(name: str, make_context: ContextFactory) -> None:
    context = make_context("flops<=50%")
    before = {k: v.clone() for k, v in context.model.state_dict().items()}
    result, reports = _run(name, context)

    # meets the target exactly, measured on the physically pruned model, without waste
    limit = context.budget.limits["flops"]
    pruned = prune_model(context.model, context.graph, result.spec)
    from prunetune.backend.measure import count_flops

    flops = count_flops(pruned.eval(), torch.zeros(1, 1, 8, 8))
    assert flops <= limit
    assert flops >= 0.9 * limit
    assert result.metrics["flops"] == flops
    assert result.metrics["feasible"] is True

    # reports carry the standard names, at least twice, and the input model is untouched
    assert len(reports) >= 2
    for record in reports:
        assert set(STANDARD) <= set(record), f"{name} report lacks {set(STANDARD) - set(record)}"
        assert 0.0 <= record["acc"] <= 1.0
    for key, value in context.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{name} changed the dense model's {key}"

    # deterministic for a seed
    again, _ = _run(name, make_context("flops<=50%"))
    assert again.spec == result.spec

    # a tighter target never gives more FLOPs
    tighter, _ = _run(name, make_context("flops<=25%"))
    assert tighter.metrics["flops"] <= result.metrics["flops"]
    assert tighter.metrics["flops"] <= context.budget.limits["flops"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list_spaces())
def test_space_meets_several_targets_at_once(name: str, make_context: ContextFactory) -> None:
    context = make_context("flops<=60%,params<=40%")
    result, _ = _run(name, context)
    costs = context.budget.evaluate(result.spec.widths)
    assert costs["flops"] <= context.budget.limits["flops"]
    assert costs["params"] <= context.budget.limits["params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list_spaces())
def test_space_keeps_widths_aligned(name: str, make_context: ContextFactory) -> None:
    context = make_context("flops<=40%", round_to=8)
    result, _ = _run(name, context)
    assert all(width % 8 == 0 for width in result.spec.widths.values()), result.spec.widths
    assert context.budget.fits(result.spec.widths)


def test_bad_round_to_is_refused(make_context: ContextFactory) -> None:
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        make_context("flops<=40%", round_to=0)


@pytest.mark.parametrize("name", list_spaces())
def test_unknown_option_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match=rf"space '{name}' has no option 'colour'; valid options"):
        create_space(name, colour="red")


def test_unknown_space_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown space 'amc'; valid: .*ratios"):
        create_space("amc")


@pytest.mark.parametrize("name", list_spaces())
def test_search_space_names_real_options(name: str, pretrained_small_cnn: Any) -> None:
    _, _, graph = pretrained_small_cnn
    space = create_space(name)
    declared = type(space).search_space(graph)
    assert declared, f"{name} declares no hyper-parameters"
    assert set(declared) <= set(vars(space.options))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("flops<=150%", r"above the dense model .* use a value at or below 100%"),
        ("flops<=0.01%", r"below the smallest subnet"),
        ("params<=10", r"below the smallest subnet"),
        ("latency<=2ms", r"needs a latency profile"),
    ],
)
def test_infeasible_targets_fail_before_any_training(
    target: str, message: str, pretrained_small_cnn: Any
) -> None:
    _, _, graph = pretrained_small_cnn
    assert isinstance(graph, ChannelGraph)
    costs = {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}
    with pytest.raises(InfeasibleTargetError, match=message):
        Target.parse(target).resolve(costs)
