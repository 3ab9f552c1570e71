"""Who owns the MCP servers that batch runs share: a ``ServerPool``, open for as long as they may be reused.

Starting a server costs more than a whole batch of calls (about 0.6 s for a
Python server), so the batches of one ``dispatch run`` (or of a program that
runs many) reuse the servers, as one dispatcher would. What they share needs
an owner that says when it ends: ``async with ServerPool():`` (like MCP's
``ClientSessionGroup``) makes the pool current for everything run inside the
block, ``shared_manager(config)`` hands out its manager for a config, and
leaving the block stops every server the pool started. A flow run that finds
no pool open opens one for itself (``ensure_server_pool``), so its servers
stop when it ends instead of living as long as its event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .mcp_config import load_config
from .mcp_manager import MCPServerManager

__all__ = ["ServerPool", "ensure_server_pool", "shared_manager"]

_current: ContextVar[ServerPool | None] = ContextVar("dispatchers_server_pool", default=None)


class ServerPool:
    """One ``MCPServerManager`` per config, shared by everything run inside ``async with``; stopped at its end.

    A pool is entered once, in the event loop its servers run in. Configs
    are told apart by their content.
    """

    def __init__(self) -> None:
        self._managers: dict[str, MCPServerManager] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: Token[ServerPool | None] | None = None
        self._closed = False

    @classmethod
    def current(cls) -> ServerPool | None:
        """The pool open in this context and event loop, if any.

        A pool seen from another event loop (a context copied into a thread)
        is not current there: its servers' tasks belong to its own loop. Nor
        is one already closed, seen by a task that outlived its block.
        """
        pool = _current.get()
        if pool is None or pool._closed or pool._loop is not asyncio.get_running_loop():
            return None
        return pool

    def manager(self, source: str | Path | Mapping[str, Any]) -> MCPServerManager:
        """The pool's manager for this config, created on first use; its servers launched, not waited for.

        Each command waits for the servers it needs, within its own deadline.
        """
        if self._closed or self._loop is None:
            raise RuntimeError("this ServerPool is not open: use it inside `async with ServerPool():`")
        specs = load_config(source)
        # exclude_unset: an entry's "max_actions": null (no limit) is not the same config as no "max_actions" at all.
        key = json.dumps(
            {name: spec.model_dump(mode="json", exclude_unset=True) for name, spec in specs.items()}, sort_keys=True
        )
        manager = self._managers.get(key)
        if manager is None:
            manager = self._managers[key] = MCPServerManager(specs)
        manager.launch()
        return manager

    async def __aenter__(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("a ServerPool is entered once")
        self._loop = asyncio.get_running_loop()
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._closed = True
        if self._token is not None:
            _current.reset(self._token)
        managers, self._managers = list(self._managers.values()), {}
        await asyncio.gather(*(manager.close() for manager in managers))


def shared_manager(source: str | Path | Mapping[str, Any]) -> MCPServerManager:
    """The manager for this config of the ``ServerPool`` open here; ``RuntimeError`` when none is."""
    pool = ServerPool.current()
    if pool is None:
        raise RuntimeError("no ServerPool is open here: run this inside `async with ServerPool():`")
    return pool.manager(source)


@asynccontextmanager
async def ensure_server_pool() -> AsyncIterator[ServerPool]:
    """The ``ServerPool`` open here, else one opened for this block alone (its servers stop at its end)."""
    pool = ServerPool.current()
    if pool is not None:
        yield pool
        return
    async with ServerPool() as pool:
        yield pool
