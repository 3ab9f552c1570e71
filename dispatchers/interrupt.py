"""Ctrl-C for a batch: the batches running under an ``Interruption`` end now, each command with a Result.

An interruption is a deadline that comes early and says so: commands that
finished keep their Results, those running are cancelled and fail
``Interrupted``, those not started fail ``Interrupted`` without running. The
request travels in a ContextVar, set by whoever owns the terminal around the
work it may interrupt, so the batch engine and the flow read it without a
parameter (flow parameters must be JSON) and nothing here learns of signals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from aip.failure import failure_cause
from aip.messages import Command, Result

from .base import error_result
from .errors import CommandError

__all__ = [
    "Interrupted",
    "Interruption",
    "current_interruption",
    "interruptible",
    "unless_interrupted",
    "was_interrupted",
]


class Interrupted(CommandError):
    """The user stopped the batch (Ctrl-C) before this command had a Result."""

    kind = "Interrupted"

    def __init__(self, *, started: bool) -> None:
        if started:
            super().__init__("stopped by the user (Ctrl-C) while it ran; it may have had effects")
        else:
            super().__init__("stopped by the user (Ctrl-C) before it started; it did not run", sent=False)


class Interruption:
    """Asked once (``interrupt``), seen by every batch running in the context it was installed in."""

    def __init__(self) -> None:
        self._asked = asyncio.Event()

    def interrupt(self) -> None:
        self._asked.set()

    @property
    def asked(self) -> bool:
        return self._asked.is_set()

    async def wait(self) -> None:
        await self._asked.wait()

    def __repr__(self) -> str:
        return f"Interruption(asked={self.asked})"


_current: ContextVar[Interruption | None] = ContextVar("dispatch_interruption", default=None)


def current_interruption() -> Interruption | None:
    return _current.get()


@contextmanager
def interruptible() -> Iterator[Interruption]:
    """An ``Interruption`` for the batches run inside this block (and the tasks they start)."""
    interruption = Interruption()
    token = _current.set(interruption)
    try:
        yield interruption
    finally:
        _current.reset(token)


async def unless_interrupted(command: Command, work: Awaitable[Result]) -> Result:
    """``work``'s Result, or an ``Interrupted`` failure as soon as the user asks (``work`` is then cancelled).

    Once we cancel it, whatever ``work`` ends with (a Result, the cancellation,
    an error its cancellation raised) is the interruption's doing.
    """
    interruption = current_interruption()
    if interruption is None:
        return await work
    if interruption.asked:
        _close(work)
        return error_result(command, Interrupted(started=False))
    running = asyncio.ensure_future(work)
    asked = asyncio.ensure_future(interruption.wait())
    try:
        await asyncio.wait({running, asked}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        asked.cancel()
        cancelled_by_us = not running.done()
        if cancelled_by_us:
            running.cancel()
            await asyncio.wait({running})
    if cancelled_by_us:
        return error_result(command, Interrupted(started=True))
    return running.result()


def was_interrupted(command: Command, result: Result) -> bool:
    """Whether ``result`` is an interruption's failure (a Ctrl-C after the last Result interrupted nothing)."""
    return failure_cause(command, result).startswith(f"{Interrupted.kind}: ")


def _close(work: Awaitable[Result]) -> None:
    """A coroutine never awaited must be closed, or Python warns about it."""
    close = getattr(work, "close", None)
    if close is not None:
        close()
