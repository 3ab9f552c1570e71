"""Retry policy as a value: printable, comparable, passed around.

Modelled on tenacity's small policy objects. A ``RetryPolicy`` says how often,
how patiently (``aip.backoff.Backoff``) and on which failures
(``retry_conditions``) to try a command again, within its ``Deadline``
(``aip.budget``). The retry loop itself is tenacity's, built by
``RetryPolicy.retrying`` for one command at a time, because the stop condition
depends on that command's remaining time.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from aip.backoff import Backoff
from aip.budget import Deadline
from aip.messages import RetryRule

from .retry_conditions import (
    RETRY_TOOL_ERRORS_TOO,
    RETRY_TRANSIENT,
    FailedAttempt,
    RetryCondition,
    never_repeatable,
    tool_error,
)

__all__ = ["AttemptObserver", "RetryListener", "RetryPolicy", "observing_attempts"]

T = TypeVar("T")


class AttemptObserver(Protocol):
    """Told of each attempt at a command and of each retry, by whoever runs it (see ``observing_attempts``)."""

    def attempt(self, number: int) -> None: ...

    def retry(self, number: int, error: BaseException, delay: float) -> None: ...


#: The observer of the commands run in this context: set by a caller (the
#: Prefect task, for the dashboard) around one command, so the dispatchers
#: need no hook of their own and keep nothing per command.
observing_attempts: ContextVar[AttemptObserver | None] = ContextVar("observing_attempts", default=None)

#: Called before each retry sleep with the attempt number that failed, its
#: error and the delay before the next attempt.
RetryListener = Callable[[int, BaseException, float], None]


#: ``attempts=None`` as it travels: a device of any version reads a whole number,
#: and the batch's deadline bounds its tries anyway.
_UNTIL_THE_DEADLINE = 2**31 - 1


@dataclass(frozen=True)
class RetryPolicy:
    """How to try a failed command again: how often, how patiently, and which failures.

    ``attempts`` counts the first try; None means as many as the deadline
    allows. ``backoff`` spaces the tries; ``when`` says which failures are
    worth another (``retry_conditions``); no retry is scheduled to start
    after the command's deadline. ``attempt_timeout`` caps one attempt (which,
    time permitting, is then retried); by default an attempt may use all the
    time left.
    """

    attempts: int | None = 3
    backoff: Backoff = Backoff(initial=0.4, maximum=5.0, jitter=0.5)
    when: RetryCondition = RETRY_TRANSIENT
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (or None: until the deadline), not {self.attempts}")
        if self.attempt_timeout is not None and not 0 < self.attempt_timeout < math.inf:
            raise ValueError(f"attempt_timeout must be a number of seconds above 0, not {self.attempt_timeout!r}")

    def to_rule(self) -> RetryRule:
        """This policy as it travels to a device (the attempt timeout stays the device's own).

        A condition travels as whether it retries tools' own errors: the
        device applies the standard condition, or the one with tool errors.
        """
        return RetryRule(
            attempts=_UNTIL_THE_DEADLINE if self.attempts is None else self.attempts,
            initial_delay=self.backoff.initial,
            max_delay=self.backoff.maximum,
            jitter=self.backoff.jitter,
            retry_tool_errors=tool_error in self.when,
        )

    def following(self, rule: RetryRule) -> RetryPolicy:
        """This policy, with what a batch's retry rule says (a jitter above 1 is read as 1)."""
        return replace(
            self,
            attempts=None if rule.attempts >= _UNTIL_THE_DEADLINE else rule.attempts,
            backoff=Backoff(rule.initial_delay, rule.max_delay, min(rule.jitter, 1.0)),
            when=RETRY_TOOL_ERRORS_TOO if rule.retry_tool_errors else RETRY_TRANSIENT,
        )

    def retrying(
        self,
        deadline: Deadline,
        should_retry: Callable[[BaseException], bool],
        on_retry: RetryListener | None = None,
    ) -> AsyncRetrying:
        """A tenacity loop for one command that must finish by ``deadline``."""

        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                error = state.outcome.exception()
                if error is not None:
                    on_retry(state.attempt_number, error, state.upcoming_sleep)

        stop = stop_before_delay(deadline.remaining())
        return AsyncRetrying(
            stop=stop if self.attempts is None else stop_after_attempt(self.attempts) | stop,
            wait=lambda state: self.backoff.delay(state.attempt_number),
            retry=retry_if_exception(should_retry),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        deadline: Deadline,
        *,
        repeatable: Callable[[], bool] = never_repeatable,
        on_retry: RetryListener | None = None,
    ) -> T:
        """``attempt()``, retried by this policy until it succeeds or must stop; then its last error is raised.

        ``repeatable`` is the transport's word on whether the command may run
        twice, asked only when ``when`` needs it. The first attempt runs
        outside tenacity: most calls succeed at once, and building a retry
        loop per call is most of the per-call cost.
        """
        observer = observing_attempts.get()
        if observer is not None:
            observer.attempt(1)
        try:
            return await attempt()
        except Exception as error:
            return await self.after(error, attempt, deadline, repeatable=repeatable, on_retry=on_retry)

    async def after(
        self,
        failure: Exception,
        attempt: Callable[[], Awaitable[T]],
        deadline: Deadline,
        *,
        repeatable: Callable[[], bool] = never_repeatable,
        on_retry: RetryListener | None = None,
    ) -> T:
        """The rest of ``call`` once its first attempt failed with ``failure``: raised again, or retried.

        For a caller that made the first attempt itself (and told the
        ``observing_attempts`` observer of it), so that a call that succeeds
        at once passes through no coroutine of the policy's.
        """

        def should_retry(error: BaseException) -> bool:
            return self.when(FailedAttempt(error, repeatable))

        if not should_retry(failure):
            raise failure
        first_failure: BaseException | None = failure
        observer = observing_attempts.get()

        def before_retry(number: int, error: BaseException, delay: float) -> None:
            if on_retry is not None:
                on_retry(number, error, delay)
            if observer is not None:
                observer.retry(number, error, delay)

        async for trial in self.retrying(deadline, should_retry, before_retry):
            with trial:
                if first_failure is not None:  # tenacity's attempt 1 is the one that already failed
                    failure_, first_failure = first_failure, None
                    raise failure_
                if observer is not None:
                    observer.attempt(trial.retry_state.attempt_number)
                return await attempt()
        raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover
