"""One Tune trial: run one space with sampled options, then score its subnet the same way for all.

The trainable gets ``config = {"space": name, name: {option: value, ...}}`` from the searcher and a
:class:`TrialPayload` through Ray's object store (``tune.with_parameters``): the dense weights, the
model's identity, the target and a :class:`DataSource`. Nothing is read from the driver's disk;
each trial builds its own splits and loaders from the source (``digits`` is embedded; files need
``data_dir`` at the same path on every node; split objects from Python travel in the payload).

Every report carries the standard metrics (the task's metric under its own name, ``acc`` by
default; ``flops``, ``params``, ``latency_ms``, ``feasible``) and ``cpu_s``, the CPU seconds
the trial's process has spent on it so far (``time.process_time``: every thread of the process,
from the trial's start; the worker's start-up and Ray's own daemons are not in it); the last
one also carries ``spec_json`` (the subnet) and ``search_<metric>`` (the space's own final
value); every report says where it ran (``node_id``, ``node_ip``, ``hostname``).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.datasources import DataSource
from prunetune.backend.errors import PrunetuneError
from prunetune.backend.graph import ChannelGraph
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.train import TrainConfig, train
from prunetune.backend.training import Runtime, Task, evaluate, steps_per_pass
from prunetune.estimators import LatencyProfile, Target, cost_models
from prunetune.spaces import SpaceContext, create_space

__all__ = [
    "WEIGHTS_FILE",
    "TrialFailedError",
    "TrialPayload",
    "finetune_and_score",
    "run_trial",
    "score_subnet",
]

_RAISED_FILE = "prunetune-raised.txt"
WEIGHTS_FILE = "subnet.pt"
"""A finished trial's scored subnet weights (a state dict), in its Tune checkpoint."""


class TrialFailedError(PrunetuneError):
    """A trial raised before; Tune's retry re-raises it instead of running it again."""


@dataclass(frozen=True)
class TrialPayload:
    """What every trial shares, shipped once through Ray's object store.

    Attributes:
        model_ref: the model's identity (``ModelRef.to_dict``), rebuilt on the worker.
        state_dict: the dense (trained) weights.
        input_shape: example input shape (batch 1).
        base_spec: the spec the dense model was already pruned with (an export checkpoint).
        target: the target (``Target.to_dict``).
        profile: the latency profile, for a latency target.
        data: where the data comes from; loaded on the worker.
        seed: the split's and every trial's seed.
        threads: torch threads per trial (the CPUs Ray gives it).
        batch_size: examples per training step.
        round_to: every space keeps widths at multiples of this (``SpaceContext.round_to``).
        score_steps: steps of the common score finetune.
        distill_weight: share of distillation from the dense model in that finetune.
        finetune_lr: peak learning rate of that finetune.
        task: the output used, loss and metric of every loop.
        runtime: device and precision of every loop (``auto``: the GPU Ray gave the trial).
        fixed_options: options set (not searched) by space name.
        module: the dense model itself when it was given as a module object (it has no
            factory to rebuild it from ``model_ref``).
    """

    model_ref: dict[str, Any]
    state_dict: dict[str, Tensor]
    input_shape: tuple[int, ...]
    target: dict[str, Any]
    data: DataSource
    base_spec: dict[str, Any] | None = None
    profile: LatencyProfile | None = None
    seed: int = 0
    threads: int = 1
    batch_size: int = 64
    round_to: int = 1
    score_steps: int = 150
    distill_weight: float = 0.7
    finetune_lr: float = 0.01
    task: Task = field(default_factory=Task)
    runtime: Runtime = field(default_factory=Runtime)
    fixed_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    module: nn.Module | None = None

    def build_model(self) -> nn.Module:
        """The dense model with its weights (pruned first when the checkpoint was an export)."""
        if self.module is not None:
            model = copy.deepcopy(self.module)
        else:
            model = ModelRef.from_dict(self.model_ref).build()
        if self.base_spec is not None:
            spec = SubnetSpec.from_dict(self.base_spec)
            graph = ChannelGraph.trace(model, torch.zeros(spec.input_shape))
            model = prune_model(model, graph, spec)
        model.load_state_dict(self.state_dict)
        return model.eval()


def run_trial(config: dict[str, Any], payload: TrialPayload) -> None:
    """The Tune function trainable (bind the payload with ``tune.with_parameters``)."""
    from ray import tune

    raised = _raised_marker()
    if raised is not None and raised.is_file():
        raise TrialFailedError(raised.read_text(encoding="utf-8").strip())
    try:
        with payload.runtime.fits(f"the {config['space']} trial at batch {payload.batch_size}"):
            _run(config, payload, tune.report)
    except Exception as exc:
        if raised is not None:  # a worker that dies leaves no marker, and is retried in full
            raised.parent.mkdir(parents=True, exist_ok=True)
            raised.write_text(_one_line(exc), encoding="utf-8")
        raise


def _run(config: dict[str, Any], payload: TrialPayload, report: Any) -> None:
    from ray import tune

    cpu_started = time.process_time()
    torch.set_num_threads(max(1, payload.threads))
    name = str(config["space"])
    options = {**payload.fixed_options.get(name, {}), **dict(config.get(name) or {})}
    space = create_space(name, **options)
    data = payload.data.load()
    dense = payload.build_model()
    graph = ChannelGraph.trace(dense, torch.zeros(payload.input_shape))
    costs = cost_models(graph, payload.profile)
    budget = Target.from_dict(payload.target).resolve(costs)
    context = SpaceContext(
        model=dense,
        graph=graph,
        model_ref=ModelRef.from_dict(payload.model_ref),
        data=data,
        budget=budget,
        seed=payload.seed,
        batch_size=payload.batch_size,
        round_to=payload.round_to,
        task=payload.task,
        runtime=payload.runtime,
    )

    where = _where()

    metric = payload.task.metric_name

    def forward(metrics: dict[str, Any]) -> None:
        if metric in metrics and "flops" in metrics:
            cpu_s = time.process_time() - cpu_started
            report({**_plain(metrics), "space": name, "phase": "search", "cpu_s": cpu_s, **where})

    result = space.run(context, report=forward)
    start = copy.deepcopy(dense)
    if result.state_dict is not None:
        start.load_state_dict(result.state_dict)
    subnet = prune_model(start, graph, result.spec)
    score = score_subnet(subnet, dense, data, payload)
    subnet.cpu()
    measured = {
        "flops": float(count_flops(subnet, torch.zeros(payload.input_shape))),
        "params": float(count_params(subnet)),
        "latency_ms": float(costs["latency_ms"].evaluate(result.spec.widths))
        if "latency_ms" in costs
        else math.nan,
    }
    feasible = all(measured[m] <= limit * (1 + 1e-9) for m, limit in budget.limits.items())
    final = {
        metric: score,
        **measured,
        "feasible": feasible,
        "space": name,
        "phase": "final",
        f"search_{metric}": float(result.metrics.get(metric, math.nan)),
        "spec_json": result.spec.to_json(indent=None),
        **where,
    }
    final["cpu_s"] = time.process_time() - cpu_started  # before the checkpoint is written
    # the scored weights go into a Tune checkpoint: Tune persists it to the run's storage from
    # whichever node ran the trial, and the final finetune continues from it if this trial wins
    with tempfile.TemporaryDirectory(prefix="prunetune-subnet-") as folder:
        state = {k: v.detach().cpu() for k, v in subnet.state_dict().items()}
        torch.save(state, Path(folder) / WEIGHTS_FILE)
        report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def score_subnet(
    subnet: nn.Module, teacher: nn.Module, data: DatasetSplits, payload: TrialPayload
) -> float:
    """The common score: a short finetune (distilled from the dense model), then the task's
    metric on the validation split.

    Every space's subnet gets the same steps, so the values compare across spaces.
    """
    return finetune_and_score(
        subnet,
        teacher,
        data,
        steps=payload.score_steps,
        batch_size=payload.batch_size,
        lr=payload.finetune_lr,
        distill_weight=payload.distill_weight,
        seed=payload.seed,
        task=payload.task,
        runtime=payload.runtime,
    )


def finetune_and_score(
    subnet: nn.Module,
    teacher: nn.Module,
    data: DatasetSplits,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    distill_weight: float,
    seed: int,
    task: Task,
    runtime: Runtime,
) -> float:
    """``steps`` SGD steps of finetuning ``subnet`` in place (distilled from ``teacher`` at
    ``distill_weight``, cosine schedule from ``lr``), then the task's metric on ``data.val``.

    Used by every trial's score and by the driver's second look at the best trials.
    """
    config = TrainConfig(
        epochs=steps / steps_per_pass(data.train, batch_size),
        lr=lr,
        batch_size=batch_size,
        distill_weight=distill_weight,
        seed=seed,
    )
    train(subnet, data, config, teacher=teacher, task=task, runtime=runtime)
    return float(evaluate(subnet, data.val, task, runtime, workers=data.workers)[1])


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly scalars of a space's report (Tune keeps them in its results)."""
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            plain[key] = bool(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            plain[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
        elif isinstance(value, str):
            plain[key] = value
        elif isinstance(value, Tensor) and value.numel() == 1:
            plain[key] = float(value)
    return plain


def _where() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }


def _trial_dir() -> Path | None:
    """This trial's folder, ``None`` outside a Tune trial."""
    from ray import tune

    try:
        trial_dir = tune.get_context().get_trial_dir()
    except Exception:  # not inside a Tune trial (tests calling the function directly)
        return None
    return Path(trial_dir) if trial_dir else None


def _raised_marker() -> Path | None:
    """Where a raising trial leaves its error, so a retry does not run it again."""
    trial_dir = _trial_dir()
    return trial_dir / _RAISED_FILE if trial_dir is not None else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
