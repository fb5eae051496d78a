"""Where the literal sizes of a channel split come from: a list attribute of the module that
owns the call (timm's ``MixedConv2d.splits``, after MixConv by Tan & Le, BMVC 2019), checked by
tracing that module again with the attribute set to other sizes (see ``_probe.py``)."""

from __future__ import annotations

from torch import fx, nn

from prunetune.backend.graph._probe import Retrace, own_calls, trace_with, untraceable
from prunetune.backend.graph._rules import owner_of
from prunetune.backend.graph._splits import SIZED_SPLITS, literal_sizes

__all__ = ["SplitSizesProbe"]


class SplitSizesProbe:
    """A ``SizesProbe`` for the channel analysis: which list attribute each split at literal
    sizes reads them from.

    The first time a split of module ``owner`` is asked about, every list or tuple attribute of
    ``owner`` that equals the sizes of one of its own splits is set to distinct sentinel sizes
    and ``owner`` is traced again on its own; a split whose sizes became an attribute's
    sentinels reads that attribute. Splits are matched between the two traces by their order
    among the module's own splits; answers are kept for the analysis' later passes.

    Args:
        model: the model the graph was traced from.
        graph: its fx graph.
        retrace: a symbolic trace of one submodule (see ``owner_retracer``).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, retrace: Retrace) -> None:
        self._model = model
        self._graph = graph
        self._retrace = retrace
        self._found: dict[str, tuple[dict[str, str], str | None]] = {}

    def __call__(self, node: fx.Node) -> tuple[str | None, str | None]:
        """``(attribute, None)`` when ``node`` reads its sizes from that attribute, ``(None,
        why)`` when that could not be checked, ``(None, None)`` for sizes written in the code."""
        owner = owner_of(node)
        if owner not in self._found:
            self._found[owner] = self._probe(owner)
        attributes, problem = self._found[owner]
        return attributes.get(node.name), problem

    def _probe(self, owner: str) -> tuple[dict[str, str], str | None]:
        dense = [n for n in own_calls(self._graph, owner, SIZED_SPLITS) if literal_sizes(n)]
        wanted = {literal_sizes(n) for n in dense}
        module = self._model.get_submodule(owner)
        changes: dict[str, list[int] | tuple[int, ...]] = {}
        sentinels: dict[tuple[int, ...], str] = {}
        # above every size looked for, so no literal is taken for one
        sentinel = 2 * max(max(sizes or (0,)) for sizes in wanted) + 1
        for attribute, value in list(vars(module).items()):
            if isinstance(value, (list, tuple)) and tuple(value) in wanted:
                fake = tuple(range(sentinel, sentinel + len(value)))
                sentinel += len(value)
                sentinels[fake] = attribute
                changes[attribute] = list(fake) if isinstance(value, list) else fake
        if not changes:
            return {}, None
        try:
            probe = trace_with(self._model, owner, changes, self._retrace)
        except Exception as exc:  # any failure of the second trace: nothing can be checked
            return {}, untraceable(self._model, owner, "where they come from", exc)
        probed = [n for n in own_calls(probe, "", SIZED_SPLITS) if literal_sizes(n)]
        if len(probed) != len(dense):
            return {}, (
                f"the forward of '{owner or type(self._model).__name__}' splits differently "
                "with other values of its attributes"
            )
        found = {}
        for ours, theirs in zip(dense, probed, strict=True):
            read = sentinels.get(literal_sizes(theirs) or ())
            if read is not None:
                found[ours.name] = read
        return found, None
