"""Cost models: FLOPs and parameters of a subnet, exact on integer widths, differentiable in ratios.

Both costs are quadratic in the channel widths: a conv or linear layer costs a constant times
(output width) x (input width), a depthwise conv, a bias or a norm layer a constant times one
width. Written in keep ratios ``alpha`` (width / dense width, one per prunable group) this is the
form of docs/methods.md §0, ``F(alpha) = alpha^T A alpha + B^T alpha + F0``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import numpy as np
import torch
from torch import Tensor

from prunetune.backend.graph import LayerInfo
from prunetune.estimators._groups import GraphLike, GroupView, HasWidths, WidthsLike, norm_segments

__all__ = ["CostModel", "FlopsModel", "ParamsModel", "QuadraticForm"]


class CostModel(abc.ABC):
    """A cost of a subnet (FLOPs, parameters, latency) as a function of its channel widths.

    Lifecycle:
        1. Built once per traced graph (``FlopsModel.from_graph(graph)``,
           ``LatencyPredictor(profile, graph)``); construction does all the heavy work (matrices,
           lookup tables) and checks the graph.
        2. :meth:`evaluate` is called many times, on one candidate (a ``{group: width}`` mapping
           or a ``SubnetSpec``) or on thousands at once (an ``(N, P)`` integer array whose
           columns follow :attr:`groups`). Fixed groups are always at their full width.
        3. :meth:`relaxed` is called inside gradient-based searches with keep ratios ``alpha``
           (``width / size``, a float tensor); it is differentiable and agrees with
           :meth:`evaluate` at ``alpha = width / size``.
        4. :attr:`dense` and :attr:`minimum` bound what any target can ask for.

    A cost model holds no state that changes with use, so one instance may be shared by many
    trials (the latency predictor's :meth:`~LatencyPredictor.calibrate` is the one exception,
    and is meant to run before the search).

    Attributes:
        metric: the name of the cost in trial metrics (``flops``, ``params``, ``latency_ms``).
    """

    metric: ClassVar[str]

    def __init__(self, view: GroupView) -> None:
        self._view = view

    @property
    def groups(self) -> tuple[str, ...]:
        """Names of the prunable groups: the columns of width arrays and of ``alpha``."""
        return self._view.prunable

    @property
    def sizes(self) -> np.ndarray:
        """Dense width of each prunable group, shape ``(P,)``."""
        return self._view.prunable_sizes.copy()

    @property
    def min_widths(self) -> np.ndarray:
        """Smallest allowed width of each prunable group, shape ``(P,)``."""
        return self._view.min_widths.copy()

    @overload
    def evaluate(self, widths: Mapping[Any, int] | HasWidths) -> float: ...

    @overload
    def evaluate(
        self, widths: np.ndarray | Sequence[int] | Sequence[Sequence[int]]
    ) -> np.ndarray: ...

    def evaluate(self, widths: WidthsLike) -> float | np.ndarray:
        """The exact cost of one or many candidates.

        Args:
            widths: a ``{group: width}`` mapping or a ``SubnetSpec`` (groups left out keep their
                full width), or integer widths of shape ``(P,)`` or ``(N, P)`` ordered as
                :attr:`groups`.

        Returns:
            A Python number for a mapping or spec; for an array, an array of shape
            ``widths.shape[:-1]`` (0-d for one candidate).

        Raises:
            SpecError: an unknown group, or a width out of its group's range.
            ValueError: an array of the wrong shape or with non-integer values.
        """
        full, single = self._view.full_widths(widths)
        values = self._evaluate_full(full)
        if single:
            return values[0].item()
        return values.reshape(np.asarray(widths).shape[:-1])

    @abc.abstractmethod
    def _evaluate_full(self, full_widths: np.ndarray) -> np.ndarray:
        """The cost of each row of checked full widths ``(N, G_all)``, shape ``(N,)``."""

    @abc.abstractmethod
    def relaxed(self, alpha: Tensor) -> Tensor:
        """The cost at keep ratios ``alpha`` (``(P,)`` or ``(N, P)``), differentiable.

        Returns:
            A 0-d tensor for ``(P,)`` input, shape ``(N,)`` for ``(N, P)``, in ``alpha``'s
            floating dtype (float64 for integer input) and device.
        """

    @property
    def dense(self) -> float:
        """The cost of the dense model."""
        return self.evaluate(self._view.prunable_sizes).item()

    @property
    def minimum(self) -> float:
        """The cost with every prunable group at its minimum width."""
        return self.evaluate(self._view.min_widths).item()


@dataclass(frozen=True)
class QuadraticForm:
    """``F(alpha) = alpha^T A alpha + B^T alpha + F0`` over the keep ratios of the prunable groups.

    Attributes:
        A: ``(P, P)`` symmetric, non-negative.
        B: ``(P,)`` non-negative.
        F0: the cost of everything no prunable group touches.
    """

    A: np.ndarray
    B: np.ndarray
    F0: float

    def __call__(self, alpha: np.ndarray) -> np.ndarray:
        """Evaluate at keep ratios of shape ``(P,)`` or ``(N, P)`` (numpy, not differentiable)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        return np.einsum("...i,ij,...j->...", alpha, self.A, alpha) + alpha @ self.B + self.F0


@dataclass(frozen=True)
class _GroupedTerm:
    """``coef * w[out] * (sum(w[in_i] * mult_i) // groups)``: a grouped conv whose coefficient
    per input channel is not a whole number."""

    out: int
    inputs: tuple[int, ...]
    multipliers: tuple[int, ...]
    coef: int
    groups: int


class _Terms:
    """Accumulates ``coef * w[a] * w[b]``, ``coef * w[a]`` and constant terms over full widths."""

    def __init__(self) -> None:
        self.quadratic: dict[tuple[int, int], int] = {}
        self.linear: dict[int, int] = {}
        self.constant = 0
        self.grouped: list[_GroupedTerm] = []

    def add_quadratic(self, out: int, inp: int, coef: int) -> None:
        self.quadratic[out, inp] = self.quadratic.get((out, inp), 0) + coef

    def add_linear(self, index: int, coef: int) -> None:
        self.linear[index] = self.linear.get(index, 0) + coef

    def add_layer(
        self, layer: LayerInfo, index: Mapping[str, int], per_pair: int, per_out: int
    ) -> None:
        """A conv/linear layer costing ``per_pair`` per (output, input feature) pair (divided
        by ``groups``) and ``per_out`` per output channel."""
        out = index[layer.out_group]
        if layer.depthwise:  # each input feature makes out_channels / groups outputs
            multiplier = layer.out_channels // layer.groups
            per_feature = per_out * multiplier
            per_feature += per_pair * multiplier * (layer.in_channels // layer.groups)
            for segment in layer.in_segments:
                self.add_linear(index[segment.group], per_feature * segment.multiplier)
            return
        inputs = [(index[seg.group], seg.multiplier) for seg in layer.in_segments]
        if layer.out_segments or all(
            per_pair * mult % layer.groups == 0 for _, mult in inputs
        ):  # an output cut into pieces: each piece's channels cost as the whole's do
            for piece in layer.outputs:  # pruned in blocks of ``multiplier`` channels
                if per_out:
                    self.add_linear(index[piece.group], per_out * piece.multiplier)
                for inp, mult in inputs:
                    coef = per_pair * mult * piece.multiplier // layer.groups
                    self.add_quadratic(index[piece.group], inp, coef)
            return
        if per_out:
            self.add_linear(out, per_out)
        self.grouped.append(
            _GroupedTerm(
                out=out,
                inputs=tuple(inp for inp, _ in inputs),
                multipliers=tuple(mult for _, mult in inputs),
                coef=per_pair,
                groups=layer.groups,
            )
        )


class _QuadraticCost(CostModel):
    """A cost made of :class:`_Terms`: exact in int64, relaxed through a :class:`QuadraticForm`."""

    def __init__(self, view: GroupView, terms: _Terms) -> None:
        super().__init__(view)
        pairs = sorted(terms.quadratic)
        self._pair_out = np.array([p[0] for p in pairs], dtype=np.int64)
        self._pair_in = np.array([p[1] for p in pairs], dtype=np.int64)
        self._pair_coef = np.array([terms.quadratic[p] for p in pairs], dtype=np.int64)
        self._lin_index = np.array(sorted(terms.linear), dtype=np.int64)
        self._lin_coef = np.array([terms.linear[i] for i in sorted(terms.linear)], dtype=np.int64)
        self._constant = int(terms.constant)
        self._grouped = tuple(terms.grouped)
        self._form = self._fold(terms)
        self._torch_cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    @overload
    def evaluate(self, widths: Mapping[Any, int] | HasWidths) -> int: ...

    @overload
    def evaluate(
        self, widths: np.ndarray | Sequence[int] | Sequence[Sequence[int]]
    ) -> np.ndarray: ...

    def evaluate(self, widths: WidthsLike) -> int | np.ndarray:
        """The exact cost (an integer) of one or many candidates; see :meth:`CostModel.evaluate`."""
        return super().evaluate(widths)  # type: ignore[return-value]

    @property
    def dense(self) -> int:
        """The cost of the dense model."""
        return int(super().dense)

    @property
    def minimum(self) -> int:
        """The cost with every prunable group at its minimum width."""
        return int(super().minimum)

    @property
    def quadratic_form(self) -> QuadraticForm:
        """``A``, ``B`` and ``F0`` of the cost over keep ratios (copies)."""
        return QuadraticForm(self._form.A.copy(), self._form.B.copy(), self._form.F0)

    def _evaluate_full(self, full_widths: np.ndarray) -> np.ndarray:
        w = full_widths
        total = (w[:, self._pair_out] * w[:, self._pair_in]) @ self._pair_coef
        total += w[:, self._lin_index] @ self._lin_coef
        total += self._constant
        for term in self._grouped:
            features = w[:, list(term.inputs)] @ np.array(term.multipliers, dtype=np.int64)
            total += term.coef * w[:, term.out] * (features // term.groups)
        return np.asarray(total, dtype=np.int64)

    def relaxed(self, alpha: Tensor) -> Tensor:
        """The cost at keep ratios ``alpha``, ``alpha^T A alpha + B^T alpha + F0``.

        Args:
            alpha: keep ratios of shape ``(P,)`` or ``(N, P)`` ordered as :attr:`groups`.

        Returns:
            A 0-d tensor for ``(P,)``, shape ``(N,)`` for ``(N, P)``; differentiable in
            ``alpha``.

        Raises:
            ValueError: the last axis of ``alpha`` is not the number of prunable groups.
        """
        count = len(self.groups)
        if alpha.ndim not in (1, 2) or alpha.shape[-1] != count:
            raise ValueError(
                f"alpha must have shape (P,) or (N, P) with P={count}, got {tuple(alpha.shape)}"
            )
        dtype = alpha.dtype if alpha.is_floating_point() else torch.float64
        alpha = alpha.to(dtype)
        key = (dtype, alpha.device)
        if key not in self._torch_cache:
            self._torch_cache[key] = (
                torch.as_tensor(self._form.A, dtype=dtype, device=alpha.device),
                torch.as_tensor(self._form.B, dtype=dtype, device=alpha.device),
            )
        matrix, vector = self._torch_cache[key]
        return ((alpha @ matrix) * alpha).sum(-1) + alpha @ vector + self._form.F0

    def _fold(self, terms: _Terms) -> QuadraticForm:
        """Substitute ``w = alpha * size`` for prunable groups and ``w = size`` for fixed ones."""
        view = self._view
        sizes = view.sizes.astype(np.float64)
        position = {int(column): p for p, column in enumerate(view.prunable_index)}
        count = len(view.prunable)
        matrix = np.zeros((count, count))
        vector = np.zeros(count)
        constant = float(terms.constant)
        quadratic: list[tuple[int, int, float]] = [
            (a, b, float(c)) for (a, b), c in terms.quadratic.items()
        ]
        for term in terms.grouped:
            quadratic += [
                (term.out, inp, term.coef * mult / term.groups)
                for inp, mult in zip(term.inputs, term.multipliers, strict=True)
            ]
        for a, b, coef in quadratic:
            value = coef * sizes[a] * sizes[b]
            if a in position and b in position:
                matrix[position[a], position[b]] += value / 2
                matrix[position[b], position[a]] += value / 2
            elif a in position:
                vector[position[a]] += value
            elif b in position:
                vector[position[b]] += value
            else:
                constant += value
        for index, coef in terms.linear.items():
            if index in position:
                vector[position[index]] += coef * sizes[index]
            else:
                constant += coef * sizes[index]
        return QuadraticForm(matrix, vector, constant)


class FlopsModel(_QuadraticCost):
    """Multiply-accumulates of the conv and linear layers of a subnet, per input sample.

    Equal to ``torch.utils.flop_counter.FlopCounterMode`` total / 2 on the physically pruned model
    (for an input of batch size 1). Per layer: ``out_w * positions * prod(kernel) *
    in_features / groups``, ``positions`` the output positions of all its calls,
    ``in_features = sum(width(seg.group) * seg.multiplier)``; a depthwise conv scales with its
    one group. The ops between attention heads (``q @ k^T``, ``attention @ v``) cost
    ``graph.head_costs`` MACs per kept head. Every other op ``FlopCounterMode`` counts (matmuls
    on activations, layers kept whole) reads only fixed channels and adds ``graph.other_flops``,
    a constant.

    Example:
        >>> import numpy as np, torch
        >>> from prunetune.backend.graph import ChannelGraph
        >>> from prunetune.backend.models import create_model
        >>> graph = ChannelGraph.trace(create_model("resnet20"), torch.zeros(1, 3, 32, 32))
        >>> flops = FlopsModel.from_graph(graph)
        >>> flops.dense, flops.evaluate({"layer1.0.conv1": 8})  # one candidate, an int
        (40813184, 38453888)
        >>> widths = np.stack([flops.sizes, flops.sizes // 2])  # (N, P) ints
        >>> flops.evaluate(widths).shape                           # (N,) int64
        (2,)
        >>> alpha = torch.full((len(flops.groups),), 0.5, dtype=torch.float64, requires_grad=True)
        >>> flops.relaxed(alpha).backward()                      # d FLOPs / d keep ratio
    """

    metric: ClassVar[str] = "flops"

    @classmethod
    def from_graph(cls, graph: GraphLike) -> FlopsModel:
        """Build the FLOPs model of a traced graph.

        Raises:
            ValueError: the graph's groups are inconsistent (duplicate names, unknown groups).
        """
        view, terms = _layer_terms(
            graph,
            lambda layer: (layer.total_positions * math.prod(layer.kernel_size), 0),
        )
        for cost in getattr(graph, "head_costs", ()):  # q @ k^T, attention @ v: per head
            for segment in cost.segments:
                terms.add_linear(view.index[segment.group], cost.macs)
        terms.constant += int(graph.other_flops)
        return cls(view, terms)


class ParamsModel(_QuadraticCost):
    """Parameters of a subnet: conv/linear weights and biases, norm affine, and the rest.

    ``graph.other_params`` (parameters of modules the graph does not prune, such as embeddings)
    are counted as a constant. A module called several times counts once.
    """

    metric: ClassVar[str] = "params"

    @classmethod
    def from_graph(cls, graph: GraphLike) -> ParamsModel:
        """Build the parameter model of a traced graph.

        Raises:
            ValueError: the graph's groups are inconsistent (duplicate names, unknown groups).
        """
        view, terms = _layer_terms(
            graph,
            lambda layer: (
                math.prod(layer.kernel_size),
                int(layer.bias) + layer.per_output,
            ),
        )
        index = view.index
        for norm in graph.norms:
            for segment in norm_segments(norm):
                if segment.group not in index:
                    raise ValueError(f"norm {norm.name!r} names unknown group {segment.group!r}")
                if norm.affine:
                    terms.add_linear(index[segment.group], 2 * segment.multiplier)
        for scale in getattr(graph, "scales", ()):  # per-channel parameters (layer scale)
            for segment in scale.segments if scale.parameter else ():
                terms.add_linear(index[segment.group], segment.multiplier * scale.entries)
        terms.constant += int(graph.other_params)
        return cls(view, terms)


def _layer_terms(
    graph: GraphLike, coefficients: Callable[[LayerInfo], tuple[int, int]]
) -> tuple[GroupView, _Terms]:
    """The graph's group view and the terms of its conv/linear layers, each layer adding
    ``per_pair`` per (output, input feature) pair and ``per_out`` per output channel, as
    ``coefficients(layer)`` gives them.

    Raises:
        ValueError: a layer names an unknown group or has ``groups < 1``.
    """
    view = GroupView.from_graph(graph)
    terms = _Terms()
    for layer in graph.layers:
        _check_layer(layer, view.index)
        per_pair, per_out = coefficients(layer)
        terms.add_layer(layer, view.index, per_pair=per_pair, per_out=per_out)
    return view, terms


def _check_layer(layer: LayerInfo, index: Mapping[str, int]) -> None:
    names = [*(seg.group for seg in layer.outputs), *(seg.group for seg in layer.in_segments)]
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(f"layer {layer.name!r} names unknown channel group {unknown[0]!r}")
    if layer.groups < 1:
        raise ValueError(f"layer {layer.name!r} has groups={layer.groups}; it must be >= 1")
