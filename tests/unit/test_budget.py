"""``aip.budget``: the deadline and how it is shared out (unit tests, no I/O).

The arithmetic every waiter uses, controller and device alike, checked with
plain numbers: what the engine waits, what an attempt gets, what a device is
told and what it takes for itself, and that no wait handed on is ever zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import pytest

from aip.budget import Budget, Deadline
from aip.messages import UFO_BATCH_TIMEOUT


def test_the_default_budget_is_a_value_that_prints_its_margins() -> None:
    assert Budget() == Budget(settle=0.2, unwind=0.5, reply_grace=0.5, reply_margin=0.3, least=1e-3)
    assert Budget(settle=1.0) != Budget()
    assert str(Budget()) == "settle 0.2s, unwind 0.5s, reply grace 0.5s, reply margin 0.3s + 2x latency"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Budget().settle = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "fields", [{"settle": -0.1}, {"unwind": math.inf}, {"reply_grace": math.nan}, {"least": 0}, {"reply_margin": -1}]
)
def test_a_budget_that_cannot_be_meant_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        Budget(**fields)


def test_no_wait_handed_on_is_shorter_than_least() -> None:
    budget = Budget()
    assert budget.handed_on(0.0) == budget.least and budget.handed_on(-3) == budget.least
    assert budget.handed_on(2.5) == 2.5


def test_an_attempt_gets_what_is_left_or_the_policys_cap() -> None:
    assert Budget().for_attempt(10.0, None) == 10.0
    assert Budget().for_attempt(10.0, 2.0) == 2.0
    assert Budget().for_attempt(1.0, 2.0) == 1.0


def test_a_controller_awaits_the_devices_answer_a_grace_past_its_deadline() -> None:
    assert Budget().awaiting_reply(10.0) == 10.5
    assert Budget(reply_grace=0).awaiting_reply(0.0) == 0.0


def test_a_device_is_told_to_stop_before_the_controller_stops_waiting() -> None:
    budget = Budget()
    # The margin is the reply margin plus the round trip...
    assert budget.for_device(30.0, latency=0.01) == pytest.approx(30.0 - 0.3 - 0.02)
    # ... at most a fifth of the time left, so a short deadline still leaves the device most of it...
    assert budget.for_device(1.0, latency=0.5) == pytest.approx(0.8)
    # ... and never nothing.
    assert budget.for_device(0.0, latency=0.0) == budget.least


def test_a_devices_commands_end_before_its_batch_and_a_spent_batch_leaves_them_none() -> None:
    budget = Budget()
    assert budget.for_commands(30.0) == pytest.approx(30.0 - budget.settle)
    assert budget.for_commands(0.5) == pytest.approx(0.4)  # at most a fifth comes off
    assert budget.for_commands(-0.01) == -0.01  # not floored: nothing may start


def test_a_device_keeps_the_way_back_out_of_the_time_it_runs() -> None:
    budget = Budget()
    assert budget.on_device(30.0, latency=0.1) == pytest.approx(29.8)
    assert budget.on_device(1.0, latency=2.0) == 0.5  # never more than half comes off
    assert budget.on_device(None, latency=0.0) == UFO_BATCH_TIMEOUT  # a UFO server that sends no timeout


def test_our_controller_and_our_device_together_answer_within_the_deadline() -> None:
    """What the device runs, plus the way back, fits in what the controller waits, whenever a round trip can."""
    budget = Budget()
    for remaining in (0.05, 0.5, 3.0, 30.0, 600.0):
        for latency in (0.0, 0.001, 0.05, 0.4):
            if 2 * latency >= budget.awaiting_reply(remaining):
                continue  # no answer could come back in time, however little the device ran
            runs = budget.on_device(budget.for_device(remaining, latency), latency)
            assert runs + 2 * latency <= budget.awaiting_reply(remaining) + 1e-9, (remaining, latency)
            assert runs > 0


# --- Deadline ---------------------------------------------------------------------------------------------------


def test_deadline_is_a_value() -> None:
    assert Deadline(expires_at=10.0, seconds=2.0) == Deadline(10.0, 2.0)
    assert Deadline(10.0, 2.0) != Deadline(10.0, 3.0)
    assert hash(Deadline(10.0, 2.0)) == hash(Deadline(10.0, 2.0))
    assert "seconds=2.0" in repr(Deadline(10.0, 2.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Deadline(10.0, 2.0).seconds = 1  # type: ignore[misc]


def test_deadline_after_counts_down_and_prints() -> None:
    deadline = Deadline.after(30)
    assert deadline.seconds == 30
    assert 0 < deadline.remaining() <= 30
    assert not deadline.expired
    assert re.fullmatch(r"30s deadline, \d+\.\d{3}s left", str(deadline))
    past = Deadline(expires_at=time.monotonic() - 1, seconds=1.0)
    assert past.expired
    assert past.remaining() == 0.0


def test_deadline_within_picks_the_earlier() -> None:
    deadline = Deadline.after(30)
    assert deadline.within(None) is deadline
    assert deadline.within(60) is deadline
    shorter = deadline.within(1)
    assert shorter.seconds == 1
    assert shorter.expires_at < deadline.expires_at


@pytest.mark.parametrize("seconds", [0, -1, math.inf, math.nan])
def test_invalid_deadlines_raise_value_error(seconds: float) -> None:
    with pytest.raises(ValueError):
        Deadline.after(seconds)
