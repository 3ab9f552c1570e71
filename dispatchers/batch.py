"""The batch engine: order, modes and the batch deadline, for every dispatcher.

``run_batch`` is where the invariants of DESIGN.md are enforced once for all
callers (the dispatchers and the Prefect flow alike): one Result per command,
in order, with its call_id; a failure is a Result, never an exception; when
the deadline passes, finished commands keep their results, the rest get
timeout failures, and the call returns at once, with nothing left running.
An interruption (``dispatchers.interrupt``) ends the batch the same way,
at once, with ``Interrupted`` failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from aip.budget import Budget, Deadline
from aip.messages import Command, Result, ResultStatus

from .base import assign_call_ids, error_result, skipped_result
from .errors import CommandTimeout
from .interrupt import Interrupted, Interruption, current_interruption

__all__ = ["BatchPolicy", "ExecutionMode", "ResultListener", "RunOne", "run_batch"]

logger = logging.getLogger("dispatchers")

#: Runs one command to its Result before the given deadline.
RunOne = Callable[[Command, Deadline], Awaitable[Result]]
#: Told of each Result as soon as it exists: (index in the batch, Result).
ResultListener = Callable[[int, Result], None]


class ExecutionMode(StrEnum):
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(frozen=True)
class BatchPolicy:
    """How a batch runs: one after the other, or concurrently up to a bound.

    With ``stop_on_failure``, commands not yet started when one fails come
    back ``skipped``.
    """

    mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    stop_on_failure: bool = False
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {self.max_concurrency}")


#: Members run_batch compares with for every command, as constants: an enum member
#: looked up on its class costs a descriptor call (Python 3.11).
_SEQUENTIAL, _FAILURE = ExecutionMode.SEQUENTIAL, ResultStatus.FAILURE


async def run_batch(
    commands: Sequence[Command],
    run_one: RunOne,
    deadline: Deadline,
    policy: BatchPolicy = BatchPolicy(),
    on_result: ResultListener | None = None,
    budget: Budget = Budget(),
) -> list[Result]:
    """Run ``commands`` through ``run_one`` and return one Result each, by ``deadline``.

    At the deadline, or when the batch is interrupted, commands in flight get
    ``budget.settle`` seconds to end by their own timeouts (or answer the
    interruption); whatever is still running then is cancelled, and given
    ``budget.unwind`` seconds to unwind.
    """
    batch = assign_call_ids(commands)
    results: list[Result | None] = [None] * len(batch)
    started = [False] * len(batch)
    failed = False  # whether a command has failed, for stop_on_failure
    finished = 0  # how many commands have their Result
    interruption = current_interruption()

    async def run(index: int, command: Command) -> None:
        nonlocal failed, finished
        if interruption is not None and interruption.asked:
            result = error_result(command, Interrupted(started=False))
        elif failed and policy.stop_on_failure:
            result = skipped_result(command, "skipped: an earlier command in the batch failed")
        elif deadline.expired:
            result = error_result(command, CommandTimeout(deadline.seconds))
        else:
            started[index] = True
            try:
                result = await run_one(
                    command, deadline if command.timeout is None else deadline.within(command.timeout)
                )
            except Exception as error:  # the boundary: nothing but Results leaves a batch
                result = error_result(command, error)
            if result.call_id != command.call_id:
                result = error_result(command, f"the result came back for call_id {result.call_id!r}")
            if result.status is _FAILURE:
                failed = True
        results[index] = result
        finished += 1
        if on_result is not None:
            try:
                on_result(index, result)
            except Exception:  # a listener's bug must not cost the batch its results
                logger.exception("result listener failed on %s[%s]", command.tool_name, command.call_id)

    # The driver says it is over itself, as its last step: the caller wakes one
    # loop iteration after it, not two (a done callback, then the waiter's), and
    # the driver is done by then.
    loop = asyncio.get_running_loop()
    over = loop.create_future()

    async def drive() -> None:
        try:
            if policy.mode is _SEQUENTIAL:
                for index, command in enumerate(batch):
                    await run(index, command)
            else:
                await _in_parallel(run, batch, policy.max_concurrency)
        finally:
            if not over.done():
                over.set_result(None)

    driver = loop.create_task(drive())
    try:
        if interruption is None:  # the common case: one timer, no waiter of its own
            # A Deadline is on asyncio's clock (time.monotonic): the wait ends at its own instant, plus settle.
            timer = loop.call_at(deadline.expires_at + budget.settle, _set_if_pending, over)
            try:
                await over
            finally:
                timer.cancel()
        else:
            await _until_done_or_interrupted(over, interruption, deadline.remaining() + budget.settle, budget.settle)
    finally:
        count = finished
        # The Results as they stand at the end of the wait (later ones are too late): a copy, unless none can come.
        outcome = results if count == len(batch) else list(results)
        if not driver.done():
            driver.cancel()
            await asyncio.wait({driver}, timeout=budget.unwind)
        elif not driver.cancelled() and driver.exception() is not None:
            raise driver.exception()  # type: ignore[misc]  # a bug in run(): never swallow it
    if interruption is not None and interruption.asked:
        return [
            result or error_result(command, Interrupted(started=ran))
            for command, result, ran in zip(batch, outcome, started, strict=True)
        ]
    if count == len(batch):  # the common case: no timeout to describe
        return outcome  # type: ignore[return-value]  # every item is a Result
    timeout = CommandTimeout(deadline.seconds)
    return [result or error_result(command, timeout) for command, result in zip(batch, outcome, strict=True)]


async def _in_parallel(run: Callable[[int, Command], Awaitable[None]], batch: list[Command], limit: int) -> None:
    """``run`` each command in a task of its own, at most ``limit`` at a time."""
    slots = asyncio.Semaphore(limit)

    async def run_in_slot(index: int, command: Command) -> None:
        async with slots:
            await run(index, command)

    async with asyncio.TaskGroup() as group:  # a failure cancels the siblings: nothing runs on unseen
        for index, command in enumerate(batch):
            group.create_task(run_in_slot(index, command))


async def _until_done_or_interrupted(
    over: asyncio.Future[None], interruption: Interruption, timeout: float, settle: float
) -> None:
    """Wait for ``over`` up to ``timeout``; if the batch is interrupted first, ``settle`` seconds more at most."""
    asked = asyncio.ensure_future(interruption.wait())
    try:
        await asyncio.wait({over, asked}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        asked.cancel()
    if interruption.asked and not over.done():
        await asyncio.wait({over}, timeout=settle)


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
