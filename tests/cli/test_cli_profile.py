"""``prunetune profile`` and ``prunetune estimate`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunetune.cli import main

FAST = ["--grid", "2", "--repeats", "1", "--calibration-subnets", "2"]


@pytest.fixture(scope="module")
def pruned_small_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subnet") / "pruned"
    assert main(["prune", "--model", "small_cnn", "--flops", "40%", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small_cnn_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "small_cnn.json"
    argv = ["profile", "--model", "small_cnn", "--threads", "1", *FAST]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def test_profile_shows_progress_and_holds_calibration_subnets(
    small_cnn_profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(small_cnn_profile.read_text())
    assert data["model_id"] == "small_cnn" and data["device"]["threads"] == 1
    assert len(data["calibration"]) == 2 and data["model_ms"] > 0
    out = small_cnn_profile.with_name("again.json")
    assert main(["profile", "--model", "small_cnn", *FAST, "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any("calibration subnet 2" in line for line in lines)
    assert f"wrote {out}" in lines[-1] and "with blocked channels; allocator" in lines[-1]
    assert data["settings"]["allocator"] in ("steady", "system")


def steady_tables(profile: Path, out: Path) -> Path:
    """The profile with every table replaced by a time proportional to in x out channels.

    One repeat on a loaded machine can time a table entry many times too slow, and the
    prediction then says nothing about the CLI; with these tables it is known: fewer channels,
    less time.
    """
    data = json.loads(profile.read_text())
    for table in data["tables"].values():
        outs = table["out_grid"] or [1]
        table["ms"] = [[1e-4 * i * o for o in outs] for i in table["in_grid"]]
        if not table["out_grid"]:
            table["ms"] = [row[0] for row in table["ms"]]
    data["calibration"] = []
    out.write_text(json.dumps(data))
    return out


def test_estimate_predicts_latency_of_an_export(
    pruned_small_cnn: Path, small_cnn_profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steady = steady_tables(small_cnn_profile, small_cnn_profile.with_name("steady.json"))
    argv = ["estimate", "--subnet", str(pruned_small_cnn), "--profile", str(steady)]
    assert main([*argv, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["flops"] <= 0.4 * figures["dense_flops"]
    assert 0 < figures["latency_ms"] < figures["dense_latency_ms"]
    assert main(argv) == 0
    assert "latency_ms (predicted):" in capsys.readouterr().out


def test_latency_aware_prune_meets_the_flops_target(
    tmp_path: Path, small_cnn_profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fast"
    steady = steady_tables(small_cnn_profile, tmp_path / "steady.json")
    argv = ["prune", "--model", "small_cnn", "--flops", "50%", "--allocation", "cost"]
    assert main([*argv, "--profile", str(steady), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.4 * summary["dense_flops"] <= summary["flops"] <= 0.5 * summary["dense_flops"]
    assert summary["latency_ms"] < summary["dense_latency_ms"]


def test_estimate_refuses_a_profile_of_another_model(
    tmp_path: Path, pruned_small_cnn: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "resnet20.json"
    argv = ["profile", "--model", "resnet20", "--input-shape", "1,3,8,8", *FAST]
    assert main([*argv, "--out", str(other)]) == 0
    capsys.readouterr()
    code = main(["estimate", "--subnet", str(pruned_small_cnn), "--profile", str(other)])
    assert code == 2
    assert "made for another model" in capsys.readouterr().err


def test_estimate_refuses_a_corrupt_profile(
    tmp_path: Path,
    pruned_small_cnn: Path,
    small_cnn_profile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(small_cnn_profile.read_text()[:100])
    code = main(["estimate", "--subnet", str(pruned_small_cnn), "--profile", str(corrupt)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not valid JSON" in err and str(corrupt) in err


def test_recalibrate_refreshes_a_profile_in_place(
    tmp_path: Path, small_cnn_profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small_cnn.json"
    path.write_text(small_cnn_profile.read_text())
    before = json.loads(path.read_text())
    assert main(["profile", "--model", "small_cnn", "--recalibrate", str(path)]) == 0
    after = json.loads(path.read_text())
    assert after["tables"] == before["tables"] and "recalibrated" in after["settings"]
    assert [c["widths"] for c in after["calibration"]] == [
        c["widths"] for c in before["calibration"]
    ]
    assert after["device"]["threads"] == 1  # the profile's own, not this process's
    err = capsys.readouterr().err.splitlines()
    assert any("calibration subnet 2" in line for line in err)
    assert f"wrote {path}: 3 whole models timed again now take" in err[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "3"], "--grid cannot change with --recalibrate"),
        (["--batch-size", "4"], "--batch-size 4 differs from the profile's 1"),
        (["--threads", "2"], "--threads 2 differs from the profile's 1"),
        (["--model", "resnet20"], "made for another model"),
    ],
)
def test_recalibrate_bad_input_leaves_the_profile_alone(
    tmp_path: Path,
    small_cnn_profile: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    path = tmp_path / "small_cnn.json"
    path.write_text(small_cnn_profile.read_text())
    argv = ["--model", "small_cnn", *argv] if "--model" not in argv else argv
    assert main(["profile", *argv, "--recalibrate", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert path.read_text() == small_cnn_profile.read_text()
    assert list(tmp_path.iterdir()) == [path]


def test_recalibrate_a_corrupt_profile_or_without_out(
    tmp_path: Path, small_cnn_profile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(small_cnn_profile.read_text()[:100])
    assert main(["profile", "--model", "small_cnn", "--recalibrate", str(corrupt)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["profile", "--model", "small_cnn"]) == 2
    assert "--out is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--grid", "1"], "widths_grid must be at least 2"),
        (["--calibration-subnets", "-1"], "calibration_subnets must be"),
        (["--channel-block", "0"], "channel_block must be a positive integer"),
    ],
)
def test_profile_bad_input_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "small_cnn", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
