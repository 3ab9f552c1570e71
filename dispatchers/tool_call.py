"""Dispatchers that run a batch one tool call at a time, with retries.

Subclasses implement a single attempt (``call``) and say which commands are
safe to repeat (``is_repeatable``, for the retry policy's ``repeatable``);
this base adds the retry loop, the per-command deadline and
the batch engine, so every such transport behaves the same way.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Sequence
from functools import partial
from types import TracebackType

from aip.budget import Budget, Deadline
from aip.messages import Command, Result, RetryRule
from aip.retry import requested_retry

from .base import DEFAULT_TIMEOUT, BasicCommandDispatcher, assign_call_ids, error_result
from .batch import BatchPolicy, ResultListener, run_batch
from .errors import AttemptTimeout, CommandTimeout, describe
from .policy import AttemptObserver, RetryPolicy, observing_attempts

__all__ = ["ToolCallDispatcher"]

logger = logging.getLogger("dispatchers")


class _AttemptCounter:
    """Counts the attempts at one command, passing each on to the observer already in place."""

    def __init__(self, outer: AttemptObserver | None) -> None:
        self.outer = outer
        self.attempts = 1

    def attempt(self, number: int) -> None:
        self.attempts = number
        if self.outer is not None:
            self.outer.attempt(number)

    def retry(self, number: int, error: BaseException, delay: float) -> None:
        if self.outer is not None:
            self.outer.retry(number, error, delay)


class _AttemptClock:
    """The time limit of one attempt, for a ``with`` block around it in the task that runs it.

    asyncio.timeout's own logic, without its object and its two coroutines:
    on expiry the task is cancelled; on the way out that cancel is taken
    back, and, when it is the one that ended the call, the attempt timed out
    (``AttemptTimeout`` when the retry policy's attempt limit ended it,
    ``CommandTimeout`` when the deadline did). A ``with`` block, not a
    coroutine: the attempt's awaits pass through no frame of its own.
    """

    __slots__ = ("_cancelling", "_deadline", "_expired", "_limit", "_task", "_timer")

    def __init__(self, deadline: Deadline, limit: float | None, budget: Budget) -> None:
        task = asyncio.current_task()
        assert task is not None  # an attempt runs in the batch's driver task
        self._task, self._cancelling, self._expired = task, task.cancelling(), False
        self._deadline, self._limit = deadline, limit
        loop = asyncio.get_running_loop()
        # A Deadline is on asyncio's clock (time.monotonic): without an attempt limit, its own instant.
        when = deadline.expires_at if limit is None else loop.time() + budget.for_attempt(deadline.remaining(), limit)
        self._timer = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._timer.cancel()
        if not self._expired:
            return
        if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
            self._task.uncancel()  # it ended before our cancel reached it: taken back unseen
            return
        if self._task.uncancel() > self._cancelling:  # cancelled by someone else too: theirs to handle
            return
        if self._limit is not None and not self._deadline.expired:
            raise AttemptTimeout(self._limit) from None
        raise CommandTimeout(self._deadline.seconds) from None


def _log_retry(command: Command, attempt_number: int, error: BaseException, delay: float) -> None:
    logger.warning(
        "%s[%s] attempt %d failed (%s); retrying in %.2fs",
        command.tool_name,
        command.call_id,
        attempt_number,
        describe(error),
        delay,
    )


class ToolCallDispatcher(BasicCommandDispatcher):
    """Base of the dispatchers that execute commands themselves, one call each."""

    def __init__(
        self,
        *,
        retry: RetryPolicy = RetryPolicy(),
        batch: BatchPolicy = BatchPolicy(),
        command_timeout: float | None = None,
        budget: Budget = Budget(),
    ) -> None:
        if command_timeout is not None and not 0 < command_timeout < float("inf"):
            raise ValueError(f"command_timeout must be a number of seconds above 0, not {command_timeout!r}")
        self.retry = retry
        self.batch = batch
        self.command_timeout = command_timeout
        self.budget = budget
        # The policy of the last batch retry rule seen: a device's batch sets one rule for all its commands.
        self._rule_policy: tuple[RetryRule, RetryPolicy] | None = None

    @abstractmethod
    async def call(self, command: Command) -> Result:
        """Make one attempt at ``command``: its success Result, or a raised ``CommandError``."""

    def is_repeatable(self, command: Command) -> bool:
        """Whether running ``command`` twice is harmless; only then is a sent call retried."""
        return False

    async def execute_command(self, command: Command, deadline: Deadline) -> Result:
        """Run one command with retries, by ``deadline`` (and its own timeout)."""
        if self.command_timeout is not None:
            deadline = deadline.within(self.command_timeout)
        rule = requested_retry.get()
        if rule is not None:  # on a device: the batch's own policy, and the Result says how many tries it took
            return await self._following(rule, command, deadline)
        # RetryPolicy.call, with its first attempt made here: a call that succeeds at once (most do) passes
        # through no coroutine of the policy's or of the attempt's; every resumption of the call passes
        # through each coroutine around it.
        observer = observing_attempts.get()
        if observer is not None:
            observer.attempt(1)
        try:
            with _AttemptClock(deadline, self.retry.attempt_timeout, self.budget):
                return await self.call(command)
        except Exception as error:
            failure = error
        try:
            return await self.retry.after(
                failure,
                partial(self._attempt, command, deadline),
                deadline,
                repeatable=partial(self.is_repeatable, command),
                on_retry=partial(_log_retry, command),
            )
        except Exception as error:
            return self.naming_the_server(command, error_result(command, error))

    async def _following(self, rule: RetryRule, command: Command, deadline: Deadline) -> Result:
        """``execute_command`` under a batch's retry rule, counting the attempts (for ``Result.attempts``)."""
        counter = _AttemptCounter(observing_attempts.get())
        token = observing_attempts.set(counter)
        known = self._rule_policy
        if known is None or known[0] is not rule:
            known = self._rule_policy = (rule, self.retry.following(rule))
        try:
            result = await known[1].call(
                partial(self._attempt, command, deadline),
                deadline,
                repeatable=partial(self.is_repeatable, command),
                on_retry=partial(_log_retry, command),
            )
        except Exception as error:
            result = self.naming_the_server(command, error_result(command, error))
        finally:
            observing_attempts.reset(token)
        return result.model_copy(update={"attempts": counter.attempts})

    async def _attempt(self, command: Command, deadline: Deadline) -> Result:
        """One attempt at ``command``, ended by the retry policy's attempt timeout or ``deadline``."""
        with _AttemptClock(deadline, self.retry.attempt_timeout, self.budget):
            return await self.call(command)

    async def execute_commands(
        self,
        commands: Sequence[Command],
        timeout: float = DEFAULT_TIMEOUT,
        on_result: ResultListener | None = None,
    ) -> list[Result]:
        try:
            deadline = Deadline.after(timeout)
        except ValueError as error:  # still one Result per command, never an exception
            return self.generate_error_results(assign_call_ids(commands), error)
        return await run_batch(commands, self.execute_command, deadline, self.batch, on_result, self.budget)
