"""The Ray session a search runs in: this machine by default, a cluster when asked.

Without an address (and without ``RAY_ADDRESS``) Ray starts here with every server on the
loopback interface; an address connects to an existing cluster, checked first with a short TCP
probe so an unreachable one fails in seconds with one line. A session the caller already opened
(``ray.init`` before :func:`prunetune.search.run_search`) is used as it is and left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prunetune.backend.errors import PrunetuneError

__all__ = ["ClusterError", "ClusterInfo", "connect_error", "ray_session"]

_PROBE_TIMEOUT_S = 5.0
# Ray's switch for "this machine only": node IP 127.0.0.1, so its servers bind to loopback
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_OBJECT_STORE_BYTES = 512 * 1024**2


class ClusterError(PrunetuneError):
    """The Ray cluster cannot be reached, or cannot run a single trial."""


@dataclass(frozen=True)
class ClusterInfo:
    """The resources of the connected cluster.

    Attributes:
        address: the GCS address, or ``local``.
        nodes: alive nodes.
        cpus: CPUs in all.
        gpus: GPUs in all.
        node_cpus: CPUs of the largest node.
        node_gpus: GPUs of the largest node.
    """

    address: str
    nodes: int
    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float

    def concurrency(self, cpus_per_trial: float, gpus_per_trial: float) -> int:
        """How many trials fit at once; raises if not even one fits on any node.

        Raises:
            ClusterError: a trial needs more CPUs or GPUs than any node has.
        """
        if cpus_per_trial > self.node_cpus:
            raise ClusterError(
                f"--cpus-per-trial {cpus_per_trial:g} is more than any node of the cluster has "
                f"({self.node_cpus:g} CPUs); use at most {self.node_cpus:g}"
            )
        if gpus_per_trial > self.node_gpus:
            raise ClusterError(
                f"--gpus-per-trial {gpus_per_trial:g} is more than any node of the cluster has "
                f"({self.node_gpus:g} GPUs); use at most {self.node_gpus:g}"
            )
        fits = int(self.cpus // cpus_per_trial)
        if gpus_per_trial > 0:
            fits = min(fits, int(self.gpus // gpus_per_trial))
        return max(1, fits)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Connect to (or start) Ray for the duration of the block.

    Args:
        address: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; ``None`` reads ``RAY_ADDRESS``
            and, without it, starts Ray on this machine bound to 127.0.0.1.
        num_cpus: CPUs of a local start (default: this machine's).

    Raises:
        ClusterError: the address cannot be reached or is not a Ray cluster.
    """
    import ray

    if ray.is_initialized():
        yield _info("existing session")
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    stack = contextlib.ExitStack()
    if address is None:
        stack.enter_context(_loopback_only())
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=_OBJECT_STORE_BYTES,
            **quiet,  # type: ignore[arg-type]
        )
    else:
        _probe(address)
        _preflight(address)
        try:
            ray.init(address=address, **quiet)  # type: ignore[arg-type]
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, grpc errors...
            raise connect_error(address, exc) from exc
    with stack:
        try:
            yield _info(address or "local")
        finally:
            ray.shutdown()


_TOKEN_SIGNS = ("invalidauthtoken", "token authentication", "authentication token")
_NOT_A_NODE_SIGNS = ("sockets/raylet", "failed to get node info", "node_ip_address")
_AUTH_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_PREFLIGHT_TIMEOUT_S = 180.0
_LOG_PREFIX = re.compile(
    r"^\[[^\]]*\] \S+:\d+: "
)  # "[2026-11-30 10:25:54,405 W 1 1] gcs_client.cc:210: "
# ray.init in a child process first: a driver on a machine that is no node of a HOST:PORT
# cluster does not raise in Ray 2.60, it aborts the whole process in C++ ("Failed to connect to
# socket at address: .../sockets/raylet"), which no except clause here could catch.
_PREFLIGHT = (
    "import logging, sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)\n"
    "ray.shutdown()\n"
)


def _preflight(address: str) -> None:
    """Connect once from a child process; its failure becomes :func:`connect_error`'s line.

    Raises:
        ClusterError: the child could not connect (or was killed connecting).
    """
    if address.startswith("ray://"):
        return  # the Ray Client needs no local node, and raises like any Python library
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PREFLIGHT, address],
            capture_output=True,
            text=True,
            timeout=_PREFLIGHT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address}: no answer in "
            f"{_PREFLIGHT_TIMEOUT_S:g} s"
        ) from exc
    if child.returncode != 0:
        raise connect_error(address, RuntimeError(child.stderr + child.stdout))


def _chain_text(exc: BaseException) -> str:
    """The text of ``exc`` and of every exception it came from (Ray puts the cause there)."""
    texts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def _telling_line(text: str, signs: tuple[str, ...]) -> str:
    """The line of ``text`` that shows a sign, else its last non-empty line."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if any(sign in line.lower() for sign in signs):
            return line[:300]
    return lines[-1][:300] if lines else "no message"


def connect_error(address: str, exc: BaseException) -> ClusterError:
    """The one line for a failed connection to ``address``, naming the cause where it shows.

    Two causes read alike in Ray's own top-level error ("Failed to connect to Ray cluster at
    ..."): the cluster uses token authentication and this process has no (or the wrong) token,
    or the driver runs on a machine that is no node of the cluster (a ``HOST:PORT`` address
    needs a local Ray node; the Ray Client, ``ray://``, does not). Their causes show in the
    exceptions Ray chains below it, or in the log of a :func:`_preflight` child.
    """
    text = _chain_text(exc)
    lowered = text.lower()
    where = f"cannot connect to the Ray cluster at {address}"
    if any(sign in lowered for sign in _TOKEN_SIGNS):
        first = _telling_line(text, _TOKEN_SIGNS)
        has_token = (
            any(os.environ.get(name) for name in _AUTH_ENV)
            or Path("~/.ray/auth_token").expanduser().is_file()
        )
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            fix = (
                "set RAY_AUTH_MODE=token here, with the cluster's token in RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
            )
        elif has_token:
            fix = (
                "the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token is not "
                "the cluster's"
            )
        else:
            fix = (
                "give the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token"
            )
        return ClusterError(f"{where}: the cluster uses token authentication; {fix} ({first})")
    direct = not address.startswith("ray://") and address != "auto"
    if direct and any(sign in lowered for sign in _NOT_A_NODE_SIGNS):
        first = _telling_line(text, _NOT_A_NODE_SIGNS)
        return ClusterError(
            f"{where}: this machine is not a node of that cluster, and a HOST:PORT address "
            "needs one; run `ray start --address HOST:PORT` here first, or connect through the "
            f"Ray Client (ray://HOST:10001) ({first})"
        )
    return ClusterError(f"{where}: {_telling_line(text, ())}")


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While Ray starts and runs here, bind its servers to 127.0.0.1 (the node IP), not to all
    interfaces; the process's settings are put back afterwards."""
    from ray._private import ray_constants

    previous_env = os.environ.get(_LOOPBACK_ENV)
    previous_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, where ray is already imported
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = previous_env


def _probe(address: str) -> None:
    """Fail fast, in one line, when nothing listens at ``address``."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one with "
            "`ray start --head`, or leave out --address and RAY_ADDRESS to run on this machine"
        ) from exc


def _info(address: str) -> ClusterInfo:
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    cpus = [float(node["Resources"].get("CPU", 0.0)) for node in alive]
    gpus = [float(node["Resources"].get("GPU", 0.0)) for node in alive]
    return ClusterInfo(
        address=address,
        nodes=len(alive),
        cpus=sum(cpus),
        gpus=sum(gpus),
        node_cpus=max(cpus, default=0.0),
        node_gpus=max(gpus, default=0.0),
    )
