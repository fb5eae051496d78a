"""Whether a latency table's timings can be trusted: repeats that agree, no point standing far
off its neighbours; measured again when not, refused when still not (:class:`Stability`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from prunetune.backend.errors import PrunetuneError
from prunetune.estimators._timing import Statistic, spread

__all__ = [
    "MAX_SPREAD",
    "OUTLIER_FACTOR",
    "REFUSE_FACTOR",
    "Stability",
    "UnstableTimingError",
    "find_outliers",
]

MAX_SPREAD = 1.0
"""A table point whose repeats spread more than this (interquartile range over the median) is
measured again, twice at most; if it stays so, it keeps the fastest run of all its
measurements (a busy machine only ever slows a run down) and counts as unsteady
(``settings["unsteady_points"]``; the command line then advises a quiet machine). On this
project's 2-core machine at a load of 4, a third of small-layer measurements spread 0.5-1.5
while their medians moved by 15%: spread alone is a symptom, not a wrong figure."""

OUTLIER_FACTOR = 3.0
"""A table point more than this many times slower than its neighbours (allowing for a wider
layer) is measured again (see :func:`find_outliers`)."""

REFUSE_FACTOR = 10.0
"""A point still this far from its neighbours after re-measuring refuses the profile (a loaded
machine once left entries 1000x off, and no layer's time jumps 10x between grid points)."""

_REMEASURES = 2


class UnstableTimingError(PrunetuneError):
    """Timings on this machine disagree too much for a profile to predict with."""


@dataclass
class Stability:
    """What the table points of a profile did: how many, how many stayed unsteady or outliers
    after being measured again, and how many were measured again."""

    points: int = 0
    unsteady: int = 0
    outliers: int = 0
    remeasured: int = 0

    def steady_time(self, samples: Callable[[], list[float]], statistic: Statistic) -> float:
        """One table point's time in seconds: ``samples()`` (repeat times) taken again, at most
        :data:`_REMEASURES` more times, until their spread is within :data:`MAX_SPREAD`; then
        their median or minimum (``statistic``). Never steady: the fastest of all runs."""
        every: list[float] = []
        for attempt in range(1 + _REMEASURES):
            taken = samples()
            every += taken
            if spread(taken) <= MAX_SPREAD:
                self.points += 1
                return statistics.median(taken) if statistic == "median" else min(taken)
            self.remeasured += attempt == 0
        self.unsteady += 1  # the fastest run is the one a busy machine disturbed least
        self.points += 1
        return min(every)

    def remeasure_outliers(
        self,
        ms: np.ndarray,
        grids: Sequence[Sequence[int]],
        point: Callable[[tuple[int, ...]], float],
    ) -> None:
        """Time the :func:`find_outliers` of table ``ms`` (in place) again with ``point(index)``,
        keeping the faster figure (a stall only ever slows a run down); what still stands
        :data:`REFUSE_FACTOR` times off its neighbours counts in :attr:`outliers`."""
        for _ in range(_REMEASURES):
            flagged = find_outliers(ms, grids)
            self.remeasured += len(flagged)
            for index in flagged:
                ms[index] = min(ms[index], point(index))
        self.outliers += len(find_outliers(ms, grids, REFUSE_FACTOR))

    def check(self, threads: int) -> None:
        """Refuse a profile whose outliers did not go away when measured again.

        Raises:
            UnstableTimingError: a point still stands :data:`REFUSE_FACTOR` times from its
                neighbours.
        """
        if self.outliers == 0:
            return
        raise UnstableTimingError(
            f"timings on this machine are unstable: {self.outliers} of {self.points} table "
            f"points stood {REFUSE_FACTOR:g}x off their neighbours even measured again "
            f"({self.unsteady} varied by more than {100 * MAX_SPREAD:.0f}% between repeats); the "
            f"profile would mispredict. Profile on a quiet machine with --threads 1 (now "
            f"{threads}), or with more --repeats"
        )


def find_outliers(
    ms: np.ndarray, grids: Sequence[Sequence[int]], factor: float = OUTLIER_FACTOR
) -> list[tuple[int, ...]]:
    """Indices of table points that stand ``factor`` times above their neighbours along either
    axis: slower than both (an interior point), or than its narrower neighbour by more than the
    width grows (the widest point). The narrowest point is not judged: width-1 layers take
    another, slower kernel (a 1-channel BatchNorm ran 5-11x slower than a 40-channel one)."""
    flagged: set[tuple[int, ...]] = set()
    for axis, widths in enumerate(grids):
        if not widths:
            continue
        lines = (
            [ms]
            if ms.ndim == 1
            else [ms[i] if axis == 1 else ms[:, i] for i in range(ms.shape[1 - axis])]
        )
        for other, line in enumerate(lines):
            for k in range(1, len(line)):
                near = [j for j in (k - 1, k + 1) if j < len(line)]
                if all(line[k] > factor * line[j] * max(1.0, widths[k] / widths[j]) for j in near):
                    flagged.add((k,) if ms.ndim == 1 else ((other, k) if axis == 1 else (k, other)))
    return sorted(flagged)
