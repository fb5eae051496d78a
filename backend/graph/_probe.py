"""Where a literal in a traced forward comes from: the module that owns the call is traced again
on its own, symbolically, with some of its attributes set to sentinel values, and a literal that
became a sentinel reads that attribute (which surgery can then update).

Shared by the probes of attention heads' reshapes (``_head_probe.py``) and of channel splits at
sizes kept in a list attribute (``_split_probe.py``). Tracing one module, not the model, also
serves models that trace only on their example input (shape logic elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from torch import fx, nn

from prunetune.backend.graph import _rules as rules
from prunetune.backend.graph._rules import owner_of
from prunetune.backend.graph._trace import LeafModule, graph_tracer

__all__ = ["Retrace", "own_calls", "owner_retracer", "trace_with", "untraceable"]

Retrace = Callable[[str], fx.Graph]
"""``owner -> fx.Graph``: a symbolic trace of submodule ``owner`` on its own (``""``: the
model); it must not run the module."""


def owner_retracer(model: nn.Module, leaf_modules: tuple[LeafModule, ...]) -> Retrace:
    """A :data:`Retrace` of ``model``'s submodules with the tracer of the model's own trace
    (the leaf modules named below ``owner`` renamed as seen from it)."""

    def retrace(owner: str) -> fx.Graph:
        prefix = f"{owner}." if owner else ""
        leaves = tuple(
            leaf[len(prefix) :] if isinstance(leaf, str) else leaf
            for leaf in leaf_modules
            if not isinstance(leaf, str) or leaf.startswith(prefix)
        )
        return graph_tracer(leaves).trace(model.get_submodule(owner))

    return retrace


def trace_with(
    model: nn.Module, owner: str, changes: Mapping[str, Any], retrace: Retrace
) -> fx.Graph:
    """The graph of submodule ``owner`` traced with its attributes set to ``changes``; every
    attribute is restored afterwards, whatever happens.

    Raises:
        Exception: whatever the trace raises (see :func:`untraceable` for the reason to give).
    """
    module = model.get_submodule(owner)
    saved = {attribute: getattr(module, attribute) for attribute in changes}
    try:
        for attribute, value in changes.items():
            setattr(module, attribute, value)
        return retrace(owner)
    finally:
        for attribute, value in saved.items():
            setattr(module, attribute, value)


def untraceable(model: nn.Module, owner: str, what: str, exc: Exception) -> str:
    """Why ``what`` (e.g. "its head count", "its split sizes") could not be checked, when the
    second trace of ``owner`` failed with ``exc``."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"{what} could not be checked: the forward of '{owner or type(model).__name__}' does "
        f"not trace symbolically on its own with other values of its attributes "
        f"({type(exc).__name__}: {first[:200]})"
    )


def own_calls(
    graph: fx.Graph,
    owner: str,
    names: Collection[str],
    also: Callable[[fx.Node], bool] | None = None,
) -> list[fx.Node]:
    """The calls of the ops ``names`` (as ``rules.op_name`` names them), and the nodes ``also``
    accepts, in ``graph`` that the forward of module ``owner`` itself holds (not one of its
    submodules' forwards), in order; the same calls of a dense and a probed trace are at the
    same index."""
    return [
        node
        for node in graph.nodes
        if node.op in ("call_method", "call_function")
        and (rules.op_name(node) in names or (also is not None and also(node)))
        and owner_of(node) == owner
    ]
