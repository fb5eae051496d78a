"""Ray Tune orchestration of the pruned-architecture search, and the ``prunetune`` CLI.

``run_search(SearchConfig(...))`` runs one search end to end: the dense model (trained first
when no checkpoint is given), trials over the chosen spaces under Ray Tune (OptunaSearch + ASHA,
locally or on a cluster, resumable), then the best subnet finetuned, exported to
``runs/<name>/best`` and reported in ``runs/<name>/report.md``.
"""

from typing import TYPE_CHECKING, Any

from prunetune.search._config import SearchConfig
from prunetune.search._result import SearchResult, TrialRecord

if TYPE_CHECKING:
    from prunetune.search._run import run_search

__all__ = ["SearchConfig", "SearchResult", "TrialRecord", "run_search"]


def __getattr__(name: str) -> Any:
    if name == "run_search":  # imports Ray Tune: only when used, so the other commands start fast
        from prunetune.search._run import run_search

        return run_search
    raise AttributeError(f"module 'prunetune.search' has no attribute {name!r}")
