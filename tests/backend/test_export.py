"""Export directories: parity-checked files, reload, and refusal of tampered or foreign ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prunetune.backend.errors import CheckpointError, SpecError
from prunetune.backend.export import export_subnet, load_model, load_subnet, seal_record
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from tests.backend.architectures import ALL_MODELS, ARCHITECTURES, build

Exported = tuple[Path, torch.nn.Module, SubnetSpec]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One export of a half-width ResNet-20, made once (export takes seconds)."""
    return _export_fresh(tmp_path_factory.mktemp("export"))


def _export(tmp_path: Path, exported: Exported) -> Exported:
    out, pruned, spec = exported
    copy = tmp_path / "subnet"
    shutil.copytree(out, copy)
    return copy, pruned, spec


def _export_fresh(tmp_path: Path) -> Exported:
    ref = ModelRef("resnet20", {"num_classes": 10, "in_channels": 3})
    torch.manual_seed(0)
    dense = ref.build().eval()
    graph = ChannelGraph.trace(dense, torch.zeros(1, 3, 16, 16))
    widths = {
        g.name: max(g.min_width, g.size // 2 // g.step * g.step) for g in graph.prunable_groups
    }
    spec = SubnetSpec.from_widths(graph, ref, widths)
    pruned = prune_model(dense, graph, spec).eval()
    out = export_subnet(tmp_path / "subnet", pruned, spec, metrics={"acc": 0.5})
    return out, pruned, spec


def test_export_writes_every_file_and_reloads(tmp_path: Path) -> None:
    out, pruned, spec = _export_fresh(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx",
        "model.pt2",
        "subnet.json",
        "weights.pt",
    ]
    record = json.loads((out / "subnet.json").read_text())
    x = torch.randn(4, 3, 16, 16)
    assert record["metrics"]["flops"] == count_flops(pruned, x[:1])
    assert record["metrics"]["acc"] == 0.5
    assert max(record["parity"].values()) <= 1e-4
    loaded = load_subnet(out)
    assert loaded.spec == spec
    torch.testing.assert_close(loaded.model(x), pruned(x), atol=1e-6, rtol=1e-5)
    program = torch.export.load(out / "model.pt2")
    torch.testing.assert_close(program.module()(x), pruned(x), atol=1e-5, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["subnet"]  # no staging directory left


def test_load_model_takes_a_directory_or_refuses_another_architecture(
    tmp_path: Path, exported: Exported
) -> None:
    out, _, _ = _export(tmp_path, exported)
    assert load_model(out).spec is not None
    with pytest.raises(CheckpointError, match="is of model 'resnet20', not 'vgg16_bn'"):
        load_model(out, expect=ModelRef("vgg16_bn"))


def test_tampered_weights_are_refused(tmp_path: Path, exported: Exported) -> None:
    out, _, _ = _export(tmp_path, exported)
    state = torch.load(out / "weights.pt", weights_only=True)
    state["conv1.weight"] += 1
    torch.save(state, out / "weights.pt")
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_subnet(out)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda r: r["spec"]["widths"].update(conv1=0), SpecError, "out of range"),
        (lambda r: r["spec"]["widths"].update(nosuch=3), SpecError, "nosuch"),
        (lambda r: r.update(format="other/1"), CheckpointError, "not a prunetune export"),
        (lambda r: r["spec"].pop("widths"), SpecError, "widths"),
    ],
)
def test_tampered_subnet_json_is_refused(
    tmp_path: Path, exported: Exported, edit: object, error: type[Exception], message: str
) -> None:
    out, _, _ = _export(tmp_path, exported)
    record = json.loads((out / "subnet.json").read_text())
    edit(record)  # type: ignore[operator]
    (out / "subnet.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"own checksum|not a prunetune"):
        load_subnet(out)
    # an edit that also recomputes the checksum still meets the spec's own checks
    (out / "subnet.json").write_text(json.dumps(seal_record(record)))
    with pytest.raises(error, match=message):
        load_subnet(out)


def test_not_json(tmp_path: Path, exported: Exported) -> None:
    out, _, _ = _export(tmp_path, exported)
    (out / "subnet.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_subnet(out)


def test_failed_export_leaves_the_previous_one(tmp_path: Path, exported: Exported) -> None:
    out, pruned, spec = _export(tmp_path, exported)
    before = (out / "subnet.json").read_text()

    class Drifting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + torch.rand(1)  # differs between runs: parity must fail

    with pytest.raises(Exception, match=r"differs from the model|failed"):
        export_subnet(out, Drifting(pruned), spec)
    assert (out / "subnet.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["subnet"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_architecture_exports_and_reloads_with_parity(tmp_path: Path, name: str) -> None:
    dense = build(name)
    if name in ARCHITECTURES:
        ref = ModelRef(f"tests.backend.architectures:{ARCHITECTURES[name].__name__}")
    else:
        ref = ModelRef(name, {"num_classes": 10, "in_channels": 3})
    graph = ChannelGraph.trace(dense, torch.zeros(1, 3, 32, 32))
    generator = torch.Generator().manual_seed(1)
    widths = {}
    for group in graph.prunable_groups:
        count = int(torch.randint(1, group.size // group.step + 1, (1,), generator=generator))
        widths[group.name] = count * group.step
    spec = SubnetSpec.from_widths(graph, ref, widths)
    pruned = prune_model(dense, graph, spec).eval()
    out = export_subnet(tmp_path / name, pruned, spec)
    loaded = load_subnet(out, trust_model_code=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x), pruned(x), atol=1e-5, rtol=1e-4)
    record = json.loads((out / "subnet.json").read_text())
    assert max(record["parity"].values()) <= 1e-4
    assert record["metrics"]["flops"] == count_flops(pruned, x[:1])
