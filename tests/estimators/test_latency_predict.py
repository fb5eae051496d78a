"""The latency predictor: interpolation of the tables and calibration against whole models."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from prunetune.backend.graph._records import ChannelSegment, LayerInfo
from prunetune.estimators import (
    LatencyPredictor,
    LatencyProfile,
    ProfileError,
    ProfileProgress,
    calibration_widths,
    measure_latencies,
    measure_latency,
    profile_model,
)
from tests.estimators._fakes import TINY_INPUT, FakeGraph, chain_graph, tiny_graph, tiny_net
from tests.estimators._latency import (
    FAST,
    bilinear_ms,
    bilinear_reference,
    two_conv_graph,
    with_tables,
)
from tests.estimators._zoo import pruned, traced


def test_predictor_fits_the_profiles_calibration_subnets(
    chain_profile: LatencyProfile, chain: FakeGraph
) -> None:
    plain = with_tables(chain_profile, bilinear_ms)
    candidates = [{"conv0": 4, "conv1": 8}, {"conv1": 4, "conv3": 2}, {"conv2": 1}]
    raw = [LatencyPredictor(plain, chain).predict(c) for c in candidates]
    dense = LatencyPredictor(plain, chain).dense
    points = tuple((c, 2.0 * r + 0.5) for c, r in zip(candidates, raw, strict=True))
    profile = dataclasses.replace(plain, model_ms=2.0 * dense + 0.5, calibration=points)
    predictor = LatencyPredictor(profile, chain)
    assert predictor.calibration.points == 4
    assert predictor.calibration.scale == pytest.approx(2.0)
    assert predictor.calibration.overhead_ms == pytest.approx(0.5)
    wrong = dataclasses.replace(profile, calibration=(({"no-such-group": 2}, 1.0),))
    with pytest.raises(ProfileError, match="calibration measurements that do not fit"):
        LatencyPredictor(wrong, chain)


def test_calibration_widths_span_sizes_and_respect_steps() -> None:
    _, graph, _ = traced("mobilenetv2")
    subnets = calibration_widths(graph, 5, seed=3)
    assert subnets == calibration_widths(graph, 5, seed=3) and len(subnets) == 5
    for widths in subnets:
        for group in graph.prunable_groups:
            width = widths[group.name]
            assert group.min_width <= width <= group.size and width % group.step == 0
    kept = [sum(w.values()) for w in subnets]
    assert kept == sorted(kept) and kept[-1] > 2 * kept[0]
    with pytest.raises(ValueError, match="calibration_subnets must be"):
        profile_model(torch.nn.Identity(), chain_graph((4,), hw=2), calibration_subnets=-1)


def test_interpolation_is_exact_at_grid_points() -> None:
    graph = two_conv_graph()
    rng = np.random.default_rng(0)
    profile = with_tables(
        profile_model(torch.nn.Identity(), graph, **FAST),
        lambda t: rng.uniform(0.1, 2.0, size=np.shape(t.ms)),
    )
    first, second = sorted(profile.tables.values(), key=lambda t: len(t.in_grid))
    assert first.in_grid == (3,) and second.in_grid == first.out_grid
    predictor = LatencyPredictor(profile, graph)
    assert predictor.calibration.overhead_ms == 0.0
    for i, a in enumerate(first.out_grid):
        for j, b in enumerate(second.out_grid):
            expected = first.ms[0, i] + second.ms[i, j]
            assert predictor.predict({"conv0": a, "conv1": b}) == pytest.approx(expected, 1e-12)
    # between grid points it is linear in each axis
    (a0, a1), b = first.out_grid[:2], second.out_grid[1]
    assert a1 - a0 > 1
    ends = [predictor.predict({"conv0": a, "conv1": b}) for a in (a0, a1)]
    for a in range(a0 + 1, a1):
        t = (a - a0) / (a1 - a0)
        between = predictor.predict({"conv0": a, "conv1": b})
        assert between == pytest.approx((1 - t) * ends[0] + t * ends[1], 1e-12)


@pytest.mark.parametrize("make_graph", [tiny_graph, lambda: chain_graph((8, 16, 16, 16), hw=4)])
def test_bilinear_tables_are_reproduced_everywhere(make_graph: Callable[[], FakeGraph]) -> None:
    graph = make_graph()
    profile = with_tables(profile_model(torch.nn.Identity(), graph, **FAST), bilinear_ms)
    predictor = LatencyPredictor(profile, graph)
    rng = np.random.default_rng(1)
    steps = np.array([g.step for g in graph.prunable_groups])
    rows = rng.integers(1, predictor.sizes // steps + 1, size=(40, len(steps))) * steps
    batch = predictor.predict(rows)
    expected = [
        bilinear_reference(graph, dict(zip(predictor.groups, r.tolist(), strict=True)))
        for r in rows
    ]
    np.testing.assert_allclose(batch, expected, rtol=1e-12)
    one_by_one = [
        predictor.predict(dict(zip(predictor.groups, r.tolist(), strict=True))) for r in rows
    ]
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-12)
    alpha = torch.tensor(rows / predictor.sizes, dtype=torch.float64, requires_grad=True)
    relaxed = predictor.relaxed(alpha)
    np.testing.assert_allclose(relaxed.detach().numpy(), expected, rtol=1e-12)
    relaxed.sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all()
    assert (alpha.grad > 0).all()  # every table grows with both widths here
    assert predictor.relaxed(alpha[0].detach()).shape == ()
    assert predictor.dense == pytest.approx(bilinear_reference(graph, {}), rel=1e-12)
    assert predictor.minimum < predictor.dense


def test_calibration_fits_overhead_and_scale(
    chain_profile: LatencyProfile, chain: FakeGraph
) -> None:
    profile = with_tables(chain_profile, bilinear_ms)
    predictor = LatencyPredictor(profile, chain)
    candidates = [{"conv0": 4, "conv1": 8}, {"conv1": 4, "conv3": 2}, {}, {"conv2": 1}]
    raw = [predictor.predict(c) for c in candidates]
    measured = [(c, 2.0 * r + 0.5) for c, r in zip(candidates, raw, strict=True)]
    fitted = predictor.calibrate(measured, fit_scale=True)
    assert fitted.scale == pytest.approx(2.0) and fitted.overhead_ms == pytest.approx(0.5)
    assert fitted.rms_error_ms == pytest.approx(0.0, abs=1e-9) and fitted.points == 4
    assert predictor.predict({}) == pytest.approx(2.0 * raw[2] + 0.5)
    alpha = torch.ones(len(predictor.groups), dtype=torch.float64)
    assert predictor.relaxed(alpha).item() == pytest.approx(2.0 * raw[2] + 0.5)
    only_overhead = predictor.calibrate([(candidates[0], raw[0] + 3.0)])
    assert only_overhead.scale == 1.0 and only_overhead.overhead_ms == pytest.approx(3.0)
    shrunk = predictor.calibrate([(c, 0.5 * r) for c, r in zip(candidates, raw, strict=True)])
    assert shrunk.overhead_ms == pytest.approx(0.0, abs=1e-12)  # lstsq: 0 up to rounding
    assert shrunk.scale == pytest.approx(0.5)
    steep = [(c, 3.0 * r - 0.9 * min(raw)) for c, r in zip(candidates, raw, strict=True)]
    constrained = predictor.calibrate(steep, fit_scale=True)
    assert constrained.scale > 0 and constrained.overhead_ms >= 0
    assert predictor.minimum > 0
    with pytest.raises(ValueError, match="at least one"):
        predictor.calibrate([])
    with pytest.raises(ValueError, match="fit_scale needs at least two measured subnets"):
        predictor.calibrate([(candidates[0], 1.0)], fit_scale=True)
    with pytest.raises(ValueError, match="must be positive"):
        predictor.calibrate([(candidates[0], -1.0)])


def test_calibration_fits_a_power_law_when_tables_grow_faster_than_models(
    chain_profile: LatencyProfile, chain: FakeGraph
) -> None:
    predictor = LatencyPredictor(with_tables(chain_profile, bilinear_ms), chain)
    candidates = [{"conv0": 4, "conv1": 8}, {"conv1": 4, "conv3": 2}, {}, {"conv2": 1}]
    raw = [predictor.predict(c) for c in candidates]
    fitted = predictor.calibrate([(c, 3.0 * r**0.8) for c, r in zip(candidates, raw, strict=True)])
    assert fitted.exponent == pytest.approx(0.8) and fitted.scale == pytest.approx(3.0)
    assert fitted.overhead_ms == 0.0 and fitted.rms_error_ms == pytest.approx(0.0, abs=1e-9)
    assert predictor.predict(candidates[1]) == pytest.approx(3.0 * raw[1] ** 0.8)
    alpha = torch.ones(len(predictor.groups), dtype=torch.float64, requires_grad=True)
    relaxed = predictor.relaxed(alpha)
    assert relaxed.item() == pytest.approx(3.0 * raw[2] ** 0.8)
    relaxed.backward()
    assert alpha.grad is not None and torch.all(alpha.grad >= 0)
    linear = predictor.calibrate([(c, 2.0 * r + 0.5) for c, r in zip(candidates, raw, strict=True)])
    assert linear.exponent == 1.0  # a linear relation stays linear


def test_dense_measurement_sets_the_default_overhead() -> None:
    graph = tiny_graph()
    profile = profile_model(tiny_net({}), graph, widths_grid=2, repeats=1, warmup=1)
    assert profile.model_ms is not None and profile.model_ms > 0
    predictor = LatencyPredictor(profile, graph)
    assert predictor.calibration.points == 1
    assert predictor.dense == pytest.approx(profile.model_ms, rel=1e-9)


def test_measure_latency_restores_modes_and_threads() -> None:
    net = tiny_net({}).train()
    threads = torch.get_num_threads()
    ms = measure_latency(net, torch.randn(TINY_INPUT), threads=1, repeats=2, warmup=1)
    assert ms > 0 and math.isfinite(ms)
    assert net.training and all(m.training for m in net.modules())
    assert torch.get_num_threads() == threads


def test_measure_latencies_compares_models_interleaved() -> None:
    small, big = torch.nn.Linear(8, 8), torch.nn.Sequential(*[torch.nn.Linear(8, 8)] * 4)
    big.train()
    times = measure_latencies([small, big], torch.randn(2, 8), rounds=2, repeats=1, threads=1)
    assert times.shape == (2,) and np.all(np.isfinite(times)) and np.all(times > 0)
    assert big.training  # modes restored, as measure_latency does
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        measure_latencies([small], torch.randn(1, 4), rounds=0)


def test_linear_layer_on_sequences_is_profiled() -> None:
    graph = chain_graph((4,), hw=4)
    token = LayerInfo(
        name="fc",
        kind="linear",
        in_segments=(ChannelSegment("conv0"),),
        out_group="logits",
        in_channels=4,
        out_channels=10,
        input_hw=(5,),
        output_hw=(5,),
        bias=False,
    )
    graph = dataclasses.replace(graph, layers=(graph.layers[0], token))
    profile = profile_model(torch.nn.Identity(), graph, **FAST)
    assert LatencyPredictor(profile, graph).predict({"conv0": 2}) > 0


@pytest.mark.slow
def test_zoo_profile_round_trip_predict_and_calibrate(tmp_path: Path) -> None:
    model, graph, example = traced("resnet20")
    steps: list[ProfileProgress] = []
    profile = profile_model(
        model, graph, widths_grid=3, repeats=3, warmup=1, calibration_subnets=3,
        progress=steps.append,
    )  # fmt: skip
    assert len(profile.tables) < len(graph.layers) + len(graph.norms)  # identical layers share
    assert [s.done for s in steps] == list(range(1, len(profile.tables) + 5))
    assert {s.total for s in steps} == {len(profile.tables) + 4}
    assert [w for w, _ in profile.calibration] == calibration_widths(graph, 3)
    loaded = LatencyProfile.load(profile.save(tmp_path / "resnet20.json"))
    assert loaded.calibration == profile.calibration
    predictor = LatencyPredictor(loaded, graph)
    assert profile.model_ms is not None and predictor.calibration.points == 4
    assert predictor.calibration.scale != 1.0  # fitted to the dense model and 3 subnets
    small, big = (ms for _, ms in (profile.calibration[0], profile.calibration[-1]))
    assert predictor.predict(profile.calibration[0][0]) == pytest.approx(small, rel=0.5)
    assert predictor.predict(profile.calibration[-1][0]) == pytest.approx(big, rel=0.5)
    half = {g.name: max(g.step, g.size // 2 // g.step * g.step) for g in graph.prunable_groups}
    measured = measure_latency(pruned("resnet20", half), example, repeats=5)
    fitted = predictor.calibrate([({}, profile.model_ms), (half, measured)], fit_scale=True)
    assert fitted.scale > 0 and fitted.overhead_ms >= 0 and math.isfinite(fitted.rms_error_ms)
    assert predictor.predict(half) > 0 and predictor.minimum > 0
    _, other, _ = traced("resnet32")
    with pytest.raises(ProfileError, match="made for another model"):
        LatencyPredictor(loaded, other)
