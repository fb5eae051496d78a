"""Atomic file writes and up-front checks that an output location is writable.

Writes go to a hidden temporary sibling (``.NAME.XXXXXXXX``) renamed over the target when
complete, so a reader never sees half a file; one left behind by a killed process is removed by
the next write of the same target (or :func:`clear_stale_temporaries`). A write that fails for
lack of space (or any other ``OSError``) raises :class:`OutputError`: one line, nothing left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prunetune.backend.errors import PrunetuneError

__all__ = [
    "OutputError",
    "atomic_directory",
    "atomic_write",
    "check_new_file",
    "check_writable",
    "clear_stale_temporaries",
]

# what tempfile.mkstemp/mkdtemp add to our prefixes: 8 of [a-z0-9_]
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(?:old\.)?[a-z0-9_]{8}")


class OutputError(PrunetuneError):
    """An output could not be written (no space left, no permission...); nothing was left."""

    @classmethod
    def wrap(cls, exc: OSError, target: Path, outcome: str = "nothing was written") -> OutputError:
        """The one-line error for ``exc`` raised while writing ``target``.

        Args:
            exc: the error.
            target: what was being written.
            outcome: what the user has now, and how to go on.

        Returns:
            The error to raise.
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        advice = (
            "free some space or write elsewhere"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the path and its permissions"
        )
        return cls(f"cannot write {str(target)!r}: {reason}; {outcome} ({advice})")


def check_writable(path: str | Path, *, directory: bool = False) -> Path:
    """Check, before any work starts, that ``path`` can be written; create nothing.

    Args:
        path: a file (or, with ``directory=True``, a directory) that will be written later.
        directory: whether ``path`` names a directory.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        PrunetuneError: the nearest existing ancestor is not a writable directory, or ``path``
            exists with the wrong kind.
    """
    target = Path(path)
    if target.exists():
        if directory and not target.is_dir():
            raise PrunetuneError(f"output {str(target)!r} exists and is not a directory")
        if not directory and target.is_dir():
            raise PrunetuneError(f"output {str(target)!r} is a directory; give a file name")
    ancestor = target if directory and target.exists() else target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PrunetuneError(f"cannot write {str(target)!r}: {str(ancestor)!r} is not a directory")
    try:  # os.access says yes to root everywhere; only a real attempt tells
        handle, probe = tempfile.mkstemp(prefix=".prunetune-probe.", dir=ancestor)
    except OSError as exc:
        raise PrunetuneError(
            f"cannot write {str(target)!r}: directory {str(ancestor)!r} is not writable "
            f"({exc.strerror or exc})"
        ) from exc
    os.close(handle)
    os.unlink(probe)
    return target


def check_new_file(path: str | Path, overwrite: bool = False) -> Path:
    """:func:`check_writable` for a file that must not replace one the user has, unless asked.

    Args:
        path: the file to write later.
        overwrite: whether an existing file may be replaced.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        PrunetuneError: ``path`` exists and ``overwrite`` is false, or see
            :func:`check_writable`.
    """
    target = check_writable(path)
    if target.exists() and not overwrite:
        raise PrunetuneError(
            f"output {str(target)!r} exists; pass --overwrite to replace it, or choose another "
            "file name"
        )
    return target


def clear_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the hidden temporaries a killed write left in ``folder`` (of ``name``, or all).

    Args:
        folder: the folder to clear.
        name: only the temporaries of this target name; ``None``: every one.

    Returns:
        The paths removed.
    """
    directory = Path(folder)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write a file through ``write(temporary_path)``, then rename it over ``path``.

    A reader never sees a half-written file, and a failure leaves the old file (or none).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(target.parent, target.name)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
    except OSError as exc:
        raise OutputError.wrap(exc, target) from exc
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise OutputError.wrap(exc, target) from exc
        raise
    return target


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling directory, then swap it in for ``path`` when the block succeeds.

    On failure the temporary directory is removed and ``path`` is left as it was; an
    ``OSError`` (a full disk) becomes :class:`OutputError`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(target.parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())
    except OSError as exc:
        raise OutputError.wrap(exc, target) from exc
    try:
        yield staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError.wrap(exc, target) from exc
        raise
    try:
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError.wrap(exc, target) from exc
