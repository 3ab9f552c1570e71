"""When a failed attempt is tried again: small conditions that compose, as tenacity's do.

Two facts of the error decide most retries (``errors.CommandError``):
``transient`` (the same call may succeed later) and ``sent`` (the call may
have reached the tool, so repeating it could repeat a side effect). A third
comes from the transport: whether the command is ``repeatable`` (running it
twice is harmless, e.g. a read-only tool). The standard condition reads as
the rule it is::

    transient & (unsent | repeatable)

A condition is a value: it prints as above, compares equal to one built the
same way, and is passed to ``RetryPolicy(when=...)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import CommandError, ToolReportedError

__all__ = [
    "RETRY_TOOL_ERRORS_TOO",
    "RETRY_TRANSIENT",
    "AllOf",
    "AnyOf",
    "Fact",
    "FailedAttempt",
    "RetryCondition",
    "never_repeatable",
    "repeatable",
    "tool_error",
    "transient",
    "unsent",
]


def never_repeatable() -> bool:
    return False


@dataclass(frozen=True)
class FailedAttempt:
    """A failed attempt as a condition sees it: its error, and the transport's word on repeating the command.

    ``repeatable`` is asked only when a condition needs it: for a local
    command, it routes the command to read its tool's annotations.
    """

    error: BaseException
    repeatable: Callable[[], bool] = never_repeatable


class RetryCondition(ABC):
    """Whether a failed attempt should be tried again (time and attempts permitting)."""

    @abstractmethod
    def __call__(self, failed: FailedAttempt) -> bool: ...

    @abstractmethod
    def parts(self) -> tuple[RetryCondition, ...]:
        """The conditions this one is built of (none for a plain fact)."""

    def __and__(self, other: RetryCondition) -> RetryCondition:
        return AllOf(_flattened(AllOf, (self, other)))

    def __or__(self, other: RetryCondition) -> RetryCondition:
        return AnyOf(_flattened(AnyOf, (self, other)))

    def __contains__(self, condition: RetryCondition) -> bool:
        """Whether ``condition`` is this one or among its parts, at any depth."""
        return condition == self or any(condition in part for part in self.parts())


@dataclass(frozen=True, repr=False)
class Fact(RetryCondition):
    """One fact about a failed attempt, known by its name."""

    name: str
    test: Callable[[FailedAttempt], bool] = field(compare=False)

    def __call__(self, failed: FailedAttempt) -> bool:
        return self.test(failed)

    def parts(self) -> tuple[RetryCondition, ...]:
        return ()

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, repr=False)
class AllOf(RetryCondition):
    conditions: tuple[RetryCondition, ...]

    def __call__(self, failed: FailedAttempt) -> bool:
        return all(condition(failed) for condition in self.conditions)

    def parts(self) -> tuple[RetryCondition, ...]:
        return self.conditions

    def __repr__(self) -> str:
        return " & ".join(f"({c!r})" if isinstance(c, AnyOf) else repr(c) for c in self.conditions)


@dataclass(frozen=True, repr=False)
class AnyOf(RetryCondition):
    conditions: tuple[RetryCondition, ...]

    def __call__(self, failed: FailedAttempt) -> bool:
        return any(condition(failed) for condition in self.conditions)

    def parts(self) -> tuple[RetryCondition, ...]:
        return self.conditions

    def __repr__(self) -> str:
        return " | ".join(f"({c!r})" if isinstance(c, AllOf) else repr(c) for c in self.conditions)


def _flattened(kind: type[AllOf | AnyOf], conditions: tuple[RetryCondition, ...]) -> tuple[RetryCondition, ...]:
    """``a & (b & c)`` is ``a & b & c``: one level per operator, so equal rules compare equal."""
    flat: list[RetryCondition] = []
    for condition in conditions:
        flat.extend(condition.conditions if isinstance(condition, kind) else (condition,))
    return tuple(flat)


#: The same call may succeed later (a server restarting, a lost connection, a timeout).
transient = Fact("transient", lambda failed: isinstance(failed.error, CommandError) and failed.error.transient)
#: The call certainly never reached the tool: repeating it repeats nothing.
unsent = Fact("unsent", lambda failed: isinstance(failed.error, CommandError) and not failed.error.sent)
#: The transport says running this command twice is harmless.
repeatable = Fact("repeatable", lambda failed: failed.repeatable())
#: The tool ran and reported a failure of its own (MCP ``isError``).
tool_error = Fact("tool_error", lambda failed: isinstance(failed.error, ToolReportedError))

#: The default: what failed for a passing reason, when trying again cannot repeat a side effect.
RETRY_TRANSIENT = transient & (unsent | repeatable)
#: The same, and tools' own errors too (a batch's ``retry_tool_errors``).
RETRY_TOOL_ERRORS_TOO = (transient | tool_error) & (unsent | repeatable)
