"""ChannelGraph: groups, layer records and fixed groups on known architectures."""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import pytest
import torch
from torch import Tensor, nn

from prunetune.backend.errors import UnsupportedModelError
from prunetune.backend.graph import (
    PROJECTIONS,
    ChannelGraph,
    ChannelGroup,
    ChannelMember,
    ChannelSegment,
    LayerInfo,
)
from tests.backend.architectures import (
    ALL_MODELS,
    ChannelShuffleNet,
    HardCodedViewNet,
    UntraceableNet,
    build,
)

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread is fastest, and a second one only contends for the
    # cores with other test processes (forwards were 100x slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trace(name: str) -> ChannelGraph:
    return ChannelGraph.trace(build(name), X)


def _group_of(graph: ChannelGraph, module: str, role: str) -> ChannelGroup:
    found = [
        group
        for group in graph.groups
        if any(m.module == module and m.role == role for m in group.members)
    ]
    assert len(found) == 1, f"{module}/{role} is in {len(found)} groups"
    return found[0]


def _in_attention(model: nn.Module, layer: LayerInfo) -> bool:
    """Whether ``layer`` is a projection of an ``nn.MultiheadAttention`` whose heads are a
    group (its query, key and value projections are rows of one of its parameters)."""
    owner = layer.name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), nn.MultiheadAttention)


def _layer_parameters(model: nn.Module, layer: LayerInfo) -> int:
    if _in_attention(model, layer) and "out_proj" not in layer.name:
        return layer.out_channels * (layer.in_channels + int(layer.bias))
    return sum(p.numel() for p in model.get_submodule(layer.name).parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_channel_dim_is_in_exactly_one_group(name: str) -> None:
    graph = _trace(name)
    model = build(name)
    for layer in graph.layers:
        if _in_attention(model, layer):  # rows of in_proj_weight (or q_proj_weight, ...)
            assert layer.name.rpartition(".")[2] in PROJECTIONS
            heads = layer.in_segments if "out_proj" in layer.name else layer.outputs
            assert graph.group(heads[0].group).unit == "heads"
            continue
        module = model.get_submodule(layer.name)
        if layer.weight:  # F.conv2d(x, self.weight, self.bias) in a plain module
            assert model.get_parameter(layer.weight).shape[:2] == (
                layer.out_channels,
                layer.in_channels,
            )
        else:
            assert isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        sizes = sum(graph.group(s.group).size * s.multiplier for s in layer.in_segments)
        assert sizes == layer.in_channels
        if layer.out_segments:  # an output cut into pieces: one group (or more) per piece
            pieces = sum(graph.group(s.group).size * s.multiplier for s in layer.outputs)
            assert pieces == layer.out_channels
            continue
        out_group = _group_of(graph, layer.name, "out")
        # a depthwise conv with a channel multiplier m makes m outputs of each input channel
        (out,) = [m for m in out_group.members if m.module == layer.name and m.role == "out"]
        assert out_group.name == layer.out_group
        assert out_group.size * out.multiplier == layer.out_channels
    for norm in graph.norms:
        assert isinstance(
            model.get_submodule(norm.name), (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
        )
        assert norm.segments[0].group == norm.group
    names = [group.name for group in graph.groups]
    assert len(set(names)) == len(names)
    assert graph.prunable_groups == tuple(g for g in graph.groups if g.prunable)
    counted = sum(_layer_parameters(model, layer) for layer in graph.layers)
    counted += sum(p.numel() for n in graph.norms for p in model.get_submodule(n.name).parameters())
    counted += sum(model.get_parameter(s.name).numel() for s in graph.scales if s.parameter)
    assert counted + graph.other_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_input_and_output_groups_are_fixed_with_reasons(name: str) -> None:
    graph = _trace(name)
    first = graph.layers[0]
    assert graph.group(first.in_segments[0].group).reason == "model input"
    last = graph.group(graph.layers[-1].out_group)
    assert not last.prunable and last.reason is not None and "model output" in last.reason
    assert graph.unprunable[last.name] == last.reason
    for group in graph.groups:
        assert group.prunable == (group.reason is None)
        assert group.min_width == (group.step if group.prunable else group.size)
        if not group.prunable:
            assert graph.unprunable[group.name]


def test_trace_is_deterministic_and_leaves_the_model_alone() -> None:
    model = build("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = ChannelGraph.trace(model, X)
    second = ChannelGraph.trace(model, X)
    assert first.groups == second.groups and first.layers == second.layers
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resnet20_stage_residuals_form_one_group() -> None:
    graph = _trace("resnet20")
    stage1 = graph.group("conv1")
    producers = {m.module for m in stage1.members if m.role == "out"}
    assert producers == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    stage2 = _group_of(graph, "layer2.0.shortcut.0", "out")
    assert stage2.name == "layer2.0.conv2"
    assert {m.module for m in stage2.members if m.role == "out"} == {
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer2.1.conv2",
        "layer2.2.conv2",
    }
    assert ChannelMember("layer2.0.shortcut.1", "norm") in stage2.members
    stage3 = _group_of(graph, "layer3.2.conv2", "out")
    assert ChannelMember("fc", "in") in stage3.members
    assert graph.group("layer1.0.conv1").size == 16
    assert len(graph.prunable_groups) == 12
    assert [g.name for g in graph.groups][:3] == ["input", "conv1", "layer1.0.conv1"]


def test_mobilenetv2_depthwise_couples_with_its_producer() -> None:
    graph = _trace("mobilenetv2")
    expand = _group_of(graph, "features.2.block.0.0", "out")
    depthwise = graph.layer("features.2.block.1.0")
    assert depthwise.depthwise and depthwise.groups == 96
    assert depthwise.out_group == expand.name
    assert depthwise.in_segments == (ChannelSegment(expand.name),)
    assert ChannelMember("features.2.block.1.1", "norm") in expand.members
    # the first block has no expansion: its depthwise conv joins the stem's group
    assert graph.layer("features.1.block.0.0").out_group == "features.0.0"
    # blocks with identity shortcuts share the projection group
    projection = _group_of(graph, "features.2.block.2", "out")
    assert ChannelMember("features.3.block.2", "out") in projection.members


def test_densenet_concat_gives_segments_with_offsets() -> None:
    graph = _trace("densenet_style")
    transition = graph.layer("transition")
    assert transition.in_segments == (
        ChannelSegment("stem"),
        ChannelSegment("conv1"),
        ChannelSegment("conv2"),
    )
    assert ChannelMember("transition", "in", offset=24) in graph.group("conv2").members
    assert ChannelMember("bn2", "norm", offset=16) in graph.group("conv1").members
    norm = next(n for n in graph.norms if n.name == "bn_transition")
    assert [s.group for s in norm.segments] == ["stem", "conv1", "conv2"]


def test_inception_branches_concat_into_segments() -> None:
    graph = _trace("inception_style")
    head = graph.layer("head")
    assert [s.group for s in head.in_segments] == ["branch1.0", "branch3.0", "branch_pool.0"]
    assert {m.module for m in graph.group("stem.0").members if m.role == "in"} == {
        "branch1.0",
        "branch3_reduce.0",
        "branch_pool.0",
    }


def test_grouped_conv_sets_a_step() -> None:
    graph = _trace("resnext_block")
    grouped = graph.layer("grouped.0")
    assert grouped.groups == 4 and not grouped.depthwise
    assert graph.group(grouped.in_segments[0].group).step == 4
    assert graph.group(grouped.out_group).step == 4
    assert graph.group(grouped.out_group).min_width == 4
    residual = graph.group("stem.0")
    assert ChannelMember("expand", "out") in residual.members and residual.step == 1


def test_squeeze_excitation_gate_couples_with_its_input() -> None:
    graph = _trace("squeeze_excitation")
    trunk = graph.group("stem.0")
    assert ChannelMember("excite", "out") in trunk.members
    assert ChannelMember("squeeze", "in") in trunk.members
    assert ChannelMember("conv", "out") in trunk.members
    assert graph.group("squeeze").prunable


def test_functional_ops_pass_channels_through() -> None:
    graph = _trace("functional")
    assert [g.name for g in graph.prunable_groups] == ["conv1", "conv2", "conv3"]
    assert graph.layer("fc").in_segments == (ChannelSegment("conv3"),)


def test_shared_module_couples_every_call_and_counts_calls() -> None:
    graph = _trace("shared_conv")
    shared = graph.layer("shared")
    assert shared.calls == 2
    assert shared.out_group == shared.in_segments[0].group == "stem"
    assert {m.module for m in graph.group("stem").members if m.role == "norm"} == {
        "bn0",
        "bn1",
        "bn2",
    }


def test_linear_after_flatten_has_a_multiplier() -> None:
    graph = _trace("flatten_linear")
    fc1 = graph.layer("fc1")
    assert fc1.in_segments == (ChannelSegment("features.1.0", multiplier=16),)
    assert ChannelMember("fc1", "in", multiplier=16) in graph.group("features.1.0").members
    assert graph.group("fc1").prunable  # a hidden linear layer, with a BatchNorm1d


def test_layer_records_carry_conv_geometry() -> None:
    graph = _trace("resnet20")
    conv = graph.layer("layer2.0.conv1")
    assert conv.kind == "conv" and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    assert conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
    assert conv.input_hw == (32, 32) and conv.output_hw == (16, 16) and not conv.bias
    fc = graph.layer("fc")
    assert fc.kind == "linear" and fc.bias and fc.in_channels == 64 and fc.out_channels == 10


def test_dag_has_shapes_on_every_edge() -> None:
    graph = _trace("resnet20")
    assert isinstance(graph.dag, nx.DiGraph) and nx.is_directed_acyclic_graph(graph.dag)
    for source, target, data in graph.dag.edges(data=True):
        assert "shape" in data, (source, target)
    assert graph.dag.edges["x", "conv1"]["shape"] == (1, 3, 32, 32)
    assert graph.dag.nodes["conv1"]["module_type"] == "Conv2d"
    assert graph.dag.nodes["conv1"]["groups"] == ("conv1",)
    assert graph.input_shape == (1, 3, 32, 32)
    assert graph.dense_widths()["conv1"] == 16


def test_channel_shuffle_prunes_its_groups_in_whole_blocks() -> None:
    graph = ChannelGraph.trace(ChannelShuffleNet(), X)
    shuffled = graph.group("conv1.0[0:4]")  # the 4 runs of 4 channels keep the same channels
    assert shuffled.prunable and shuffled.size == 4
    assert [(s.group, s.multiplier) for s in graph.layer("conv2.0").in_segments] == [
        ("conv1.0[0:4]", 4)
    ]
    assert graph.group("conv2.0").prunable  # the conv after the shuffle may still shrink


def test_reshape_to_a_literal_channel_count_is_fixed() -> None:
    graph = ChannelGraph.trace(HardCodedViewNet(), X)
    assert "fixed size 16" in graph.unprunable["conv2.0"]
    assert graph.group("conv1.0").prunable


class _MatmulHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).mean((2, 3))
        return x @ self.proj


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8, 8))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nchw,cd->ndhw", x, self.weight)


class _WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.leaf = _Opaque()
        self.gn = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.gn(self.leaf(self.conv(x))))


def test_unknown_ops_fix_their_groups_without_failing() -> None:
    graph = ChannelGraph.trace(_MatmulHead(), X)
    assert not graph.group("conv").prunable
    assert "matmul" in (graph.group("conv").reason or "")
    leaf = ChannelGraph.trace(_WithLeaf(), X, leaf_modules=[_Opaque])
    assert "leaf" in leaf.unprunable and "_Opaque" in leaf.unprunable["leaf"]
    assert "GroupNorm" in leaf.unprunable["gn"]
    assert not leaf.group("conv").prunable
    assert leaf.other_params == 64 + 16


def test_untraceable_model_names_the_offending_line() -> None:
    with pytest.raises(UnsupportedModelError, match=r"control flow.*if x\.sum\(\) > 0"):
        ChannelGraph.trace(UntraceableNet(), X)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        ChannelGraph.trace("resnet20", X)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch and a channel dim"):
        ChannelGraph.trace(build("resnet20"), torch.randn(3))
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 5, 32, 32\)"):
        ChannelGraph.trace(build("resnet20"), torch.randn(1, 5, 32, 32))
    with pytest.raises(KeyError, match="no channel group 'nope'"):
        _trace("small_cnn").group("nope")


class _Ops(nn.Module):
    """Each branch exercises one rule; the sum keeps every branch alive."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        if self.op == "cat_spatial":
            y = torch.cat([a, b], dim=2)
        elif self.op == "channel_slice":
            y = torch.cat([a[:, :4], b[:, 4:]], 1)
        elif self.op == "spatial_slice":
            y = a[:, :, 1:] + b[..., 1:, :]
        elif self.op == "permute":
            y = (a + b).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        elif self.op == "chunk":
            first, second = torch.chunk(a + b, 2, dim=1)
            y = torch.cat([second, first], 1)
        else:
            first, second = (a + b).chunk(2, dim=3)
            y = torch.cat([first, second], 3)
        return self.head(y)


@pytest.mark.parametrize(
    ("op", "coupled", "fixed_by"),
    [
        ("cat_spatial", True, None),
        ("channel_slice", False, "getitem"),
        ("spatial_slice", True, None),
        ("permute", True, None),  # to channels-last and back
        ("chunk", True, None),  # each half pruned alike, the convs cut in halves
        ("chunk_spatial", True, None),
    ],
)
def test_op_rules(op: str, coupled: bool, fixed_by: str | None) -> None:
    graph = ChannelGraph.trace(_Ops(op), X)
    a, b = graph.group(graph.layer("a").out_group), graph.group(graph.layer("b").out_group)
    assert (a.name == b.name) == coupled
    if fixed_by is None:
        assert a.prunable and b.prunable
    else:
        assert not a.prunable and fixed_by in (a.reason or "")
    assert not graph.group(graph.layer("head").out_group).prunable  # model output
