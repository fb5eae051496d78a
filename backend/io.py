"""Atomic file writes and up-front checks that an output location is writable."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prunetune.backend.errors import PrunetuneError

__all__ = ["atomic_directory", "atomic_write", "check_writable"]


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


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(temporary_path)``, then rename it over ``path``.

    A reader never sees a half-written file, and a failure leaves the old file (or none).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling directory, then swap it in for ``path`` when the block succeeds.

    On failure the temporary directory is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
