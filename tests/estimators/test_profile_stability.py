"""Unstable timings while profiling are measured again, and refused with advice when they stay:
the timer is replaced by a fake whose figures follow the layer's widths, with spikes or noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import create_model
from prunetune.cli import main
from prunetune.estimators import _profiling
from prunetune.estimators._profiling import profile_model
from prunetune.estimators._stability import UnstableTimingError


class _Point:
    def __init__(self, config: dict[str, Any], in_width: int, out_width: int) -> None:
        self.kind, self.in_width, self.out_width = config["kind"], in_width, out_width

    def seconds(self) -> float:
        return 1e-6 * (10 + self.in_width * self.out_width / 10)


Fake = Callable[[_Point, int], list[float]]


def _install(monkeypatch: pytest.MonkeyPatch, fake: Fake) -> list[_Point]:
    """Time every table point with ``fake(point, nth_time_measured)``; returns the points."""
    seen: list[_Point] = []
    counts: dict[tuple[str, int, int], int] = {}
    monkeypatch.setattr(
        _profiling, "_layer_runner", lambda config, i, o, batch, device="cpu": _Point(config, i, o)
    )

    def samples(
        point: _Point, warmup: int, repeats: int, min_total_s: float, cuda: bool = False
    ) -> list[float]:
        key = (point.kind, point.in_width, point.out_width)
        counts[key] = counts.get(key, 0) + 1
        seen.append(point)
        return fake(point, counts[key])

    monkeypatch.setattr(_profiling, "time_samples", samples)
    return seen


def _profile() -> Any:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    graph = ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))
    return profile_model(
        model, graph, widths_grid=3, repeats=5, channel_block=1, measure_model=False
    )


def _is_spiked(point: _Point) -> bool:
    """One interior point of the conv tables."""
    return point.kind == "conv" and 3 < point.in_width < 20 and 3 < point.out_width < 40


def test_steady_timings_make_a_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, lambda point, nth: [point.seconds()] * 8)
    profile = _profile()
    assert profile.settings["remeasured_points"] == 0
    assert profile.settings["unsteady_points"] == 0 and profile.settings["points"] > 0


def test_a_passing_stall_is_measured_again_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(point: _Point, nth: int) -> list[float]:
        stall = 1000.0 if _is_spiked(point) and nth == 1 else 1.0
        return [point.seconds() * stall] * 8

    _install(monkeypatch, fake)
    profile = _profile()
    assert profile.settings["remeasured_points"] >= 1
    worst = max(float(np.max(table.ms)) for table in profile.tables.values())
    assert worst < 2.0  # ms: the largest steady entry is 1.65 ms; no 1000x entry is left


def test_an_outlier_that_stays_refuses_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, lambda p, nth: [p.seconds() * (1000.0 if _is_spiked(p) else 1.0)] * 8)
    with pytest.raises(UnstableTimingError, match=r"stood 10x off their neighbours.*--threads 1"):
        _profile()


def test_noisy_repeats_keep_the_fastest_run_and_advise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    noise = [1.0, 3.0, 0.4, 2.5, 1.0, 3.5, 0.5, 2.0]
    seen = _install(monkeypatch, lambda point, nth: [point.seconds() * n for n in noise])
    profile = _profile()
    assert profile.settings["unsteady_points"] == profile.settings["points"]
    assert len(seen) == 3 * profile.settings["points"]  # each measured twice again
    table = next(iter(profile.tables.values()))
    assert float(np.min(table.ms)) == pytest.approx(0.4 * 1e3 * 1e-6 * 10, rel=0.5)
    out = tmp_path / "p.json"
    argv = ["profile", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--grid", "3"]
    assert (
        main([*argv, "--channel-block", "1", "--calibration-subnets", "0", "--out", str(out)]) == 0
    )
    err = capsys.readouterr().err
    assert "warning: " in err and "profile on a quiet machine with --threads 1" in err
    assert out.exists()


def test_refused_profile_is_one_line_and_not_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _install(monkeypatch, lambda p, nth: [p.seconds() * (1000.0 if _is_spiked(p) else 1.0)] * 8)
    out = tmp_path / "p.json"
    argv = ["profile", "--model", "small_cnn", "--input-shape", "1,1,8,8", "--grid", "3"]
    assert (
        main([*argv, "--channel-block", "1", "--calibration-subnets", "0", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("prunetune profile: error: timings on this machine are unstable")
    assert "a quiet machine with --threads 1" in err and not out.exists()
