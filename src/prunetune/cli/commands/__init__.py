"""The subcommands of ``prunetune``; each module has ``register(subparsers)``."""

from __future__ import annotations

from types import ModuleType

from prunetune.cli.commands import estimate, inspect, profile, prune, search, train

COMMANDS: tuple[ModuleType, ...] = (train, prune, inspect, profile, estimate, search)

__all__ = ["COMMANDS"]
