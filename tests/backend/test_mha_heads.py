"""Heads of ``nn.MultiheadAttention`` (and so of ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer``) pruned whole: the module replaced by a
``PrunedMultiheadAttention`` that computes what the zeroed and the masked dense models do."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import prunetune
from prunetune.backend.attention import (
    PrunedMultiheadAttention,
    prune_attention_heads,
    zero_attention_heads,
)
from prunetune.backend.export import export_subnet, load_subnet
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.importance import channel_importance
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model, zero_pruned_channels
from prunetune.estimators import FlopsModel, ParamsModel
from tests.backend.mha_architectures import HEADS, MHA_ARCHITECTURES

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MHA_ARCHITECTURES[name]().eval()


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention))
    }


@pytest.mark.parametrize("name", list(MHA_ARCHITECTURES))
def test_heads_are_groups_pruned_by_replacing_the_module(name: str) -> None:
    model = _build(name)
    graph = ChannelGraph.trace(model, X[:1])
    attention = _attention_modules(model)
    heads = {g.name: g for g in graph.groups if g.unit == "heads"}
    assert set(heads) == set(attention)
    for group in heads.values():
        assert (group.size, group.prunable) == (HEADS, True)
        assert {m.multiplier for m in group.members} == {8}  # head_dim
        assert {(m.module, m.role, m.offset) for m in group.members} == {
            (group.name, "out", 0),
            (group.name, "out", 32),
            (group.name, "out", 64),
            (f"{group.name}.out_proj", "in", 0),
        }
    widths = {g.name: g.size for g in graph.prunable_groups}
    kept_heads = {name: (0, 2) for name in heads}
    widths.update({name: 2 for name in heads})
    spec = SubnetSpec.from_widths(graph, ModelRef(name), widths)
    spec = dataclasses.replace(spec, kept={**(spec.kept or {}), **kept_heads})
    pruned = prune_model(model, graph, spec)
    for module_name, module in _attention_modules(pruned).items():
        assert isinstance(module, PrunedMultiheadAttention)
        assert (module.num_heads, module.kept_heads) == (2, (0, 2))
        assert module.out_proj.in_features == 16
        assert module.batch_first == attention[module_name].batch_first
    zeroed = zero_pruned_channels(model, graph, spec)
    masker = ChannelMasker(model, graph)
    masker.set_masks(masks_from_spec(graph, spec))
    with torch.no_grad():
        expected = zeroed(X)
        assert not torch.allclose(expected, model(X), atol=1e-3)
        torch.testing.assert_close(pruned(X), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masker(X), expected, atol=1e-5, rtol=1e-5)
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    assert flops.dense == count_flops(model, X[:1])
    assert flops.evaluate(spec) == count_flops(pruned, X[:1]) < flops.dense
    assert params.evaluate(spec) == count_params(pruned) < count_params(model)


def test_a_model_keeping_every_head_keeps_its_modules() -> None:
    model = _build("mha_encoder_stack")
    graph = ChannelGraph.trace(model, X[:1])
    widths = {g.name: g.size for g in graph.prunable_groups}
    widths["encoder.layers.0.self_attn"] = 3
    pruned = prune_model(model, graph, SubnetSpec.from_widths(graph, ModelRef("m"), widths))
    assert type(pruned.encoder.layers[0].self_attn) is PrunedMultiheadAttention
    assert type(pruned.encoder.layers[1].self_attn) is nn.MultiheadAttention
    assert not pruned.encoder.use_nested_tensor  # its fused layers cannot read pruned heads


def test_prune_meets_a_flops_target_through_the_api() -> None:
    model = _build("mha_decoder")  # the embed width kept, 61% of the FLOPs at the least
    result = prunetune.prune(model, X[:1], "flops<=75%")
    assert result.flops == count_flops(result.model, X[:1]) == result.costs["flops"]
    assert result.flops <= 0.75 * result.dense_flops
    assert result.params == count_params(result.model)
    found = prunetune.inspect(model, X[:1])
    assert "decoder.multihead_attn" in {g.name for g in found.groups}


def test_zeroed_rows_silence_a_head() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    silent = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    silent.load_state_dict(attention.state_dict())
    head_dim = 4
    rows = torch.cat([torch.arange(head_dim) + 4 + part * 16 for part in range(3)])  # head 1
    zero_attention_heads(silent, rows)
    with torch.no_grad():
        kept = prune_attention_heads(attention, (0, 2, 3))(x, x, x)[0]
        torch.testing.assert_close(silent(x, x, x)[0], kept, atol=1e-6, rtol=1e-5)
        zero_attention_heads(silent, torch.arange(48))  # every head: only out_proj's bias
        expected = attention.out_proj.bias.expand(2, 5, 16)
        torch.testing.assert_close(silent(x, x, x, need_weights=False)[0], expected)


def _masks(kind: str, batch: int, length: int, source: int, heads: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    if kind == "none":
        return {}
    if kind == "causal":
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return {"attn_mask": mask, "is_causal": True}  # type: ignore[dict-item]
    if kind == "bool":
        mask = torch.rand(length, source, generator=generator) > 0.7
        mask[:, 0] = False
        padding = torch.zeros(batch, source, dtype=torch.bool)
        padding[:, -1] = True
        return {"attn_mask": mask, "key_padding_mask": padding}
    mask = torch.randn(batch * heads, length, source, generator=generator)  # one per head
    return {"attn_mask": mask}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "causal", "bool", "per_head"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "options",
    [{}, {"kdim": 6, "vdim": 10, "bias": False}, {"add_zero_attn": True}],
    ids=["packed", "separate", "zero_attn"],
)
def test_pruned_module_computes_the_dense_module_on_its_heads(
    batch_first: bool, masks: str, need_weights: bool, options: dict[str, object]
) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options).eval()  # type: ignore[arg-type]
    query = torch.randn(2, 5, 16)
    memory = torch.randn(2, 7, 16)
    key = memory[..., : attention.kdim]
    value = torch.randn(2, 7, attention.vdim)
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    extra = _masks(masks, 2, 5, 7, 4)
    if masks == "causal":
        key, value = query[..., : attention.kdim], torch.randn(*query.shape[:2], attention.vdim)
        extra["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
    every = prune_attention_heads(attention, range(4))
    with torch.no_grad():
        dense = attention(query, key, value, need_weights=need_weights, **extra)
        same = every(query, key, value, need_weights=need_weights, **extra)
    torch.testing.assert_close(same[0], dense[0], atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(same[1], dense[1], atol=1e-5, rtol=1e-5)
    else:
        assert same[1] is None


def test_unbatched_inputs_and_heads_weights() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 16)
    every = prune_attention_heads(attention, range(4))
    with torch.no_grad():
        dense = attention(x, x, x, average_attn_weights=False)
        same = every(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(same[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same[1], dense[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="kept_heads"):
        PrunedMultiheadAttention(16, 2, 4, kept_heads=(1, 1), dense_heads=4)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        every(x, x, x, is_causal=True)


def test_counting_turns_the_fused_fast_path_off() -> None:
    """In eval mode without gradients ``nn.MultiheadAttention`` runs a fused kernel in which
    ``FlopCounterMode`` counts nothing; prunetune counts with the fast path off (the same
    function as separate ops), as the pruned module computes it."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True).eval().requires_grad_(False)
    x = torch.randn(1, 5, 16)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attention(x, x, x, need_weights=False)
    assert counter.get_total_flops() == 0
    projections = 4 * 5 * 16 * 16  # q, k, v and the output projection, 5 tokens
    assert count_flops(attention, (x, x, x)) >= projections
    assert torch.backends.mha.get_fastpath_enabled()  # put back


class _PatchAttention(nn.Module):
    """Patch tokens ``[B, 16, 16]`` and a 4-head attention, called by subclasses' forward."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)

    def tokens(self, x: Tensor) -> Tensor:
        return self.patch(x).flatten(2).transpose(1, 2)


def test_kept_whole_variants_say_why() -> None:
    class _Attention(_PatchAttention):
        def forward(self, x: Tensor) -> Tensor:
            tokens = self.tokens(x)
            out, weights = self.attention(tokens, tokens, tokens)
            return out.mean(1) + weights.mean((1, 2))[:, None]

    graph = ChannelGraph.trace(_Attention().eval(), X[:1])
    assert not [g for g in graph.groups if g.unit == "heads"]
    assert "attention weights it returns are used" in graph.unprunable["attention"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mha_encoder_stack", "mha_sequence_first", "mha_cross_attention"])
def test_pruned_heads_export_and_reload_from_weights(tmp_path: Path, name: str) -> None:
    model = _build(name)
    ref = ModelRef(f"tests.backend.mha_architectures:{MHA_ARCHITECTURES[name].__name__}")
    graph = ChannelGraph.trace(model, torch.zeros(1, 3, 32, 32))
    widths = {g.name: max(1, g.size // 2) for g in graph.prunable_groups}
    spec = SubnetSpec.from_widths(graph, ref, widths)
    pruned = prune_model(model, graph, spec).eval()
    out = export_subnet(tmp_path / name, pruned, spec)
    record = json.loads((out / "subnet.json").read_text())
    assert "missing_formats" not in record  # model.pt2 and model.onnx written
    assert max(record["parity"].values()) <= 1e-4
    loaded = load_subnet(out, expect=ref)  # rebuilt and pruned by prunetune, weights loaded
    assert any(isinstance(m, PrunedMultiheadAttention) for m in loaded.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), pruned(X), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_heads_are_scored_by_their_projection_rows(criterion: str) -> None:
    model = _build("mha_cross_attention")
    graph = ChannelGraph.trace(model, X[:1])
    labels = torch.tensor([1, 3])
    scores = channel_importance(model, graph, criterion, [(X, labels)])["attention"]
    assert scores.shape == (HEADS,) and len(set(scores.tolist())) == HEADS
    if criterion == "l1":  # the q, k and v rows of each head (8 of each)
        rows = [model.attention.q_proj_weight, model.attention.k_proj_weight]
        rows.append(model.attention.v_proj_weight)
        expected = sum(w.detach().abs().reshape(HEADS, -1).sum(1) for w in rows)
        assert torch.allclose(scores, expected)


def test_an_attention_called_twice_keeps_its_heads() -> None:
    class _Twice(_PatchAttention):
        def forward(self, x: Tensor) -> Tensor:
            tokens = self.tokens(x)
            tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
            return self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(1)

    model = _Twice().eval()
    graph = ChannelGraph.trace(model, X[:1])
    assert not graph.prunable_groups
    assert "called more than once" in graph.unprunable["attention"]
    assert FlopsModel.from_graph(graph).dense == count_flops(model, X[:1])
