"""The subcommands of ``prunetune``; each module has ``register(subparsers)``."""

from __future__ import annotations

from types import ModuleType

from search.commands import train

COMMANDS: tuple[ModuleType, ...] = (train,)

__all__ = ["COMMANDS"]
