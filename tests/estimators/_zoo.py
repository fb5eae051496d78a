"""The model zoo traced once per test session, with random valid widths and pruned copies."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef, create_model
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model


@functools.cache
def traced(name: str) -> tuple[nn.Module, ChannelGraph, torch.Tensor]:
    """A zoo model (seeded), its channel graph and the 32x32 example input it was traced on."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    example = torch.randn(1, first_conv.in_channels, 32, 32)
    return model, ChannelGraph.trace(model, example), example


def random_widths(graph: ChannelGraph, count: int, seed: int) -> np.ndarray:
    """``count`` random valid width rows ``(count, P)`` ordered as ``graph.prunable_groups``."""
    rng = np.random.default_rng(seed)
    steps = np.array([group.step for group in graph.prunable_groups])
    sizes = np.array([group.size for group in graph.prunable_groups])
    return rng.integers(1, sizes // steps + 1, size=(count, len(steps))) * steps


def pruned(name: str, widths: dict[str, int]) -> nn.Module:
    """The zoo model ``name`` physically pruned to ``widths``."""
    model, graph, _ = traced(name)
    spec = SubnetSpec.from_widths(graph, ModelRef(name), widths)
    return prune_model(model, graph, spec)
