"""Deadline and retry policy as values: printable, comparable, passed around.

Modelled on tenacity's small policy objects. A ``RetryPolicy`` says how often
and how patiently to try a command again; a ``Deadline`` says when nobody waits
for it any more. The retry loop itself is tenacity's, built by
``RetryPolicy.retrying`` for one command at a time, because the stop condition
depends on that command's remaining time.
"""

from __future__ import annotations

import math
import time
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
    wait_exponential_jitter,
)

from aip.messages import RetryRule


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, with the budget it was set from.

    The budget is kept so that a timeout can say what it was ("no result
    within 30.0s") long after the deadline was computed.
    """

    expires_at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        if not seconds > 0 or math.isinf(seconds):
            raise ValueError(f"a deadline needs a finite number of seconds above 0, not {seconds!r}")
        return cls(expires_at=time.monotonic() + seconds, seconds=seconds)

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def within(self, seconds: float | None) -> Deadline:
        """The earlier of this deadline and one ``seconds`` from now."""
        if seconds is None:
            return self
        other = Deadline.after(seconds)
        return other if other.expires_at < self.expires_at else self

    def __str__(self) -> str:
        return f"{self.seconds:g}s deadline, {self.remaining():.3f}s left"


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


@dataclass(frozen=True)
class RetryPolicy:
    """How to try a failed command again: exponential backoff with jitter.

    ``attempts`` counts the first try. Delays grow from ``initial_delay`` by
    doubling up to ``max_delay``, each plus up to ``jitter`` seconds at random.
    Only transient failures are retried (see ``errors.CommandError``), a
    tool's own reported error only when ``retry_tool_errors`` is set, and no
    retry is scheduled to start after the command's deadline.
    """

    attempts: int = 3
    initial_delay: float = 0.2
    max_delay: float = 5.0
    jitter: float = 0.2
    retry_tool_errors: bool = False
    #: Seconds one attempt may take before it is abandoned (and, time
    #: permitting, retried); by default an attempt may use all the time left.
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        for name in ("initial_delay", "max_delay", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.attempt_timeout is not None and not 0 < self.attempt_timeout < math.inf:
            raise ValueError(f"attempt_timeout must be a number of seconds above 0, not {self.attempt_timeout!r}")

    def to_rule(self) -> RetryRule:
        """This policy as it travels to a device (the attempt timeout stays the device's own)."""
        return RetryRule(
            attempts=self.attempts,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
            jitter=self.jitter,
            retry_tool_errors=self.retry_tool_errors,
        )

    def following(self, rule: RetryRule) -> RetryPolicy:
        """This policy, with what a batch's retry rule says."""
        return replace(self, **rule.model_dump())

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

        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts) | stop_before_delay(deadline.remaining()),
            wait=wait_exponential_jitter(multiplier=self.initial_delay, max=self.max_delay, jitter=self.jitter),
            retry=retry_if_exception(should_retry),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        deadline: Deadline,
        should_retry: Callable[[BaseException], bool],
        on_retry: RetryListener | None = None,
    ) -> T:
        """``attempt()``, retried by this policy until it succeeds or must stop; then its last error is raised.

        The first attempt runs outside tenacity: most calls succeed at once,
        and building a retry loop per call is most of the per-call cost.
        """
        observer = observing_attempts.get()
        if observer is not None:
            observer.attempt(1)
        try:
            return await attempt()
        except Exception as error:
            if not should_retry(error):
                raise
            first_failure: BaseException | None = error

        def before_retry(number: int, error: BaseException, delay: float) -> None:
            if on_retry is not None:
                on_retry(number, error, delay)
            if observer is not None:
                observer.retry(number, error, delay)

        async for trial in self.retrying(deadline, should_retry, before_retry):
            with trial:
                if first_failure is not None:  # tenacity's attempt 1 is the one that already failed
                    failure, first_failure = first_failure, None
                    raise failure
                if observer is not None:
                    observer.attempt(trial.retry_state.attempt_number)
                return await attempt()
        raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover
