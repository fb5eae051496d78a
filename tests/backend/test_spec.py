"""SubnetSpec: JSON round trip, validation messages, channel selection."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from prunetune.backend.errors import SpecError
from prunetune.backend.graph import ChannelGraph, ChannelGroup, ChannelMember
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec, select_channels
from tests.backend.architectures import ALL_MODELS, build

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread is fastest, and a second one only contends for the
    # cores with other test processes (forwards were 100x slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def graph() -> ChannelGraph:
    return ChannelGraph.trace(build("resnet20"), X)


def _widths(graph: ChannelGraph, **changes: int) -> dict[str, int]:
    widths = {g.name: g.size for g in graph.prunable_groups}
    widths.update({k.replace("__", "."): v for k, v in changes.items()})
    return widths


@pytest.mark.parametrize("name", ALL_MODELS)
def test_json_round_trip(name: str) -> None:
    graph = ChannelGraph.trace(build(name), X)
    widths = {
        g.name: max(g.min_width, g.size // 2 // g.step * g.step) for g in graph.prunable_groups
    }
    scores = {g.name: torch.randn(g.size) for g in graph.prunable_groups}
    spec = SubnetSpec.from_widths(graph, ModelRef(name, {"num_classes": 10}), widths, scores)
    again = SubnetSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert SubnetSpec.from_dict(spec.to_dict()) == spec
    again.validate(graph)
    assert SubnetSpec(spec.model, spec.input_shape, spec.widths) != spec  # kept differs


def test_spec_copies_its_inputs(graph: ChannelGraph) -> None:
    widths = _widths(graph)
    spec = SubnetSpec(ModelRef("resnet20"), (1, 3, 32, 32), widths)
    widths["conv1"] = 1
    assert spec.widths["conv1"] == 16
    with pytest.raises(AttributeError):
        spec.widths = {}  # type: ignore[misc]


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        (
            {"layer1__0__conv1": 0},
            r"group 'layer1.0.conv1' has 16 channels; width 0 is out of range 1..16",
        ),
        ({"layer1__0__conv1": 17}, r"width 17 is out of range 1..16"),
        ({"nope": 3}, r"unknown channel group 'nope'; prunable groups: conv1, layer1.0.conv1"),
        ({"fc": 5}, r"group 'fc' cannot be pruned \(model output\); its width must stay 10"),
    ],
)
def test_validate_rejects_bad_widths(
    graph: ChannelGraph, widths: dict[str, int], message: str
) -> None:
    spec = SubnetSpec(ModelRef("resnet20"), (1, 3, 32, 32), _widths(graph, **widths))
    with pytest.raises(SpecError, match=message):
        spec.validate(graph)


def test_validate_rejects_missing_groups_and_other_inputs(graph: ChannelGraph) -> None:
    widths = _widths(graph)
    del widths["layer2.0.conv1"]
    with pytest.raises(SpecError, match=r"no width for groups 'layer2.0.conv1'"):
        SubnetSpec(ModelRef("resnet20"), (1, 3, 32, 32), widths).validate(graph)
    with pytest.raises(SpecError, match=r"input shape \(1, 3, 64, 64\)"):
        SubnetSpec(ModelRef("resnet20"), (1, 3, 64, 64), _widths(graph)).validate(graph)


def test_validate_rejects_bad_kept_indices(graph: ChannelGraph) -> None:
    spec = SubnetSpec.from_widths(graph, ModelRef("resnet20"), _widths(graph, conv1=4))
    assert spec.kept is not None and spec.kept["conv1"] == (0, 1, 2, 3)
    cases = {
        (0, 1, 2): "keeps 3 indices but its width is 4",
        (0, 1, 1, 2): "not unique",
        (0, 1, 2, 16): r"must be in 0..15, got \[16\]",
    }
    for indices, message in cases.items():
        kept = {**spec.kept, "conv1": indices}
        with pytest.raises(SpecError, match=message):
            SubnetSpec(spec.model, spec.input_shape, spec.widths, kept).validate(graph)
    kept = {k: v for k, v in spec.kept.items() if k != "conv1"}
    with pytest.raises(SpecError, match="kept has no entry for group 'conv1'"):
        SubnetSpec(spec.model, spec.input_shape, spec.widths, kept).validate(graph)


def test_grouped_conv_widths_must_be_multiples_of_the_step() -> None:
    graph = ChannelGraph.trace(build("resnext_block"), X)
    widths = {g.name: g.size for g in graph.prunable_groups}
    widths["grouped.0"] = 30
    with pytest.raises(SpecError, match=r"width 30 is not a multiple of 4"):
        SubnetSpec(ModelRef("x"), (1, 3, 32, 32), widths).validate(graph)
    widths["grouped.0"] = 8
    spec = SubnetSpec.from_widths(graph, ModelRef("x"), widths)
    assert spec.kept is not None and spec.kept["grouped.0"] == (0, 1, 16, 17, 32, 33, 48, 49)
    unbalanced = {**spec.kept, "grouped.0": (0, 1, 2, 3, 4, 5, 6, 7)}
    with pytest.raises(SpecError, match="each of its 4 slices of 16 channels must keep 2"):
        SubnetSpec(ModelRef("x"), (1, 3, 32, 32), widths, unbalanced).validate(graph)


def test_select_channels_by_importance() -> None:
    group = ChannelGroup("g", 8, (ChannelMember("conv", "out"),))
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5, 0.5, 0.0, 0.2])
    assert select_channels(group, 3, scores) == (1, 3, 4)
    assert select_channels(group, 3) == (0, 1, 2)
    stepped = ChannelGroup("g", 8, (ChannelMember("conv", "out"),), step=2)
    assert select_channels(stepped, 4, scores) == (1, 3, 4, 5)
    with pytest.raises(SpecError, match="not a multiple of 2"):
        select_channels(stepped, 3)
    with pytest.raises(ValueError, match="must have 8 entries"):
        select_channels(group, 3, torch.ones(5))


def test_from_json_rejects_malformed_text() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        SubnetSpec.from_json("{")
    with pytest.raises(SpecError, match="missing 'widths'"):
        SubnetSpec.from_json('{"model": {"name": "resnet20"}, "input_shape": [1, 3, 32, 32]}')
    with pytest.raises(SpecError, match="version 7 is not supported"):
        SubnetSpec.from_dict({"version": 7})
    with pytest.raises(SpecError, match="width of group 'conv1' must be an integer"):
        SubnetSpec.from_dict(
            {"model": {"name": "r"}, "input_shape": [1, 3, 8, 8], "widths": {"conv1": "8"}}
        )


def test_compose_maps_inner_indices_back_to_the_dense_channels() -> None:
    from prunetune.backend.models import ModelRef
    from prunetune.backend.spec import SubnetSpec

    ref = ModelRef("small_cnn")
    outer = SubnetSpec(ref, (1, 1, 8, 8), {"a": 3, "b": 2}, {"a": (1, 4, 6), "b": (0, 5)})
    inner = SubnetSpec(ref, (1, 1, 8, 8), {"a": 2}, {"a": (0, 2)})
    composed = outer.compose(inner)
    assert composed.kept == {"a": (1, 6), "b": (0, 5)}
    assert composed.widths == {"a": 2, "b": 2}
