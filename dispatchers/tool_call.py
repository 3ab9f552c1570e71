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
from typing import NoReturn

from aip.budget import Budget, Deadline
from aip.messages import Command, Result, RetryRule
from aip.retry import requested_retry

from .base import DEFAULT_TIMEOUT, BasicCommandDispatcher, assign_call_ids, error_result
from .batch import BatchPolicy, CancelAt, ResultListener, run_batch
from .errors import AttemptTimeout, describe
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


class _AttemptClock(CancelAt):
    """The time limit of one attempt, for a ``with`` block around it in the task that runs it.

    When its cancel is what ended the call, the attempt timed out:
    ``AttemptTimeout`` when the retry policy's attempt limit ended it,
    ``CommandTimeout`` when the deadline did.
    """

    __slots__ = ("_limit",)

    def __init__(self, deadline: Deadline, limit: float, budget: Budget) -> None:
        super().__init__(asyncio.get_running_loop().time() + budget.for_attempt(deadline.remaining(), limit), deadline)
        self._limit = limit

    def timed_out(self) -> NoReturn:
        if not self.deadline.expired:
            raise AttemptTimeout(self._limit) from None
        super().timed_out()


def _attempt_clock(deadline: Deadline, limit: float | None, budget: Budget) -> CancelAt:
    """The clock of one attempt: without an attempt limit, the deadline's own instant (on asyncio's clock)."""
    return CancelAt(deadline.expires_at, deadline) if limit is None else _AttemptClock(deadline, limit, budget)


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

    #: Whether ``call`` ends promptly once its task is cancelled (twice at most), so that a
    #: batch of one may run in the caller's task (``run_batch``'s ``alone_in_task``). A cancel
    #: from outside (the caller's own) then reaches the call at once, with no driver's
    #: ``unwind`` bounding it: a clean-up the call shields from it (MCP's courtesy cancel to
    #: its server, up to 5 s) runs to its end, unless the batch's wait ends first.
    calls_end_when_cancelled = False

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
        """Make one attempt at ``command``: its success Result, or a raised ``CommandError``.

        The Result is a new one, the call's own: the dispatcher fills in its ``attempts``.
        """

    def is_repeatable(self, command: Command) -> bool:
        """Whether running ``command`` twice is harmless; only then is a sent call retried."""
        return False

    async def execute_command(self, command: Command, deadline: Deadline) -> Result:
        """Run one command with retries, by ``deadline`` (and its own timeout).

        On a device, the batch's retry rule (``requested_retry``) is the
        policy, and the Result says how many tries it took (``attempts``).
        The first attempt is made here, as ``RetryPolicy.call`` would: a call
        that succeeds at once (most do) passes through no coroutine of the
        policy's or of the attempt's, and builds no retry loop, counter or
        copy of its Result; every resumption of the call passes through each
        coroutine around it.
        """
        if self.command_timeout is not None:
            deadline = deadline.within(self.command_timeout)
        rule = requested_retry.get()
        observer = observing_attempts.get()
        if observer is not None:
            observer.attempt(1)
        try:
            with _attempt_clock(deadline, self.retry.attempt_timeout, self.budget):
                result = await self.call(command)
        except Exception as error:
            return await self._retried(rule, error, command, deadline, observer)
        if rule is not None:
            result.attempts = 1  # the call's own Result (see ``call``)
        return result

    async def _retried(
        self,
        rule: RetryRule | None,
        failure: Exception,
        command: Command,
        deadline: Deadline,
        observer: AttemptObserver | None,
    ) -> Result:
        """The rest of ``execute_command`` once its first attempt failed with ``failure``."""
        counter = _AttemptCounter(observer)
        token = observing_attempts.set(counter)
        try:
            result = await self._policy(rule).after(
                failure,
                partial(self._attempt, command, deadline),
                deadline,
                repeatable=partial(self.is_repeatable, command),
                on_retry=partial(_log_retry, command),
            )
        except Exception as error:
            result = self.naming_the_server(command, error_result(command, error))
        finally:
            observing_attempts.reset(token)
        return result if rule is None else result.model_copy(update={"attempts": counter.attempts})

    def _policy(self, rule: RetryRule | None) -> RetryPolicy:
        """The retry policy under ``rule`` (a batch's, on a device), else the dispatcher's own."""
        if rule is None:
            return self.retry
        known = self._rule_policy
        if known is None or known[0] is not rule:
            known = self._rule_policy = (rule, self.retry.following(rule))
        return known[1]

    async def _attempt(self, command: Command, deadline: Deadline) -> Result:
        """One attempt at ``command``, ended by the retry policy's attempt timeout or ``deadline``."""
        with _attempt_clock(deadline, self.retry.attempt_timeout, self.budget):
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
        return await run_batch(
            commands,
            self.execute_command,
            deadline,
            self.batch,
            on_result,
            self.budget,
            alone_in_task=self.calls_end_when_cancelled,
        )
