"""``prunetune prune`` and ``prunetune inspect`` from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from prunetune.backend.export import load_subnet
from prunetune.backend.measure import count_flops
from prunetune.cli import main


def test_prune_exports_a_subnet_that_meets_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    argv = ["prune", "--model", "resnet20", "--input-shape", "1,3,16,16", "--flops", "50%"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    loaded = load_subnet(out)
    measured = count_flops(loaded.model, torch.zeros(1, 3, 16, 16))
    assert measured == summary["flops"] <= 0.5 * summary["dense_flops"]
    assert measured >= 0.45 * summary["dense_flops"]
    aligned = tmp_path / "aligned"
    assert main([*argv, "--round-to", "8", "--out", str(aligned)]) == 0
    assert all(width % 8 == 0 for width in load_subnet(aligned).spec.widths.values())


def test_prune_from_a_checkpoint_and_again_from_the_export(tmp_path: Path) -> None:
    dense = tmp_path / "dense.pt"
    assert main(["train", "--model", "small_cnn", "--epochs", "0.2", "--out", str(dense)]) == 0
    first = tmp_path / "first"
    argv = ["prune", "--checkpoint", str(dense), "--flops", "60%", "--importance", "taylor"]
    assert main([*argv, "--dataset", "digits", "--out", str(first)]) == 0
    second = tmp_path / "second"
    assert main(["prune", "--checkpoint", str(first), "--params", "50%", "--out", str(second)]) == 0
    once, twice = load_subnet(first), load_subnet(second)
    assert sum(p.numel() for p in twice.model.parameters()) <= 0.5 * sum(
        p.numel() for p in once.model.parameters()
    )
    # every export of one model keeps the original dense model as its base
    assert twice.metrics["dense_flops"] == once.metrics["dense_flops"]
    assert twice.metrics["input_params"] == sum(p.numel() for p in once.model.parameters())


def test_pruning_an_export_again_names_both_bases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["prune", "--model", "small_cnn", "--flops", "50%", "--out", str(first)]) == 0
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(first), "--flops", "50%", "--out", str(second)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("flops:"))
    of_input, of_original = (float(x) for x in re.findall(r"([\d.]+)% of the", line))
    assert of_input <= 50.0 and of_original <= 0.5 * 50.0 + 0.5
    assert main(["estimate", "--subnet", str(second), "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert 100 * estimate["flops"] / estimate["dense_flops"] == pytest.approx(of_original, abs=0.06)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet20", "--flops", "150%"], "above the dense model"),
        (["--model", "resnet20", "--flops", "0.001%"], "below the smallest subnet"),
        (["--model", "resnet20"], "give a target"),
        (["--model", "resnet20", "--flops", "half"], "cannot read flops target 'half'"),
        (["--model", "resnet20", "--latency", "2ms"], "needs a latency profile"),
        (["--model", "resnet20", "--flops", "50%", "--input-shape", "3,a"], "not a shape"),
        (["--model", "nosuch", "--flops", "50%"], "unknown model 'nosuch'"),
        (["--checkpoint", "/no/such.pt", "--flops", "50%"], "does not exist"),
        (["--model", "resnet20", "--flops", "50%", "--round-to", "0"], "round_to must be"),
        (["--model", "resnet20", "--flops", "50%", "--allocation", "cost"], "give --profile"),
    ],
)
def test_prune_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["prune", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--model", "resnet20", "--input-shape", "1,3,32,32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flops"] == 40_813_184  # MACs with option-B shortcuts, FlopCounterMode / 2
    assert report["params"] == 272_474
    assert report["unprunable"] == {"input": "model input", "fc": "model output"}
    assert sum(g["prunable"] for g in report["groups"]) == 12


def test_inspect_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--model", "mobilenetv2"]) == 0
    out = capsys.readouterr().out
    assert "prunable channel groups" in out and "kept whole" in out


@pytest.mark.slow
def test_a_torchvision_model_by_name_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchvision")
    model = "torchvision.models:mobilenet_v3_small"
    shape = ["--input-shape", "1,3,32,32"]
    assert main(["inspect", "--model", model, *shape, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["model"]["kwargs"] == {"num_classes": 10}  # no in_channels: ResNet-style builders
    out = tmp_path / "mnv3"
    assert main(["prune", "--model", model, *shape, "--flops", "50%", "--out", str(out)]) == 0
    loaded = load_subnet(out, expect=model)  # the reference the user names, never the file's
    measured = count_flops(loaded.model, torch.zeros(1, 3, 32, 32))
    assert measured == json.loads((out / "subnet.json").read_text())["metrics"]["flops"]
    assert measured <= 0.5 * found["flops"]
    again = ["prune", "--checkpoint", str(out), "--model", model, "--flops", "50%"]
    assert main([*again, "--out", str(tmp_path / "again")]) == 0


def test_inspect_table_is_the_api_report(capsys: pytest.CaptureFixture[str]) -> None:
    model = "tests.backend.architectures:NonLocalNet"
    assert main(["inspect", "--model", model]) == 0
    out = capsys.readouterr().out
    assert "einsum: reads channels kept whole; counted, not pruned" in out
    assert "% of FLOPs" in out


def test_prune_says_when_nothing_can_be_pruned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "tests.backend.architectures:single_conv"
    argv = ["prune", "--model", model, "--out", str(tmp_path / "out")]
    assert main([*argv, "--flops", "50%"]) == 2
    assert f"nothing in {model} can be pruned" in capsys.readouterr().err
    assert main([*argv, "--flops", "100%"]) == 0  # the dense model, exported
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_prune_of_a_model_without_flops_prints_no_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prune", "--model", "torch.nn:Identity"]
    assert main([*argv, "--flops", "100%", "--out", str(tmp_path / "out")]) == 0
    assert "flops: 0 -> 0\n" in capsys.readouterr().out
    # like a lone Linear, a model with nothing to prune is refused below 100%
    assert main([*argv, "--flops", "50%", "--out", str(tmp_path / "half")]) == 2
    assert "nothing in torch.nn:Identity can be pruned" in capsys.readouterr().err
