"""Untraceable submodules named as leaves, from the command line (--leaf-module, by class or
by name) and the Python API: refused without, pruned, exported and reloaded with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunetune
from prunetune.backend.errors import UnsupportedModelError
from prunetune.backend.export import ExportParityError
from prunetune.cli import main
from tests.factories import GatedNet, PaddedNet, SignGate

MODEL = ["--model", "tests.factories:PaddedNet", "--input-shape", "1,3,17,17"]
GATED = ["--model", "tests.factories:GatedNet", "--input-shape", "1,3,17,17"]


def test_refused_without_a_leaf_module_with_the_option_to_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["inspect", *GATED]) == 2
    err = capsys.readouterr().err
    assert "--leaf-module package.module:ThatModule" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(UnsupportedModelError, match=r"leaf_modules=\[ThatModule\]"):
        prunetune.inspect(GatedNet(), torch.randn(1, 3, 17, 17))
    # branching on the input's size alone traces (concretely, on the example input)
    assert main(["inspect", *MODEL]) == 0


@pytest.mark.parametrize("leaf", ["tests.factories:PadToEven", "pad"])
def test_a_leaf_module_by_class_or_name_is_pruned_around_and_reloads(
    leaf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", *MODEL, "--leaf-module", leaf, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {g["name"] for g in found["groups"] if g["prunable"]} >= {"conv2"}
    out = tmp_path / "out"
    assert main(["prune", *MODEL, "--leaf-module", leaf, "--flops", "60%", "--out", str(out)]) == 0
    spec = json.loads((out / "subnet.json").read_text())["spec"]
    assert spec["leaf_modules"] == [leaf]
    capsys.readouterr()
    assert main(["inspect", *MODEL[:2], "--checkpoint", str(out)]) == 0  # traced with the leaf
    x = torch.randn(2, 3, 17, 17)
    back = prunetune.load(out, model=PaddedNet())
    assert back.model(x).shape == (2, 4)


def test_the_api_takes_a_submodule_name_and_refuses_an_unknown_one() -> None:
    x = torch.randn(1, 3, 17, 17)
    result = prunetune.prune(PaddedNet(), x, "flops<=60%", leaf_modules=["pad"])
    assert result.flops == result.costs["flops"] <= 0.6 * result.dense_flops
    with pytest.raises(ValueError, match="leaf module 'padd' is not a submodule of PaddedNet"):
        prunetune.inspect(PaddedNet(), x, leaf_modules=["padd"])


def test_a_bad_leaf_module_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", *MODEL, "--leaf-module", "tests.factories:nothing"]) == 2
    assert "cannot import --leaf-module 'tests.factories:nothing'" in capsys.readouterr().err
    assert main(["inspect", *MODEL, "--leaf-module", "tests.factories:blobs"]) == 2
    assert "is not an nn.Module class" in capsys.readouterr().err


def test_data_dependent_control_flow_is_refused_and_prunes_as_a_leaf(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 17, 17)
    with pytest.raises(UnsupportedModelError, match=r"if x.mean\(\) > 0"):
        prunetune.prune(GatedNet(), x, "flops<=60%")
    result = prunetune.prune(GatedNet(), x, "flops<=60%", leaf_modules=[SignGate])
    assert result.flops == result.costs["flops"] <= 0.6 * result.dense_flops
    assert result.model(torch.randn(2, 3, 17, 17)).shape == (2, 4)
    with pytest.raises(ExportParityError, match=r"branches on a tensor's value.*torch.where"):
        result.export(tmp_path / "out")
