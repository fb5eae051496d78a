"""Channel kinds pruned through with the coupling each needs: splits of the channels (gated
halves, C2f blocks), channel shuffles, per-channel parameters, pixel shuffles and group norms."""

from __future__ import annotations

import torch

import prunetune
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops
from tests.backend.architectures import build

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


def test_a_c2f_block_prunes_its_split_halves_and_bottlenecks() -> None:
    graph = ChannelGraph.trace(build("c2f"), X)
    halves = graph.group("cv1.0[0:8]")
    assert halves.prunable
    assert {"cv1.0", "m.0.cv2.0", "m.1.cv2.0", "cv2.0"} <= {m.module for m in halves.members}
    assert len(graph.layer("cv1.0").outputs) == 2
    model = _prunes_exactly("c2f").model
    assert model.cv2[0].in_channels == 2 * model.cv1[0].out_channels
