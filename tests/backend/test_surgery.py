"""Physical pruning: pruned == zeroed == masked outputs, and FLOPs match the layer records."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunetune.backend.errors import SpecError
from prunetune.backend.graph import ChannelGraph, ChannelSegment, counting_mode
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model, zero_pruned_channels
from prunetune.estimators import FlopsModel
from tests.backend.architectures import ALL_MODELS, build

SLOW_MODELS = {"mobilenetv2", "resnet56", "vgg16_bn"}
SPECS_PER_MODEL = 20
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread is fastest, and a second one only contends for the
    # cores with other test processes (forwards were 100x slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_macs(graph: ChannelGraph, widths: dict[str, int]) -> int:
    """MACs computed from the LayerInfo and HeadCost records, plus the graph's constant
    (unmodelled) MACs."""
    width = {group.name: widths.get(group.name, group.size) for group in graph.groups}
    total = graph.other_flops
    for cost in graph.head_costs:  # q @ k^T and attention @ v, per kept head
        total += cost.macs * sum(width[s.group] for s in cost.segments)
    for layer in graph.layers:
        if layer.depthwise:  # each kept input channel makes out_channels / groups outputs
            per_channel = math.prod(layer.kernel_size) * layer.out_channels // layer.groups
            features = sum(width[s.group] * s.multiplier for s in layer.in_segments)
            total += layer.total_positions * features * per_channel
            continue
        out_channels = sum(width[s.group] * s.multiplier for s in layer.outputs)
        in_features = sum(width[s.group] * s.multiplier for s in layer.in_segments)
        groups = out_channels if layer.depthwise else layer.groups
        per_position = out_channels * math.prod(layer.kernel_size) * in_features
        assert per_position % groups == 0
        total += layer.total_positions * per_position // groups
    return total


def run_counting_macs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The model's output and FlopCounterMode's total over two (MACs), per example."""
    with counting_mode(model), FlopCounterMode(display=False) as counter:
        output = model(x)
    return output, counter.get_total_flops() // 2 // x.shape[0]


def random_spec(graph: ChannelGraph, name: str, rng: random.Random) -> SubnetSpec:
    """Random widths (sometimes minimal or dense) and random channel importance."""
    widths = {}
    for group in graph.prunable_groups:
        choice = rng.random()
        if choice < 0.1:
            widths[group.name] = group.min_width
        elif choice < 0.2:
            widths[group.name] = group.size
        else:
            widths[group.name] = rng.randrange(group.step, group.size + 1, group.step)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    importance = {
        group.name: torch.rand(group.size, generator=generator)
        for group in graph.prunable_groups
        if rng.random() < 0.7
    }
    return SubnetSpec.from_widths(graph, ModelRef(name), widths, importance)


def check_pruned_zeroed_masked(
    model: nn.Module, graph: ChannelGraph, masker: ChannelMasker, spec: SubnetSpec, exact: bool
) -> nn.Module:
    """Assert that the zeroed and masked models compute what the pruned one does (``exact``:
    the pruned one too) and that its MACs are the records' figure; returns the pruned model."""
    pruned = prune_model(model, graph, spec)
    zeroed = zero_pruned_channels(model, graph, spec)
    masker.set_masks(masks_from_spec(graph, spec))
    output, macs = run_counting_macs(pruned, X)
    with torch.no_grad():
        expected = zeroed(X)
        if exact:
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masker(X), expected, atol=1e-5, rtol=1e-5)
    assert macs == reference_macs(graph, spec.widths)
    return pruned


RESTANDARDISED = {"bit_style"}
"""Convs that standardise their weight over its input channels (BiT's StdConv2d) standardise
again over the kept ones, so the pruned model is not the zeroed one; masks and zeros agree."""


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in ALL_MODELS],
)
def test_pruned_zeroed_and_masked_models_agree(name: str) -> None:
    model = build(name)
    graph = ChannelGraph.trace(model, X)
    masker = ChannelMasker(model, graph)
    assert run_counting_macs(model, X)[1] == reference_macs(graph, {})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(name)
    for _ in range(SPECS_PER_MODEL):
        spec = random_spec(graph, name, rng)
        pruned = check_pruned_zeroed_masked(model, graph, masker, spec, name not in RESTANDARDISED)
        for layer in graph.layers:
            owner_name = layer.name.rpartition(".")[0]
            if isinstance(model.get_submodule(owner_name), nn.MultiheadAttention):
                # its projections: the module keeps its heads' rows, or is replaced
                heads = layer.in_segments[0] if "out_proj" in layer.name else layer.outputs[0]
                kept = spec.widths.get(heads.group, graph.group(heads.group).size)
                assert pruned.get_submodule(owner_name).num_heads == kept
                continue
            module = pruned.get_submodule(layer.name)
            if layer.weight:  # a functional layer: its weight's rows
                out_features = pruned.get_parameter(layer.weight).shape[0]
            else:
                out_features = module.out_channels if layer.kind == "conv" else module.out_features
            # a depthwise conv's outputs follow its input, whatever groups make it up
            segments = layer.in_segments if layer.depthwise else layer.outputs
            widths = [
                spec.widths.get(s.group, graph.group(s.group).size) * s.multiplier for s in segments
            ]
            if layer.depthwise:  # each kept input channel makes ``multiplier`` outputs
                multiplier = layer.out_channels // layer.in_channels
                assert out_features == sum(widths) * multiplier
            else:
                assert out_features == sum(widths)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} of the dense model changed"


def test_pruned_model_is_smaller_and_keeps_weights() -> None:
    model = build("resnet20")
    graph = ChannelGraph.trace(model, X)
    widths = {g.name: max(g.min_width, g.size // 2) for g in graph.prunable_groups}
    spec = SubnetSpec.from_widths(graph, ModelRef("resnet20"), widths)
    pruned = prune_model(model, graph, spec)
    conv = pruned.get_submodule("layer1.0.conv1")
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 8 and conv.out_channels == 8
    kept = spec.kept_channels(graph)
    dense = model.get_submodule("layer1.0.conv1").weight
    expected = dense[list(kept["layer1.0.conv1"])][:, list(kept["conv1"])]
    assert torch.equal(conv.weight, expected)
    bn = pruned.get_submodule("layer1.0.bn1")
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.modules())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert model.get_submodule("layer1.0.conv1").out_channels == 16
    assert not pruned.training  # same mode as the dense model


def test_depthwise_and_grouped_convs_are_rebuilt() -> None:
    model = build("mobilenetv2")
    graph = ChannelGraph.trace(model, torch.randn(1, 3, 32, 32))
    widths = {g.name: g.min_width for g in graph.prunable_groups}
    pruned = prune_model(
        model, graph, SubnetSpec.from_widths(graph, ModelRef("mobilenetv2"), widths)
    )
    depthwise = pruned.get_submodule("features.2.block.1.0")
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 1
    model = build("resnext_block")
    graph = ChannelGraph.trace(model, X)
    widths = {g.name: g.min_width for g in graph.prunable_groups}
    pruned = prune_model(model, graph, SubnetSpec.from_widths(graph, ModelRef("x"), widths))
    grouped = pruned.get_submodule("grouped.0")
    assert (grouped.groups, grouped.in_channels, grouped.out_channels) == (4, 4, 4)


def test_dense_spec_reproduces_the_model() -> None:
    model = build("inception_style")
    graph = ChannelGraph.trace(model, X)
    spec = SubnetSpec.from_widths(graph, ModelRef("x"), graph.dense_widths())
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model, graph, spec)(X), model(X))


def test_prune_rejects_a_spec_that_does_not_fit() -> None:
    model = build("small_cnn")
    graph = ChannelGraph.trace(model, X)
    widths = {**graph.dense_widths(), "features.0": 99}
    del widths["input"], widths["head.2"]
    spec = SubnetSpec(ModelRef("small_cnn"), tuple(X.shape), widths)
    with pytest.raises(SpecError, match="out of range"):
        prune_model(model, graph, spec)


class _Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 12, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm1d(12)
        self.multiplied = nn.Conv1d(12, 24, 3, padding=1, groups=12)  # depth multiplier 2
        self.conv3 = nn.Conv1d(24, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))) + x
        return self.fc(torch.flatten(self.conv3(torch.relu(self.multiplied(x))), 1))


def test_conv1d_models_prune_too() -> None:
    model = _Conv1dNet().eval()
    x = torch.randn(2, 3, 16)
    graph = ChannelGraph.trace(model, x)
    assert graph.layer("conv2").depthwise
    assert graph.layer("fc").in_segments[0].multiplier == 7
    multiplied = graph.layer("multiplied")  # depthwise with a channel multiplier of 2
    assert multiplied.depthwise and multiplied.out_group == "conv1"
    assert graph.layer("conv3").in_segments == (ChannelSegment("conv1", 2),)
    assert graph.group("conv1").prunable
    flops = FlopsModel.from_graph(graph)
    rng = random.Random(1)
    for _ in range(SPECS_PER_MODEL):
        spec = random_spec(graph, "x", rng)
        output, macs = run_counting_macs(prune_model(model, graph, spec), x)
        with torch.no_grad():
            torch.testing.assert_close(output, zero_pruned_channels(model, graph, spec)(x))
        assert macs == reference_macs(graph, spec.widths) == flops.evaluate(spec)
