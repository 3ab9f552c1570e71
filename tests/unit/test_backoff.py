"""``aip.backoff.Backoff``: the one way every retry in the project waits (unit tests, no I/O)."""

from __future__ import annotations

import random

import pytest

import aip.backoff
from aip.backoff import Backoff


def test_delays_double_from_the_first_failure_up_to_the_cap_without_jitter() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 10)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(10_000) == 30.0  # no overflow after a very long outage


def test_jitter_spans_exactly_the_documented_range(monkeypatch: pytest.MonkeyPatch) -> None:
    class Extremes:
        def __init__(self) -> None:
            self.asked: list[tuple[float, float]] = []

        def uniform(self, low: float, high: float) -> float:
            self.asked.append((low, high))
            return low if len(self.asked) % 2 else high

    extremes = Extremes()
    monkeypatch.setattr(aip.backoff, "random", extremes)
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.25)
    assert backoff.delay(3) == pytest.approx(3.0)  # 4 * 0.75
    assert backoff.delay(3) == pytest.approx(4.0)
    assert backoff.delay(20) == pytest.approx(8.0 * 0.75)
    assert extremes.asked[0] == (0.75, 1)


def test_delays_lie_within_their_jittered_bounds_and_never_above_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aip.backoff, "random", random.Random(20260101))
    backoff = Backoff(initial=0.5, maximum=30.0, jitter=0.5)
    for failures in range(1, 13):
        nominal = min(30.0, 0.5 * 2 ** (failures - 1))
        assert backoff.nominal(failures) == nominal
        delays = [backoff.delay(failures) for _ in range(50)]
        assert all(nominal * 0.5 <= d <= nominal for d in delays), (failures, delays)
        assert len(set(delays)) > 1  # jitter actually spreads them
    assert max(backoff.delay(100) for _ in range(50)) <= 30.0


@pytest.mark.parametrize(
    "fields", [{"initial": -1}, {"maximum": float("inf")}, {"initial": float("nan")}, {"jitter": 1.5}, {"jitter": -0.1}]
)
def test_a_backoff_that_cannot_be_meant_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**fields)


def test_a_delay_follows_a_failure() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        Backoff().delay(0)


def test_a_backoff_is_a_value_to_print_and_compare() -> None:
    assert Backoff(0.5, 30, 0.5) == Backoff(initial=0.5, maximum=30.0, jitter=0.5)
    assert str(Backoff(0.5, 30, 0.5)) == "backoff 0.5s doubling to 30s, jitter 50%"
    assert "Backoff(initial=0.5" in repr(Backoff(0.5))
