"""Fixtures of the estimator tests: a chain graph and its fast profile."""

from __future__ import annotations

import pytest
import torch

from prunetune.estimators import (
    LatencyProfile,
    profile_model,
)
from tests.estimators._fakes import FakeGraph, chain_graph
from tests.estimators._latency import FAST


@pytest.fixture(scope="module")
def chain() -> FakeGraph:
    return chain_graph((8, 16, 16, 16), hw=4)


@pytest.fixture(scope="module")
def chain_profile(chain: FakeGraph) -> LatencyProfile:
    return profile_model(torch.nn.Identity(), chain, batch_size=2, **FAST)
