"""Prefect tasks: one task run per command, so the dashboard shows each one."""

from .command import run_command

__all__ = ["run_command"]
