"""A search against a real two-node Ray cluster on this machine, reached by its address.

Each node has its own Ray temp dir, as nodes on separate machines do: a trial's local folder on
one node is not visible from the driver's, so the winning trial's weights must reach the driver
through Tune's checkpoints in the run's storage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prunetune.backend.export import load_subnet
from prunetune.backend.measure import count_flops
from prunetune.estimators import Target
from prunetune.search import SearchConfig, run_search

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, set[str]]]:
    """A head and a worker node (one CPU each, each its own Ray temp dir), every server on
    127.0.0.1; (address, node ids)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only nodes
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 128 * 1024**2}
    # short paths: Ray's unix sockets live under the temp dir (about 107 characters at most)
    temps = [tempfile.mkdtemp(prefix="rt-head-"), tempfile.mkdtemp(prefix="rt-node-")]
    head_args = {**small, "include_dashboard": False, "temp_dir": temps[0]}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        worker = cluster.add_node(**small, temp_dir=temps[1])
        cluster.wait_for_nodes()
        head = cluster.head_node
        assert head is not None
        yield cluster.address, {head.node_id, worker.node_id}
    finally:
        cluster.shutdown()
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def test_search_by_address_runs_trials_on_both_nodes_and_exports(
    two_nodes: tuple[str, set[str]], tmp_path: Path
) -> None:
    import ray

    address, node_ids = two_nodes
    config = SearchConfig(
        model="small_cnn",
        target=Target.parse("flops<=50%"),
        spaces=("ratios",),
        trials=4,
        cpus_per_trial=1,
        address=address,
        name="cluster",
        runs_dir=str(tmp_path / "runs"),
        dense_epochs=3,
        finetune_epochs=2,
        score_steps=30,
        inner_epochs=1,
    )
    result = run_search(config)

    assert not ray.is_initialized()  # the search disconnected; the cluster is the fixture's
    assert {t.node_id for t in result.trials} == node_ids
    assert all(t.status in ("finished", "stopped") for t in result.trials)
    # every scored subnet reached the run's storage as a Tune checkpoint, whichever node ran it,
    # and the final finetune continued from the winner's
    finished = [t for t in result.trials if t.status == "finished"]
    assert finished and all(t.weights is not None for t in finished)
    assert all(Path(t.weights or "").is_relative_to(config.run_dir.resolve()) for t in finished)
    report = result.report_path.read_text()
    assert "epochs of finetuning from the trial's weights" in report
    assert "could not start from the best trial's weights" not in report
    loaded = load_subnet(result.export_dir)
    assert loaded.spec == result.spec
    assert count_flops(loaded.model, torch.zeros(1, 1, 8, 8)) <= 0.5 * 617_088
