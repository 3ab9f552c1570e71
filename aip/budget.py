"""The time a batch is given, and how it is shared between the engine, the wire and the device.

A deadline is set once, where the batch enters (``dispatch run --timeout``,
a flow parameter, a UFO server's ``timeout``), and every part that waits
derives its wait from it: the batch engine, each attempt at a command, the
controller sending a batch to a device, the device running it. The margins
between them are one value, ``Budget``, as httpx's ``Timeout`` gathers its
four timeouts: printable, comparable, passed to whoever waits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .messages import UFO_BATCH_TIMEOUT

__all__ = ["Budget", "Deadline"]


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


@dataclass(frozen=True)
class Budget:
    """The margins every waiter keeps within a deadline, so that an answer always arrives before it.

    ``settle``: at the deadline, the batch engine gives commands still in
    flight this long to end by their own timeouts (which fire at the same
    instant) and report, before it cancels them. ``unwind``: how long it
    then lets cancelled work unwind. ``reply_grace``: how long past its
    deadline a controller still awaits a device's own answer. ``reply_margin``:
    the device is told to stop this much before the controller's deadline,
    plus the round trip to the hub, so its answer (with the Results of the
    commands that did finish) arrives in time. ``least``: no wait handed on
    is shorter, so a nearly spent deadline still yields a timeout Result
    rather than a refusal to start.
    """

    settle: float = 0.2
    unwind: float = 0.5
    reply_grace: float = 0.5
    reply_margin: float = 0.3
    least: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("settle", "unwind", "reply_grace", "reply_margin", "least"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number of seconds, 0 or more, not {value!r}")
        if not self.least > 0:
            raise ValueError(f"least must be above 0, not {self.least!r}")

    def handed_on(self, seconds: float) -> float:
        """``seconds``, as a timeout to give a callee: never below ``least``."""
        return max(seconds, self.least)

    def for_attempt(self, remaining: float, attempt_timeout: float | None) -> float:
        """How long one attempt at a command may take: what is left, or less if the retry policy caps attempts."""
        return remaining if attempt_timeout is None else min(remaining, attempt_timeout)

    def for_commands(self, remaining: float) -> float:
        """How long a device's commands may run of what is left of its batch: ``settle`` less (a fifth at most).

        Their own timeouts then report, and are remembered, before the device
        gives up on them at the batch's time. Not floored: none is left for a
        batch whose time is up.
        """
        return remaining - min(self.settle, max(remaining, 0.0) / 5)

    def awaiting_reply(self, remaining: float) -> float:
        """How long a controller awaits a device's answer: what is left, and the grace for a late answer."""
        return remaining + self.reply_grace

    def for_device(self, remaining: float, latency: float) -> float:
        """The timeout a controller sends with a batch: what is left, less the way back (at most a fifth of it)."""
        margin = min(remaining / 5, self.reply_margin + 2 * latency)
        return self.handed_on(remaining - margin)

    def on_device(self, timeout: float | None, latency: float) -> float:
        """How long a device runs a batch its sender awaits for ``timeout`` (UFO's default when None).

        Its answer needs the way back to the hub: twice the measured latency
        comes off, but never more than half (a UFO server sends its own wait,
        with no margin taken off).
        """
        timeout = timeout or UFO_BATCH_TIMEOUT
        return self.handed_on(max(timeout - 2 * latency, timeout / 2))

    def __str__(self) -> str:
        return (
            f"settle {self.settle:g}s, unwind {self.unwind:g}s, reply grace {self.reply_grace:g}s, "
            f"reply margin {self.reply_margin:g}s + 2x latency"
        )
