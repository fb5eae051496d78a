"""Latency profiles: the tables measured, their files, recalibration and devices."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prunetune.estimators import (
    DeviceInfo,
    LatencyPredictor,
    LatencyProfile,
    LatencyTable,
    ProfileError,
    ProfileMismatchWarning,
    ProfileProgress,
    cpu_channel_block,
    graph_fingerprint,
    profile_model,
    recalibrate_profile,
    steady_allocator,
)
from prunetune.estimators._groups import GroupView
from prunetune.estimators._profile import layer_axes
from prunetune.estimators._profiling import _axis_block
from tests.estimators._fakes import FakeGraph, chain_graph, tiny_graph, tiny_net
from tests.estimators._latency import FAST, bilinear_ms, two_conv_graph, with_tables
from tests.estimators._zoo import traced


def test_profile_measures_each_distinct_layer_once(chain: FakeGraph) -> None:
    seen: list[ProfileProgress] = []
    threads = torch.get_num_threads()
    profile = profile_model(
        torch.nn.Identity(), chain, batch_size=2, threads=1, progress=seen.append, **FAST
    )
    # conv0 (image->8), conv1 (8->16), conv2 = conv3 (16->16), fc; norms bn0 (8), bn1..3 (16)
    assert len(profile.tables) == 6
    assert [p.done for p in seen] == list(range(1, 7)) and seen[-1].total == 6
    assert torch.get_num_threads() == threads
    assert profile.device.threads == 1 and profile.batch_size == 2
    assert profile.fingerprint == graph_fingerprint(chain)
    for table in profile.tables.values():
        assert (table.ms > 0).all()
        assert len(table.in_grid) in (1, 3) and len(table.out_grid) in (0, 1, 3)


def test_profile_options_are_checked(chain: FakeGraph) -> None:
    model = torch.nn.Identity()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        profile_model(model, chain, batch_size=0)
    with pytest.raises(ValueError, match="widths_grid must be at least 2 points"):
        profile_model(model, chain, widths_grid=1)
    with pytest.raises(ValueError, match="keep ratios in"):
        profile_model(model, chain, widths_grid=(0.5, 1.5))
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        profile_model(model, chain, threads=0)


def test_grid_of_keep_ratios_and_steps() -> None:
    graph = tiny_graph()
    profile = profile_model(
        tiny_net({}), graph, widths_grid=(0.5, 1.0), repeats=1, warmup=1, measure_model=False,
        channel_block=1,
    )  # fmt: skip
    grids = {(t.config["kind"], t.config.get("groups")): t for t in profile.tables.values()}
    grouped = grids["conv", 2]  # stem (2..16 step 2) -> mid (2..12 step 2), groups=2
    assert grouped.in_grid == (2, 8, 16) and grouped.out_grid == (2, 6, 12)
    depthwise = grids["conv", 16]
    assert depthwise.in_grid == (2, 8, 16) and depthwise.out_grid == ()


def test_axis_block_is_probed_step_or_slope() -> None:
    def step(width: int) -> float:  # a kernel computing whole blocks of 8, 10% extra unaligned
        return (1 + math.ceil(width / 8)) * (1.1 if width % 8 else 1.0)

    calls: list[int] = []
    assert _axis_block(64, 8, lambda w: calls.append(w) or step(w)) == (8, pytest.approx(1.1))
    assert calls == [8, 12, 16]  # at the multiple nearest a quarter of the axis, at least 2 blocks
    assert _axis_block(64, 8, lambda w: 1.0 + w) == (1, 1.0)  # a slope: interpolated
    assert _axis_block(64, 8, lambda w: 5.0) == (1, 1.0)  # flat: nothing to model
    assert _axis_block(12, 8, step) == (1, 1.0)  # shorter than two blocks: the grid covers it
    assert _axis_block(64, 1, step) == (1, 1.0)


def test_conv_grids_sit_on_their_blocks() -> None:
    graph = chain_graph((24, 40), hw=4)  # image -> conv0 (24) -> conv1 (40) -> fc (10)
    axes = [layer_axes(layer, GroupView.from_graph(graph)) for layer in graph.layers[:2]]
    assert axes[0].grid(3, (8, 8)) == ((3,), (8, 16, 24))  # 3 image channels: not a multiple
    assert axes[1].grid(3, (8, 8)) == ((8, 16, 24), (8, 24, 40))
    assert axes[1].grid(3, (1, 8)) == ((1, 12, 24), (8, 24, 40))
    profile = profile_model(torch.nn.Identity(), graph, **{**FAST, "channel_block": 8})
    assert profile.settings["channel_block"] == 8
    for table in profile.tables.values():  # whatever the probe found on this CPU
        for grid, block, factor in zip(
            (table.in_grid, table.out_grid), table.blocks, table.unaligned, strict=True
        ):
            assert all(point % block == 0 for point in grid[:-1])
            assert (block, factor) == (1, 1.0) or (block == 8 and 0 < factor < math.inf)
        if table.config["kind"] != "conv":
            assert table.blocks == (1, 1)
    with pytest.raises(ValueError, match="channel_block must be a positive integer, got 0"):
        profile_model(torch.nn.Identity(), graph, **{**FAST, "channel_block": 0})


def test_blocked_tables_round_widths_up_and_charge_partial_blocks() -> None:
    graph = two_conv_graph()  # image -> conv0 (8) -> conv1 (12)
    profile = with_tables(
        profile_model(torch.nn.Identity(), graph, **{**FAST, "widths_grid": (0.5, 1.0)}),
        bilinear_ms,
    )
    tables = {  # blocks of 4 on both axes; unaligned factors 1.5 (first conv), 1.25 and 2
        key: dataclasses.replace(
            t, blocks=(4, 4), unaligned=(1.0, 1.5) if t.in_grid == (3,) else (1.25, 2.0)
        )
        for key, t in profile.tables.items()
    }
    profile = dataclasses.replace(profile, tables=tables)
    first, second = sorted(profile.tables.values(), key=lambda t: len(t.in_grid))

    def table(t: LatencyTable, i: int, o: int) -> float:
        return 1 + 0.1 * i + 0.2 * o + 0.01 * i * o  # bilinear_ms: exact on any grid

    predictor = LatencyPredictor(profile, graph)
    cases = {  # (conv0, conv1): widths looked up, factors charged
        (8, 12): table(first, 3, 8) + table(second, 8, 12),
        (6, 12): table(first, 3, 8) * 1.5 + table(second, 8, 12) * 1.25,
        (8, 9): table(first, 3, 8) + table(second, 8, 12) * 2.0,
        (5, 10): table(first, 3, 8) * 1.5 + table(second, 8, 12) * 1.25 * 2.0,
        (4, 3): table(first, 3, 4) + table(second, 4, 4) * 2.0,
    }
    for (a, b), expected in cases.items():
        assert predictor.predict({"conv0": a, "conv1": b}) == pytest.approx(expected, rel=1e-12)
    rows = np.array(list(cases))
    np.testing.assert_allclose(predictor.predict(rows), list(cases.values()), rtol=1e-12)
    alpha = torch.tensor(rows / predictor.sizes, dtype=torch.float64, requires_grad=True)
    relaxed = predictor.relaxed(alpha)  # the same values at integer widths
    np.testing.assert_allclose(relaxed.detach().numpy(), list(cases.values()), rtol=1e-12)
    relaxed.sum().backward()  # with the table's slope as gradient (straight through)
    assert alpha.grad is not None and (alpha.grad > 0).all()


def test_steady_allocator_and_channel_block() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert steady_allocator() is glibc and steady_allocator() is glibc  # idempotent
    assert cpu_channel_block() in (1, 8, 16)
    profile = profile_model(torch.nn.Identity(), chain_graph((4,), hw=2), **FAST)
    assert profile.settings["allocator"] == ("steady" if glibc else "system")


def test_save_load_round_trip(tmp_path: Path, chain_profile: LatencyProfile) -> None:
    path = chain_profile.save(tmp_path / "sub" / "profile.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LatencyProfile.load(path, threads=chain_profile.device.threads, batch_size=2)
    assert loaded.to_dict() == chain_profile.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON"),
        (lambda text: text.replace('"schema": 1', '"schema": 99'), "schema version 99"),
        (lambda text: "[1, 2]", "expected a JSON object"),
        (lambda text: text.replace('"batch_size": 2', '"batch_size": -1'), "'batch_size' must"),
    ],
)
def test_corrupt_profile_is_a_clear_error(
    tmp_path: Path, chain_profile: LatencyProfile, corrupt: Callable[[str], str], message: str
) -> None:
    path = chain_profile.save(tmp_path / "profile.json")
    path.write_text(corrupt(path.read_text()))
    with pytest.raises(ProfileError, match=message) as caught:
        LatencyProfile.load(path)
    assert str(path) in str(caught.value)


def test_malformed_table_and_missing_file(tmp_path: Path, chain_profile: LatencyProfile) -> None:
    data = chain_profile.to_dict()
    key = next(iter(data["tables"]))
    data["tables"][key]["ms"] = [1.0]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=f"table '{key}': 'ms' has shape"):
        LatencyProfile.load(path)
    with pytest.raises(ProfileError, match=r"cannot read latency profile .*missing\.json"):
        LatencyProfile.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ({"conv0": 2}, "must be a list"),
        ([{"widths": {"conv0": 2}}], "must be a list"),
        ([{"widths": {"conv0": 0}, "ms": 1.0}], "positive integers"),
        ([{"widths": {"conv0": 2}, "ms": -1.0}], "positive numbers"),
    ],
)
def test_malformed_calibration_is_a_clear_error(
    tmp_path: Path, chain_profile: LatencyProfile, points: Any, message: str
) -> None:
    data = chain_profile.to_dict()
    data["calibration"] = points
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        LatencyProfile.load(path)


def test_older_profile_without_calibration_still_loads(
    tmp_path: Path, chain_profile: LatencyProfile
) -> None:
    data = chain_profile.to_dict()
    del data["calibration"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    assert LatencyProfile.load(path).calibration == ()


def test_older_tables_without_blocks_load_unblocked(
    tmp_path: Path, chain_profile: LatencyProfile
) -> None:
    data = chain_profile.to_dict()
    for table in data["tables"].values():
        del table["blocks"], table["unaligned"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    tables = LatencyProfile.load(path).tables.values()
    assert all(t.blocks == (1, 1) and t.unaligned == (1.0, 1.0) for t in tables)
    key = next(iter(data["tables"]))
    data["tables"][key]["unaligned"] = [1.0, -2.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=f"table '{key}': 'unaligned' must be two positive"):
        LatencyProfile.load(path)


def test_profile_from_elsewhere_warns_with_what_differs(
    tmp_path: Path, chain_profile: LatencyProfile
) -> None:
    device = dataclasses.replace(
        chain_profile.device, cpu_model="Imaginary CPU 9000", threads=chain_profile.device.threads
    )
    path = dataclasses.replace(chain_profile, device=device).save(tmp_path / "other.json")
    with pytest.warns(ProfileMismatchWarning, match="cpu_model 'Imaginary CPU 9000' vs"):
        LatencyProfile.load(path, threads=device.threads)
    with pytest.warns(ProfileMismatchWarning, match=r"threads 1 vs 7.*batch_size 2 vs 8") as record:
        LatencyProfile.load(
            dataclasses.replace(
                chain_profile, device=dataclasses.replace(chain_profile.device, threads=1)
            ).save(tmp_path / "threads.json"),
            threads=7,
            batch_size=8,
        )
    assert "threads.json" in str(record[0].message)


def test_device_info_differences() -> None:
    here = DeviceInfo.current(threads=3)
    assert here.threads == 3 and here.torch_version == torch.__version__
    assert here.differences(dataclasses.replace(here, machine="riscv")) == [
        f"machine {here.machine!r} vs 'riscv'"
    ]


def test_predictor_rejects_profile_of_another_graph(chain_profile: LatencyProfile) -> None:
    with pytest.raises(ProfileError, match=r"made for another model .*Measure a profile"):
        LatencyPredictor(chain_profile, chain_graph((8, 16, 32), hw=4))
    missing = dataclasses.replace(chain_profile, tables={})
    with pytest.raises(ProfileError, match="has no table"):
        LatencyPredictor(missing, chain_graph((8, 16, 16, 16), hw=4))


def test_recalibrate_times_the_whole_models_again_and_keeps_the_tables() -> None:
    model, graph, _ = traced("small_cnn")
    profile = profile_model(
        model, graph, widths_grid=2, repeats=1, warmup=1, calibration_subnets=2, channel_block=1
    )
    assert profile.model_ms is not None
    # as if whole models had run 10x slower while profiling
    slow = dataclasses.replace(
        profile,
        model_ms=10 * profile.model_ms,
        calibration=tuple((w, 10 * ms) for w, ms in profile.calibration),
    )
    steps: list[ProfileProgress] = []
    fresh = recalibrate_profile(slow, model, graph, progress=steps.append)
    assert fresh.tables == slow.tables and fresh.created == slow.created
    assert [w for w, _ in fresh.calibration] == [w for w, _ in slow.calibration]
    assert fresh.model_ms is not None and fresh.model_ms < 0.5 * slow.model_ms
    assert all(ms < 0.5 * old for (_, ms), (_, old) in zip(fresh.calibration, slow.calibration))
    assert fresh.settings["recalibrated"] >= fresh.created
    assert [(s.done, s.total) for s in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[0].description == "dense model"
    dense = LatencyPredictor(fresh, graph).dense
    assert dense == pytest.approx(fresh.model_ms, rel=0.2)
    assert LatencyPredictor(slow, graph).dense > 5 * dense


def test_recalibrate_refuses_other_machines_models_and_subnets() -> None:
    model, graph, _ = traced("small_cnn")
    profile = profile_model(model, graph, widths_grid=2, repeats=1, warmup=1, channel_block=1)
    device = dataclasses.replace(profile.device, cpu_model="Imaginary CPU 9000")
    elsewhere = dataclasses.replace(profile, device=device)
    with pytest.raises(ProfileError, match=r"another setup .*cpu_model 'Imaginary CPU 9000'"):
        recalibrate_profile(elsewhere, model, graph)
    other_model, other_graph, _ = traced("resnet20")
    with pytest.raises(ProfileError, match="made for another model"):
        recalibrate_profile(profile, other_model, other_graph)
    misfit = dataclasses.replace(profile, calibration=(({"no-such-group": 2}, 1.0),))
    with pytest.raises(ProfileError, match="calibration subnets that do not fit"):
        recalibrate_profile(misfit, model, graph)


def test_a_profile_from_another_device_is_refused_and_old_ones_still_load(
    tmp_path: Path, chain_profile: LatencyProfile
) -> None:
    assert chain_profile.device.accelerator == "cpu" and chain_profile.device.gpu_name == ""
    gpu = dataclasses.replace(
        chain_profile.device, accelerator="cuda", gpu_name="NVIDIA H200", gpu_driver="570.1",
        cuda_version="12.8",
    )  # fmt: skip
    path = dataclasses.replace(chain_profile, device=gpu).save(tmp_path / "gpu.json")
    with pytest.raises(ProfileError, match=r"measured on the GPU NVIDIA H200, not on this CPU"):
        LatencyProfile.load(path, device="cpu")
    with pytest.warns(ProfileMismatchWarning, match="accelerator 'cuda' vs 'cpu'"):
        assert LatencyProfile.load(path).device.gpu_driver == "570.1"  # used, not re-measured
    data = chain_profile.to_dict()
    for name in ("accelerator", "gpu_name", "gpu_driver", "cuda_version"):
        del data["device"][name]  # a profile from before GPUs
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert LatencyProfile.load(tmp_path / "old.json", device="cpu").device.accelerator == "cpu"


def test_cuda_timing_uses_events_after_synchronising(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, with torch.cuda's events and synchronize faked: the clock's order of calls."""
    from prunetune.estimators import _timing

    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            calls.append("record")

        def synchronize(self) -> None:
            calls.append("wait")

        def elapsed_time(self, end: FakeEvent) -> float:
            return 2.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    ms = _timing.time_ms(lambda: None, warmup=0, repeats=2, statistic="median", cuda=True)
    assert calls[:4] == ["sync", "record", "record", "wait"]
    assert ms == pytest.approx(2.0 / max(1, int(_timing.MIN_REPEAT_S / 2e-3)))
