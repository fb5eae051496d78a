"""Fixtures for the space tests: the embedded default, briefly pretrained, and contexts on it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.models import ModelRef
from prunetune.backend.train import TrainConfig, train
from prunetune.estimators import FlopsModel, ParamsModel, Target
from prunetune.spaces import SpaceContext

ContextFactory = Callable[..., SpaceContext]


@pytest.fixture(scope="session")
def pretrained_small_cnn(digits: DatasetSplits) -> tuple[ModelRef, nn.Module, ChannelGraph]:
    """``small_cnn`` trained 3 epochs on digits (about 90% val accuracy), and its graph."""
    ref = ModelRef("small_cnn", {"num_classes": 10, "in_channels": 1})
    torch.manual_seed(0)
    model = ref.build()
    train(model, digits, TrainConfig(epochs=3, batch_size=64))
    return ref, model, ChannelGraph.trace(model, torch.zeros(1, 1, 8, 8))


@pytest.fixture
def make_context(
    digits: DatasetSplits, pretrained_small_cnn: tuple[ModelRef, nn.Module, ChannelGraph]
) -> ContextFactory:
    """``make_context("flops<=50%")``: a fresh context on the pretrained default."""
    ref, model, graph = pretrained_small_cnn
    costs = {"flops": FlopsModel.from_graph(graph), "params": ParamsModel.from_graph(graph)}

    def make(target: str, seed: int = 0, round_to: int = 1) -> SpaceContext:
        budget = Target.parse(target).resolve(costs)
        return SpaceContext(
            model=model,
            graph=graph,
            model_ref=ref,
            data=digits,
            budget=budget,
            seed=seed,
            round_to=round_to,
        )

    return make
