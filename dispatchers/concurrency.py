"""How many commands of each category may run at once: limits as values, slots to hold.

A command is an ``action`` (it may change something) or ``data_collection``
(it only reads). By default at most one action runs at a time on a server (or,
with a shared ``Slots``, on a whole device), so two actions never race on the
same screen, file or account, while reads run in parallel.

``ConcurrencyLimits`` is the policy value, printable and comparable like
``RetryPolicy``. ``Slots`` holds one ``asyncio.Semaphore`` per limited category;
``async with slots.slot(category):`` waits for a free slot and gives it back
however the block ends (result, error, timeout or cancellation), so no slot
leaks. A wait for a slot is an ordinary await: it ends at the deadline of
whatever awaits it, and a waiter that gives up never takes the slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType

from mcp.types import Tool

from aip.messages import TOOL_TYPES, Command, ToolType

__all__ = ["ConcurrencyLimits", "Slots", "command_category"]


#: The categories as module constants: an enum member looked up on its class costs a
#: descriptor call (Python 3.11), and the category is taken for every command.
_ACTION, _DATA_COLLECTION = ToolType.ACTION, ToolType.DATA_COLLECTION


def command_category(command: Command, tool: Tool) -> ToolType:
    """Which limit ``command``, routed to ``tool``, counts against.

    ``data_collection`` when the command says so (``tool_type``), or when it
    does not call itself an ``action`` and the tool declares ``readOnlyHint``;
    otherwise ``action``: a tool whose effects are unknown is taken to have
    side effects.
    """
    if command.tool_type == _DATA_COLLECTION:
        return _DATA_COLLECTION
    if command.tool_type != _ACTION and tool.annotations is not None and tool.annotations.read_only_hint:
        return _DATA_COLLECTION
    return _ACTION


@dataclass(frozen=True)
class ConcurrencyLimits:
    """At most how many commands of each category run at once; ``None`` means no limit.

    The default lets one ``action`` run at a time and any number of
    ``data_collection`` commands.
    """

    action: int | None = 1
    data_collection: int | None = None

    def __post_init__(self) -> None:
        for category in TOOL_TYPES:
            value = getattr(self, category)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{category} must be a whole number of at least 1, or None for no limit, not {value!r}"
                )

    def limit(self, category: str) -> int | None:
        """The limit for ``category``; ``None`` when unlimited."""
        if category not in TOOL_TYPES:
            raise ValueError(f"no concurrency limit for category {category!r}; categories: {', '.join(TOOL_TYPES)}")
        value: int | None = getattr(self, category)
        return value


#: The slot of an unlimited category: nothing to wait for or give back (one for all: it holds no state).
_UNLIMITED: AbstractAsyncContextManager[None] = nullcontext()


class _Held:
    """One slot of one category, held for the length of an ``async with``."""

    __slots__ = ("_category", "_semaphore", "_slots")

    def __init__(self, slots: Slots, category: str, semaphore: asyncio.Semaphore) -> None:
        self._slots, self._category, self._semaphore = slots, category, semaphore

    async def __aenter__(self) -> None:
        waiting = self._slots._waiting
        waiting[self._category] += 1
        try:
            await self._semaphore.acquire()  # cancelled while waiting: nothing taken (asyncio's guarantee)
        finally:
            waiting[self._category] -= 1
        self._slots._in_use[self._category] += 1  # no await between acquire and here: nothing can intervene

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._slots._in_use[self._category] -= 1
        self._semaphore.release()


class Slots:
    """The slots for the limits of one server, or of one device: one semaphore per limited category.

    ``within`` names another ``Slots`` whose limits apply too (a device's,
    shared by all its servers): a command takes its slot here first, then
    there, always in that order, so two commands can't each hold what the
    other waits for.

    The semaphores don't need a running loop to be made; each binds to the
    event loop of its first wait, so a ``Slots`` (like the ``MCPServerManager``
    that owns it) serves one event loop.
    """

    def __init__(self, limits: ConcurrencyLimits | None = None, *, within: Slots | None = None) -> None:
        self.limits = limits if limits is not None else ConcurrencyLimits()
        self.within = within
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        for category in TOOL_TYPES:
            limit = self.limits.limit(category)
            if limit is not None:
                self._semaphores[category] = asyncio.Semaphore(limit)
        self._in_use: dict[str, int] = dict.fromkeys(TOOL_TYPES, 0)
        self._waiting: dict[str, int] = dict.fromkeys(TOOL_TYPES, 0)
        #: The categories limited neither here nor ``within``: a command of one holds nothing, so it needs no
        #: ``async with`` (an attribute, not a method: it is asked for every command).
        self.unlimited: frozenset[str] = frozenset(
            category
            for category in TOOL_TYPES
            if category not in self._semaphores and (within is None or category in within.unlimited)
        )

    def slot(self, category: str) -> AbstractAsyncContextManager[None]:
        """Hold a slot of ``category`` for an ``async with`` block (no wait at all for an unlimited category)."""
        if category not in self._in_use:
            raise ValueError(f"no slots for category {category!r}; categories: {', '.join(TOOL_TYPES)}")
        semaphore = self._semaphores.get(category)
        own = _UNLIMITED if semaphore is None else _Held(self, category, semaphore)
        if self.within is None:
            return own
        return _both(own, self.within.slot(category))

    def in_use(self, category: str) -> int:
        """How many slots of ``category`` are held right now (here, not in ``within``; 0 for an unlimited category)."""
        return self._in_use[category]

    def waiting(self, category: str) -> int:
        """How many commands wait for a slot of ``category`` right now (here, not counting ``within``)."""
        return self._waiting[category]

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{category} {self._in_use[category]}/{self.limits.limit(category) or 'unlimited'}"
            + (f" (+{self._waiting[category]} waiting)" if self._waiting[category] else "")
            for category in TOOL_TYPES
        )
        within = f" within {self.within!r}" if self.within is not None else ""
        return f"<Slots {counts}{within}>"


@asynccontextmanager
async def _both(
    inner: AbstractAsyncContextManager[None], outer: AbstractAsyncContextManager[None]
) -> AsyncIterator[None]:
    async with inner, outer:
        yield
