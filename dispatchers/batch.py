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
import math
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import NoReturn, Self

from aip.budget import Budget, Deadline
from aip.messages import Command, Result, ResultStatus

from .base import assign_call_ids, error_result, skipped_result
from .errors import CommandTimeout
from .interrupt import Interrupted, Interruption, current_interruption

__all__ = ["BatchPolicy", "CancelAt", "ExecutionMode", "ResultListener", "RunOne", "run_batch"]

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
    *,
    alone_in_task: bool = False,
) -> list[Result]:
    """Run ``commands`` through ``run_one`` and return one Result each, by ``deadline``.

    At the deadline, or when the batch is interrupted, commands in flight get
    ``budget.settle`` seconds to end by their own timeouts (or answer the
    interruption); whatever is still running then is cancelled, and given
    ``budget.unwind`` seconds to unwind.

    ``alone_in_task`` is the caller's word that ``run_one`` ends promptly
    once its task is cancelled (it never carries on past a second
    ``CancelledError``): a batch of one command, not under an
    ``Interruption``, then runs in the caller's task (see ``_alone``).
    """
    batch = assign_call_ids(commands)
    interruption = current_interruption()
    if alone_in_task and interruption is None and len(batch) == 1:
        return [await _alone(batch[0], run_one, deadline, on_result, budget)]
    results: list[Result | None] = [None] * len(batch)
    started = [False] * len(batch)
    failed = False  # whether a command has failed, for stop_on_failure
    finished = 0  # how many commands have their Result

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
            result = await _result_of(command, run_one, deadline)
            if result.status is _FAILURE:
                failed = True
        results[index] = result
        finished += 1
        if on_result is not None:
            _tell(on_result, index, command, result)

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


async def _alone(
    command: Command, run_one: RunOne, deadline: Deadline, on_result: ResultListener | None, budget: Budget
) -> Result:
    """A batch of one, run in the caller's task: what the driver task does, without the task.

    A driver task of its own costs a batch of one a task and two turns of
    the event loop (one to start the driver, one to wake the caller): about
    35 µs of CPU on a call of under a millisecond (``bench/local_overhead.py``).
    Here the wait's end, ``settle`` past the deadline, cancels this task
    instead; a ``run_one`` cancelled at the deadline by its own timeout is
    then cancelled a second time, which also ends a clean-up that shields
    itself from the first (MCP's courtesy cancel to the server does). A
    Result that comes after that is too late, as it is for the driver: the
    command's Result is its timeout.
    """
    if deadline.expired:  # as the driver does: nothing runs, the listener hears of it
        late = error_result(command, CommandTimeout(deadline.seconds))
        if on_result is not None:
            _tell(on_result, 0, command, late)
        return late
    try:
        with CancelAt(deadline.expires_at + budget.settle, deadline) as wait:
            result = await _result_of(command, run_one, deadline)
    except CommandTimeout as timeout:  # the wait is over (what run_one raises is a Result already)
        return error_result(command, timeout)
    if wait.expired:  # the Result came once the wait was over: too late
        return error_result(command, CommandTimeout(deadline.seconds))
    if on_result is not None:
        _tell(on_result, 0, command, result)
    return result


async def _result_of(command: Command, run_one: RunOne, deadline: Deadline) -> Result:
    """``run_one``'s Result for ``command`` (by its own timeout too), or the failure it ended in: never an error."""
    try:
        result = await run_one(command, deadline if command.timeout is None else deadline.within(command.timeout))
    except Exception as error:  # the boundary: nothing but Results leaves a batch
        return error_result(command, error)
    if result.call_id != command.call_id:
        return error_result(command, f"the result came back for call_id {result.call_id!r}")
    return result


def _tell(on_result: ResultListener, index: int, command: Command, result: Result) -> None:
    try:
        on_result(index, result)
    except Exception:  # a listener's bug must not cost the batch its results
        logger.exception("result listener failed on %s[%s]", command.tool_name, command.call_id)


class CancelAt:
    """Cancels the task that makes it at ``when`` (asyncio's clock), for a ``with`` block in that task.

    asyncio.timeout's logic, without its object and its two coroutines: on
    the way out the cancel is taken back, and ``expired`` says whether it
    came; when it is what ended the block, ``timed_out`` raises what that
    becomes, by default ``CommandTimeout`` for ``deadline``. A ``with``
    block, not a coroutine: the awaits in it pass through no frame of its own.
    The instant is kept by its event loop's ``_Watch``, not a timer of its own.
    """

    __slots__ = ("_cancelling", "_task", "_watch", "deadline", "expired")

    def __init__(self, when: float, deadline: Deadline) -> None:
        task = asyncio.current_task()
        assert task is not None  # made where it is entered, in a task
        # Weakly: a watch holds its pending clocks, and through a task it would hold its own loop (the
        # key of ``_watches``), so a loop closed with a task inside a block would never be collected.
        # So a clock keeps no task alive: whoever awaits the task does (a batch's driver, a task group).
        self._task = weakref.ref(task)
        self._cancelling, self.expired, self.deadline = task.cancelling(), False, deadline
        loop = task.get_loop()
        last = _last_watch
        watch = last[1] if last is not None and last[0]() is loop else _watch_of(loop)
        self._watch = watch
        # _Watch.add, without a frame of its own: this runs for every attempt.
        watch.clocks[self] = when
        if when < watch.when:
            watch.arm(when, loop)

    def expire(self) -> None:
        """The instant has come (called by the watch)."""
        task = self._task()
        if task is not None:  # else nothing is left to stop
            self.expired = True
            task.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._watch.clocks.pop(self, None)
        if not self.expired:
            return
        task = self._task()
        if task is None:  # a task collected mid-block (its loop closed): its coroutine is being closed
            return
        if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
            task.uncancel()  # it ended before our cancel reached it: taken back unseen
            return
        if task.uncancel() > self._cancelling:  # cancelled by someone else too: theirs to handle
            return
        self.timed_out()

    def timed_out(self) -> NoReturn:
        """Our cancel ended the block."""
        raise CommandTimeout(self.deadline.seconds) from None


class _Watch:
    """The pending ``CancelAt``s of one event loop, under one timer, armed for the earliest of them.

    A timer per clock (made, pushed on the loop's heap and cancelled for
    every attempt and every batch of one) cost a call of under a millisecond
    several µs each (``bench/local_overhead.py``); here a clock is a dict
    entry, and a timer is armed only for a clock due before the armed one (a
    sequence of calls with the same timeout arms none). A timer finds the
    clocks due at its instant (none, if they have ended) and arms one for
    the earliest left; one armed for a later instant than a newer one comes
    to nothing, and an instant that has a timer pending gets no second one.
    The watch holds no timer and no loop (its clocks hold their tasks
    weakly): the loop's timers hold it, so a closed loop takes its watch
    with it.
    """

    __slots__ = ("clocks", "pending", "when")

    def __init__(self) -> None:
        self.clocks: dict[CancelAt, float] = {}
        self.when = math.inf  # the instant of the timer that counts; none armed: inf
        self.pending: set[float] = set()  # the instants timers are set for (a few: sooner ones came since)

    def _fire(self, due: float) -> None:
        self.pending.discard(due)
        if due != self.when:  # a timer since armed for a sooner instant counts instead
            return
        expired = [clock for clock, when in self.clocks.items() if when <= due]
        for clock in expired:
            del self.clocks[clock]
        self.when = math.inf
        if self.clocks:
            self.arm(min(self.clocks.values()), asyncio.get_running_loop())
        for clock in expired:
            clock.expire()

    def arm(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        self.when = when
        if when not in self.pending:  # a long clock outliving many short ones is armed once, not once each
            self.pending.add(when)
            loop.call_at(when, self._fire, when)


#: Each event loop's watch (a loop that is gone takes its watch with it).
_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watch] = weakref.WeakKeyDictionary()
#: The watch last looked up, with its loop (weakly): the loop of the next clock, nearly always, found
#: without building a weak reference to look it up (a watch outlives its loop until another's replaces it).
_last_watch: tuple[weakref.ref[asyncio.AbstractEventLoop], _Watch] | None = None


def _watch_of(loop: asyncio.AbstractEventLoop) -> _Watch:
    """``loop``'s watch, remembered as the last one looked up."""
    global _last_watch
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = _Watch()
    _last_watch = (weakref.ref(loop), watch)
    return watch


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
