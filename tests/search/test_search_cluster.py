"""Real Ray clusters on this machine, reached by their address: a two-node search, and the
connection errors of a token-protected cluster and of a driver that is no node.

Each node has its own Ray temp dir, as nodes on separate machines do: a trial's local folder on
one node is not visible from the driver's, so the winning trial's weights must reach the driver
through Tune's checkpoints in the run's storage.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
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
from prunetune.search._cluster import ClusterError, ray_session

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


@contextlib.contextmanager
def one_node(prefix: str) -> Iterator[tuple[str, str]]:
    """``ray start --head`` (one CPU, its own temp dir) with the environment as it is now: Ray
    reads RAY_AUTH_* once per process, so the head runs apart from this one; (address, temp
    dir). Only the head's own processes are stopped after: ``ray stop`` would end every Ray
    session on the machine."""
    import psutil

    temp = tempfile.mkdtemp(prefix=prefix)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", temp
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if any(temp in part for part in process.info["cmdline"] or ()):
                with contextlib.suppress(psutil.Error):
                    process.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A HOME without ~/.ray/auth_token and no Ray auth settings: the driver has no token."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def connect(address: str) -> None:
    with ray_session(address):
        pass


@pytest.mark.usefixtures("bare_home")
def test_a_cluster_with_token_authentication_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's own error reads "Failed to connect to Ray cluster at ..."; the cause (an
    InvalidAuthToken from the GCS) is in the exceptions it chains, and prunetune names it."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    with one_node("rt-tok-") as (address, _):
        monkeypatch.delenv("RAY_AUTH_MODE")
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        with pytest.raises(ClusterError, match=r"uses token authentication; set RAY_AUTH_MODE"):
            connect(address)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        with pytest.raises(ClusterError, match=r"token in RAY_AUTH_TOKEN .* is not the cluster's"):
            connect(address)


def _can_hide_a_folder() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.usefixtures("bare_home")
@pytest.mark.skipif(not _can_hide_a_folder(), reason="needs mount namespaces (unshare -m)")
def test_a_driver_on_a_machine_that_is_no_node_is_named_as_such() -> None:
    """A driver that cannot see the cluster's raylet (here: the head's temp dir hidden by a
    mount namespace, as on another machine) aborts inside Ray's C++ when connecting by
    HOST:PORT; the connection is tried in a child process first, and its cause named."""
    script = (
        "from prunetune.search._cluster import ClusterError, ray_session\n"
        "try:\n"
        "    with ray_session(__import__('sys').argv[1]):\n"
        "        print('connected')\n"
        "except ClusterError as exc:\n"
        "    print(exc)\n"
    )
    with one_node("rt-far-") as (address, temp):
        hidden = f'mount -t tmpfs tmpfs "$1" && exec {sys.executable} -c "$0" "$2"'
        child = subprocess.run(
            ["unshare", "-m", "sh", "-c", hidden, script, temp, address],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert "this machine is not a node of that cluster" in child.stdout, child.stdout
    assert "sockets/raylet" in child.stdout
