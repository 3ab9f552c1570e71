"""MCP servers as long-lived connections: started once, watched, restarted.

Each ``ServerConnection`` has an owner task that holds the ``mcp.Client``
open (anyio wants a client entered and left by the same task) until the
manager closes or the server dies. A stdio server's stderr goes through a pipe
we read: its last lines explain a failure, and its end tells us that the
process exited even while no call was in flight, so the next command starts
a fresh process instead of failing on a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CONNECTION_CLOSED, INTERNAL_ERROR, REQUEST_TIMEOUT, CallToolResult, Tool

from .errors import ConnectionLost, ProtocolError, ServerUnavailable, describe
from .mcp_config import HttpServer, ServerSpec, StdioServer, load_config

logger = logging.getLogger("dispatchers.mcp")

#: JSON-RPC error codes after which the same call may well succeed.
TRANSIENT_CODES = frozenset({INTERNAL_ERROR, REQUEST_TIMEOUT})


class StderrTail:
    """The last lines a stdio server wrote to stderr, read through a pipe.

    The pipe's end means the process exited (or closed stderr, which servers
    don't do while they serve).
    """

    def __init__(self, name: str, lines: int = 3) -> None:
        read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "w")
        self.closed = asyncio.Event()
        self._lines: deque[str] = deque(maxlen=lines)
        self._log = logger.getChild(name)
        self._reader = asyncio.create_task(self._read(os.fdopen(read_fd, "rb")))

    async def _read(self, pipe: Any) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            while line := await reader.readline():
                text = line.decode(errors="replace").rstrip()
                self._log.debug("%s", text)
                if text.strip():
                    self._lines.append(text)
        finally:
            transport.close()
            self.closed.set()

    def release_writer(self) -> None:
        """Close our copy of the pipe's write end, once the child has its own."""
        self.writer.close()

    def text(self, limit: int = 400) -> str:
        """The last few non-blank lines, joined; at most ``limit`` characters from the end."""
        text = " | ".join(line.strip() for line in self._lines if line.strip())
        return text if len(text) <= limit else "..." + text[-limit:]

    async def aclose(self) -> None:
        """Stop reading, once the server's last words are in (or a second has passed)."""
        self.release_writer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), timeout=1.0)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@asynccontextmanager
async def _stdio_transport(spec: StdioServer, stderr: StderrTail) -> AsyncIterator[Any]:
    params = StdioServerParameters(command=spec.command, args=list(spec.args), env=spec.env or None, cwd=spec.cwd)
    async with stdio_client(params, errlog=stderr.writer) as streams:
        stderr.release_writer()
        yield streams


@asynccontextmanager
async def _http_transport(spec: HttpServer) -> AsyncIterator[Any]:
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(headers=spec.headers, timeout=timeout) as http,
        streamable_http_client(spec.url, http_client=http) as streams,
    ):
        yield streams


class ServerConnection:
    """One configured MCP server and its session."""

    def __init__(
        self,
        name: str,
        spec: ServerSpec,
        *,
        start_timeout: float = 30.0,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
    ) -> None:
        self.name = name
        self.spec = spec
        self.start_timeout = start_timeout
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        #: The tools the server listed when it last started, by name.
        self.tools: dict[str, Tool] = {}
        #: Why the server is down, while it is.
        self.error: str | None = None
        self._client: Client | None = None
        self._starting: asyncio.Future[None] | None = None
        self._owner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        #: Set when the current run of the server is over.
        self._down = asyncio.Event()
        self._failures = 0
        self._next_start = 0.0

    @property
    def available(self) -> bool:
        return self._client is not None

    @property
    def categories(self) -> tuple[str, ...]:
        return self.spec.category

    def __repr__(self) -> str:
        state = "up" if self.available else f"down: {self.error}"
        return f"<ServerConnection {self.name} ({self.spec.describe()}) {state}>"

    async def start(self) -> None:
        """Start the server unless it runs; a failure is kept in ``error``, not raised."""
        if self._client is not None:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._down = asyncio.Event()
            self._owner = asyncio.create_task(self._own(self._starting), name=f"mcp-server:{self.name}")
        # Shielded: a caller that gives up (its deadline) must not abort the start for the next one.
        await asyncio.shield(self._starting)

    async def _own(self, started: asyncio.Future[None]) -> None:
        stderr: StderrTail | None = None
        if isinstance(self.spec, StdioServer):
            stderr = StderrTail(self.name)
            transport = _stdio_transport(self.spec, stderr)
        else:
            transport = _http_transport(self.spec)
        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout(self.start_timeout):
                    client = await stack.enter_async_context(Client(transport))
                    self.tools = {tool.name: tool for tool in await _list_tools(client)}
                self._client, self.error, self._failures = client, None, 0
                self._starting = None
                started.set_result(None)
                logger.info("MCP server %r is up with %d tools", self.name, len(self.tools))
                await _first_of(self._stop.wait(), stderr.closed.wait() if stderr else None)
                # Down from this moment: no new call may reach the dying session.
                self._client = None
                self._down.set()
                if not self._stop.is_set():
                    self.error = "the server process exited"
        except TimeoutError:
            self.error = f"no answer within {self.start_timeout}s of starting"
        except Exception as error:
            self.error = _start_failure(error)
        finally:
            self._client = None
            self._down.set()
            if not self._stop.is_set():
                self._failures += 1
                delay = min(self.max_restart_delay, self.restart_delay * 2 ** (self._failures - 1))
                self._next_start = time.monotonic() + delay * (1 + random.random() / 4)
            if stderr is not None:
                await stderr.aclose()
                if self.error and stderr.text():
                    self.error += f"; stderr: {stderr.text()}"
            if not self._stop.is_set():
                logger.warning("MCP server %r is down: %s", self.name, self.error)
            if self._starting is started:
                self._starting = None
            if not started.done():
                started.set_result(None)

    @property
    def starting(self) -> bool:
        return self._starting is not None

    @property
    def restart_due(self) -> bool:
        """Down, not starting, and past its restart delay."""
        return self._client is None and self._starting is None and time.monotonic() >= self._next_start

    async def session(self) -> Client:
        """The live client, starting the server if its restart delay has passed."""
        if self._client is None:
            wait = self._next_start - time.monotonic()
            if self._starting is None and wait > 0:
                raise ServerUnavailable(f"MCP server {self.name!r} is down ({self.error}); next start in {wait:.1f}s")
            await self.start()
        if self._client is None:
            raise ServerUnavailable(f"MCP server {self.name!r} failed to start: {self.error}")
        return self._client

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        client = await self.session()
        down = self._down
        try:
            return await client.call_tool(tool, arguments)
        except MCPError as error:
            if error.code != CONNECTION_CLOSED:
                raise ProtocolError(
                    f"{error.message} (code {error.code})", transient=error.code in TRANSIENT_CODES
                ) from None
            # Give the owner a moment to notice the exit, so the next call starts a fresh server.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(down.wait(), timeout=0.5)
            raise ConnectionLost(f"MCP server {self.name!r} closed the connection mid-call ({self.error})") from None
        except (OSError, httpx2.TransportError) as error:
            raise ConnectionLost(f"MCP server {self.name!r}: {describe(error)}") from None

    async def close(self) -> None:
        """Stop the server: gracefully when it runs, at once when it is still starting."""
        self._stop.set()
        if self._owner is not None:
            if self._client is None:
                self._owner.cancel()
            await asyncio.wait({self._owner}, timeout=10)


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


class MCPServerManager:
    """All servers of one ``mcp.json``: an async context manager that starts and stops them.

    Entering starts every server at once and waits for each to be up or to
    have failed; a server that fails is reported in ``connections[name].error``
    and does not stop the others.
    """

    def __init__(self, servers: Mapping[str, ServerSpec], *, start_timeout: float = 30.0) -> None:
        self.connections = {
            name: ServerConnection(name, spec, start_timeout=start_timeout) for name, spec in servers.items()
        }

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any], **options: Any) -> MCPServerManager:
        return cls(load_config(source), **options)

    async def start(self) -> None:
        """Bring up every server that is down and past its restart delay; wait for those starting.

        Entering the manager calls it; so does a dispatcher that is about to
        refuse a command for want of a server's tools, since only a running
        server lists them (a server that failed its first start comes back so).
        """
        wanted = [c.start() for c in self.connections.values() if c.starting or c.restart_due]
        await asyncio.gather(*wanted)

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.connections.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, MCPServerManager]] = weakref.WeakKeyDictionary()


async def shared_manager(source: str | Path | Mapping[str, Any]) -> MCPServerManager:
    """A started manager for this config, shared by every batch run in this event loop.

    Starting a server costs more than a whole batch of calls (about 0.6 s for
    a Python server), so batches that follow one another reuse the servers,
    as one dispatcher would. Configs are told apart by their content. The
    servers stop when the event loop ends (its tasks are cancelled), or at
    ``close_shared_managers()``.
    """
    specs = load_config(source)
    key = json.dumps({name: spec.model_dump(mode="json") for name, spec in specs.items()}, sort_keys=True)
    managers = _shared.setdefault(asyncio.get_running_loop(), {})
    manager = managers.get(key)
    if manager is None:
        manager = managers[key] = MCPServerManager(specs)
    await manager.start()
    return manager


async def close_shared_managers() -> None:
    """Stop the servers that ``shared_manager`` started in this event loop."""
    managers = _shared.pop(asyncio.get_running_loop(), {})
    await asyncio.gather(*(manager.close() for manager in managers.values()))
