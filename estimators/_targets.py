"""Targets: one or several cost constraints, absolute or relative to the dense model.

``Target`` is what the user says (``flops<=50%,params<=1.2M,latency<=4ms``); ``Budget`` is that
target resolved against one model's cost estimators into absolute limits, with the checks every
space and the search share (exact, vectorised and differentiable).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.errors import InfeasibleTargetError
from prunetune.estimators._cost import CostModel

__all__ = ["METRICS", "Budget", "Constraint", "Metric", "Target", "format_metric"]

Metric = Literal["flops", "params", "latency_ms"]
METRICS: tuple[str, ...] = get_args(Metric)
_ALIASES = {"flops": "flops", "macs": "flops", "params": "params", "latency": "latency_ms",
            "latency_ms": "latency_ms"}  # fmt: skip
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_TIME = {"ms": 1.0, "us": 1e-3, "s": 1e3, "": 1.0}


def _format_count(value: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


def format_metric(metric: str, value: float) -> str:
    """``41.2M`` for counts, ``3.21ms`` for latency."""
    return f"{value:.3g}ms" if metric == "latency_ms" else _format_count(value)


def format_share(value: float, dense: float) -> str:
    """`` (41.2% of dense)``; empty when the dense figure is 0 (a model with no FLOPs)."""
    return f" ({100 * value / dense:.1f}% of dense)" if dense else ""


@dataclass(frozen=True)
class Constraint:
    """``metric <= limit``; ``relative`` limits are fractions of the dense model's cost."""

    metric: Metric
    limit: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown target metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if not self.limit > 0:
            raise ValueError(f"target {self} must have a positive limit")

    @classmethod
    def parse(cls, metric: str, text: str) -> Constraint:
        """Parse a limit such as ``50%``, ``20M``, ``0.3M``, ``120000``, ``2ms`` or ``500us``.

        Raises:
            ValueError: unknown metric, or a value that is not one of those forms.
        """
        name = _ALIASES.get(metric.strip().lower())
        if name is None:
            raise ValueError(f"unknown target metric {metric!r}; valid: flops, params, latency")
        value = text.strip().lower()
        if value.endswith("%"):
            try:
                share = float(value[:-1]) / 100.0
            except ValueError:
                share = None
            if share is not None:
                return cls(name, share, relative=True)  # type: ignore[arg-type]
        elif name == "latency_ms":
            match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|us|s|)", value)
            if match:
                return cls("latency_ms", float(match[1]) * _TIME[match[2]])
        else:
            match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmg]?)", value)
            if match:
                return cls(name, float(match[1]) * _SCALE[match[2]])  # type: ignore[arg-type]
        example = "2ms or 500us" if name == "latency_ms" else "20M or 120000"
        raise ValueError(
            f"cannot read {name} target {text!r}: give a share of the dense model such as 50%, "
            f"or an absolute value such as {example}"
        )

    def __str__(self) -> str:
        limit = (
            f"{100 * self.limit:.4g}%" if self.relative else format_metric(self.metric, self.limit)
        )
        return f"{self.metric.replace('_ms', '')}<={limit}"


@dataclass(frozen=True)
class Target:
    """One or several constraints that a subnet must meet together."""

    constraints: tuple[Constraint, ...]

    def __post_init__(self) -> None:
        if not self.constraints:
            raise ValueError("a target needs at least one constraint (flops, params or latency)")
        metrics = [c.metric for c in self.constraints]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"target {self} names a metric twice")

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse ``flops<=50%,params<=1.2M,latency<=4ms`` (``<=`` or ``=`` both accepted)."""
        constraints = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            metric, sep, value = part.partition("<=")
            if not sep:
                metric, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"cannot read target {part!r}: write it as metric<=value")
            constraints.append(Constraint.parse(metric, value))
        return cls(tuple(constraints))

    @classmethod
    def from_options(
        cls, flops: str | None = None, params: str | None = None, latency: str | None = None
    ) -> Target:
        """Build a target from command-line style values (``--flops 50% --latency 2ms``)."""
        parts = [("flops", flops), ("params", params), ("latency", latency)]
        return cls(tuple(Constraint.parse(m, v) for m, v in parts if v is not None))

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this target constrains."""
        return tuple(c.metric for c in self.constraints)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"flops": {"limit": 0.5, "relative": true}, ...}``."""
        return {c.metric: {"limit": c.limit, "relative": c.relative} for c in self.constraints}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(
                Constraint(metric, float(v["limit"]), bool(v["relative"]))  # type: ignore[arg-type]
                for metric, v in data.items()
            )
        )

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.constraints)

    def resolve(self, costs: Mapping[str, CostModel]) -> Budget:
        """Turn the target into absolute limits for one model, refusing infeasible ones.

        Args:
            costs: cost estimators of the model by metric (``flops``, ``params``, and
                ``latency_ms`` when a latency target is set).

        Raises:
            InfeasibleTargetError: a limit is above the dense model or below the smallest
                subnet, or a latency target has no latency estimator (no profile).
        """
        limits: dict[str, float] = {}
        for constraint in self.constraints:
            cost = costs.get(constraint.metric)
            if cost is None:
                if constraint.metric == "latency_ms":
                    raise InfeasibleTargetError(
                        f"target {constraint} needs a latency profile of this model: run "
                        "prunetune profile and pass --profile PROFILE.json"
                    )
                raise InfeasibleTargetError(f"no estimator for {constraint.metric}")
            dense, smallest = float(cost.dense), float(cost.minimum)
            limit = constraint.limit * dense if constraint.relative else constraint.limit
            unit = constraint.metric.replace("_ms", "")
            if limit > dense * (1 + 1e-9):
                raise InfeasibleTargetError(
                    f"target {constraint} is above the dense model "
                    f"({format_metric(constraint.metric, dense)} {unit}); use a value at or below "
                    f"{'100%' if constraint.relative else format_metric(constraint.metric, dense)}"
                )
            if limit < smallest:
                raise InfeasibleTargetError(
                    f"target {constraint} ({format_metric(constraint.metric, limit)}) is below the "
                    f"smallest subnet ({format_metric(constraint.metric, smallest)} {unit}, every "
                    f"group at its minimum width); use at least "
                    f"{100 * smallest / dense:.3g}% or {format_metric(constraint.metric, smallest)}"
                )
            limits[constraint.metric] = limit
        return Budget(self, limits, {m: costs[m] for m in limits})


@dataclass(frozen=True)
class Budget:
    """A target resolved for one model: absolute limits and the estimators that check them."""

    target: Target
    limits: Mapping[str, float]
    costs: Mapping[str, CostModel]

    def evaluate(self, widths: Any) -> dict[str, Any]:
        """Every constrained cost of ``widths`` (one candidate, or an (N, G) array)."""
        return {metric: self.costs[metric].evaluate(widths) for metric in self.limits}

    def fits(self, widths: Any) -> Any:
        """Whether ``widths`` meet every limit (a bool, or a bool array for (N, G) input)."""
        result: Any = True
        for metric, limit in self.limits.items():
            result = np.logical_and(
                result, np.asarray(self.costs[metric].evaluate(widths)) <= limit
            )
        return bool(result) if np.ndim(result) == 0 else result

    def utilisation(self, widths: Any) -> float:
        """The largest cost / limit ratio of ``widths`` (at most 1 when they fit)."""
        return max(
            float(self.costs[m].evaluate(widths)) / limit for m, limit in self.limits.items()
        )

    def relaxed_ratios(self, alpha: Tensor) -> dict[str, Tensor]:
        """Differentiable cost / limit of keep ratios ``alpha`` for every metric."""
        return {m: self.costs[m].relaxed(alpha) / limit for m, limit in self.limits.items()}

    def penalty(self, alpha: Tensor) -> Tensor:
        """Differentiable ``sum(relu(cost / limit - 1))``: zero inside the budget."""
        ratios = self.relaxed_ratios(alpha)
        return torch.stack([torch.relu(r - 1.0) for r in ratios.values()]).sum()

    def describe(self, widths: Any) -> str:
        """``flops 20.1M/20.3M, params 0.12M/0.15M``."""
        costs = self.evaluate(widths)
        return ", ".join(
            f"{m.replace('_ms', '')} {format_metric(m, float(costs[m]))}/{format_metric(m, limit)}"
            for m, limit in self.limits.items()
        )
