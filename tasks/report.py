"""What a command's run adds to its Result, free of Prefect: the terminal reads it without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandReport"]


@dataclass
class CommandReport:
    """What the dashboard shows of a command beyond its Result: attempts and time taken."""

    call_id: str | None
    attempts: int = 0
    seconds: float = 0.0
    reused: bool = False
