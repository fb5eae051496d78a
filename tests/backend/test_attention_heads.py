"""Attention heads pruned whole: ViT-style blocks with fused or separate q/k/v Linears, explicit
softmax attention or ``F.scaled_dot_product_attention``; heads that cannot follow stay whole."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import prunetune
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.surgery import prune_model, zero_pruned_channels
from prunetune.estimators import FlopsModel
from tests.backend.architectures import build
from tests.backend.attention_architectures import FusedQkvAttention, TinyViT

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HEAD_DIM = 12


def _head_group(graph: ChannelGraph) -> str:
    (group,) = [g for g in graph.groups if g.unit == "heads"]
    return group.name


@pytest.mark.parametrize(
    "name", ["vit_fused_qkv", "vit_separate_qkv", "vit_sdpa", "vit_shape_logic", "vit_head_bias"]
)
def test_heads_are_pruned_whole_at_half_the_flops(name: str) -> None:
    model = build(name)
    found = prunetune.inspect(model, X[:1])
    group = found.graph.group(_head_group(found.graph))
    assert (group.size, group.prunable, group.unit) == (4, True, "heads")
    assert {m.multiplier for m in group.members} == {HEAD_DIM}
    summary = next(g for g in found.groups if g.name == group.name)
    assert (summary.unit, summary.spans) == ("heads", HEAD_DIM)
    assert f"4 heads (each {HEAD_DIM} channels of q, k and v)" in str(found)

    result = prunetune.prune(model, X[:1], "flops<=50%")
    heads = result.spec.widths[group.name]
    assert 1 <= heads < 4
    pruned = result.model
    attention = pruned.attn
    assert attention.num_heads == heads
    if hasattr(attention, "bias"):  # one [N, N] bias per head, kept with its head
        assert attention.bias.shape[0] == heads
    projection = attention.out if hasattr(attention, "out") else attention.proj
    assert projection.in_features == heads * HEAD_DIM
    assert result.flops == count_flops(pruned, X[:1]) == result.costs["flops"]
    assert result.flops <= 0.5 * result.dense_flops
    assert result.params == count_params(pruned)
    graph = found.graph
    zeroed = zero_pruned_channels(model, graph, result.spec)
    with torch.no_grad():
        torch.testing.assert_close(
            prune_model(model, graph, result.spec)(X), zeroed(X), atol=1e-5, rtol=1e-5
        )
    assert FlopsModel.from_graph(graph).evaluate(result.spec) == result.flops


def test_matmul_costs_follow_the_heads_kept() -> None:
    graph = ChannelGraph.trace(build("vit_fused_qkv"), X[:1])
    costs = {cost.name: cost.macs for cost in graph.head_costs}
    tokens = 8 * 8
    assert costs == {"matmul": tokens * tokens * HEAD_DIM, "matmul_1": tokens * tokens * HEAD_DIM}
    assert not [place for place in graph.constant_flops if place.startswith("attn")]
    assert {(a.attribute, a.per_head) for a in graph.head_attributes} == {
        ("num_heads", 1),
        ("attn_dim", HEAD_DIM),
    }


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vit_input_width", "merges the attention heads back to a width read from a tensor's"),
        ("vit_literal_heads", "reshapes its attention heads with the literal size 4"),
        ("vit_input_bias", "one entry per head that is not a bias computed from one parameter"),
    ],
)
def test_heads_that_cannot_follow_are_kept_whole_with_the_reason(name: str, reason: str) -> None:
    model = TinyViT(InputBiasAttention).eval() if name == "vit_input_bias" else build(name)
    found = prunetune.inspect(model, X[:1])
    groups = [g for g in found.graph.groups if g.unit == "heads"]
    assert groups and not any(g.prunable for g in groups)
    named = [g.name for g in groups if reason in (g.reason or "")]
    assert named and reason in found.kept_whole[named[0]]
    assert "fc1" in {g.name for g in found.prunable_groups}  # the MLP still prunes


class InputBiasAttention(FusedQkvAttention):
    """Adds a bias per head made from the tokens by a Linear (a gate, as ConViT's positional
    attention mixes one in): it is not a parameter's entries, so the heads are kept whole."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.gate = nn.Linear(dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.gate(x).transpose(1, 2).unsqueeze(-1)  # [B, heads, N, 1]
        attn = (q @ k.transpose(-2, -1) * self.scale + bias).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


def test_swin_relative_position_bias_and_shift_mask_prune_with_the_heads() -> None:
    model = build("swin_style")  # timm's WindowAttention: bias table [49, heads], shift mask
    found = prunetune.inspect(model, X[:1])
    heads = [g for g in found.graph.prunable_groups if g.unit == "heads"]
    assert [g.size for g in heads] == [4, 4]
    tables = {s.name: s for s in found.graph.scales}
    assert {(s.dim, s.entries) for s in tables.values()} == {(1, 49)}
    assert {s.segments[0].group for s in tables.values()} == {g.name for g in heads}
    result = prunetune.prune(model, X[:1], "flops<=50%")
    assert result.flops == count_flops(result.model, X[:1]) == result.costs["flops"]
    assert result.params == count_params(result.model) == result.costs["params"]
    for index, group in enumerate(heads):
        kept = result.spec.widths[group.name]
        attention = result.model.attns[index]
        assert attention.num_heads == kept < 4
        assert attention.relative_position_bias_table.shape == (49, kept)
        assert attention.proj.in_features == kept * HEAD_DIM
    zeroed = zero_pruned_channels(model, found.graph, result.spec)
    with torch.no_grad():
        torch.testing.assert_close(result.model(X), zeroed(X), atol=1e-5, rtol=1e-5)


def test_head_importance_adds_up_the_heads_q_k_v_rows_and_tracing_restores_attributes() -> None:
    model = build("vit_fused_qkv")
    graph = ChannelGraph.trace(model, X[:1])
    assert (model.attn.num_heads, model.attn.attn_dim) == (4, 4 * HEAD_DIM)
    scores = channel_importance(model, graph, "l1")[_head_group(graph)]
    rows = model.attn.qkv.weight.detach().abs().reshape(3, 4, HEAD_DIM, -1)  # q/k/v, head, row
    torch.testing.assert_close(scores, rows.sum((0, 2, 3)))


def test_class_tokens_handed_to_submodules_are_counted_and_flags_restored() -> None:
    model = build("vit_class_token")  # PiT/CaiT: an expanded class token as a module input
    found = prunetune.inspect(model, X[:1])
    assert found.costs["flops"] == count_flops(model, X[:1])
    assert all(p.requires_grad for p in model.parameters())
    assert [g.unit for g in found.prunable_groups] == ["heads", "heads"]
    assert "'pool_cls'" in found.kept_whole["pool_cls"]


def test_an_attention_fx_cannot_trace_is_kept_as_one_call_with_the_reason() -> None:
    model = build("vit_cached_positions")  # ConViT: the forward assigns a buffer
    found = prunetune.inspect(model, X[:1])
    reason = found.kept_whole["attn"]
    assert reason.startswith("module kept whole: torch.fx cannot trace its forward (TypeError")
    assert "attention_architectures.py" in reason and "\n" not in reason
    result = prunetune.prune(model, X[:1], "flops<=75%")
    assert result.flops == count_flops(result.model, X[:1]) == result.costs["flops"]
    assert result.flops <= 0.75 * result.dense_flops


def test_a_width_borrowed_from_another_tensor_keeps_both_whole() -> None:
    model = build("vit_borrowed_width")  # NextViT: reshape(B, N, C), C of the attention's input
    found = prunetune.inspect(model, X[:1])
    assert "is a size of Tensor.reshape of another tensor at node" in found.kept_whole["conv"]
    assert {g.name for g in found.prunable_groups} == {"stem", "attn.proj"}
    result = prunetune.prune(model, X[:1], "flops<=70%")
    assert result.flops == count_flops(result.model, X[:1]) == result.costs["flops"]


class _DepthwiseMlp(nn.Module):
    """PVT v2's MLP: hidden tokens viewed as a map for a depthwise conv, ``C`` read from them."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = nn.Linear(8, 16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        hidden = self.fc1(x)
        B, _, C = hidden.shape
        hidden = self.dw(hidden.transpose(1, 2).view(B, C, 8, 8)).flatten(2).transpose(1, 2)
        return self.head((x + self.fc2(hidden)).mean(1))


def test_a_width_read_from_the_same_channels_still_prunes() -> None:
    found = prunetune.inspect(_DepthwiseMlp(), X[:1])
    assert sorted(g.size for g in found.prunable_groups) == [8, 16]  # tokens, hidden
    result = prunetune.prune(_DepthwiseMlp(), X[:1], "flops<=80%")
    assert result.flops == count_flops(result.model, X[:1]) == result.costs["flops"]
