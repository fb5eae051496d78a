"""DAIS: the temperature schedule, the band regulariser, the threshold bisection, and short runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor

from prunetune.backend.data import DatasetSplits
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef
from prunetune.backend.train import TrainConfig, train
from prunetune.estimators import CostModel, FlopsModel, ParamsModel
from prunetune.estimators._groups import GroupView
from prunetune.estimators._targets import Target
from prunetune.spaces import SpaceContext, create_space
from prunetune.spaces._dais import (
    DaisSpace,
    anneal_temperature,
    band_penalty,
    bisect_threshold,
    threshold_widths,
)


class _LinearLatency(CostModel):
    """A made-up latency: a fixed overhead plus a per-channel cost that weighs the first group."""

    metric = "latency_ms"

    def __init__(self, graph: ChannelGraph) -> None:
        super().__init__(GroupView.from_graph(graph))
        count = len(self.groups)
        self.per_channel = np.asarray([0.05 if i == 0 else 0.005 for i in range(count)])

    def _evaluate_full(self, full_widths: np.ndarray) -> np.ndarray:
        return 0.1 + full_widths[:, self._view.prunable_index] @ self.per_channel

    def relaxed(self, alpha: Tensor) -> Tensor:
        scale = torch.as_tensor(self.sizes * self.per_channel, dtype=alpha.dtype)
        return 0.1 + (alpha * scale).sum(-1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the runs are tiny, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


Setup = tuple[ModelRef, torch.nn.Module, ChannelGraph]


@pytest.fixture
def data(digits: DatasetSplits) -> DatasetSplits:
    return digits


@pytest.fixture
def small(pretrained_small_cnn: Setup) -> Setup:
    return pretrained_small_cnn


def _pretrained(name: str, data: DatasetSplits) -> Setup:
    ref = ModelRef(name, {"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    model = ref.build()
    train(model, data, TrainConfig(epochs=2))
    return ref, model, ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))


def _context(setup: Setup, data: DatasetSplits, target: str, latency: bool = False) -> SpaceContext:
    ref, model, graph = setup
    costs: dict[str, CostModel] = {
        "flops": FlopsModel.from_graph(graph),
        "params": ParamsModel.from_graph(graph),
    }
    if latency:
        costs["latency_ms"] = _LinearLatency(graph)
    budget = Target.parse(target).resolve(costs)
    return SpaceContext(model=model, graph=graph, model_ref=ref, data=data, budget=budget)


def test_temperature_anneals_from_t0_to_t0_over_one_plus_kappa_with_a_floor() -> None:
    values = [anneal_temperature(e, 10, 1.0, 20.0, 0.02) for e in np.linspace(0, 10, 41)]
    assert values[0] == 1.0
    assert values[-1] == pytest.approx(1.0 / 21.0)
    assert all(a > b for a, b in itertools.pairwise(values))
    assert anneal_temperature(10, 10, 1.0, 100.0, 0.02) == 0.02  # 1/101 is below the floor
    assert anneal_temperature(5, 10, 0.5, 0.0, 0.02) == 0.5  # kappa 0: no annealing


def test_band_penalty_is_zero_inside_and_pushes_back_towards_the_band() -> None:
    def penalty(ratio: float) -> tuple[float, float]:
        value = torch.tensor(ratio, requires_grad=True)
        result = band_penalty({"flops": value}, band=0.9)
        result.backward()
        assert value.grad is not None
        return float(result.detach()), float(value.grad)

    for inside in (0.901, 0.95, 1.0):
        assert penalty(inside) == (0.0, 0.0)
    above, slope_above = penalty(1.5)
    assert above == pytest.approx(math.log(1.5)) and slope_above > 0
    below, slope_below = penalty(0.45)
    assert below == pytest.approx(-math.log(0.45 / 0.9)) and slope_below < 0


def test_band_penalty_lower_side_only_on_the_binding_metric() -> None:
    loose = {"flops": torch.tensor(0.95), "params": torch.tensor(0.3)}
    assert float(band_penalty(loose, 0.9)) == 0.0
    both_over = {"flops": torch.tensor(2.0), "params": torch.tensor(1.5)}
    assert float(band_penalty(both_over, 0.9)) == pytest.approx(math.log(2.0) + math.log(1.5))
    both_under = {"flops": torch.tensor(0.6), "params": torch.tensor(0.3)}
    assert float(band_penalty(both_under, 0.9)) == pytest.approx(-math.log(0.6 / 0.9))


@pytest.mark.parametrize("offset", [5.0, -5.0])  # every channel kept / every channel dropped
def test_threshold_bisection_lands_in_the_band(
    small: Setup, data: DatasetSplits, offset: float
) -> None:
    context = _context(small, data, "flops<=40%")
    groups = context.graph.prunable_groups
    generator = torch.Generator().manual_seed(0)
    scores = {g.name: torch.randn(g.size, generator=generator) + offset for g in groups}
    start = context.budget.utilisation(threshold_widths(groups, scores, 0.0))
    assert not 0.9 <= start <= 1.0
    threshold, widths, in_band = bisect_threshold(context.budget, groups, scores, band=0.9)
    assert in_band and (threshold > 0) == (offset > 0)
    assert 0.9 <= context.budget.utilisation(widths) <= 1.0
    assert widths == threshold_widths(groups, scores, threshold)


def test_threshold_widths_respect_step_and_minimum(
    small: Setup,
) -> None:
    groups = small[2].prunable_groups
    stepped = [dataclasses.replace(g, step=4) for g in groups]
    scores = {g.name: torch.linspace(-1, 1, g.size) for g in groups}
    widths = threshold_widths(stepped, scores, 0.0)
    assert all(widths[g.name] % 4 == 0 and widths[g.name] <= g.size for g in stepped)
    nothing = threshold_widths(stepped, scores, 10.0)
    assert all(nothing[g.name] == g.min_width == 4 for g in stepped)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"band": 1.0}, "band=1.0"),
        ({"epochs": 0}, "epochs=0"),
        ({"temperature_min": 2.0}, "temperature_min=2.0.*temperature_init"),
        ({"lambda_budget": -1.0}, "lambda_budget=-1.0"),
    ],
)
def test_invalid_options_are_refused_with_their_name(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_space("dais", **options)


def test_search_space_samples_valid_options(small: Setup) -> None:
    pytest.importorskip("ray")
    domains = DaisSpace.search_space(small[2])
    fields = {f.name for f in dataclasses.fields(DaisSpace.Options)}
    assert set(domains) <= fields and "anneal_rate" in domains
    for _ in range(5):
        create_space("dais", **{name: domain.sample() for name, domain in domains.items()})


def test_run_anneals_reaches_the_band_and_is_deterministic(
    small: Setup, data: DatasetSplits
) -> None:
    context = _context(small, data, "flops<=50%")
    before = {k: v.clone() for k, v in context.model.state_dict().items()}
    reports: list[dict] = []
    result = create_space("dais", epochs=3).run(context, report=reports.append)
    assert all(torch.equal(before[k], v) for k, v in context.model.state_dict().items())
    assert len(reports) >= 3 and reports == result.history
    temperatures = [r["temperature"] for r in reports]
    assert all(a > b for a, b in itertools.pairwise(temperatures))
    assert [r["step"] for r in reports] == sorted({r["step"] for r in reports})
    for key in ("acc", "acc_soft", "flops", "params", "latency_ms", "feasible"):
        assert key in reports[-1]
    # The search itself (not only the final check) brought the expected FLOPs, 2x the limit
    # for the dense model, to the band.
    assert 0.8 <= result.metrics["expected_flops_ratio"] <= 1.1
    assert result.metrics["undecided_share"] < 0.2
    limit = context.budget.limits["flops"]
    assert 0.9 * limit <= result.metrics["flops"] <= limit
    assert result.metrics["acc"] > 0.8
    assert result.state_dict is not None
    assert {k: v.shape for k, v in result.state_dict.items()} == {
        k: v.shape for k, v in before.items()
    }
    again = create_space("dais", epochs=3).run(context)
    assert again.spec == result.spec


def test_frozen_indicators_are_rescued_by_the_threshold(small: Setup, data: DatasetSplits) -> None:
    """Slow logits under an instant anneal stay frozen near 1; bisection still meets the band."""
    context = _context(small, data, "flops<=30%")
    result = create_space("dais", epochs=1, anneal_rate=1e4, arch_lr=1e-3).run(context)
    assert result.metrics["threshold"] > 0 and result.metrics["in_band"]
    assert context.budget.fits(result.spec.widths)


def test_resnet_with_flops_and_params_limits(data: DatasetSplits) -> None:
    context = _context(_pretrained("resnet20", data), data, "flops<=60%,params<=40%")
    result = create_space("dais", epochs=1).run(context)
    assert context.budget.fits(result.spec.widths)
    assert result.metrics["utilisation"] >= 0.9
    assert {"expected_flops_ratio", "expected_params_ratio"} <= set(result.metrics)


def test_latency_target(small: Setup, data: DatasetSplits) -> None:
    context = _context(small, data, "latency<=60%", latency=True)
    result = create_space("dais", epochs=1).run(context)
    limit = context.budget.limits["latency_ms"]
    assert 0.9 * limit <= result.metrics["latency_ms"] <= limit
    assert "expected_latency_ms_ratio" in result.history[-1]
