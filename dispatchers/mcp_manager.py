"""All the servers of one ``mcp.json``, started together, stopped together, sharing limits when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aip.backoff import Backoff

from .concurrency import ConcurrencyLimits, Slots
from .managed_server import RESTART_BACKOFF, ManagedServer
from .mcp_config import ServerSpec, load_config

__all__ = ["MCPServerManager"]


class MCPServerManager:
    """All servers of one ``mcp.json``: an async context manager that starts and stops them.

    Entering starts every server at once and waits for each to be up or to
    have failed; a server that fails is reported in ``servers[name].error``
    and does not stop the others. Each server restarts after a failure as
    ``restart_backoff`` spaces it (see ``ManagedServer``).

    Concurrency limits (see ``concurrency``) hold per server by default: each
    server's ``max_actions``/``max_data_collection`` from its ``mcp.json``
    entry, else those of ``limits``, else ``ConcurrencyLimits()`` (one action
    at a time, reads unlimited). With ``per_manager``, ``limits`` bound all
    the servers together (``slots``: at most one action on the whole device,
    by default), and a server's own ``mcp.json`` limits still apply within.
    """

    def __init__(
        self,
        servers: Mapping[str, ServerSpec],
        *,
        start_timeout: float = 30.0,
        restart_backoff: Backoff = RESTART_BACKOFF,
        limits: ConcurrencyLimits | None = None,
        per_manager: bool = False,
    ) -> None:
        limits = limits if limits is not None else ConcurrencyLimits()
        #: The slots all servers share, with ``per_manager``; else None.
        self.slots = Slots(limits) if per_manager else None

        def slots_of(spec: ServerSpec) -> Slots:
            own = spec.concurrency_limits()
            if self.slots is None:
                return Slots(replace(limits, **own))
            if not own:
                return self.slots
            return Slots(
                ConcurrencyLimits(action=own.get("action"), data_collection=own.get("data_collection")),
                within=self.slots,
            )

        self.servers = {
            name: ManagedServer(
                name, spec, start_timeout=start_timeout, restart_backoff=restart_backoff, slots=slots_of(spec)
            )
            for name, spec in servers.items()
        }

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any], **options: Any) -> MCPServerManager:
        return cls(load_config(source), **options)

    def launch(self, names: Iterable[str] | None = None) -> list[asyncio.Future[None]]:
        """Start the named servers (all by default) that are down and due; don't wait.

        Returns a future for each server now starting, resolved when it is up
        or has failed: a caller waits for just the servers it needs, within
        its own deadline.
        """
        wanted = self.servers if names is None else {name: self.servers[name] for name in names}
        return [c.launch() for c in wanted.values() if c.starting or c.restart_due]

    async def start(self) -> None:
        """Bring up every server that is down and due, and wait for each to be up or to have failed."""
        await asyncio.gather(*(asyncio.shield(started) for started in self.launch()))

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.servers.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
