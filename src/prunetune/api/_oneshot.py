"""The Python front door: prune, inspect, load and search any ``nn.Module`` object.

These functions are what ``prunetune/__init__.py`` re-exports; the command line
(:mod:`prunetune.cli`) is a thin layer over the same calls, so a one-shot prune from Python and
``prunetune prune`` take one path. The shape of the API follows the libraries people already prune
with: one call from a model, an example input and constraints to a pruned model (NVIDIA
ModelOpt's ``prune(model, mode, constraints, dummy_input, config)``), and the pieces usable on
their own (Torch-Pruning's dependency graph and pruners used as a library).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from prunetune.api._inspection import Inspection
from prunetune.backend.errors import CheckpointError, InfeasibleTargetError, PrunetuneError
from prunetune.backend.export import LoadedModel, check_export_dir, export_subnet, load_export
from prunetune.backend.graph import ChannelGraph, LeafModule, eval_mode
from prunetune.backend.importance import IMPORTANCE_CRITERIA, channel_importance
from prunetune.backend.measure import count_flops, count_params
from prunetune.backend.models import ModelRef
from prunetune.backend.pruning import ALLOCATIONS, one_shot_widths
from prunetune.backend.spec import SubnetSpec
from prunetune.backend.surgery import prune_model
from prunetune.backend.training import Task
from prunetune.estimators import (
    Budget,
    CostModel,
    LatencyProfile,
    Target,
    cost_models,
    format_metric,
    format_share,
)

__all__ = [
    "PruneResult",
    "as_target",
    "inspect",
    "load",
    "prune",
    "resolve_target",
]

TargetLike = Target | str | Mapping[str, str]


def as_target(target: TargetLike) -> Target:
    """A :class:`~prunetune.estimators.Target` from any of the forms the API accepts.

    Args:
        target: a ``Target``; a string such as ``"flops<=50%"`` or
            ``"flops<=50%,params<=1.2M"``; or a mapping such as ``{"flops": "50%"}``.

    Raises:
        ValueError: the target cannot be read (the message says which part and the valid forms).
        TypeError: ``target`` is none of those forms.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return Target.parse(target)
    if isinstance(target, Mapping):
        unknown = set(target) - {"flops", "params", "latency"}
        if unknown:
            raise ValueError(
                f"unknown target metric {sorted(unknown)[0]!r}; valid: flops, params, latency"
            )
        return Target.from_options(**{k: str(v) for k, v in target.items()})
    raise TypeError(
        f"target must be a Target, a string like 'flops<=50%' or a mapping like "
        f"{{'flops': '50%'}}, got {type(target).__name__}"
    )


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module instance, got {type(model).__name__}; "
            "to prune a zoo model or a factory, build it first (prunetune.backend.models."
            "create_model('resnet20'))"
        )
    return model


ExampleInput = Tensor | tuple[Tensor, ...]


def _check_input(example_input: Any) -> tuple[Tensor, ...]:
    """The example inputs as a tuple of float tensors of batch 1 (one per ``forward`` input)."""
    several = isinstance(example_input, tuple)
    inputs = tuple(example_input) if several else (example_input,)
    if not inputs:
        raise ValueError(
            "example_input is an empty tuple: give one tensor per input of forward, e.g. "
            "(torch.randn(1, 3, 32, 32), torch.randn(1, 10))"
        )
    for index, tensor in enumerate(inputs):
        which = f"example_input[{index}]" if several else "example_input"
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"{which} must be a torch.Tensor of shape [N, ...] (e.g. torch.randn(1, 3, 224, "
                f"224)), or a tuple of them for a model of several inputs; got "
                f"{type(tensor).__name__}"
            )
        if tensor.dim() < 2 or tensor.shape[0] < 1:
            raise ValueError(
                f"{which} must have a batch dimension first, shape [N, ...]; got "
                f"{tuple(tensor.shape)}"
            )
    return tuple(tensor[:1].detach().float() for tensor in inputs)


def _trace(
    model: nn.Module, example: tuple[Tensor, ...], leaf_modules: Sequence[LeafModule]
) -> ChannelGraph:
    with eval_mode(model):
        return ChannelGraph.trace(model, example, leaf_modules=tuple(leaf_modules))


def inspect(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    profile: LatencyProfile | str | None = None,
    leaf_modules: Sequence[LeafModule] = (),
) -> Inspection:
    """Trace ``model`` and report its coupled channel groups, dense costs and kept-whole layers.

    The model is traced in eval mode (what is exported and deployed) and left as it was: its
    weights, buffers and train/eval mode are unchanged.

    Args:
        model: any ``nn.Module``.
        example_input: a float tensor of shape ``[N, ...]`` (e.g. ``[1, 3, 224, 224]``), or a
            tuple of them, one per positional input, for a model whose ``forward`` takes
            several tensors; only the first example is used, so costs are per example.
        profile: a latency profile (object or path to ``prunetune profile``'s JSON) of this
            model: adds the predicted ``latency_ms``.
        leaf_modules: module classes, or names of submodules (``"blocks.3"``), not to trace
            into (blocks torch.fx cannot trace); they are kept whole.

    Returns:
        An :class:`Inspection`; ``print()`` it for a table.

    Raises:
        TypeError: ``model`` is not a module or ``example_input`` not a tensor.
        UnsupportedModelError: the model cannot be traced (the message quotes the line).
        ProfileError: the profile is unreadable or of another model.

    Example:
        >>> import torch, prunetune
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        ...                     nn.Conv2d(16, 8, 3))
        >>> found = prunetune.inspect(net, torch.randn(1, 3, 16, 16))
        >>> [g.size for g in found.prunable_groups], int(found.costs["flops"])
        ([16], 250560)
    """
    model = _check_model(model)
    example = _check_input(example_input)
    graph = _trace(model, example, leaf_modules)
    return Inspection.of(graph, cost_models(graph, profile), model)


@dataclass(frozen=True)
class PruneResult:
    """A physically pruned model and what it costs.

    Attributes:
        model: the pruned module (a copy: the dense model is untouched), in eval mode, with the
            dense weights of the kept channels.
        spec: the kept channels of every group (JSON round-trippable).
        flops: multiply-accumulates of one example through :attr:`model`, measured with
            ``torch.utils.flop_counter.FlopCounterMode`` (total / 2).
        params: parameters of :attr:`model`.
        dense_flops: the same for the dense model.
        dense_params: the same for the dense model.
        costs: every estimator's figure for the subnet (``flops``, ``params`` and, with a
            profile, the *predicted* ``latency_ms``).
        dense_costs: the same for the model that was pruned.
        original_costs: when the model pruned was itself a pruned export, the figures of the
            original dense model it came from (what the export records as ``dense_*``, so that
            every export of one model shares one base); ``None`` otherwise.
    """

    model: nn.Module
    spec: SubnetSpec
    flops: int
    params: int
    dense_flops: int
    dense_params: int
    costs: dict[str, float]
    dense_costs: dict[str, float]
    original_costs: dict[str, float] | None = None

    def export(
        self,
        directory: str | Path,
        *,
        progress: Callable[[str], None] | None = None,
        overwrite: bool = False,
        preprocessing: dict[str, Any] | None = None,
        fold_normalization: bool = False,
    ) -> Path:
        """Write the subnet to ``directory`` and check every format against PyTorch.

        The directory holds ``subnet.json`` (spec, figures, checksums), ``weights.pt``,
        ``model.pt2`` (``torch.export``) and ``model.onnx``; :func:`load` reads it back.

        Args:
            directory: the export directory: new, empty or an earlier export.
            progress: called with a short message as each file is written.
            overwrite: replace ``directory`` even when it holds other files.
            preprocessing: what inputs must be (``DatasetSplits.preprocessing()``), recorded
                in ``subnet.json``.
            fold_normalization: build ``(x - mean) / std`` into ``model.pt2`` and
                ``model.onnx`` (needs ``preprocessing``).

        Returns:
            The export directory.

        Raises:
            ExportParityError: an exported format computes something else than :attr:`model`.
            PrunetuneError: ``directory`` cannot be written, or holds other files than an
                earlier export and ``overwrite`` is false.
        """
        out = check_export_dir(directory, overwrite)
        metrics = {f"dense_{m}": float(v) for m, v in self.dense_costs.items()}
        if self.original_costs is not None:
            metrics |= {f"input_{m}": float(v) for m, v in self.dense_costs.items()}
            metrics |= {f"dense_{m}": float(v) for m, v in self.original_costs.items()}
        if "latency_ms" in self.costs:
            metrics["predicted_latency_ms"] = float(self.costs["latency_ms"])
        return export_subnet(
            out,
            self.model,
            self.spec,
            metrics=metrics,
            progress=progress,
            preprocessing=preprocessing,
            fold_normalization=fold_normalization,
        )

    def summary(self) -> str:
        """One line per figure: dense -> pruned (share of dense).

        When the model pruned was itself pruned (:attr:`original_costs`), the share is of that
        input model, followed by the share of the original dense model.
        """
        lines = []
        for metric, value in self.costs.items():
            dense = float(self.dense_costs[metric])
            label = "latency_ms (predicted)" if metric == "latency_ms" else metric
            line = f"{label}: {format_metric(metric, dense)} -> {format_metric(metric, value)}"
            original = (self.original_costs or {}).get(metric)
            if original is None:
                lines.append(line + format_share(value, dense))
                continue
            of_input = f"{100 * value / dense:.1f}% of the input model, " if dense else ""
            of_original = (
                f"{100 * value / original:.1f}% of the original dense " if original else ""
            )
            lines.append(f"{line} ({of_input}{of_original}{format_metric(metric, original)})")
        return "\n".join(lines)


def prune(
    model: nn.Module,
    example_input: ExampleInput,
    target: TargetLike,
    *,
    importance: str = "l1",
    allocation: str = "global",
    round_to: int = 1,
    profile: LatencyProfile | str | None = None,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    leaf_modules: Sequence[LeafModule] = (),
    output: str | int | None = None,
    model_ref: ModelRef | None = None,
    base_spec: SubnetSpec | None = None,
) -> PruneResult:
    """One-shot prune ``model`` to ``target`` by channel importance, physically.

    Channels are scored once (``importance``), the target is met by removing the least
    important ones (``allocation``), and a smaller copy of the model is built with the kept
    weights: the baseline any search must beat, and a deployable model on its own.

    Args:
        model: any traceable ``nn.Module``; it is not modified.
        example_input: a float tensor of shape ``[N, ...]``, or a tuple of them, one per
            positional input, for a model whose ``forward`` takes several tensors (channels
            of the second and later inputs are kept whole); costs are per example.
        target: ``"flops<=50%"``, ``{"flops": "50%", "params": "1M"}`` or a ``Target``.
            FLOPs are multiply-accumulates; latency needs ``profile``.
        importance: channel score: ``l1`` or ``l2`` (weight norms, Li et al. 2017), ``bn`` (BN
            scale, Liu et al. 2017) or ``taylor`` (first-order loss change, Molchanov et al.
            2019; needs ``batches``).
        allocation: ``uniform`` (one keep ratio everywhere), ``global`` (least important
            channels of the whole model first) or ``cost`` (channels first where they save the
            most predicted latency per unit of importance; needs ``profile``).
        round_to: keep pruned widths at multiples of this (8 or 16 suit CPU/GPU kernels);
            a group narrower than it keeps its own step, and a value larger than every
            prunable group is refused (it could round nothing).
        profile: a latency profile of this model (object or JSON path).
        batches: ``(inputs, labels)`` batches for ``taylor``.
        output: for ``taylor`` on a model that returns a tuple or a dict: the index or key of
            the output the cross-entropy is taken on (default: the first item of a tuple,
            the ``"out"`` entry of a dict, as in training).
        leaf_modules: module classes, or names of submodules (``"blocks.3"``), not to trace
            into (blocks torch.fx cannot trace); they are kept whole and recorded in the spec,
            so the export reloads with them.
        model_ref: the model's identity recorded in the export (defaults to the module's class).
        base_spec: when ``model`` is itself a pruned export, the spec it was pruned with; the
            result's spec composes both (so it stays relative to the original dense model).

    Returns:
        A :class:`PruneResult` whose ``model`` meets the target by ``FlopCounterMode``.

    Raises:
        TypeError: ``model`` is not a module or ``example_input`` not a tensor.
        ValueError: an unknown importance or allocation, a bad target, ``taylor`` without
            batches, ``cost`` without a profile, ``round_to`` larger than every group.
        InfeasibleTargetError: no subnet of this model meets the target.
        UnsupportedModelError: the model cannot be traced.

    Example:
        >>> import torch, prunetune
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        ...                     nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        >>> result = prunetune.prune(net, torch.randn(1, 3, 32, 32), "flops<=50%")
        >>> result.flops <= 0.5 * result.dense_flops
        True
        >>> result.model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 10])
    """
    model = _check_model(model)
    example = _check_input(example_input)
    if importance not in IMPORTANCE_CRITERIA:
        raise ValueError(
            f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCE_CRITERIA)}"
        )
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")
    if output is not None and importance != "taylor":
        raise ValueError(
            f"output={output!r} names the output taylor's loss is taken on; it needs "
            "importance='taylor'"
        )
    if importance == "taylor" and batches is None:
        raise ValueError(
            "importance='taylor' takes gradients: pass batches=[(inputs, labels), ...]"
        )
    if allocation == "cost" and profile is None:
        raise ValueError(
            "allocation='cost' saves predicted latency: pass profile= (measure one with "
            "prunetune profile)"
        )
    goal = as_target(target)
    graph = _trace(model, example, leaf_modules)
    costs = cost_models(graph, profile)
    name = model_ref.name if model_ref is not None else type(model).__name__
    budget = resolve_target(goal, costs, graph, name)
    with eval_mode(model):
        task = Task(output=output)
        scores = channel_importance(model, graph, importance, batches, task)
        dense_flops = count_flops(model, example)
    latency = costs["latency_ms"].evaluate if allocation == "cost" else None
    widths = one_shot_widths(graph, budget.fits, allocation, scores, round_to, latency)
    ref = model_ref or ModelRef.for_instance(model)
    spec = SubnetSpec.from_widths(graph, ref, widths, scores)
    pruned = prune_model(model, graph, spec).eval()
    if base_spec is not None:
        spec = base_spec.compose(spec)
    return PruneResult(
        model=pruned,
        spec=spec,
        flops=count_flops(pruned, example),
        params=count_params(pruned),
        dense_flops=dense_flops,
        dense_params=count_params(model),
        costs={m: float(c.evaluate(widths)) for m, c in costs.items()},
        dense_costs={m: float(c.evaluate(graph.dense_widths())) for m, c in costs.items()},
    )


def resolve_target(
    goal: Target, costs: Mapping[str, CostModel], graph: ChannelGraph, model_name: str
) -> Budget:
    """``goal.resolve(costs)``, refused in one line that says so when nothing can be pruned.

    Args:
        goal: the target.
        costs: the model's cost models by metric.
        graph: the traced model.
        model_name: how to name the model in the refusal.

    Returns:
        The absolute limits of the target for this model.

    Raises:
        InfeasibleTargetError: no subnet meets the target; when the model has no prunable
            group, the message says so and names the first places kept whole (also for a
            model of no FLOPs, which meets any share of them: nothing can be pruned).
    """
    try:
        budget = goal.resolve(costs)
    except InfeasibleTargetError as exc:
        if graph.prunable_groups:
            raise
        refusal = Inspection.of(graph, costs).nothing_prunable(model_name)
        raise InfeasibleTargetError(f"{refusal}: {exc}") from exc
    below = [c for c in goal.constraints if c.relative and c.limit < 1]
    if below and not graph.prunable_groups:
        # a model of no FLOPs (an activation alone) meets any share of them; it is refused like
        # any other model with nothing to prune, which cannot meet a share below 100%
        refusal = Inspection.of(graph, costs).nothing_prunable(model_name)
        asked = f"{below[0].metric}<={100 * below[0].limit:g}%"
        raise InfeasibleTargetError(f"{refusal}: {asked} asks to prune it")
    return budget


def load(
    directory: str | Path,
    *,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    trust_model_code: bool = False,
) -> LoadedModel:
    """The pruned module back from an export directory (:meth:`PruneResult.export`, a search).

    Every file the export records a checksum for is verified first. The module is then rebuilt
    from, in order: ``model`` when given (the dense module, or a callable returning it: pruned
    to the spec, loaded with the exported weights), the zoo when the export names a zoo model,
    else the export's own ``model.pt2`` program (``torch.export``), which needs no source code:
    this is how an export of a model defined in a notebook or a function comes back. No
    reference read from the files is imported unless ``trust_model_code`` says so.

    Args:
        directory: an export directory.
        model: the dense model the export was pruned from (or a zero-argument factory).
        trust_model_code: import and call the ``package.module:factory`` that ``subnet.json``
            names (it runs that code; in the spirit of ``trust_remote_code``).

    Returns:
        A :class:`~prunetune.backend.export.LoadedModel`: ``.model`` (eval mode), ``.spec``,
        ``.input_shape``, ``.metrics``.

    Raises:
        CheckpointError: not an export, a file missing, or a file changed since export.
        SpecError: the spec does not fit ``model``.

    Example:
        >>> import tempfile, torch, prunetune
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> result = prunetune.prune(net, torch.randn(1, 3, 12, 12), {"flops": "60%"})
        >>> out = result.export(tempfile.mkdtemp() + "/subnet")
        >>> back = prunetune.load(out)
        >>> x = torch.randn(2, 3, 12, 12)
        >>> torch.allclose(back.model(x), result.model(x), atol=1e-5)
        True
    """
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"directory must be the path of an export (str or Path), got {type(directory).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(
                f"model must be an nn.Module or a callable returning one, got "
                f"{type(model).__name__}"
            )
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model() returned {type(built).__name__}, not an nn.Module")
        model = built
    try:
        return load_export(directory, dense=model, trust_model_code=trust_model_code)
    except PrunetuneError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read export {str(directory)!r}: {exc}") from exc
