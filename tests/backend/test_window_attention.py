"""torchvision's Swin window attention (a wrapped call the trace does not enter): heads pruned
whole with their q, k, v rows, proj columns, relative position bias and logit scale; pruned =
zeroed = masked, exact MACs and parameters, export reload parity."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import prunetune
from prunetune.backend.export import export_subnet, load_subnet
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.masks import ChannelMasker
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.estimators import FlopsModel, ParamsModel
from tests.backend.test_surgery import check_pruned_zeroed_masked, random_spec, reference_macs

pytest.importorskip("torchvision")
from tests.backend.window_architectures import WINDOW_ARCHITECTURES

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NAMES = sorted(WINDOW_ARCHITECTURES)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = WINDOW_ARCHITECTURES[name]().eval()
    with torch.no_grad():  # non-trivial biases per head, so a leaked head would show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_window_attention_heads_are_found_with_their_bias(name: str) -> None:
    model = _build(name)
    graph = ChannelGraph.trace(model, X)
    heads = [g for g in graph.groups if g.unit == "heads"]
    assert [(g.size, g.prunable) for g in heads] == [(2, True)] * 2 + [(4, True)] * 2
    qkv = {m.multiplier for g in heads for m in g.members if m.module.endswith("qkv")}
    assert qkv == {12}  # whole heads of 12 features
    tables = {s.name.rpartition(".")[2]: s for s in graph.scales}
    if name == "tv_swin":  # the table's columns, 49 entries each
        assert {(s.dim, s.entries) for s in graph.scales} == {(1, 49)}
    else:  # the logit scale; cpb_mlp's last Linear is coupled to the heads instead
        assert set(tables) == {"logit_scale"}
        cpb = [g for g in heads if any(m.module.endswith("cpb_mlp.2") for m in g.members)]
        assert cpb == heads
    assert {(a.attribute, a.per_head) for a in graph.head_attributes} == {("num_heads", 1)}
    assert FlopsModel.from_graph(graph).dense == count_flops(model, X)
    assert ParamsModel.from_graph(graph).dense == count_params(model)


@pytest.mark.parametrize("name", NAMES)
def test_pruned_zeroed_and_masked_window_attention_agree(name: str) -> None:
    model = _build(name)
    graph = ChannelGraph.trace(model, X)
    masker = ChannelMasker(model, graph)
    flops, params = FlopsModel.from_graph(graph), ParamsModel.from_graph(graph)
    rng = random.Random(name)
    for _ in range(6):
        spec = random_spec(graph, name, rng)
        pruned = check_pruned_zeroed_masked(model, graph, masker, spec, exact=True)
        assert flops.evaluate(spec) == reference_macs(graph, spec.widths)
        assert params.evaluate(spec) == count_params(pruned)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_half_the_flops_exports_and_reloads_with_fewer_heads(name: str, tmp_path: Path) -> None:
    model = _build(name)
    graph = ChannelGraph.trace(model, X)
    result = prunetune.prune(model, X, "flops<=50%")
    assert result.flops == count_flops(result.model, X) == result.costs["flops"]
    assert result.flops <= 0.5 * result.dense_flops
    attentions = [m for n, m in result.model.named_modules() if n.endswith(".attn")]
    kept = sorted(result.spec.widths[g.name] for g in graph.groups if g.unit == "heads")
    assert sorted(a.num_heads for a in attentions) == kept and sum(kept) < 12
    for attention in attentions:
        assert attention.qkv.weight.shape[0] == 3 * 12 * attention.num_heads
        if hasattr(attention, "logit_scale"):
            assert attention.logit_scale.shape == (attention.num_heads, 1, 1)
        else:
            assert attention.relative_position_bias_table.shape[1] == attention.num_heads
    ref = ModelRef(f"tests.backend.window_architectures:{type(model).__name__}")
    spec = SubnetSpec.from_widths(graph, ref, result.spec.widths)
    pruned = prune_model(model, graph, spec).eval()
    loaded = load_subnet(export_subnet(tmp_path / name, pruned, spec), trust_model_code=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(x), pruned(x), atol=1e-5, rtol=1e-4)


def test_a_window_attention_outside_torchvision_modules_is_kept_whole() -> None:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class Custom(ShiftedWindowAttention):  # its own forward could ignore a new head count
        pass

    model = _build("tv_swin")
    block = model.features[1][0]
    original = block.attn
    block.attn = Custom(24, [4, 4], [0, 0], 2)
    block.attn.load_state_dict(original.state_dict())
    found = prunetune.inspect(model, X)
    reasons = [r for r in found.kept_whole.values() if "ShiftedWindowAttentionV2, whose" in r]
    assert reasons and len([g for g in found.prunable_groups if g.unit == "heads"]) == 3


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize(
    ("height", "width", "shift"),
    [(8, 8, [2, 2]), (6, 11, [2, 2]), (4, 12, [2, 2]), (9, 9, [0, 0]), (12, 12, [0, 2])],
)
def test_pruned_forward_computes_torchvisions_window_attention(
    v2: bool, height: int, width: int, shift: list[int]
) -> None:
    """With every head kept, prunetune's forward equals torchvision's: padding, a shift along
    one side only (the other fits in one window), shifted-window masks, v2's cosine scores."""
    from torchvision.models import swin_transformer as tv

    from prunetune.backend._window_attention import shifted_window_attention

    generator = torch.Generator().manual_seed(height * width + sum(shift))
    channels, heads, window = 16, 4, [4, 4]
    args = dict(
        input=torch.randn(2, height, width, channels, generator=generator),
        qkv_weight=torch.randn(3 * channels, channels, generator=generator) * 0.3,
        proj_weight=torch.randn(channels, channels, generator=generator) * 0.3,
        relative_position_bias=torch.randn(1, heads, 16, 16, generator=generator),
        window_size=window,
        num_heads=heads,
        shift_size=shift,
        qkv_bias=torch.randn(3 * channels, generator=generator),
        proj_bias=torch.randn(channels, generator=generator),
        logit_scale=torch.randn(heads, 1, 1, generator=generator) if v2 else None,
        training=False,
    )
    ours = shifted_window_attention(**args)  # type: ignore[arg-type]
    theirs = tv.shifted_window_attention(**args)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
