"""prunetune: search for the best pruned subnet of a PyTorch network under a FLOPs, parameter or
latency target, and get it back physically pruned, finetuned and exported.

The Python API, on any ``nn.Module``:

- :func:`prune`: one-shot prune to a target (returns the pruned module, its spec and exact
  costs; ``.export(directory)`` writes it with parity checks);
- :func:`inspect`: the model's coupled channel groups, dense costs, layers kept whole and why;
- :func:`load`: an export back as a module, also without the model's source code;
- :func:`run_search`: the Ray Tune search over the DSA, DAIS, DDPNAS and direct-ratio spaces,
  ending in the finetuned, exported best subnet (the name ``search`` is the subpackage
  :mod:`prunetune.search`, which a function of that name would shadow).

The layers underneath are subpackages: :mod:`prunetune.backend` (tracing, surgery, training,
export), :mod:`prunetune.estimators` (FLOPs, params, latency), :mod:`prunetune.spaces` (the search
spaces) and :mod:`prunetune.search` (Ray Tune orchestration). ``prunetune`` on the command line
is :mod:`prunetune.cli`.

Attributes are imported on first use, so ``import prunetune`` stays cheap and the layers can be
imported on their own (Ray workers do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prunetune.api import Inspection, PruneResult, inspect, load, prune, run_search
    from prunetune.backend.errors import InfeasibleTargetError, PrunetuneError
    from prunetune.backend.spec import SubnetSpec
    from prunetune.estimators import Target
    from prunetune.search import SearchResult

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "prunetune.api",
    "inspect": "prunetune.api",
    "load": "prunetune.api",
    "PruneResult": "prunetune.api",
    "Inspection": "prunetune.api",
    "run_search": "prunetune.api",
    "SearchResult": "prunetune.search",
    "Target": "prunetune.estimators",
    "SubnetSpec": "prunetune.backend.spec",
    "PrunetuneError": "prunetune.backend.errors",
    "InfeasibleTargetError": "prunetune.backend.errors",
}

__all__ = [
    "InfeasibleTargetError",
    "Inspection",
    "PruneResult",
    "PrunetuneError",
    "SearchResult",
    "SubnetSpec",
    "Target",
    "__version__",
    "inspect",
    "load",
    "prune",
    "run_search",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prunetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
