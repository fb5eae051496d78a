"""ASHA, run separately for each space.

Every space reports the search metric (``acc`` by default) while it searches, but they measure
different things: DSA the soft-pruned network, DAIS the indicator-masked one, ``ratios`` its
finetuned subnet. Stopping a DSA trial because a ratios trial reported a higher number at the same
iteration would compare unlike with unlike, so each space gets its own ASHA, and trials compete
only with trials of the same space. (Across spaces, only the final value, after the common score
finetune, compares; the searcher sees that one.)
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

__all__ = ["PerSpaceASHA"]


class PerSpaceASHA(FIFOScheduler):
    """One :class:`ASHAScheduler` per space (``trial.config["space"]``).

    Args:
        metric: the reported metric ASHA ranks on.
        mode: ``max`` or ``min``.
        grace_period: reports a trial makes before it may be stopped.
        reduction_factor: only the best ``1 / reduction_factor`` of a rung go on.
        max_t: reports after which a trial is stopped anyway (large: trials end by themselves).
    """

    def __init__(
        self,
        metric: str = "acc",
        mode: str = "max",
        grace_period: int = 2,
        reduction_factor: float = 3,
        max_t: int = 1_000_000,
    ) -> None:
        super().__init__()
        self._metric = metric
        self._mode = mode
        self._options: dict[str, Any] = {
            "time_attr": "training_iteration",
            "metric": metric,
            "mode": mode,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
            "max_t": max_t,
        }
        self._by_space: dict[str, ASHAScheduler] = {}

    def _asha(self, trial: Any) -> ASHAScheduler:
        space = str((trial.config or {}).get("space", ""))
        if space not in self._by_space:
            self._by_space[space] = ASHAScheduler(**self._options)
        return self._by_space[space]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        """Register the trial with its space's ASHA."""
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        """Continue or stop, by the trial's standing among its own space's trials."""
        decision: str = self._asha(trial).on_trial_result(tune_controller, trial, result)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        """Record the final result in the space's rungs."""
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        """Forget a removed trial."""
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        """One ASHA summary per space."""
        return "\n".join(f"{space}: {a.debug_string()}" for space, a in self._by_space.items())

    def save(self, checkpoint_path: str) -> None:
        """Pickle the per-space state (Tune saves schedulers with the experiment)."""
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        """Inverse of :meth:`save`."""
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
