"""Retry conditions and ``RetryPolicy`` as values (unit tests, no I/O; the loop itself is in test_batch_engine)."""

from __future__ import annotations

import asyncio

import pytest

from aip.backoff import Backoff
from aip.budget import Deadline
from aip.messages import Command, RetryRule
from aip.retry import requested_retry
from dispatchers import InMemoryCommandDispatcher, RetryPolicy, observing_attempts
from dispatchers.errors import CommandError, ConnectionLost, InvalidParameters, ServerUnavailable, ToolReportedError
from dispatchers.remote import DELIVER_AGAIN, HubDropped
from dispatchers.retry_conditions import (
    RETRY_TOOL_ERRORS_TOO,
    RETRY_TRANSIENT,
    FailedAttempt,
    repeatable,
    tool_error,
    transient,
    unsent,
)

LOST_IN_FLIGHT = ConnectionLost("the server went away")  # transient, sent
NOT_RUNNING = ServerUnavailable("not started yet")  # transient, never sent
TOOL_SAID_NO = ToolReportedError("division by zero")  # not transient, sent
BAD_INPUT = InvalidParameters("a: required")  # not transient, never sent


def failed(error: BaseException, *, can_repeat: bool = False) -> FailedAttempt:
    return FailedAttempt(error, lambda: can_repeat)


def test_the_standard_condition_prints_as_the_rule_it_is() -> None:
    assert repr(RETRY_TRANSIENT) == "transient & (unsent | repeatable)"
    assert repr(RETRY_TOOL_ERRORS_TOO) == "(transient | tool_error) & (unsent | repeatable)"
    assert repr(DELIVER_AGAIN) == "hub_dropped | (transient & unsent)"


def test_conditions_built_alike_compare_equal_and_flatten() -> None:
    assert transient & (unsent | repeatable) == RETRY_TRANSIENT
    assert (transient & unsent) & repeatable == transient & (unsent & repeatable)
    assert repr(transient & unsent & repeatable) == "transient & unsent & repeatable"
    assert transient | unsent != transient & unsent
    assert hash(RETRY_TRANSIENT) == hash(transient & (unsent | repeatable))


@pytest.mark.parametrize(
    ("error", "can_repeat", "retried"),
    [
        (NOT_RUNNING, False, True),  # nothing was sent: trying again repeats nothing
        (LOST_IN_FLIGHT, False, False),  # it may have run: not again, unless harmless
        (LOST_IN_FLIGHT, True, True),
        (TOOL_SAID_NO, True, False),  # the tool's own answer: the same next time
        (BAD_INPUT, True, False),
        (ValueError("a bug"), True, False),  # not a CommandError: never retried
    ],
)
def test_the_standard_condition_retries_transient_failures_that_cannot_repeat_an_effect(
    error: BaseException, can_repeat: bool, retried: bool
) -> None:
    assert RETRY_TRANSIENT(failed(error, can_repeat=can_repeat)) is retried


def test_tool_errors_are_retried_only_when_asked_and_still_only_if_repeatable() -> None:
    assert RETRY_TOOL_ERRORS_TOO(failed(TOOL_SAID_NO, can_repeat=True))
    assert not RETRY_TOOL_ERRORS_TOO(failed(TOOL_SAID_NO, can_repeat=False))


def test_the_transport_is_asked_whether_a_command_repeats_only_when_the_rule_needs_it() -> None:
    asked: list[bool] = []

    def can_repeat() -> bool:
        asked.append(True)
        return True

    assert RETRY_TRANSIENT(FailedAttempt(NOT_RUNNING, can_repeat)) and not asked  # unsent decided it
    assert RETRY_TRANSIENT(FailedAttempt(LOST_IN_FLIGHT, can_repeat)) and asked == [True]


def test_a_batch_is_delivered_again_when_the_hub_lost_it_or_it_never_got_through() -> None:
    assert DELIVER_AGAIN(failed(HubDropped("hub restarted")))  # sent, but the device dedupes
    assert DELIVER_AGAIN(failed(NOT_RUNNING))
    assert not DELIVER_AGAIN(failed(LOST_IN_FLIGHT))  # lost with its device: a new process forgot what ran
    assert not DELIVER_AGAIN(failed(CommandError("refused", sent=False)))


def test_a_condition_knows_its_parts() -> None:
    assert tool_error in RETRY_TOOL_ERRORS_TOO and tool_error not in RETRY_TRANSIENT
    assert repeatable in RETRY_TRANSIENT and transient in transient


def test_a_policy_travels_to_a_device_and_back() -> None:
    policy = RetryPolicy(attempts=4, backoff=Backoff(0.1, 2.0, 0.3), when=RETRY_TOOL_ERRORS_TOO, attempt_timeout=5)
    rule = policy.to_rule()
    assert rule == RetryRule(attempts=4, initial_delay=0.1, max_delay=2.0, jitter=0.3, retry_tool_errors=True)
    on_device = RetryPolicy(attempt_timeout=9).following(rule)
    assert on_device == RetryPolicy(4, Backoff(0.1, 2.0, 0.3), RETRY_TOOL_ERRORS_TOO, attempt_timeout=9)
    assert RetryPolicy().following(RetryPolicy().to_rule()) == RetryPolicy()


def test_a_rule_from_an_older_peer_with_jitter_in_seconds_still_works() -> None:
    rule = RetryRule(attempts=3, initial_delay=0.2, max_delay=5, jitter=2.5, retry_tool_errors=False)
    assert RetryPolicy().following(rule).backoff == Backoff(0.2, 5.0, 1.0)


def test_until_the_deadline_travels_as_a_whole_number_every_device_reads() -> None:
    rule = RetryPolicy(attempts=None).to_rule()
    assert isinstance(rule.attempts, int) and rule.attempts >= 2**31 - 1  # an older device refuses null
    assert RetryPolicy().following(rule).attempts is None


async def test_attempts_none_retries_until_the_deadline_and_no_further() -> None:
    tries = 0

    async def never_up() -> None:
        nonlocal tries
        tries += 1
        raise NOT_RUNNING

    policy = RetryPolicy(attempts=None, backoff=Backoff(0.01, 0.01, 0))
    async with asyncio.timeout(5):
        with pytest.raises(ServerUnavailable):
            await policy.call(never_up, Deadline.after(0.3))
    assert tries > 3  # far more than the default 3: it went on until the deadline


async def test_a_failure_the_condition_refuses_is_raised_after_one_try() -> None:
    tries = 0

    async def lost() -> None:
        nonlocal tries
        tries += 1
        raise LOST_IN_FLIGHT

    with pytest.raises(ConnectionLost):
        await RetryPolicy(attempts=5, backoff=Backoff(0, 0, 0)).call(lost, Deadline.after(5))
    assert tries == 1
    harmless = RetryPolicy(attempts=5, backoff=Backoff(0, 0, 0))
    with pytest.raises(ConnectionLost):
        await harmless.call(lost, Deadline.after(5), repeatable=lambda: True)
    assert tries == 1 + 5


async def test_one_dispatcher_follows_each_batch_rule_in_turn_however_many_it_has_seen() -> None:
    """A device's dispatcher keeps the policy of the last rule it saw: another batch's rule must replace it."""
    tries: dict[str, int] = {}

    def flaky(command: Command) -> str:
        tries[command.call_id or ""] = tries.get(command.call_id or "", 0) + 1
        if tries[command.call_id or ""] < 3:
            raise LOST_IN_FLIGHT
        return "done"

    dispatcher = InMemoryCommandDispatcher({"flaky": flaky}, retry=RetryPolicy(attempts=1))
    patient = RetryPolicy(attempts=3, backoff=Backoff(0.001, 0.001, 0)).to_rule()
    hasty = RetryPolicy(attempts=2, backoff=Backoff(0.001, 0.001, 0)).to_rule()
    outcomes = []
    for name, rule in [("a", patient), ("b", hasty), ("c", patient), ("d", hasty.model_copy())]:
        token = requested_retry.set(rule)
        try:
            result = await dispatcher.execute_command(Command(tool_name="flaky", call_id=name), Deadline.after(5))
        finally:
            requested_retry.reset(token)
        outcomes.append((name, result.status.value, result.attempts))
    assert outcomes == [("a", "success", 3), ("b", "failure", 2), ("c", "success", 3), ("d", "failure", 2)]


class _Heard:
    """An ``observing_attempts`` observer that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def attempt(self, number: int) -> None:
        self.events.append(("attempt", number))

    def retry(self, number: int, error: BaseException, delay: float) -> None:
        self.events.append(("retry", number))


@pytest.mark.parametrize("under_a_rule", [True, False])
async def test_the_observer_in_place_hears_every_attempt_and_a_rule_s_result_counts_them(under_a_rule: bool) -> None:
    """The Prefect task counts attempts through its observer, on a device's batch rule or not."""
    failures = {"once": 1, "never": 0, "always": 9}

    def fails(command: Command) -> str:
        if failures[command.tool_name] > 0:
            failures[command.tool_name] -= 1
            raise LOST_IN_FLIGHT
        return command.tool_name

    policy = RetryPolicy(attempts=3, backoff=Backoff(0.001, 0.001, 0))
    dispatcher = InMemoryCommandDispatcher({name: fails for name in failures}, retry=policy)
    heard: dict[str, list[tuple[str, int]]] = {}
    counted: dict[str, tuple[str, int | None]] = {}
    for name in failures:
        observer = _Heard()
        tokens = (observing_attempts.set(observer), requested_retry.set(policy.to_rule() if under_a_rule else None))
        try:
            result = await dispatcher.execute_command(Command(tool_name=name, call_id=name), Deadline.after(5))
        finally:
            requested_retry.reset(tokens[1])
            observing_attempts.reset(tokens[0])
        heard[name], counted[name] = observer.events, (result.status.value, result.attempts)

    assert heard == {
        "once": [("attempt", 1), ("retry", 1), ("attempt", 2)],
        "never": [("attempt", 1)],
        "always": [("attempt", 1), ("retry", 1), ("attempt", 2), ("retry", 2), ("attempt", 3)],
    }
    if under_a_rule:
        assert counted == {"once": ("success", 2), "never": ("success", 1), "always": ("failure", 3)}
    else:  # only a device's Results say how many tries they took
        assert counted == {"once": ("success", None), "never": ("success", None), "always": ("failure", None)}
