"""Prefect tasks: one task run per command, so the dashboard shows each one."""

from .command import execute_as_task, run_command

__all__ = ["execute_as_task", "run_command"]
