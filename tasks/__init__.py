"""Prefect tasks: one task run per command, so the dashboard shows each one; and the ``dispatch.*`` events.

The names below are resolved lazily (PEP 562), as in ``dispatchers``: the
terminal reads a ``CommandReport`` (``tasks.report``) without importing
Prefect, which ``tasks.command`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .command import BatchContext, execute_as_task, install_run_logging, run_command, run_resumable_command
    from .report import CommandReport

_EXPORTS = {
    "BatchContext": "command",
    "CommandReport": "report",
    "execute_as_task": "command",
    "install_run_logging": "command",
    "run_command": "command",
    "run_resumable_command": "command",
}

__all__ = [
    "BatchContext",
    "CommandReport",
    "execute_as_task",
    "install_run_logging",
    "run_command",
    "run_resumable_command",
]


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
