"""What :func:`prunetune.inspect` reports: channel groups, dense costs, what is kept whole."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunetune.backend.graph import ChannelGraph
from prunetune.estimators import CostModel, format_metric

__all__ = ["GroupSummary", "Inspection"]


@dataclass(frozen=True)
class GroupSummary:
    """One channel group of a traced model, as :func:`inspect` reports it.

    Attributes:
        name: the group's name (the first member layer that produces it).
        size: channels in the dense model.
        prunable: whether the group may be made narrower.
        step: widths are kept at multiples of this (e.g. channels that feed a grouped conv).
        members: the layers whose channels are coupled in this group.
        reason: why the group is kept whole, when it is.
        spans: the most consecutive channels of one layer that a channel of the group stands
            for (a shuffle, pixel shuffle or GroupNorm prunes them in such blocks; a depthwise
            conv's channel multiplier; an attention head's head dim); 1 for plain channels.
        unit: what one channel of the group is: ``"channels"``, or ``"heads"`` (attention
            heads, ``size`` of them, each ``spans`` channels of the q, k, v projections).
    """

    name: str
    size: int
    prunable: bool
    step: int
    members: tuple[str, ...]
    reason: str | None = None
    spans: int = 1
    unit: str = "channels"


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect` finds in a model.

    Attributes:
        input_shape: the example input's shape, batch 1 (costs are per example).
        costs: ``flops`` (multiply-accumulates), ``params`` (count) and, with a profile,
            ``latency_ms`` (predicted milliseconds at the profile's batch size) of the dense model.
        groups: every channel group, prunable or not.
        kept_whole: layer (or group) name -> the reason it cannot be pruned.
        graph: the traced :class:`~prunetune.backend.graph.ChannelGraph`, for further use.
        notes: layers that will stop an export, one line each naming the layer and the fix.
    """

    input_shape: tuple[int, ...]
    costs: dict[str, float]
    groups: tuple[GroupSummary, ...]
    kept_whole: dict[str, str]
    graph: ChannelGraph = field(repr=False)
    notes: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        graph: ChannelGraph,
        costs: Mapping[str, CostModel],
        model: nn.Module | None = None,
    ) -> Inspection:
        """What :func:`inspect` reports for an already traced graph and its cost models.

        Args:
            graph: the traced model.
            costs: cost models by metric (``flops``, ``params``, maybe ``latency_ms``).
            model: the model itself, to note layers the export cannot write.
        """
        dense = graph.dense_widths()
        figures = {metric: float(cost.evaluate(dense)) for metric, cost in costs.items()}
        return cls(
            input_shape=(1, *graph.input_shape[1:]),
            costs=figures,
            groups=tuple(
                GroupSummary(
                    name=g.name,
                    size=g.size,
                    prunable=g.prunable,
                    step=g.step,
                    members=tuple(sorted({m.module for m in g.members})),
                    reason=g.reason or None,
                    spans=max((m.multiplier for m in g.members if m.role != "in"), default=1),
                    unit=g.unit,
                )
                for g in graph.groups
            ),
            kept_whole=_kept_whole(graph, figures.get("flops", 0.0)),
            graph=graph,
            notes=_export_notes(model) if model is not None else (),
        )

    def nothing_prunable(self, model_name: str) -> str:
        """One line saying that no channel of the model can be pruned, with the first reasons
        (what a target below 100% is refused with when there are no prunable groups)."""
        reasons = "; ".join(f"{name}: {why}" for name, why in list(self.kept_whole.items())[:3])
        more = "; ..." if len(self.kept_whole) > 3 else ""
        return (
            f"nothing in {model_name} can be pruned, every channel group is kept whole "
            f"({reasons or 'it has no conv, linear or norm layer'}{more}); only a 100% target "
            "can be met, which gives the dense model"
        )

    @property
    def prunable_groups(self) -> tuple[GroupSummary, ...]:
        """The groups that may be made narrower."""
        return tuple(g for g in self.groups if g.prunable)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``prunetune inspect --json`` prints, less the model)."""
        return {
            "input_shape": list(self.input_shape),
            **self.costs,
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "prunable": g.prunable,
                    "step": g.step,
                    "members": list(g.members),
                    **({"reason": g.reason} if g.reason else {}),
                    **({"spans": g.spans} if g.spans > 1 else {}),
                    **({"unit": g.unit} if g.unit != "channels" else {}),
                }
                for g in self.groups
            ],
            "unprunable": dict(self.kept_whole),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        shapes = [self.input_shape, *((1, *s[1:]) for s in self.graph.input_shapes[1:])]
        lines = [f"input {', '.join('x'.join(map(str, s)) for s in shapes)}"]
        lines += [f"  {metric}: {format_metric(metric, v)}" for metric, v in self.costs.items()]
        prunable = self.prunable_groups
        if prunable:
            lines.append(f"{len(prunable)} prunable channel groups:")
        else:
            lines.append("nothing can be pruned: every channel group is kept whole (see below)")
        width = max((len(g.name) for g in prunable), default=0)
        for group in prunable:
            step = f" (step {group.step})" if group.step > 1 else ""
            if group.unit == "heads":
                step += f" heads (each {group.spans} channels of q, k and v)"
            elif group.spans > 1:
                step += f" (each up to {group.spans} of a layer's channels)"
            lines.append(
                f"  {group.name:<{width}}  {group.size:>5}{step}  {', '.join(group.members)}"
            )
        if self.kept_whole:
            lines.append("kept whole:")
            lines += [f"  {name}: {reason}" for name, reason in self.kept_whole.items()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _kept_whole(graph: ChannelGraph, dense_flops: float) -> dict[str, str]:
    """The graph's kept-whole groups and layers, each with the share of the dense FLOPs it
    fixes where ops there are counted but not pruned (transposed convs, matmuls, ...)."""
    kept = dict(graph.unprunable)
    touched: dict[str, int] = {}  # MACs of the layers that read or make each group
    for layer in graph.layers:
        macs = layer.total_positions * layer.out_channels * math.prod(layer.kernel_size)
        macs *= layer.in_channels // layer.groups
        for name in {layer.out_group, *(s.group for s in (*layer.outputs, *layer.in_segments))}:
            touched[name] = touched.get(name, 0) + macs
    for name, macs in touched.items():  # the model's own input and output go without saying
        if kept.get(name, "model input") in ("model input", "model output"):
            continue
        if name not in graph.constant_flops and dense_flops:
            kept[name] += f" ({100 * macs / dense_flops:.1f}% of FLOPs in the layers it touches)"
    for place, macs in graph.constant_flops.items():
        share = f"{100 * macs / dense_flops:.1f}% of FLOPs" if dense_flops else "no FLOPs"
        reason = kept.get(place, "reads channels kept whole; counted, not pruned")
        kept[place] = f"{reason} ({share})"
    for name, reason in kept.items():  # a module FlopCounterMode counts nothing in (a fused
        # kernel it has no formula for) fixes no counted FLOPs of its own
        if reason.startswith("module kept whole") and name not in graph.constant_flops:
            kept[name] = f"{reason} (0.0% of FLOPs: FlopCounterMode counts none in it)"
    return kept


def _export_notes(model: nn.Module) -> tuple[str, ...]:
    """Layers that the export cannot write: BatchNorms without running statistics."""
    return tuple(
        f"BatchNorm '{name}' has no running statistics (track_running_stats=False): in eval "
        "mode it normalises each batch by its own statistics, which the ONNX exporter cannot "
        "write; give it running statistics (track_running_stats=True, then calibrate them on "
        "training batches) to export it"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None
    )
