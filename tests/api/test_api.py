"""The Python API on module objects: prune, inspect and load (run_search is in tests/search)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import prunetune
from prunetune.backend.errors import CheckpointError, InfeasibleTargetError


def measured_macs(model: nn.Module, example: Tensor) -> int:
    """The reference: FlopCounterMode total / 2, in eval mode."""
    model = model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return int(counter.get_total_flops()) // 2


class ResidualNet(nn.Module):
    """A hand-written model: stem, a residual block (coupled channels), a classifier."""

    def __init__(self, width: int = 24, classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.body(x))
        return self.head(x.mean(dim=(2, 3)))


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so that a wrong channel would show in the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def test_prune_a_hand_written_module_meets_the_target_by_flop_counter() -> None:
    torch.manual_seed(0)
    net = randomise_bn(ResidualNet())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    example = torch.randn(2, 3, 16, 16)

    result = prunetune.prune(net, example, "flops<=50%")

    dense = measured_macs(net, example[:1])
    assert result.dense_flops == dense
    assert result.flops == measured_macs(result.model, example[:1]) <= 0.5 * dense
    assert result.params == sum(p.numel() for p in result.model.parameters())
    assert result.model(example).shape == (2, 7)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert result.spec.model.name.endswith("ResidualNet") and not result.spec.model.buildable


def test_prune_to_everything_gives_the_dense_outputs_back() -> None:
    torch.manual_seed(0)
    net = randomise_bn(ResidualNet())
    example = torch.randn(4, 3, 16, 16)
    result = prunetune.prune(net, example, {"flops": "100%"})
    assert result.flops == result.dense_flops
    torch.testing.assert_close(result.model(example), net(example), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_prune_a_torchvision_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    result = prunetune.prune(net, example, "flops<=50%", round_to=8)
    assert result.flops == measured_macs(result.model, example) <= 0.5 * result.dense_flops
    assert result.dense_flops == measured_macs(net, example)
    assert all(w % 8 == 0 for w in result.spec.widths.values())
    assert result.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    full = prunetune.prune(net, example, "flops<=100%")
    torch.testing.assert_close(full.model(example), net(example), rtol=0, atol=1e-5)


def test_inspect_reports_groups_costs_and_leaves_the_model_as_it_was() -> None:
    net = ResidualNet().train()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    found = prunetune.inspect(net, torch.randn(3, 3, 16, 16))
    assert found.input_shape == (1, 3, 16, 16)
    assert found.costs["flops"] == measured_macs(ResidualNet(), torch.randn(1, 3, 16, 16))
    sizes = sorted(g.size for g in found.prunable_groups)
    assert sizes == [24, 48]  # the residual couples stem and body output; the hidden conv alone
    assert "head" in found.kept_whole or any("head" in g.members for g in found.groups)
    assert net.training and all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())
    assert json.loads(json.dumps(found.to_dict()))["groups"]
    assert "prunable channel groups" in str(found)


def test_load_rebuilds_an_export_of_a_model_defined_in_a_function(tmp_path: Path) -> None:
    class Local(nn.Module):  # not importable: only the export's own program can rebuild it
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3)
            )
            self.classifier = nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.classifier(self.features(x).amax(dim=(2, 3)))

    torch.manual_seed(0)
    net = randomise_bn(Local())
    result = prunetune.prune(net, torch.randn(1, 1, 12, 12), "flops<=60%")
    out = result.export(tmp_path / "subnet")
    x = torch.randn(5, 1, 12, 12)

    from_program = prunetune.load(out)
    assert from_program.model.eval() is from_program.model  # torch refuses eval() on a program
    torch.testing.assert_close(from_program.model(x), result.model(x), rtol=1e-5, atol=1e-6)
    assert from_program.spec == result.spec

    from_module = prunetune.load(out, model=net)  # the dense module given again: a real Local
    assert type(from_module.model) is Local
    torch.testing.assert_close(from_module.model(x), result.model(x), rtol=1e-5, atol=1e-6)


def test_load_refuses_a_tampered_or_foreign_directory(tmp_path: Path) -> None:
    net = ResidualNet()
    out = prunetune.prune(net, torch.randn(1, 3, 8, 8), "flops<=70%").export(tmp_path / "s")
    program = out / "model.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.pt2.*does not match the checksum"):
        prunetune.load(out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "subnet.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="is not a prunetune export"):
        prunetune.load(foreign)
    with pytest.raises(CheckpointError, match=r"has no subnet\.json"):
        prunetune.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"export '.*nowhere' does not exist"):
        prunetune.load(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="directory must be the path of an export"):
        prunetune.load(None)  # type: ignore[arg-type]


def test_bad_arguments_say_what_was_wrong() -> None:
    net = ResidualNet()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module instance, got str"):
        prunetune.prune("resnet20", x, "flops<=50%")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"example_input must be a torch\.Tensor"):
        prunetune.prune(net, [1, 2], "flops<=50%")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        prunetune.prune(net, x, "flops<=50%", importance="l3")
    with pytest.raises(ValueError, match="unknown target metric 'macs2'"):
        prunetune.prune(net, x, {"macs2": "50%"})
    with pytest.raises(ValueError, match="cannot read flops target"):
        prunetune.prune(net, x, "flops<=half")
    with pytest.raises(ValueError, match="pass profile="):
        prunetune.prune(net, x, "flops<=50%", allocation="cost")
    with pytest.raises(InfeasibleTargetError):
        prunetune.prune(net, x, "params<=10")


def test_the_package_exports_its_api_lazily() -> None:
    assert set(prunetune.__all__) <= set(dir(prunetune))
    for name in prunetune.__all__:
        assert getattr(prunetune, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        prunetune.nope  # noqa: B018
