"""Interrupts are interrupts: SIGINT and SIGTERM stop a search cleanly, and a killed search's
Ray processes are found and ended by the next run of the same name.

While Tune runs the trials, a signal is handed to Tune's own stop handler (it stops the trials
and saves the experiment state one last time) and :func:`run_search` then raises
:class:`SearchInterrupted`; outside the trials (dense training, the final finetune) it raises at
once. Either way nothing is finetuned or exported from a partial search, and the command line
prints one line and exits with 128 + the signal number (130, 143). A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

__all__ = ["SESSION_FILE", "SearchInterrupted", "end_leftover_ray", "record_ray_session", "stops"]

SESSION_FILE = "ray-session.json"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by SIGINT or SIGTERM; its state is kept for ``--resume``.

    Attributes:
        signum: the signal received.
        exit_code: ``128 + signum``, as a shell reports a process a signal ended.
    """

    def __init__(self, signum: int, name: str, runs_dir: str | Path) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}: no subnet was finetuned or "
            f"exported; the finished trials are kept, continue with: prunetune search --name "
            f"{name} --runs-dir {runs_dir} --resume"
        )


@dataclass
class Stops:
    """What :func:`stops` saw: the first signal, and whether the trials are running."""

    name: str
    runs_dir: str
    received: list[int] = field(default_factory=list)
    in_trials: bool = False
    handler: Callable[[int, FrameType | None], None] | None = None

    def rearm(self) -> None:
        """Install the handlers again: ``ray.init`` puts in Ray's own for SIGTERM (a crash
        dump, then abort), so this runs once Ray is up."""
        if self.handler is not None:
            for signum in _SIGNALS:
                signal.signal(signum, self.handler)

    def check(self) -> None:
        """Raise :class:`SearchInterrupted` if a signal came.

        Raises:
            SearchInterrupted: a signal came.
        """
        if self.received:
            raise SearchInterrupted(self.received[0], self.name, self.runs_dir)

    @contextlib.contextmanager
    def trials(self) -> Iterator[None]:
        """Mark the block where Tune runs the trials; a signal inside it stops them gracefully."""
        self.in_trials = True
        try:
            yield
        finally:
            self.in_trials = False
        self.check()


@contextlib.contextmanager
def stops(name: str, runs_dir: str | Path) -> Iterator[Stops]:
    """Handle SIGINT and SIGTERM for the block (a search); see the module's description.

    Only the main thread can handle signals; elsewhere the block runs without handlers.

    Args:
        name: the run's name, for the message.
        runs_dir: the folder of runs, for the message.

    Yields:
        The :class:`Stops` of the block: mark the trials with :meth:`Stops.trials`, and call
        :meth:`Stops.rearm` once Ray is up.
    """
    state = Stops(name, str(runs_dir))
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if state.received:  # a second signal: stop now
            raise SearchInterrupted(state.received[0], state.name, state.runs_dir)
        state.received.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if state.in_trials and callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)  # Tune: stop the trials, save the state
            return
        state.check()

    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    usr1 = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours decides, and tells Tune
    state.handler = handle
    state.rearm()
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if usr1 is not None:
            signal.signal(signal.SIGUSR1, usr1)
        if tune_sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint


def record_ray_session(run_dir: Path) -> None:
    """Note this process and the Ray session it started in ``run_dir``, for
    :func:`end_leftover_ray` after a ``kill -9``. Nothing is noted for a cluster.

    Args:
        run_dir: the search's run folder (it exists).
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not getattr(node, "head", False):
        return
    record = {"driver_pid": os.getpid(), "session_dir": node.get_session_dir_path()}
    (run_dir / SESSION_FILE).write_text(json.dumps(record), encoding="utf-8")


def end_leftover_ray(run_dir: Path) -> list[int]:
    """End the Ray processes of a killed earlier search of ``run_dir``.

    A search killed with SIGKILL cannot shut its Ray session down. Its processes are those
    whose command line names the session directory it recorded (unique to that session); they
    are ended only when the driver that recorded it is gone.

    Args:
        run_dir: the search's run folder.

    Returns:
        The process ids signalled.
    """
    path = run_dir / SESSION_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        driver, session = int(record["driver_pid"]), str(record["session_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if driver != os.getpid() and _alive(driver):
        return []  # that search still runs
    ended = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in command:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
    path.unlink(missing_ok=True)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
