"""One exception tree for prunetune: callers can catch ours, and the CLI maps them to exit 2."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "DeviceError",
    "DivergedError",
    "InfeasibleTargetError",
    "PrunetuneError",
    "SpecError",
    "TrainingError",
    "UnsupportedModelError",
]


class PrunetuneError(Exception):
    """Base class of every error prunetune raises on purpose.

    The command line prints the message on one line and exits with code 2, so messages say what
    was wrong and how to fix it.
    """


class UnsupportedModelError(PrunetuneError):
    """A model name is unknown, a factory cannot be imported, or a model cannot be traced."""


class DataError(PrunetuneError):
    """A dataset name is unknown, or its directory is missing or malformed."""


class DeviceError(PrunetuneError):
    """A device is not available here, or a model or batch does not fit its memory."""


class TrainingError(PrunetuneError):
    """Training diverged (a non-finite loss) or a loss or metric does not fit the outputs."""


class DivergedError(TrainingError):
    """The training loss became NaN or infinite: the run stopped before the weights did."""


class CheckpointError(PrunetuneError):
    """A checkpoint or export directory is missing, corrupt or made for another architecture."""


class SpecError(PrunetuneError):
    """A SubnetSpec does not fit the model it is applied to (unknown group, width out of range)."""


class InfeasibleTargetError(PrunetuneError):
    """A cost target cannot be met by any subnet of the model, or is above the dense model."""
