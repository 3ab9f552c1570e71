"""Prefect tasks: one task run per command, so the dashboard shows each one; and the ``dispatch.*`` events.

The names below are resolved lazily (PEP 562), as in ``dispatchers``: the
terminal reads a ``CommandReport`` (``tasks.report``) without importing
Prefect, which ``tasks.command`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatchers.lazy_names import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
