"""The Python API over module objects (re-exported by :mod:`prunetune`)."""

from prunetune.api._inspection import GroupSummary, Inspection
from prunetune.api._oneshot import (
    PruneResult,
    as_target,
    inspect,
    load,
    prune,
    resolve_target,
)
from prunetune.api._search import run_search

__all__ = [
    "GroupSummary",
    "Inspection",
    "PruneResult",
    "as_target",
    "inspect",
    "load",
    "prune",
    "resolve_target",
    "run_search",
]
