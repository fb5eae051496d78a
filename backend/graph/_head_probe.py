"""Where the sizes of attention heads' reshapes come from: a module attribute that surgery can
update (timm's ``num_heads``, ``attn_dim``), checked by tracing the module again with other values.

The analysis (``_heads.py``) records each literal size in a reshape of heads that must follow the
kept heads as a :class:`HeadSite`; here every module holding such sites is traced on its own with
its matching int attributes set to sentinels, and a site whose literal becomes a sentinel reads
that attribute. Heads whose sizes are literals in the code, or that cannot be checked, are kept
whole with the reason.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from prunetune.backend.graph._groups import Channels
from prunetune.backend.graph._probe import Retrace, own_calls, trace_with, untraceable
from prunetune.backend.graph._rules import reshape_sizes
from prunetune.backend.graph._state import AnalysisState, HeadSite
from prunetune.backend.graph._window_rules import is_window_attention

__all__ = ["check_head_sites", "probe_head_sites"]

_RESHAPES = ("view", "reshape")


def _sized_calls(graph: fx.Graph, owner: str) -> list[fx.Node]:
    """The reshapes, and the window attention calls (their ``num_heads`` argument a size), that
    the forward of ``owner`` itself holds, in order."""
    return own_calls(graph, owner, _RESHAPES, also=is_window_attention)


def check_head_sites(
    model: nn.Module, analysis: AnalysisState, retrace: Retrace
) -> list[tuple[str, str, Channels, int]]:
    """The attributes that the sizes of the attention heads' reshapes are read from, as
    ``(module, attribute, channels, per_head)``; heads whose sizes are not read from one
    attribute (a literal in the forward, a size two head groups share) are kept whole."""
    sites = [  # heads kept whole already need no check (nor a second trace)
        site
        for site in analysis.head_sites
        if not all(analysis.slots.is_fixed(s.slot) for s in site.channels)
    ]
    if not sites:
        return []

    found, refused = probe_head_sites(model, analysis.module.graph, sites, retrace)
    for site, reason in refused:
        analysis._fix(site.channels, reason)
    chosen: dict[tuple[str, str], tuple[Channels, int]] = {}
    for site, attribute, per_head in found:
        key = (site.module, attribute)
        roots = [analysis.slots.find(s.slot) for s in site.channels]
        known = chosen.setdefault(key, (site.channels, per_head))
        fixed = all(analysis.slots.is_fixed(s.slot) for s in (*site.channels, *known[0]))
        if fixed:
            continue  # kept whole already, for its own reasons
        if [analysis.slots.find(s.slot) for s in known[0]] != roots or known[1] != per_head:
            reason = (
                f"attribute '{attribute}' of '{site.module}' sizes heads of channel groups that "
                "are pruned apart, so no one value of it would fit them all"
            )
            analysis._fix(site.channels, reason)
            analysis._fix(known[0], reason)
    return [
        (owner, attribute, channels, per) for (owner, attribute), (channels, per) in chosen.items()
    ]


def probe_head_sites(
    model: nn.Module, graph: fx.Graph, sites: list[HeadSite], retrace: Retrace
) -> tuple[list[tuple[HeadSite, str, int]], list[tuple[HeadSite, str]]]:
    """Which attribute of its module each head site's literal size comes from.

    Each module holding sites is traced again on its own, symbolically (``retrace(owner)``
    returns the fx graph of submodule ``owner``; it must not run it), with every int attribute
    of it that equals a site's size (the head count or the width) set to a distinct sentinel.
    A site whose literal became a sentinel reads that attribute; one that became a sentinel
    times the head dim reads a head count (``self.num_heads * self.head_dim``). Sites are
    matched between the two traces by their order among the module's own reshapes. The
    attributes are restored afterwards. Tracing one module, not the model, also serves models
    that trace only on their example input (shape logic elsewhere).

    Args:
        model: the model.
        graph: the model's fx graph the sites' nodes are in.
        sites: the head sites found by the analysis.
        retrace: ``owner -> fx.Graph``, a symbolic trace of submodule ``owner``.

    Returns:
        ``(site, attribute, per_head)`` for every site found, and ``(site, reason)`` for the
        others (their heads are then kept whole).
    """
    found: list[tuple[HeadSite, str, int]] = []
    refused: list[tuple[HeadSite, str]] = []
    owners: dict[str, list[HeadSite]] = {}
    for site in sites:
        owners.setdefault(site.module, []).append(site)
    for owner, owned in owners.items():
        module = model.get_submodule(owner)
        values = {_site_value(site) for site in owned}
        sentinels: dict[int, tuple[str, int]] = {}
        changes: dict[str, int] = {}
        # above every size looked for, so no literal is taken for one; small, so that Python
        # code looping over the heads at trace time stays quick
        sentinel = 2 * max(values) + 1
        for attribute, value in list(vars(module).items()):
            if type(value) is int and value in values:
                sentinels[sentinel] = (attribute, value)
                changes[attribute] = sentinel
                sentinel += 1
        try:
            probe = trace_with(model, owner, changes, retrace)
        except Exception as exc:  # any failure of the second trace: nothing can be checked
            reason = untraceable(model, owner, "its head count", exc)
            refused += [(site, reason) for site in owned]
            continue
        dense = [n.name for n in _sized_calls(graph, owner)]
        probed = _sized_calls(probe, "")
        for site in owned:
            index = dense.index(site.node) if site.node in dense else len(probed)
            sizes = reshape_sizes(probed[index]) if index < len(probed) else []
            literal = sizes[site.position] if site.position < len(sizes) else None
            read = _read_from(literal, site, sentinels)
            if read is not None:
                found.append((site, *read))
                continue
            where = f"'{site.module}'" if site.module else "the model"
            refused.append(
                (
                    site,
                    f"the forward of {where} reshapes its attention heads with the literal size "
                    f"{_site_value(site)} at node '{site.node}', which is not read from an "
                    "attribute of that module, so it would not follow pruned heads (keep the "
                    "head count in an attribute such as self.num_heads, or reshape to -1)",
                )
            )
    return found, refused


def _read_from(
    literal: Any, site: HeadSite, sentinels: dict[int, tuple[str, int]]
) -> tuple[str, int] | None:
    """``(attribute, per_head)`` that a probed literal was read from, ``None`` if none."""
    if not isinstance(literal, int):
        return None
    read = sentinels.get(literal)
    if read is not None and read[1] == _site_value(site):
        return read[0], site.per_head
    if site.per_head > 1 and literal % site.per_head == 0:
        read = sentinels.get(literal // site.per_head)
        if read is not None and read[1] == _site_value(site) // site.per_head:
            return read[0], 1
    return None


def _site_value(site: HeadSite) -> int:
    """The literal size a head site holds in the dense model."""
    return sum(segment.size for segment in site.channels) * site.per_head
