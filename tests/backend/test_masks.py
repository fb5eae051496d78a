"""ChannelMasker: shares parameters, applies masks where channels are produced, passes gradients."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
import torch

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.masks import ChannelMasker, masks_from_spec
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from tests.backend.architectures import build

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread is fastest, and a second one only contends for the
    # cores with other test processes (forwards were 100x slower on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, ChannelGraph]:
    model = build("resnet20")
    return model, ChannelGraph.trace(model, X)


def test_without_masks_the_masker_is_the_model(
    resnet: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    model, graph = resnet
    masker = ChannelMasker(model, graph)
    with torch.no_grad():
        torch.testing.assert_close(masker(X), model(X))


def test_masker_shares_parameters_with_the_model(
    resnet: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    model, graph = resnet
    masker = ChannelMasker(model, graph)
    model_params = {id(p) for p in model.parameters()}
    assert {id(p) for p in masker.parameters()} == model_params
    assert masker.graph_module.get_submodule("layer1.0.conv1") is model.get_submodule(
        "layer1.0.conv1"
    )


def test_masks_match_the_pruned_model_and_clear(
    resnet: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    model, graph = resnet
    masker = ChannelMasker(model, graph)
    widths = {g.name: g.size // 2 for g in graph.prunable_groups}
    scores = {g.name: torch.rand(g.size) for g in graph.prunable_groups}
    spec = SubnetSpec.from_widths(graph, ModelRef("resnet20"), widths, scores)
    masker.set_masks(masks_from_spec(graph, spec))
    with torch.no_grad():
        torch.testing.assert_close(masker(X), prune_model(model, graph, spec)(X), atol=1e-5, rtol=0)
        masker.clear_masks()
        assert masker.masks == {}
        torch.testing.assert_close(masker(X), model(X))


def test_mask_goes_after_the_bn_so_its_shift_cannot_leak(
    resnet: tuple[torch.nn.Module, ChannelGraph],
) -> None:
    model, graph = resnet
    points = {p.node: p for p in graph.mask_points}
    assert "layer1_0_bn1" in points and "layer1_0_conv1" not in points
    masker = ChannelMasker(model, graph)
    zero = torch.zeros(graph.group("layer1.0.conv1").size)
    masker.set_masks({"layer1.0.conv1": zero})
    seen: list[torch.Tensor] = []
    handle = model.get_submodule("layer1.0.conv2").register_forward_pre_hook(
        lambda module, args: seen.append(args[0])
    )
    try:
        with torch.no_grad():
            masker(X)
    finally:
        handle.remove()
    assert torch.count_nonzero(seen[0]) == 0


def test_gradients_flow_to_masks(resnet: tuple[torch.nn.Module, ChannelGraph]) -> None:
    model, graph = resnet
    masker = ChannelMasker(model, graph)
    masks = {g.name: torch.full((g.size,), 0.7, requires_grad=True) for g in graph.prunable_groups}
    masker.set_masks(masks)
    masker(X).square().sum().backward()
    for name, mask in masks.items():
        assert mask.grad is not None and torch.count_nonzero(mask.grad) > 0, name
    assert model.get_submodule("conv1").weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_masks_over_concat_segments() -> None:
    model = build("densenet_style")
    graph = ChannelGraph.trace(model, X)
    masker = ChannelMasker(model, graph)
    widths = {"stem": 5, "conv1": 3, "conv2": 8, "transition": 16}
    spec = SubnetSpec.from_widths(graph, ModelRef("x"), widths)
    masker.set_masks(masks_from_spec(graph, spec))
    with torch.no_grad():
        torch.testing.assert_close(masker(X), prune_model(model, graph, spec)(X), atol=1e-5, rtol=0)


def test_bad_masks_are_rejected(resnet: tuple[torch.nn.Module, ChannelGraph]) -> None:
    model, graph = resnet
    masker = ChannelMasker(model, graph)
    with pytest.raises(KeyError, match="no prunable channel group 'fc'"):
        masker.set_masks({"fc": torch.ones(10)})
    with pytest.raises(ValueError, match=r"must have shape \(16,\), got \(8,\)"):
        masker.set_masks({"conv1": torch.ones(8)})
    with pytest.raises(ValueError, match="floating-point"):
        masker.set_masks({"conv1": torch.ones(16, dtype=torch.long)})


def test_masker_refuses_another_model(resnet: tuple[torch.nn.Module, ChannelGraph]) -> None:
    _, graph = resnet
    with pytest.raises(ValueError, match="does not match the channel graph"):
        ChannelMasker(build("small_cnn"), graph)


def test_graph_pickles_for_remote_trials() -> None:
    model = build("functional")
    graph = ChannelGraph.trace(model, X)
    again = pickle.loads(pickle.dumps(graph))
    assert again.groups == graph.groups and again.mask_points == graph.mask_points
    masker = ChannelMasker(model, again)
    with torch.no_grad():
        torch.testing.assert_close(masker(X), model(X))
