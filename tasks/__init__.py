"""Prefect tasks: one task run per command, so the dashboard shows each one; and the ``dispatch.*`` events."""

from .command import (
    BatchContext,
    CommandReport,
    execute_as_task,
    install_run_logging,
    run_command,
    run_resumable_command,
)

__all__ = [
    "BatchContext",
    "CommandReport",
    "execute_as_task",
    "install_run_logging",
    "run_command",
    "run_resumable_command",
]
