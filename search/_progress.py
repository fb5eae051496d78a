"""The live progress line of a search: trials finished, running and failed, best so far, time.

On a terminal the line is redrawn in place; otherwise (a log file, a pipe) a line is written each
time the counts or the best accuracy change.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import tune

from prunetune.search._result import format_score

__all__ = ["ProgressLine", "format_elapsed"]


def format_elapsed(seconds: float) -> str:
    """``0:01:23``."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressLine(tune.Callback):
    """A Tune callback that keeps one status line on stderr.

    Args:
        total: trials the search runs in all.
        refresh_s: how often a terminal line is redrawn while nothing changes.
        metric: the search metric's name.
    """

    def __init__(self, total: int, refresh_s: float = 1.0, metric: str = "acc") -> None:
        self.total = total
        self.metric = metric
        self.refresh_s = refresh_s
        self._started = time.monotonic()
        self._shown = ""
        self._drawn_at = 0.0

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        """Restart the clock when a (resumed) search starts."""
        self._started = time.monotonic()
        self._shown = ""

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        """Redraw the line from the trials' states."""
        self._draw(trials, final=False)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Draw the last state and end the line."""
        self._draw(trials, final=True)

    def status(self, trials: list[Any]) -> str:
        """The line, without the elapsed time."""
        finished = sum(t.status == "TERMINATED" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        scored = [
            float(t.last_result[self.metric])
            for t in trials
            if t.last_result and t.last_result.get("feasible") and "spec_json" in t.last_result
        ]
        best = format_score(self.metric, max(scored)) if scored else "-"
        return (
            f"trials {finished}/{self.total} finished, {running} running, {failed} failed"
            f" | best feasible {self.metric} {best}"
        )

    def _draw(self, trials: list[Any], final: bool) -> None:
        line = self.status(trials)
        now = time.monotonic()
        elapsed = format_elapsed(now - self._started)
        stream = sys.stderr
        if stream.isatty():
            if line != self._shown or now - self._drawn_at >= self.refresh_s or final:
                stream.write(f"\r\033[K{line} | {elapsed}" + ("\n" if final else ""))
                stream.flush()
                self._drawn_at = now
        elif line != self._shown:
            stream.write(f"{line} | {elapsed}\n")
            stream.flush()
        self._shown = line
