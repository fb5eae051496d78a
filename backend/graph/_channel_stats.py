"""Statistics across the channels that only rescale them: ConvNeXt-V2's global response norm.

GRN (Woo et al., "ConvNeXt V2", CVPR 2023, eq. 1-3; timm's ``GlobalResponseNorm``) computes,
channels-last, ``Gx = ||x||_2`` over the positions (one value per channel), ``Nx = Gx / (mean_c
Gx + eps)`` and ``y = gamma * (x * Nx) + beta + x``. The mean across the channels is the only
thing that sees more than one channel, and it only divides. With channels removed, a zeroed
channel adds 0 to the channel sum, so the pruned model's mean over ``C'`` kept channels is the
zeroed (or masked) model's mean over all ``C`` times ``C / C'``: ``Nx`` shrinks by ``C' / C`` and
``gamma`` scaled by ``C / C'`` at surgery makes the pruned model compute what the zeroed one does
(up to ``eps``, which is not rescaled: the relative difference is about ``eps / mean_c Gx``;
it shows only where activations are tiny, as at timm's random initialisation, where a
``convnextv2_atto`` pruned at random differs from the zeroed one by up to 1e-3 on outputs of
about 1, and by 7e-7 with ``eps`` set to 0).

Recognised by what is computed, not by a class name:

- a ``mean`` (or ``sum``) over exactly the channel dim (the last dim of a channels-last value,
  dim 1 otherwise) with the dim kept, of channels the graph follows, is a :class:`Statistic`:
  one value per example that changes by ``(C / C') ** power`` when channels go (``power`` 1
  for a mean, 0 for a sum, whose zeroed terms add nothing);
- multiplying or dividing it by Python numbers, adding (or bounding it by) a number of at
  most 1e-3 (an ``eps``), ``sqrt``, ``rsqrt``, ``reciprocal`` and ``pow`` by a number keep it
  a statistic, with the power they give it (``rsqrt`` halves and negates it: an RMS norm
  across the channels, ``x * rsqrt(mean_c x^2 + eps) * weight``, fits too);
- a channel value multiplied or divided by it is :class:`Rescaled`: every channel changes by
  the same factor; products and sums of rescaled values of one factor stay rescaled (with
  power 0, as ``x / sum_c x``, they are plain channels: pruning does not change them);
- a per-channel parameter multiplied into a rescaled value (``gamma * (x * Nx)``, or
  ``addcmul(beta, gamma, x * Nx)``) absorbs the factor: surgery multiplies its kept entries by
  the inverse, ``(C / C') ** -power`` (``ScaleInfo.rescale_power``), and the value is plain
  channels again.

Anything else done with a statistic or a rescaled value (``x - mean``, as a LayerNorm does;
a rescaled value reaching a layer before any parameter can absorb the factor) keeps the
averaged channels whole, with the reason; the value then goes on as what it is without them.

During masked training the masks zero channels where they are made and the mean still divides
by ``C``: with masks of zeros and ones the masked model is the zeroed model, and the exported
(pruned) one equals both through the rescaled ``gamma``; fractional masks scale the channels
the statistic reads, as they scale what every later layer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels
from prunetune.backend.graph._scales import ScaleRules
from prunetune.backend.graph._state import Last
from prunetune.backend.graph._trace import node_shape

__all__ = ["ChannelStatisticRules", "Rescaled", "Statistic"]

STATISTIC_REASON = (
    "a statistic across the channels (as a LayerNorm takes) otherwise than to rescale them "
    "before a per-channel parameter: pruning would change it, so they are kept whole"
)

_SAME = rules._names("contiguous clone detach float")
_SHIFT = rules._names("add sub radd rsub iadd isub add_ sub_")
_BOUND = rules._names("clamp clamp_min clip")
_TIMES = rules._names("mul rmul imul mul_")
_OVER = rules._names("truediv div itruediv div_")
_POWERS = {"sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0, "square": 2.0}
_EPS = 1e-3
"""The largest constant added to a statistic (or bounding it) that is taken for an ``eps``."""


@dataclass(frozen=True)
class Statistic:
    """A per-example value computed across channels (shape ``[N, 1, ..., 1]``): pruning
    ``counted`` from ``C`` to ``C'`` channels multiplies it by ``(C / C') ** power``.

    ``plain`` is the value the node has for every other rule (new fixed channels)."""

    counted: Channels
    power: float
    plain: Any


@dataclass(frozen=True)
class Rescaled:
    """A channel value (plain :data:`Channels` or :class:`Last`) that pruning ``counted``
    multiplies by ``(C / C') ** power``, every channel alike."""

    value: Any
    counted: Channels
    power: float


class ChannelStatisticRules(ScaleRules):
    """The rules for statistics across channels, used by the channel analysis.

    :attr:`rescales` names the per-channel parameters that absorb a statistic's factor, each
    with the channels counted and the power ``r``: surgery multiplies the parameter's kept
    entries by ``(C / C') ** r``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rescales: dict[str, tuple[Channels, float]] = {}

    def _visit(self, node: fx.Node) -> Any:
        """The value of ``node``: a statistic, an op on one, or the ordinary rules' value."""
        special = [
            s for s in node.all_input_nodes if isinstance(self.values.get(s), (Statistic, Rescaled))
        ]
        if special:
            value = self._statistic_op(node)
            return value if value is not None else self._keep_counted_whole(node)
        if node.op in ("call_function", "call_method") and "tensor_meta" in node.meta:
            statistic = self._statistic(node)
            if statistic is not None:
                return statistic
        return self._visit_ordinary(node)

    def _visit_ordinary(self, node: fx.Node) -> Any:
        raise NotImplementedError  # the channel analysis's dispatch

    def _statistic(self, node: fx.Node) -> Statistic | None:
        """A ``mean`` or ``sum`` over exactly the channel dim, dim kept, else ``None``."""
        name = rules.op_name(node)
        source = node.args[0] if node.args else None
        if name not in ("mean", "sum") or not isinstance(source, fx.Node):
            return None
        last = self.last(source)
        counted = last if last is not None else self.channels(source)
        shape, out_shape = node_shape(source), node_shape(node)
        if counted is None or shape is None or out_shape is None or len(shape) < 2:
            return None
        dims = rules.argument(node, 1, "dim", rules.argument(node, 1, "axis"))
        axis = len(shape) - 1 if last is not None else 1
        if rules.normalise_dims(dims, len(shape)) != (axis,) or len(out_shape) != len(shape):
            return None
        return Statistic(counted, 1.0 if name == "mean" else 0.0, self._plain(node))

    def _plain(self, node: fx.Node) -> Any:
        """A statistic's value for the ordinary rules: one new fixed channel."""
        what = f"{rules.describe(node)} at node '{node.name}'"
        return self._fresh(node, f"produced by {what} (a statistic across the channels)")

    def _statistic_op(self, node: fx.Node) -> Any | None:
        """The value of an op on a statistic or a rescaled value, ``None`` when no rule fits."""
        name = rules.op_name(node)
        values = [self.values.get(source) for source in node.all_input_nodes]
        special = [v for v in values if isinstance(v, (Statistic, Rescaled))]
        if name is None or len({_key(v.counted) for v in special}) > 1:
            return None  # statistics of other channels have no one factor
        stats = [v for v in special if isinstance(v, Statistic)]
        if stats and len(values) == 1:  # the statistic and Python numbers only
            return self._statistic_arithmetic(node, name, stats[0])
        if len(stats) == 1:
            return self._rescale(node, name, stats[0])
        if stats:
            return None
        return self._rescaled_op(node, name, [v for v in special if isinstance(v, Rescaled)])

    def _statistic_arithmetic(self, node: fx.Node, name: str, stat: Statistic) -> Any | None:
        """``stat + eps``, ``stat * 2``, ``1 / stat``, ``sqrt(stat)``: still a statistic."""
        arguments = [a for a in (*node.args, *node.kwargs.values()) if not isinstance(a, fx.Node)]
        others = [float(a) for a in arguments if isinstance(a, (int, float))]
        if len(others) != len(arguments) or any(isinstance(a, bool) for a in arguments):
            return None
        first = node.args[0] is _only_input(node)
        power: float | None = None
        if name in _SAME and not others:
            power = stat.power
        elif name in _SHIFT or name in _BOUND:  # an eps added, or a lower bound
            power = stat.power if all(abs(a) <= _EPS for a in others) else None
        elif name in _TIMES:
            power = stat.power
        elif name in _OVER:
            power = stat.power if first else -stat.power
        elif name in _POWERS and not others:
            power = stat.power * _POWERS[name]
        elif name == "pow" and first and len(others) == 1:
            power = stat.power * others[0]
        if power is None:
            return None
        return Statistic(stat.counted, power, self._plain(node))

    def _rescale(self, node: fx.Node, name: str, stat: Statistic) -> Any | None:
        """``x * stat`` or ``x / stat`` with ``x`` a channel value: rescaled channels."""
        if len(node.args) != 2 or node.kwargs or (name not in _TIMES and name not in _OVER):
            return None
        second = node.args[1]
        index = 0 if isinstance(second, fx.Node) and _is_statistic(self.values.get(second)) else 1
        other = node.args[index]
        if name in _OVER and index == 1:
            return None  # stat / x: the channels divide, they are not rescaled
        if not isinstance(other, fx.Node) or node_shape(other) != node_shape(node):
            return None
        value = self.values.get(other)
        power = -stat.power if name in _OVER else stat.power
        if isinstance(value, Rescaled):
            value, power = value.value, value.power + power
        if not isinstance(value, (tuple, Last)):
            return None
        return Rescaled(value, stat.counted, power) if power else value

    def _rescaled_op(self, node: fx.Node, name: str, rescaled: list[Rescaled]) -> Any | None:
        """Products and sums with rescaled values: a per-channel parameter multiplied in
        absorbs the factor; rescaled values of one factor multiplied or added stay so."""
        counted = rescaled[0].counted
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if name in _SHIFT:  # x * Nx + y * Nx: the same factor on both terms
            factors = [self.values.get(a) for a in tensors]
            if len(tensors) != len(node.args) or len({_power(f) for f in factors}) != 1:
                return None
            return self._wrapped(node, counted, rescaled[0].power)
        if name == "addcmul":
            added = rules.argument(node, 0, "input")
            value = rules.argument(node, 3, "value", 1)
            if isinstance(self.values.get(added), Rescaled) or value != 1:
                return None
            tensors = [rules.argument(node, 1, "tensor1"), rules.argument(node, 2, "tensor2")]
        elif name not in _TIMES or len(tensors) != len(node.args):
            return None
        factors = [self.values.get(tensor) for tensor in tensors]
        power = sum(f.power for f in factors if isinstance(f, Rescaled))
        out_shape = node_shape(node)
        if out_shape is None:
            return None
        axis = len(out_shape) - 1 if isinstance(rescaled[0].value, Last) else 1
        absorbing = [
            scale
            for tensor in tensors
            if not isinstance(self.values.get(tensor), Rescaled)
            for scale in [self._scale_of(tensor, out_shape, axis)]
            if scale is not None
        ]
        if len(absorbing) == 1 and absorbing[0][0] not in self.rescales:
            self.rescales[absorbing[0][0]] = (counted, -power)
            return self._visit_unwrapped(node)
        return self._wrapped(node, counted, power)

    def _wrapped(self, node: fx.Node, counted: Channels, power: float) -> Any:
        """``node``'s value by the ordinary rules, rescaled by ``(C / C') ** power``."""
        value = self._visit_unwrapped(node)
        if not power:  # a sum across the channels: the zeroed ones add nothing
            return value
        if not isinstance(value, (tuple, Last)):  # no channels left to carry the factor
            self._fix(
                counted, f"{rules.describe(node)} at node '{node.name}' uses {STATISTIC_REASON}"
            )
            return value
        return Rescaled(value, counted, power)

    def _visit_unwrapped(self, node: fx.Node) -> Any:
        """``node``'s value by the ordinary rules, its statistic and rescaled inputs read as
        their plain values."""
        saved: dict[fx.Node, Any] = {}
        for source in node.all_input_nodes:
            value = self.values.get(source)
            if isinstance(value, Statistic):
                saved[source], self.values[source] = value, value.plain
            elif isinstance(value, Rescaled):
                saved[source], self.values[source] = value, value.value
        try:
            return self._visit_ordinary(node)
        finally:
            self.values.update(saved)

    def _keep_counted_whole(self, node: fx.Node) -> Any:
        """No rule fits: the channels each statistic counts are kept whole (their factor is
        then 1), and the op is analysed as if its inputs were plain."""
        what = rules.describe(node)
        for source in node.all_input_nodes:
            value = self.values.get(source)
            if isinstance(value, (Statistic, Rescaled)):
                self._fix(value.counted, f"{what} at node '{node.name}' uses {STATISTIC_REASON}")
        return self._visit_unwrapped(node)

    def _fix_value(self, value: Any, reason: str) -> None:
        if isinstance(value, Statistic):
            self._fix(value.counted, reason)
            super()._fix_value(value.plain, reason)
        elif isinstance(value, Rescaled):
            self._fix(value.counted, reason)
            super()._fix_value(value.value, reason)
        else:
            super()._fix_value(value, reason)


def _key(channels: Channels) -> tuple[tuple[int, int, int], ...]:
    return tuple((s.slot, s.size, s.mult) for s in channels)


def _is_statistic(value: Any) -> bool:
    return isinstance(value, Statistic)


def _power(value: Any) -> float | None:
    return value.power if isinstance(value, Rescaled) else None


def _only_input(node: fx.Node) -> Any:
    return node.all_input_nodes[0] if node.all_input_nodes else None
