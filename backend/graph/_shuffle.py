"""Channel shuffles (ShuffleNet): ``view(N, g, C/g, H, W) -> transpose(1, 2) -> view(N, C, H, W)``
and ``nn.ChannelShuffle``, pruned through by coupling the ``g`` runs of ``C / g`` channels; and
pixel shuffles, which move blocks of ``r^2`` channels into space (pruned in whole blocks).

The shuffle interleaves the runs: output channel ``j * g + i`` is channel ``j`` of run ``i``. A
pruned model shuffles its own, smaller tensor the same way, which equals the dense shuffle with
the removed channels dropped exactly when every run keeps the same channels: the runs are
coupled one to one, and each channel of the result spans ``g`` consecutive channels (a segment
multiplier of ``g``). Runs made of differently cut or blocked channels ask for the cuts and
blocks that line them up (see ``AnalysisState``); where a run is not made by layers that can be
cut, it is kept whole.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from prunetune.backend.graph._groups import Channels, Segment
from prunetune.backend.graph._state import AnalysisState, Shuffled
from prunetune.backend.graph._trace import node_shape

__all__ = ["ShuffleRules"]


class ShuffleRules(AnalysisState):
    """The rules for channel shuffles, used by the channel analysis."""

    def _shuffle_view(
        self, node: fx.Node, what: str, literal_sizes: list[Any] | None
    ) -> Any | None:
        """A view of the channels as ``[N, g, C/g, ...]``, or back to ``[N, C, ...]`` from a
        :class:`Shuffled` value; ``None`` when the reshape is not one of these."""
        source = node.args[0] if node.args else None
        in_shape = node_shape(source) if isinstance(source, fx.Node) else None
        out_shape = node_shape(node)
        if in_shape is None or out_shape is None:
            return None
        value = self.values.get(source) if isinstance(source, fx.Node) else None
        if isinstance(value, Shuffled):
            if (
                len(out_shape) != len(in_shape) - 1
                or out_shape[1] != in_shape[1] * in_shape[2]
                or out_shape[2:] != in_shape[3:]
            ):
                return self._unknown(node, f"{what} (reshapes a channel shuffle's groups)")
            if not value.swapped:
                return tuple(segment for piece in value.pieces for segment in piece)
            return self._interleave(node, list(value.pieces), what)
        channels = self.channels(source)
        if (
            channels is None
            or len(out_shape) != len(in_shape) + 1
            or out_shape[0] != in_shape[0]
            or out_shape[1] * out_shape[2] != in_shape[1]
            or out_shape[3:] != in_shape[2:]
            or min(out_shape[1], out_shape[2]) < 2
        ):
            return None
        literal = literal_sizes[2] if literal_sizes is not None and len(literal_sizes) > 2 else -1
        if isinstance(literal, int) and literal != -1:
            return self._unknown(
                node,
                f"{what} (views the channels in groups of a literal {literal}: compute it "
                "from the tensor, e.g. x.size(1) // groups)",
            )
        groups = out_shape[1]
        pieces = self._pieces(channels, [in_shape[1] // groups] * groups)
        if pieces is None:
            return self._unknown(
                node, f"{what} (groups the channels where no layer's output can be cut)"
            )
        return Shuffled(tuple(pieces))

    def _shuffle_swap(self, node: fx.Node, order: tuple[int, ...] | None) -> Any | None:
        """A transpose of dims 1 and 2 of a :class:`Shuffled` value; ``None`` otherwise."""
        value = self.values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, Shuffled):
            return None
        if order is not None and order[:3] == (0, 2, 1) and list(order[3:]) == sorted(order[3:]):
            return Shuffled(value.pieces, not value.swapped)
        return self._unknown(node, f"{node.target} (moves a channel shuffle's dims)")

    def _channel_shuffle(self, node: fx.Node, groups: int, what: str) -> Any:
        """``nn.ChannelShuffle(groups)`` (or the native op): the runs interleaved."""
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        shape = node_shape(source) if isinstance(source, fx.Node) else None
        if channels is None or shape is None or groups < 1 or shape[1] % groups:
            return self._unknown(node, what)
        pieces = self._pieces(channels, [shape[1] // groups] * groups)
        if pieces is None:
            return self._unknown(
                node, f"{what} (groups the channels where no layer's output can be cut)"
            )
        return self._interleave(node, pieces, what)

    def _interleave(self, node: fx.Node, pieces: list[Channels], what: str) -> Any:
        """Channel ``j * g + i`` from channel ``j`` of run ``i``: the runs coupled one to one,
        each channel of the result spanning ``g`` consecutive channels."""
        structure = [(s.size, s.mult) for s in pieces[0]]
        for piece in pieces[1:]:
            self._join(pieces[0], piece, node, what)
        if any([(s.size, s.mult) for s in piece] != structure for piece in pieces[1:]):
            return self._unknown(node, f"{what} (shuffles runs of differently made channels)")
        groups = len(pieces)
        return tuple(Segment(s.slot, s.size, s.mult * groups) for s in pieces[0])

    def _pixel_shuffle(self, node: fx.Node, factor: int, what: str) -> Any:
        """``PixelShuffle(r)``: output channel ``c`` is made of input channels ``c * r^2`` to
        ``(c + 1) * r^2 - 1``, so the producers prune in whole blocks of ``r^2``."""
        source = node.args[0] if node.args else None
        channels = self.channels(source)
        block = factor * factor
        if channels is None or factor < 1:
            return self._unknown(node, what)
        if not self._in_blocks(channels, block):
            return self._unknown(
                node,
                f"{what} (its blocks of {block} channels are not made by layers that can "
                "prune in whole blocks)",
            )
        return tuple(Segment(s.slot, s.size, s.mult // block) for s in channels)

    def _pixel_unshuffle(self, node: fx.Node, factor: int, what: str) -> Any:
        """``PixelUnshuffle(r)``: each input channel becomes ``r^2`` consecutive channels."""
        channels = self.channels(node.args[0] if node.args else None)
        if channels is None or factor < 1:
            return self._unknown(node, what)
        return tuple(Segment(s.slot, s.size, s.mult * factor * factor) for s in channels)
