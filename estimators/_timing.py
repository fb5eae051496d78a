"""Timing forward passes on this machine: :func:`measure_latency` and what profiles share."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "MIN_REPEAT_S",
    "MODEL_MIN_S",
    "Statistic",
    "check_timing",
    "measure_latencies",
    "measure_latency",
    "spread",
    "steady_allocator",
    "time_ms",
    "time_samples",
    "torch_threads",
]

Statistic = Literal["median", "min"]
"""How repeated timings become one number: the median, or the minimum (steadier when busy)."""

MIN_REPEAT_S = 1e-3
"""Each timed repeat runs the op enough times to last at least this long (timer resolution)."""

MODEL_MIN_S = 0.2
"""Whole models are timed for at least this long in all (more repeats than asked for if need
be): on this project's machine the minimum of 7 single runs of MobileNetV2 at batch 1 varied
by +-7% between measurements, the minimum over 0.2 s (about 30 runs) by +-2.5%."""

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_steady = False


def steady_allocator() -> bool:
    """Keep freed memory in this process instead of giving it back to the OS (glibc only).

    By default glibc's ``malloc`` maps large blocks (a batch-32 activation) fresh and returns
    freed memory at the top of the heap, so a forward pass may page-fault its activations in
    again: on this project's machine the same dense MobileNetV2 at batch 32 took 121 ms or
    188 ms (35,000 page faults per pass) depending on the allocator's history, and an isolated
    1x1 conv of 64 channels took 16 ms against 8 ms for one of 96. Latency profiles and
    measurements call this first so that their times are the steady ones; a server gets the
    same by setting ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` in its environment
    or by preloading jemalloc or tcmalloc.

    The change lasts for the life of the process: memory it frees is reused by it, not
    returned (up to 1 GiB of free heap top is kept).

    Returns:
        Whether the steady setting is in effect (``False`` where the C library has no glibc
        ``mallopt``, as on macOS or musl).
    """
    global _steady
    if not _steady:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        _steady = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _steady


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


class _Clock:
    """Seconds of a block of work: wall time on the CPU; on a GPU, CUDA events recorded on the
    stream after synchronising, so queued kernels are counted and nothing else is."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def start(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_since(self, started: object) -> float:
        if not self.cuda:
            return time.perf_counter() - started  # type: ignore[operator]
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return started.elapsed_time(end) / 1e3  # type: ignore[attr-defined, no-any-return]


def time_ms(
    run: Callable[[], object],
    warmup: int,
    repeats: int,
    statistic: Statistic,
    min_total_s: float = 0.0,
    cuda: bool = False,
) -> float:
    """One figure (ms) from :func:`time_samples`: their median or minimum.

    With ``cuda``, times are CUDA event times taken after synchronising the device.
    """
    samples = time_samples(run, warmup, repeats, min_total_s, cuda=cuda)
    return (statistics.median(samples) if statistic == "median" else min(samples)) * 1e3


def spread(samples: Sequence[float]) -> float:
    """How much repeated timings disagree: the interquartile range over the median (0 with
    fewer than 4 samples, which cannot tell)."""
    if len(samples) < 4:
        return 0.0
    low, middle, high = np.percentile(np.asarray(samples), [25, 50, 75])
    return float((high - low) / middle) if middle > 0 else 0.0


def time_samples(
    run: Callable[[], object],
    warmup: int,
    repeats: int,
    min_total_s: float = 0.0,
    cuda: bool = False,
) -> list[float]:
    """Seconds per call of ``run``, one sample per timed repeat (each repeat loops the call
    long enough for the timer), at least ``repeats`` and more until they last ``min_total_s``.
    With ``cuda``, CUDA event times taken after synchronising the device.
    """
    clock = _Clock(cuda)
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        probes = []
        for _ in range(3):
            start = clock.start()
            run()
            probes.append(clock.seconds_since(start))
        # the fastest probe sizes the inner loop: one stalled run must not shrink it
        inner = max(1, int(MIN_REPEAT_S / max(min(probes), 1e-9)))
        samples: list[float] = []
        while len(samples) < repeats or (
            sum(samples) * inner < min_total_s and len(samples) < 100 * repeats
        ):
            start = clock.start()
            for _ in range(inner):
                run()
            samples.append(clock.seconds_since(start) / inner)
    return samples


def check_timing(threads: int | None, repeats: int, warmup: int, statistic: str) -> None:
    """Raise ``ValueError`` for a timing option out of range."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")


def measure_latency(
    model: nn.Module,
    example_input: Tensor,
    *,
    threads: int | None = None,
    repeats: int = 10,
    warmup: int = 3,
    statistic: Statistic = "median",
) -> float:
    """The latency of one forward pass of ``model`` on ``example_input``, in ms: the median
    (or, with ``statistic="min"``, the minimum) of the timed runs.

    At least ``repeats`` runs are timed, and more until they add up to 0.2 s, which steadies
    the figure for small models. On a GPU (``example_input`` on CUDA, the model with it) the
    times are CUDA event times after synchronising. The model runs in eval mode under
    ``torch.inference_mode`` with ``threads`` torch threads; its train/eval flags and torch's
    thread count are restored afterwards. The process is switched to :func:`steady_allocator`
    first, as profiles are.
    Whole-model measurements like this one are what :meth:`LatencyPredictor.calibrate` fits
    to; use the profile's ``threads``, ``statistic`` and batch size.

    Raises:
        ValueError: ``threads``, ``repeats`` or ``warmup`` out of range.
    """
    check_timing(threads, repeats, warmup, statistic)
    steady_allocator()
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch_threads(threads):
            run = lambda: model(example_input)  # noqa: E731
            cuda = example_input.device.type == "cuda"
            return time_ms(run, warmup, repeats, statistic, MODEL_MIN_S, cuda=cuda)
    finally:
        for module, training in modes.items():
            module.training = training


def measure_latencies(
    models: Sequence[nn.Module],
    example_input: Tensor,
    *,
    rounds: int = 3,
    threads: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    statistic: Statistic = "min",
) -> np.ndarray:
    """Latencies (ms) of several models on one input, for comparing them (a speed-up).

    The models are measured in turn, ``rounds`` times over, and each keeps its fastest
    measurement (each one :func:`measure_latency` with ``repeats`` and ``statistic``). A slow
    spell of the machine then hits every model alike instead of whichever was running.

    Returns:
        An array of shape ``(len(models),)``.

    Raises:
        ValueError: ``rounds``, ``threads``, ``repeats`` or ``warmup`` out of range.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    best = np.full(len(models), np.inf)
    for _ in range(rounds):
        for index, model in enumerate(models):
            ms = measure_latency(
                model,
                example_input,
                threads=threads,
                repeats=repeats,
                warmup=warmup,
                statistic=statistic,
            )
            best[index] = min(best[index], ms)
    return best
