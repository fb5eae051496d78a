"""Channel kinds pruned through with the coupling each needs: splits of the channels (gated
halves, MixConv's pieces, C2f blocks), channel shuffles, per-channel parameters, pixel shuffles,
group norms, and statistics across the channels that only rescale them (global response
norms)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

import prunetune
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from prunetune.backend.surgery import zero_pruned_channels
from tests.backend.architectures import build
from tests.backend.architectures_splits import CheckedMixConvNet

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _prunes_exactly(name: str, share: float = 0.5) -> prunetune.PruneResult:
    model = build(name)
    found = prunetune.inspect(model, X)
    assert found.costs["flops"] == count_flops(model, X)
    result = prunetune.prune(model, X, {"flops": f"{100 * share:g}%"})
    assert result.flops == result.costs["flops"] == count_flops(result.model, X)
    assert result.flops <= share * result.dense_flops
    return result


def test_halves_gated_against_each_other_keep_the_same_channels() -> None:
    graph = ChannelGraph.trace(build("gated_split"), X)
    gate = graph.layer("gate")
    assert [s.group for s in gate.outputs] == ["gate[0:16]", "gate[0:16]"]
    assert graph.group("gate[0:16]").prunable
    assert {m.module for m in graph.group("gate[0:16]").members} == {"gate", "gate_bn", "mix.0"}
    thirds = graph.group("mix.0[0:8]")  # split by a size computed from the tensor
    assert thirds.prunable and {"left", "right"} <= {m.module for m in thirds.members}
    assert "literal sizes [4, 8]" in graph.unprunable["literal"]
    model = _prunes_exactly("gated_split", 0.4).model
    assert model.gate.out_channels == 2 * model.mix[0].in_channels < 32
    assert model.mix[0].out_channels == 3 * model.left.in_channels


def test_mixconv_pieces_prune_on_their_own_and_their_sizes_follow() -> None:
    model = build("mixconv")
    graph = ChannelGraph.trace(model, X)
    assert model.dw.splits == [10, 8, 8] and model.head.splits == (8, 8)  # probes restored
    # the depthwise pieces (10, 8, 8) cut the pointwise pieces' outputs (13, 13) at 10 and 5
    pieces = [[s.group for s in graph.layer(f"dw.convs.{i}").in_segments] for i in range(3)]
    assert pieces == [
        ["pw.convs.0[0:10]"],
        ["pw.convs.0[10:13]", "pw.convs.1[0:5]"],
        ["pw.convs.1[5:13]"],
    ]
    assert all(graph.group(group).prunable for piece in pieces for group in piece)
    attributes = {(a.module, a.attribute): a.pieces for a in graph.split_attributes}
    assert set(attributes) == {("pw", "splits"), ("dw", "splits"), ("head", "splits")}
    assert [[s.group for s in piece] for piece in attributes[("dw", "splits")]] == pieces
    pruned = _prunes_exactly("mixconv", 0.4).model
    for owner in (pruned.pw, pruned.dw, pruned.head):
        assert list(owner.splits) == [conv.in_channels for conv in owner.convs]
    assert isinstance(pruned.dw.splits, list) and isinstance(pruned.head.splits, tuple)
    assert sum(pruned.dw.splits) == pruned.pwl.in_channels < 26


def test_a_split_at_sizes_written_in_the_code_is_kept_whole_with_the_reason() -> None:
    graph = ChannelGraph.trace(build("mixconv_literal"), X)  # self.splits equal, but unread
    assert graph.split_attributes == ()
    assert "literal sizes [8, 4]" in graph.unprunable["stem"]
    assert "read them from a list attribute" in graph.unprunable["stem"]
    assert not graph.prunable_groups


def test_split_sizes_whose_source_cannot_be_checked_keep_the_pieces_whole() -> None:
    graph = ChannelGraph.trace(CheckedMixConvNet().eval(), X)  # traces only on a real input
    assert graph.split_attributes == ()
    assert "could not be checked: the forward of 'dw'" in graph.unprunable["stem"]
    assert not graph.prunable_groups


def test_a_c2f_block_prunes_its_split_halves_and_bottlenecks() -> None:
    graph = ChannelGraph.trace(build("c2f"), X)
    halves = graph.group("cv1.0[0:8]")
    assert halves.prunable
    assert {"cv1.0", "m.0.cv2.0", "m.1.cv2.0", "cv2.0"} <= {m.module for m in halves.members}
    assert len(graph.layer("cv1.0").outputs) == 2
    model = _prunes_exactly("c2f").model
    assert model.cv2[0].in_channels == 2 * model.cv1[0].out_channels


def test_shufflenet_v2_units_prune_through_their_channel_shuffles() -> None:
    graph = ChannelGraph.trace(build("shufflenet_v2_style"), X)
    shuffled = graph.group("stage.0.branch1.2.0[0:4]")
    assert shuffled.prunable
    producers = {m.module for m in shuffled.members if m.role == "out"}
    assert producers == {f"stage.{i}.branch2.3.0" for i in range(3)} | {"stage.0.branch1.2.0"}
    # each unit's shuffle doubles the block its branch output is pruned in
    assert [s.multiplier for s in graph.layer("stage.2.branch2.3.0").outputs] == [4]
    assert not graph.unprunable.keys() - {"input", "fc"}
    summary = {g.name: g for g in prunetune.inspect(build("shufflenet_v2_style"), X).groups}
    assert summary["stage.0.branch1.2.0[0:4]"].spans == 4  # stage.2's blocks of 4 channels
    model = _prunes_exactly("shufflenet_v2_style", 0.4).model
    assert model.head[0].in_channels < 32


def test_a_channel_shuffle_module_prunes_like_the_view_transpose_form() -> None:
    from tests.backend.architectures import _ShuffleUnit

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), _ShuffleUnit(16, 32, 2, module=True), torch.nn.Conv2d(32, 8, 1)
    ).eval()
    graph = ChannelGraph.trace(model, X)
    assert graph.group("1.branch1.2.0").prunable
    assert [s.multiplier for s in graph.layer("2").in_segments] == [2]
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == result.costs["flops"] == count_flops(result.model, X)


def test_a_shuffle_of_runs_no_layer_can_cut_is_kept_whole_with_the_reason() -> None:
    class _InputShuffle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.shuffle = torch.nn.ChannelShuffle(3)  # runs of 2: one cuts the image's 3
            self.head = torch.nn.Conv2d(6, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.shuffle(torch.cat([x, self.conv(x)], 1)))

    graph = ChannelGraph.trace(_InputShuffle().eval(), X)
    assert "no layer's output can be cut" in graph.unprunable["conv"]
    found = prunetune.inspect(_InputShuffle().eval(), X)
    assert "% of FLOPs" in found.kept_whole["conv"]


def test_layer_scales_and_prelu_slopes_are_pruned_with_their_channels() -> None:
    graph = ChannelGraph.trace(build("layer_scale"), X)
    scales = {scale.name: scale for scale in graph.scales}
    assert {name: s.dim for name, s in scales.items()} == {
        "act.weight": 0, "gamma": 0, "scale": 0, "last_scale": 0, "shift": 0,
    }  # fmt: skip
    assert [s.group for s in scales["gamma"].segments] == ["stem.0"]
    assert not scales["shift"].parameter
    assert not graph.unprunable.keys() - {"input", "fc"}
    model = _prunes_exactly("layer_scale").model
    width = model.stem[0].out_channels
    assert width < 16 and model.gamma.shape == (width, 1, 1)
    assert model.act.weight.shape == (model.expand.out_channels,) == (model.act.num_parameters,)
    assert model.shift.shape == model.last_scale.shape == (model.pointwise.out_features,)


def test_a_per_channel_parameter_viewed_at_a_literal_width_is_kept_whole() -> None:
    class _Literal(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.gamma = torch.nn.Parameter(torch.ones(8))
            self.head = torch.nn.Conv2d(8, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x) * self.gamma.view(1, 8, 1, 1))

    graph = ChannelGraph.trace(_Literal().eval(), X)
    assert not graph.scales and not graph.group("conv").prunable


def test_pixel_shuffles_and_group_norms_prune_in_whole_blocks() -> None:
    graph = ChannelGraph.trace(build("pixel_shuffle_group_norm"), X)
    # GroupNorm(4, 16) keeps whole groups of 4 channels; GroupNorm(2, 16) groups of 8
    assert [(s.group, s.multiplier) for s in graph.layer("stem").outputs] == [("stem", 4)]
    assert [(s.group, s.multiplier) for s in graph.layer("body").outputs] == [("body", 8)]
    # PixelShuffle(2) makes each output channel from 4 of the conv's channels
    assert graph.layer("upsample").outputs[0].multiplier == 4
    assert [(s.group, s.multiplier) for s in graph.layer("refine").in_segments] == [("upsample", 1)]
    assert not graph.unprunable.keys() - {"input", "fc"}
    model = _prunes_exactly("pixel_shuffle_group_norm", 0.4).model
    assert model.norm.num_channels == 4 * model.norm.num_groups == model.stem.out_channels
    assert model.body_norm.num_channels == 8 * model.body_norm.num_groups
    assert model.upsample.out_channels == 4 * model.refine.in_channels


def test_a_group_norm_of_one_group_is_kept_whole_with_the_reason() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(1, 8), torch.nn.Conv2d(8, 4, 3)
    ).eval()
    found = prunetune.inspect(model, X)
    assert "one group normalises across all its channels" in found.kept_whole["1"]


def test_ghost_modules_prune_their_primary_and_cheap_halves_together() -> None:
    graph = ChannelGraph.trace(build("ghost_grn"), X)
    ghost = graph.group("ghost1.primary_conv.0")  # ghost1's primary conv and its cheap copy
    assert ghost.prunable
    assert {"ghost1.cheap_operation.0", "ghost2.primary_conv.0"} <= {
        m.module for m in ghost.members
    }
    assert graph.layer("ghost1.cheap_operation.0").depthwise
    # ghost2's output (primary, cheap) is added to the stem's: the stem is cut in two halves
    residual = graph.group("stem.0[0:8]")
    assert residual.prunable and {"ghost2.cheap_operation.0", "pwconv1"} <= {
        m.module for m in residual.members
    }
    model = _prunes_exactly("ghost_grn").model
    assert model.ghost1.cheap_operation[0].in_channels == model.ghost1.primary_conv[0].out_channels


def test_global_response_norms_prune_with_their_gamma_rescaled() -> None:
    graph = ChannelGraph.trace(build("convnextv2_style"), X)
    assert {g.name for g in graph.prunable_groups} == {"fc1", "conv1", "head"}
    scales = {s.name: s for s in graph.scales}
    for name, group, power in (("grn", "fc1", 1.0), ("grn2", "conv1", 1.0)):
        gamma = scales[f"{name}.weight"]  # channels-last, then channels-first
        assert ([s.group for s in gamma.rescale_segments], gamma.rescale_power) == ([group], power)
        assert not scales[f"{name}.bias"].rescale_segments  # added, not multiplied
    rms = scales["rms_weight"]  # x * rsqrt(mean_c x^2 + eps) * weight: a square root of C/C'
    assert ([s.group for s in rms.rescale_segments], rms.rescale_power) == (["head"], 0.5)
    model = build("convnextv2_style")
    result = _prunes_exactly("convnextv2_style")
    kept = result.spec.kept_channels(graph)
    width = len(kept["fc1"])
    assert result.model.fc1.out_features == width < 64
    dense_gamma = model.grn.weight.detach()[list(kept["fc1"])]
    torch.testing.assert_close(result.model.grn.weight.detach(), dense_gamma * 64 / width)
    torch.testing.assert_close(
        result.model.grn.bias.detach(), model.grn.bias.detach()[list(kept["fc1"])]
    )
    assert not prunetune.inspect(build("ghost_grn"), X).kept_whole.keys() - {"input", "fc"}


class _ConvStatisticConv(torch.nn.Module):
    """A conv, then ``mix(y)`` of its output, then a conv."""

    def __init__(self, mix: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.mix = mix
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.conv(x)))


def test_a_mean_across_channels_subtracted_keeps_them_whole_with_the_reason() -> None:
    # a LayerNorm written out: the mean shifts the channels, it does not scale them
    model = _ConvStatisticConv(lambda y: y - y.mean(1, keepdim=True)).eval()
    graph = ChannelGraph.trace(model, X)
    assert not graph.group("conv").prunable
    assert "a statistic across the channels" in graph.unprunable["conv"]


def test_a_sum_across_channels_that_divides_them_needs_no_rescale() -> None:
    # zeroed channels add nothing to the sum: the pruned model divides by the same
    model = _ConvStatisticConv(lambda y: y / (y.abs().sum(1, keepdim=True) + 1e-6)).eval()
    graph = ChannelGraph.trace(model, X)
    assert graph.group("conv").prunable and not graph.scales
    result = prunetune.prune(model, X, "flops<=60%")
    zeroed = zero_pruned_channels(model, graph, result.spec)
    with torch.no_grad():
        torch.testing.assert_close(result.model(X), zeroed(X), atol=1e-5, rtol=1e-5)


def test_functional_layers_on_a_modules_own_weight_prune_like_the_builtins() -> None:
    graph = ChannelGraph.trace(build("functional_weight"), X)
    block, hidden = graph.layer("block"), graph.layer("hidden")
    assert (block.kind, block.weight, block.bias_parameter) == (
        "conv",
        "block.weight",
        "block.bias",
    )
    assert (hidden.kind, hidden.weight, hidden.bias_parameter) == ("linear", "hidden.weight", "")
    assert {"stem.0", "conv.0", "hidden"} <= {g.name for g in graph.prunable_groups}
    assert "block" not in graph.constant_flops  # costed as a layer, not as a constant
    reason = graph.unprunable["block"]  # read by F.conv2d(x, self.kernel): a root parameter
    assert "not ungrouped on a submodule's own `weight`" in reason
    model = _prunes_exactly("functional_weight").model
    assert model.block.weight.shape[1] == model.stem[0].out_channels < 16
    assert model.block.bias.shape[0] == model.block.weight.shape[0]
    assert model.hidden.weight.shape[0] == model.fc.in_features < 32


def test_attention_projections_are_kept_whole_with_the_reason() -> None:
    class _Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 16, 8, stride=8)
            self.attention = torch.nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
            return self.fc(out.mean(1))

    found = prunetune.inspect(_Attention().eval(), X)
    reason = found.kept_whole["attention"]
    assert "add_bias_kv=True" in reason and "not costed per head" in reason
    assert re.search(r"\(\d+\.\d% of FLOPs", reason)
