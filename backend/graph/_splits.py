"""Splits of a tensor (``chunk``, ``split``, ``tensor_split``, ``unbind``), the channels' among
them: into equal pieces that a pruned model cuts alike (sizes computed from the tensor), or at
sizes kept in a list attribute of the module that owns the call.

The second is MixConv (Tan & Le, "MixConv: Mixed Depthwise Convolutional Kernels", BMVC 2019), as
timm's ``MixedConv2d`` computes it::

    x_split = torch.split(x, self.splits, 1)   # self.splits: a list of channel counts
    x = torch.cat([conv(x_split[i]) for i, conv in enumerate(self.values())], 1)

one conv per piece, each with its own kernel size (depthwise, or a plain conv whose output
sizes differ from the input's pieces). Under fx the sizes become literals in the graph, which a
pruned model would not follow unless the attribute changes with it. Each piece is its own run of
channels, pruned independently, once ``_split_probe.py`` has checked, by tracing the owning
module again with the attribute changed, that the sizes are read from it: the producers' outputs
are cut where the pieces start, and surgery writes the kept count of every piece back into the
attribute. Sizes that are literals in the code keep the pieces whole.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._groups import Channels
from prunetune.backend.graph._rules import owner_of
from prunetune.backend.graph._state import AnalysisState, Last, Many, is_multi
from prunetune.backend.graph._trace import node_shape

__all__ = ["SIZED_SPLITS", "SplitRules", "literal_sizes"]

SIZED_SPLITS = ("split", "split_with_sizes")
"""The ops that split at a list of sizes (``torch.split``, ``Tensor.split``,
``Tensor.split_with_sizes``)."""


def literal_sizes(node: fx.Node) -> tuple[int, ...] | None:
    """The sizes a ``split`` or ``split_with_sizes`` call cuts at, when they are a list or tuple
    of int literals (``None`` for one size, or sizes computed in the graph)."""
    sections = node.args[1] if len(node.args) > 1 else None
    for keyword in ("split_size_or_sections", "split_size", "split_sizes"):
        sections = node.kwargs.get(keyword, sections)
    if not isinstance(sections, (tuple, list)):
        return None
    if not all(type(size) is int for size in sections):
        return None
    return tuple(sections)


class SplitRules(AnalysisState):
    """The rules for splits, used by the channel analysis."""

    def _split(self, node: fx.Node, name: str, what: str) -> Any:
        """``chunk``, ``split`` and kin: along positions every piece keeps the channels; along
        the channels (dim 1, or the last dim of a :class:`Last` value) each piece takes its
        own run of them, the producers' outputs cut where the pieces start."""
        source = node.args[0] if node.args else None
        last = self.last(source)
        channels = last if last is not None else self.channels(source)
        shape = node_shape(source) if isinstance(source, fx.Node) else None
        rank = len(shape or ())
        position = 1 if name == "unbind" else 2
        axis = rules.normalise_dims(rules.argument(node, position, "dim", 0), rank)
        meta = node.meta.get("tensor_meta")
        if channels is None or axis is None or not is_multi(meta):
            return self._unknown(node, f"{what} (splits along the batch or channel dim)")
        channel_axis = rank - 1 if last is not None else 1
        if axis[0] == channel_axis and name != "unbind":
            return self._split_channels(node, name, what, channels, last is not None)
        if axis[0] == 0 or axis[0] == channel_axis or (last is None and axis[0] < 2):
            return self._unknown(node, f"{what} (splits along the batch or channel dim)")
        value = Last(channels) if last is not None else channels
        return Many(tuple(value for _ in meta))

    def _split_channels(
        self, node: fx.Node, name: str, what: str, channels: Channels, last: bool
    ) -> Any:
        """A split of the channels into pieces of equal size that the pruned model cuts alike:
        ``chunk(n)``, ``tensor_split(n)``, or ``split`` by a size computed from the tensor.
        The pieces are coupled one to one (each keeps the same channels, so they stay equal),
        and the producers' outputs are cut where the pieces start. A ``split`` at a list of
        literal sizes goes to :meth:`_split_at_sizes`; other literal sizes would not follow a
        pruned width: those pieces are kept whole."""
        meta = node.meta.get("tensor_meta")
        axis = len(node_shape(node.args[0]) or ()) - 1 if last else 1  # type: ignore[arg-type]
        sizes = [int(item.shape[axis]) for item in meta]  # type: ignore[union-attr]
        sections = rules.argument(node, 1, "chunks" if name == "chunk" else "split_size")
        if name == "tensor_split":
            sections = rules.argument(node, 1, "sections", rules.argument(node, 1, "indices"))
        relative = name == "chunk" or (name == "tensor_split" and isinstance(sections, int))
        relative |= name == "split" and bool(
            [a for a in fx.node.map_arg(sections, lambda n: n) or () if isinstance(a, fx.Node)]
            if isinstance(sections, (tuple, list))
            else isinstance(sections, fx.Node)
        )
        if not relative:
            if name in SIZED_SPLITS and literal_sizes(node) == tuple(sizes) and min(sizes) > 0:
                return self._split_at_sizes(node, what, channels, sizes, last)
            return self._unknown(
                node,
                f"{what} (cuts the channels at literal sizes {sizes}: compute them from the "
                "tensor, e.g. x.chunk(2, 1), to let them be pruned)",
            )
        if len(set(sizes)) != 1:
            return self._unknown(node, f"{what} (cuts the channels into unequal pieces {sizes})")
        pieces = self._pieces(channels, sizes)
        if pieces is None:
            return self._unknown(
                node, f"{what} (splits the channels where no layer's output can be cut)"
            )
        for piece in pieces[1:]:
            self._join(pieces[0], piece, node, what)
        return Many(tuple(Last(p) if last else p for p in pieces))

    def _split_at_sizes(
        self, node: fx.Node, what: str, channels: Channels, sizes: list[int], last: bool
    ) -> Any:
        """A split at a list of literal sizes: when :attr:`split_probe` finds them read from a
        list attribute of the module that owns the call (MixConv's ``self.splits``), each piece
        is its own run of channels, pruned on its own, and the attribute is recorded in
        :attr:`split_attributes` for surgery to update; otherwise the pieces are kept whole.
        Two splits that read one attribute have their pieces coupled one to one."""
        attribute, problem = self.split_probe(node) if self.split_probe else (None, None)
        if problem is not None:
            return self._unknown(
                node, f"{what} (cuts the channels at literal sizes {sizes}: {problem})"
            )
        if attribute is None:
            return self._unknown(
                node,
                f"{what} (cuts the channels at literal sizes {sizes}: read them from a list "
                "attribute of the module, as timm's MixedConv2d reads self.splits, or compute "
                "them from the tensor, e.g. x.chunk(2, 1), to let them be pruned)",
            )
        pieces = self._pieces(channels, sizes)
        if pieces is None:  # cuts requested: the next pass splits there, if one can
            return self._unknown(
                node, f"{what} (splits the channels where no layer's output can be cut)"
            )
        key, value = (owner_of(node), attribute), tuple(pieces)
        known = self.split_attributes.setdefault(key, value)
        if known is not value:
            for first, second in zip(known, value, strict=True):
                self._join(first, second, node, what)
        return Many(tuple(Last(p) if last else p for p in pieces))
