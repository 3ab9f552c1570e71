"""How long to wait before trying again: one convention for every retry in the project.

A device reconnecting to its hub, an MCP server restarting after a crash and
a command retried after a transient failure all wait the same way: a delay
that doubles with each consecutive failure up to a cap, spread at random
below it so that many clients that failed together do not all come back in
the same instant. The spread never exceeds the cap, so ``maximum`` is a
promise a person can plan with.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays after consecutive failures: ``initial`` doubled each time, at most ``maximum``.

    Each delay is scaled by a random factor in ``[1 - jitter, 1]``: ``jitter``
    0 is deterministic, 1 spreads a delay over all of ``[0, nominal]``.
    """

    initial: float = 1.0
    maximum: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("initial", "maximum"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number of seconds, 0 or more, not {value!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter is a fraction of each delay, from 0 to 1, not {self.jitter!r}")

    def nominal(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures (1 for the first), before jitter."""
        if failures < 1:
            raise ValueError(f"a delay follows at least one failure, not {failures}")
        return min(self.maximum, self.initial * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int) -> float:
        """The delay to wait after ``failures`` consecutive failures (1 for the first)."""
        return self.nominal(failures) * random.uniform(1 - self.jitter, 1)

    def __str__(self) -> str:
        return f"backoff {self.initial:g}s doubling to {self.maximum:g}s, jitter {self.jitter:.0%}"
