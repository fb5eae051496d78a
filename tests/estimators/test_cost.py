"""FLOPs and parameter models: exact against torch on pruned models, quadratic form, vectorised."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prunetune.backend.errors import SpecError
from prunetune.backend.models import ModelRef, list_models
from prunetune.backend.spec import SubnetSpec
from prunetune.estimators import CostModel, FlopsModel, ParamsModel
from tests.estimators._fakes import TINY_INPUT, FakeGraph, chain_graph, tiny_graph, tiny_net
from tests.estimators._zoo import pruned, traced
from tests.estimators._zoo import random_widths as zoo_random_widths

CostClass = type[FlopsModel] | type[ParamsModel]
COST_MODELS: tuple[CostClass, ...] = (FlopsModel, ParamsModel)


def counted_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(example)
    return counter.get_total_flops() // 2


def counted_params(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def random_widths(model: CostModel, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random valid width rows for ``model``'s prunable groups."""
    rng = np.random.default_rng(seed)
    steps = np.array([_step(model, i) for i in range(len(model.groups))])
    low = model.min_widths // steps
    high = model.sizes // steps
    return rng.integers(low, high + 1, size=(count, len(model.groups))) * steps


def _step(model: CostModel, column: int) -> int:
    return int(model.min_widths[column])  # min width == step for prunable groups


def test_tiny_flops_and_params_match_torch_on_pruned_models() -> None:
    graph = tiny_graph()
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    example = torch.randn(TINY_INPUT)
    rows = np.vstack([random_widths(flops, 16, seed=1), flops.min_widths, flops.sizes])
    mismatches = []
    for row in rows:
        widths = dict(zip(flops.groups, row.tolist(), strict=True))
        net = tiny_net(widths)
        expected = (counted_flops(net, example), counted_params(net))
        got = (flops.evaluate(widths), params.evaluate(widths))
        if got != expected:
            mismatches.append((widths, got, expected))
    assert mismatches == []


def test_dense_and_minimum() -> None:
    graph = tiny_graph()
    flops = FlopsModel.from_graph(graph)
    net = tiny_net({})
    assert flops.dense == counted_flops(net, torch.randn(TINY_INPUT))
    assert ParamsModel.from_graph(graph).dense == counted_params(net)
    smallest = tiny_net(dict(zip(flops.groups, flops.min_widths.tolist(), strict=True)))
    assert flops.minimum == counted_flops(smallest, torch.randn(TINY_INPUT))
    assert isinstance(flops.dense, int) and flops.minimum < flops.dense


@pytest.mark.parametrize("model_class", COST_MODELS)
@pytest.mark.parametrize("make_graph", [tiny_graph, chain_graph])
def test_quadratic_form_equals_exact_at_integer_points(
    model_class: CostClass, make_graph: Callable[[], FakeGraph]
) -> None:
    model = model_class.from_graph(make_graph())
    rows = random_widths(model, 200, seed=2)
    exact = model.evaluate(rows)
    alpha = torch.as_tensor(rows / model.sizes, dtype=torch.float64)
    relaxed = model.relaxed(alpha).numpy()
    np.testing.assert_allclose(relaxed, exact, rtol=1e-12, atol=1e-6)
    form = model.quadratic_form
    np.testing.assert_allclose(form(alpha.numpy()), exact, rtol=1e-12, atol=1e-6)
    np.testing.assert_array_equal(form.A, form.A.T)
    assert (form.A >= 0).all() and (form.B >= 0).all() and form.F0 >= 0
    assert model.relaxed(torch.ones(len(model.groups), dtype=torch.float64)).item() == (
        pytest.approx(model.dense, rel=1e-12)
    )


@pytest.mark.parametrize("model_class", COST_MODELS)
def test_relaxed_gradient_is_the_quadratic_forms(model_class: CostClass) -> None:
    model = model_class.from_graph(tiny_graph())
    alpha = torch.rand(len(model.groups), dtype=torch.float64, requires_grad=True)
    model.relaxed(alpha).backward()
    form = model.quadratic_form
    expected = 2 * form.A @ alpha.detach().numpy() + form.B
    assert alpha.grad is not None
    np.testing.assert_allclose(alpha.grad.numpy(), expected, rtol=1e-10)
    single = model.relaxed(alpha.detach().float())
    assert single.dtype == torch.float32 and single.shape == ()


@pytest.mark.parametrize("model_class", COST_MODELS)
def test_vectorised_equals_one_candidate_at_a_time(model_class: CostClass) -> None:
    model = model_class.from_graph(tiny_graph())
    rows = random_widths(model, 50, seed=3)
    batch = model.evaluate(rows)
    assert batch.dtype == np.int64 and batch.shape == (50,)
    one_by_one = [
        model.evaluate(dict(zip(model.groups, row.tolist(), strict=True))) for row in rows
    ]
    assert batch.tolist() == one_by_one
    assert model.evaluate(rows[0]).shape == ()
    assert int(model.evaluate(rows[0])) == one_by_one[0]
    assert model.evaluate(rows.astype(np.float64)).tolist() == one_by_one


@pytest.mark.parametrize("model_class", COST_MODELS)
@pytest.mark.parametrize("make_graph", [tiny_graph, chain_graph])
def test_more_channels_never_cost_less(
    model_class: CostClass, make_graph: Callable[[], FakeGraph]
) -> None:
    model = model_class.from_graph(make_graph())
    rows = random_widths(model, 100, seed=4)
    base = model.evaluate(rows)
    for column in range(len(model.groups)):
        step = _step(model, column)
        grown = rows.copy()
        grown[:, column] = np.minimum(grown[:, column] + step, model.sizes[column])
        assert (model.evaluate(grown) >= base).all()
        assert (
            model.evaluate(grown)[grown[:, column] > rows[:, column]]
            > base[grown[:, column] > rows[:, column]]
        ).all()


def test_mapping_keys_specs_and_missing_groups() -> None:
    graph = tiny_graph()
    flops = FlopsModel.from_graph(graph)

    @dataclass
    class Spec:
        widths: dict[str, int]

    by_group = {graph.groups[1]: 8}
    assert flops.evaluate(by_group) == flops.evaluate({"stem": 8})
    assert flops.evaluate(Spec({"stem": 8})) == flops.evaluate({"stem": 8})
    assert flops.evaluate({}) == flops.dense
    assert flops.evaluate(graph.dense_widths()) == flops.dense
    assert flops.evaluate({"input": 3}) == flops.dense


def test_bad_widths_are_rejected_with_clear_messages() -> None:
    flops = FlopsModel.from_graph(tiny_graph())
    with pytest.raises(SpecError, match="unknown channel group 'nope'"):
        flops.evaluate({"nope": 3})
    with pytest.raises(SpecError, match="'input' cannot be pruned; its width must stay 3"):
        flops.evaluate({"input": 2})
    with pytest.raises(
        SpecError,
        match=r"width 7 of group 'stem' is out of range; valid: "
        r"2\.\.16 in multiples of 2",
    ):
        flops.evaluate({"stem": 7})
    with pytest.raises(SpecError, match="width 0 of group 'branch'"):
        flops.evaluate({"branch": 0})
    with pytest.raises(SpecError, match=r"width 99 of group 'hidden' \(candidate 1\)"):
        flops.evaluate(np.array([flops.sizes, [*flops.sizes[:-1], 99]]))
    with pytest.raises(ValueError, match=r"shape \(P,\) or \(N, P\) with P=4"):
        flops.evaluate(np.ones((2, 3), dtype=int))
    with pytest.raises(ValueError, match="whole channel counts"):
        flops.evaluate(flops.sizes - 0.5)
    with pytest.raises(ValueError, match="alpha must have shape"):
        flops.relaxed(torch.ones(3))


def test_cost_model_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        CostModel(None)  # type: ignore[abstract,arg-type]


def test_unknown_group_in_graph_is_an_error() -> None:
    graph = tiny_graph()
    broken = type(graph)(graph.groups[:-1], graph.layers, graph.norms, 0, graph.input_shape)
    with pytest.raises(ValueError, match="layer 'fc2' names unknown channel group 'logits'"):
        FlopsModel.from_graph(broken)


@pytest.mark.parametrize(
    "name",
    [name if name == "resnet20" else pytest.param(name, marks=pytest.mark.slow)
     for name in list_models()],
)  # fmt: skip
def test_zoo_dense_costs_match_torch(name: str) -> None:
    model, graph, example = traced(name)
    flops = FlopsModel.from_graph(graph)
    assert flops.dense == counted_flops(model, example)
    assert ParamsModel.from_graph(graph).dense == counted_params(model)
    assert flops.groups == tuple(group.name for group in graph.prunable_groups)
    widths = dict(zip(flops.groups, zoo_random_widths(graph, 1, seed=7)[0].tolist(), strict=True))
    spec = SubnetSpec.from_widths(graph, ModelRef(name), widths)
    assert flops.evaluate(spec) == flops.evaluate(widths) < flops.dense


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_zoo_pruned_costs_match_torch(name: str) -> None:
    _, graph, example = traced(name)
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    rows = np.vstack([zoo_random_widths(graph, 8, seed=5), flops.min_widths])
    mismatches = []
    for row in rows:
        widths = dict(zip(flops.groups, row.tolist(), strict=True))
        net = pruned(name, widths)
        expected = (counted_flops(net, example), counted_params(net))
        got = (flops.evaluate(widths), params.evaluate(widths))
        if got != expected:
            mismatches.append((widths, got, expected))
    assert mismatches == []
    alpha = torch.as_tensor(rows / flops.sizes, dtype=torch.float64)
    np.testing.assert_allclose(flops.relaxed(alpha).numpy(), flops.evaluate(rows), rtol=1e-12)


@pytest.mark.slow
def test_vectorised_flops_are_1000x_faster_than_pruning_and_counting() -> None:
    name = "resnet56"
    _, graph, example = traced(name)
    flops = FlopsModel.from_graph(graph)
    rows = zoo_random_widths(graph, 20_000, seed=6)
    flops.evaluate(rows[:10])
    start = time.perf_counter()
    flops.evaluate(rows)
    per_candidate = (time.perf_counter() - start) / len(rows)
    start = time.perf_counter()
    for row in rows[:3]:
        counted_flops(pruned(name, dict(zip(flops.groups, row.tolist(), strict=True))), example)
    per_pruned = (time.perf_counter() - start) / 3
    assert per_pruned / per_candidate >= 1000, (per_pruned, per_candidate)
