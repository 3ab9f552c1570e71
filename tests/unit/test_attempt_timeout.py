"""An attempt's own timeout: the cancellation it uses is taken back, and only its own becomes a timeout.

``ToolCallDispatcher.execute_command`` times an attempt as ``asyncio.timeout``
does, without its object: these tests hold it to the same contract. The task
that ran a timed-out attempt is left with no cancellation pending (so the
next attempt, and the batch engine around it, see nothing), and a
cancellation from outside stays a cancellation, never a timeout Result.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aip.backoff import Backoff
from aip.budget import Deadline
from aip.messages import Command, ResultStatus
from dispatchers import InMemoryCommandDispatcher, RetryPolicy

ONCE = RetryPolicy(attempts=1)


def hung(started: asyncio.Event | None = None) -> Any:
    async def tool(command: Command) -> Any:
        if started is not None:
            started.set()
        await asyncio.Event().wait()

    return tool


async def test_a_timed_out_attempt_leaves_its_task_with_no_cancellation_pending() -> None:
    dispatcher = InMemoryCommandDispatcher({"hung": hung()}, retry=ONCE)
    task = asyncio.current_task()
    assert task is not None

    result = await dispatcher.execute_command(Command(tool_name="hung", call_id="h"), Deadline.after(0.05))

    assert (result.error or "").endswith("TimeoutError: no result within 0.05s")
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left over to land here


async def test_every_retried_attempt_times_out_on_its_own_and_leaves_nothing_pending() -> None:
    calls: list[int] = []

    async def hangs(command: Command) -> Any:
        calls.append(1)
        await asyncio.Event().wait()

    retry = RetryPolicy(attempts=3, attempt_timeout=0.05, backoff=Backoff(initial=0, maximum=0, jitter=0))
    dispatcher = InMemoryCommandDispatcher({"hangs": hangs}, retry=retry)
    task = asyncio.current_task()
    assert task is not None

    result = await dispatcher.execute_command(Command(tool_name="hangs", call_id="h"), Deadline.after(10))

    assert result.status is ResultStatus.FAILURE
    assert "no result within 0.05s" in (result.error or "")
    assert len(calls) == 3
    assert task.cancelling() == 0


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    started = asyncio.Event()
    dispatcher = InMemoryCommandDispatcher({"hung": hung(started)}, retry=ONCE)
    running = asyncio.ensure_future(
        dispatcher.execute_command(Command(tool_name="hung", call_id="h"), Deadline.after(10))
    )
    await started.wait()

    running.cancel()

    with pytest.raises(asyncio.CancelledError):
        await running


async def test_a_cancellation_from_outside_during_the_timeout_is_not_a_timeout() -> None:
    """The attempt times out, and its task is cancelled once more before the attempt ends: cancelled, not timed out."""

    async def cancelled_twice(command: Command) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # a second request, as from a caller giving up at that moment
            raise

    dispatcher = InMemoryCommandDispatcher({"twice": cancelled_twice}, retry=ONCE)
    running = asyncio.ensure_future(
        dispatcher.execute_command(Command(tool_name="twice", call_id="t"), Deadline.after(0.05))
    )

    with pytest.raises(asyncio.CancelledError):
        await running


async def test_an_attempt_that_ignores_the_timeout_keeps_its_result_and_leaves_nothing_pending() -> None:
    async def shrugs(command: Command) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "finished anyway"
        return "never"

    dispatcher = InMemoryCommandDispatcher({"shrugs": shrugs}, retry=ONCE)
    task = asyncio.current_task()
    assert task is not None

    result = await dispatcher.execute_command(Command(tool_name="shrugs", call_id="s"), Deadline.after(0.05))

    assert result.status is ResultStatus.SUCCESS
    assert result.result == "finished anyway"
    assert task.cancelling() == 0
