"""One configured MCP server as a long-lived connection: started once, watched, restarted.

A server is in one ``ServerState`` at a time, and ``ManagedServer._move`` is
the only code that changes it (and logs the change): what a command may do
with the server (call it, start it, wait out a restart delay, give up) is
read from that one value.

Each start is a ``_Run`` with an owner task that holds the ``mcp.Client``
open (anyio wants a client entered and left by the same task) until the
server is closed or dies. A move made for a run that is no longer the
current one changes nothing, so an old run winding down can never touch the
next one.

A server also holds the ``Slots`` that bound how many commands of each kind
run on it at once (see ``concurrency``). They live with the server, not with
a dispatcher, so every dispatcher that uses its manager shares them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import httpx2
from mcp import Client, MCPError
from mcp.types import CONNECTION_CLOSED, INTERNAL_ERROR, REQUEST_TIMEOUT, CallToolResult, Tool

from aip.backoff import Backoff

from .concurrency import ConcurrencyLimits, Slots
from .errors import ConnectionLost, ProtocolError, ServerStopped, ServerUnavailable, describe
from .mcp_config import ServerSpec, StdioServer
from .mcp_transports import http_transport, stdio_transport
from .stderr_tail import StderrTail

__all__ = ["RESTART_BACKOFF", "TRANSIENT_CODES", "ManagedServer", "ServerState"]

logger = logging.getLogger("dispatchers.mcp")

#: JSON-RPC error codes after which the same call may well succeed.
TRANSIENT_CODES = frozenset({INTERNAL_ERROR, REQUEST_TIMEOUT})

#: How long a server that failed waits before it may start again: 0.5 to
#: 0.625 s after the first failure, doubling with each one to 30 to 37.5 s.
RESTART_BACKOFF = Backoff(initial=0.625, maximum=37.5, jitter=0.2)


class ServerState(StrEnum):
    """Where a server is in its life; ``ManagedServer.state``."""

    #: Not running, and may start at once: never started, or stopped with its event loop.
    STOPPED = "stopped"
    #: Launched, not yet up: its process starts, or it has not listed its tools.
    STARTING = "starting"
    #: Serving: calls go to its client.
    UP = "up"
    #: Failed to start or died; it starts again on demand once its restart delay has passed.
    DOWN = "down"
    #: Stopped for good, with its manager: it never starts again.
    CLOSED = "closed"


#: The moves ``ManagedServer._move`` allows; any other is a bug.
_NEXT: dict[ServerState, frozenset[ServerState]] = {
    ServerState.STOPPED: frozenset({ServerState.STARTING, ServerState.CLOSED}),
    ServerState.STARTING: frozenset({ServerState.UP, ServerState.DOWN, ServerState.STOPPED, ServerState.CLOSED}),
    ServerState.UP: frozenset({ServerState.DOWN, ServerState.STOPPED, ServerState.CLOSED}),
    ServerState.DOWN: frozenset({ServerState.STARTING, ServerState.CLOSED}),
    ServerState.CLOSED: frozenset(),
}


@dataclass(eq=False)
class _Run:
    """One start of a server, from launch to its end."""

    #: Resolved once the run is no longer starting: up, or failed, stopped or closed.
    started: asyncio.Future[None]
    #: Set by ``close`` to end the run.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once the run is over: no call may reach it any more.
    over: asyncio.Event = field(default_factory=asyncio.Event)
    client: Client | None = None
    owner: asyncio.Task[None] | None = None


class ManagedServer:
    """One configured MCP server that its manager starts, watches and restarts, and its client.

    ``slots`` bound the commands running on it at once; by default, the
    limits its ``mcp.json`` entry sets, else ``ConcurrencyLimits()``.
    ``restart_backoff`` spaces the starts after consecutive failures (a
    successful call counts them from zero again).
    """

    def __init__(
        self,
        name: str,
        spec: ServerSpec,
        *,
        start_timeout: float = 30.0,
        restart_backoff: Backoff = RESTART_BACKOFF,
        slots: Slots | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.slots = slots if slots is not None else Slots(replace(ConcurrencyLimits(), **spec.concurrency_limits()))
        self.start_timeout = start_timeout
        self.restart_backoff = restart_backoff
        #: The tools the server listed when it last started, by name.
        self.tools: dict[str, Tool] = {}
        #: Why the server is down, while it is.
        self.error: str | None = None
        self._state = ServerState.STOPPED
        self._run: _Run | None = None
        #: Failures since the last successful call: they set the restart delay.
        self._failures = 0
        self._next_start = 0.0

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def available(self) -> bool:
        return self._state is ServerState.UP

    @property
    def starting(self) -> bool:
        return self._state is ServerState.STARTING

    @property
    def restart_due(self) -> bool:
        """Stopped or down (not starting, not closed), and past its restart delay."""
        waiting = self._state in (ServerState.STOPPED, ServerState.DOWN)
        return waiting and time.monotonic() >= self._next_start

    @property
    def categories(self) -> tuple[str, ...]:
        return self.spec.category

    def __repr__(self) -> str:
        why = f": {self.error}" if self.error and not self.available else ""
        return f"<ManagedServer {self.name} ({self.spec.describe()}) {self._state}{why}>"

    def _move(self, run: _Run | None, to: ServerState, error: str | None = None) -> None:
        """Change the state, for ``run``: the one place it changes, and where each change is logged.

        A move for a run that is no longer the current one, or after the
        server was closed, is a late report of an old run and changes
        nothing. Leaving ``STARTING`` resolves the run's ``started``; leaving
        ``UP`` (or ``STARTING``) sets its ``over``; ``DOWN`` counts a failure
        and sets when the server may start again.
        """
        if run is not self._run or self._state is ServerState.CLOSED:
            return
        if to not in _NEXT[self._state]:
            raise RuntimeError(f"MCP server {self.name!r} cannot go from {self._state} to {to}")
        self._state = to
        if to is ServerState.UP:
            self.error = None
        elif to is ServerState.DOWN:
            self.error = error
            self._failures += 1
            self._next_start = time.monotonic() + self.restart_backoff.delay(self._failures)
        if run is not None and to is not ServerState.STARTING:
            if not run.started.done():
                run.started.set_result(None)
            if to is not ServerState.UP:
                run.over.set()
                run.client = None
        if to is ServerState.UP:
            logger.info("MCP server %r is up with %d tools", self.name, len(self.tools))
        elif to is ServerState.DOWN:
            logger.warning("MCP server %r is down: %s", self.name, self.error)
        else:
            logger.debug("MCP server %r is %s", self.name, to)

    def launch(self) -> asyncio.Future[None]:
        """Start the server unless it is up or starting; resolves when it is up or has failed."""
        if self._state is ServerState.CLOSED:
            raise ServerStopped(f"MCP server {self.name!r} was stopped: its manager is closed")
        if self._run is not None and self._state in (ServerState.STARTING, ServerState.UP):
            return self._run.started
        run = self._run = _Run(started=asyncio.get_running_loop().create_future())
        self._move(run, ServerState.STARTING)
        run.owner = asyncio.create_task(self._own(run), name=f"mcp-server:{self.name}")
        return run.started

    async def start(self) -> None:
        """Start the server unless it runs; a failure is kept in ``error``, not raised."""
        # Shielded: a caller that gives up (its deadline) must not abort the start for the next one.
        await asyncio.shield(self.launch())

    async def _own(self, run: _Run) -> None:
        """Hold one run's client open, from the start until the server is closed or dies.

        The run ends ``DOWN`` only once its transport is shut and its stderr
        read to the end, so that the error says all the server said.
        """
        stderr: StderrTail | None = None
        transport: AbstractAsyncContextManager[Any]
        if isinstance(self.spec, StdioServer):
            stderr = StderrTail()
            transport = stdio_transport(self.spec, stderr)
        else:
            transport = http_transport(self.spec)
        failure: str | None = None
        try:
            try:
                async with AsyncExitStack() as stack:
                    try:
                        async with asyncio.timeout(self.start_timeout):
                            client = await stack.enter_async_context(Client(transport))
                            tools = await _list_tools(client)
                    except TimeoutError:
                        failure = f"no answer within {self.start_timeout}s of starting"
                    except Exception as error:
                        failure = _start_failure(error)
                    else:
                        self.tools, run.client = {tool.name: tool for tool in tools}, client
                        self._move(run, ServerState.UP)
                        await _first_of(run.stop.wait(), stderr.closed.wait() if stderr else None)
                        if not run.stop.is_set():
                            failure = "the server process exited"
            except Exception as error:  # the session failed after the start (an HTTP server went away)
                failure = failure or describe(error)
            finally:
                if stderr is not None:
                    await stderr.aclose()
        except asyncio.CancelledError:
            self._move(run, ServerState.STOPPED)  # the manager or the event loop is closing: a stop, not a failure
            raise
        if failure is not None:
            said = stderr.text() if stderr is not None else ""
            self._move(run, ServerState.DOWN, f"{failure}; stderr: {said}" if said else failure)

    async def _live_run(self) -> tuple[_Run, Client]:
        """The live run and its client, starting the server if its restart delay has passed."""
        if self._state in (ServerState.STOPPED, ServerState.DOWN):
            wait = self._next_start - time.monotonic()
            if wait > 0:
                raise ServerUnavailable(f"MCP server {self.name!r} is down ({self.error}); next start in {wait:.1f}s")
        if self._state is not ServerState.UP:
            await self.start()
        run = self._run
        if self._state is not ServerState.UP or run is None or run.client is None:
            raise ServerUnavailable(f"MCP server {self.name!r} failed to start: {self.error}")
        return run, run.client

    async def client(self) -> Client:
        """The live ``mcp.Client``, for what commands don't cover (resources, prompts, raw calls).

        Calls made through it hold no slot: ``slots`` bound commands, not raw calls.
        """
        _, client = await self._live_run()
        return client

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        run = self._run
        if self._state is ServerState.UP and run is not None and run.client is not None:  # serving: the common case
            client = run.client
        else:
            run, client = await self._live_run()
        try:
            answer = await client.call_tool(tool, arguments)
        except MCPError as error:
            if error.code != CONNECTION_CLOSED:
                transient = error.code in TRANSIENT_CODES
                raise ProtocolError(f"{error.message} (code {error.code})", transient=transient) from None
            # Give the owner a moment to see the exit, so the next call starts a fresh server.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.over.wait(), timeout=0.5)
            raise ConnectionLost(f"MCP server {self.name!r} closed the connection mid-call ({self.error})") from None
        except (OSError, httpx2.TransportError) as error:
            raise ConnectionLost(f"MCP server {self.name!r}: {describe(error)}") from None
        self._failures = 0
        return answer

    async def close(self) -> None:
        """Stop the server for good: gracefully when it runs, at once when it is still starting."""
        run, starting = self._run, self.starting
        self._move(run, ServerState.CLOSED)
        if run is None or run.owner is None:
            return
        run.stop.set()
        if starting:
            run.owner.cancel()
        await asyncio.wait({run.owner}, timeout=10)


async def _list_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


async def _first_of(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits if wait is not None]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _start_failure(error: BaseException) -> str:
    """The innermost useful cause of a start failure (anyio wraps them in groups)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, MCPError) and error.code == CONNECTION_CLOSED:
        return "the server closed the connection while starting"
    return describe(error)
