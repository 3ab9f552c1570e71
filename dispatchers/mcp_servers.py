"""MCP servers as long-lived connections: started once, watched, restarted.

Each start of a server is a ``_Run`` with an owner task that holds the
``mcp.Client`` open (anyio wants a client entered and left by the same task)
until it is stopped or the server dies; a run's state lives on the run, so an
old run winding down can never touch the next one. A stdio server's stderr
goes through a pipe we read: its last lines explain a failure, and its end
tells us that the process exited even while no call was in flight, so the
next command starts a fresh process instead of failing on a dead one.

A connection also holds the ``Slots`` that bound how many commands of each
kind run on it at once (see ``concurrency``). They live with the server, not
with a dispatcher, so every dispatcher that uses the manager shares them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CONNECTION_CLOSED, INTERNAL_ERROR, REQUEST_TIMEOUT, CallToolResult, Tool

from .concurrency import ConcurrencyLimits, Slots
from .errors import ConnectionLost, ProtocolError, ServerStopped, ServerUnavailable, describe
from .mcp_config import HttpServer, ServerSpec, StdioServer, load_config

logger = logging.getLogger("dispatchers.mcp")

#: JSON-RPC error codes after which the same call may well succeed.
TRANSIENT_CODES = frozenset({INTERNAL_ERROR, REQUEST_TIMEOUT})


class StderrTail:
    """The end of what a stdio server writes to stderr, read through a pipe.

    Read in chunks, so no line is too long to read; only the last few KiB
    are kept. The pipe's end means the process exited (servers don't close
    stderr while they serve).
    """

    KEEP = 8192

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "w")
        self.closed = asyncio.Event()
        self._tail = bytearray()
        self._reader = asyncio.create_task(self._read(os.fdopen(read_fd, "rb")))

    async def _read(self, pipe: Any) -> None:
        try:
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            try:
                while chunk := await reader.read(65536):
                    self._tail += chunk
                    del self._tail[: -self.KEEP]
            finally:
                transport.close()
        finally:
            self.closed.set()

    def release_writer(self) -> None:
        """Close our copy of the pipe's write end, once the child has its own."""
        with contextlib.suppress(OSError):
            self.writer.close()

    def text(self, lines: int = 3, limit: int = 400) -> str:
        """The last few non-blank lines, joined; at most ``limit`` characters from the end."""
        kept = [line.strip() for line in self._tail.decode(errors="replace").splitlines() if line.strip()]
        text = " | ".join(kept[-lines:])
        return text if len(text) <= limit else "..." + text[-limit:]

    async def aclose(self) -> None:
        """Stop reading, once the server's last words are in (or a second has passed)."""
        self.release_writer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), timeout=1.0)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


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


@dataclass(eq=False)
class _Run:
    """One start of a server, from launch to its end."""

    #: Resolved once the server is up, or once it failed to come up.
    started: asyncio.Future[None]
    #: Set to end the run.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set as soon as the run is over: no call may reach it any more.
    down: asyncio.Event = field(default_factory=asyncio.Event)
    client: Client | None = None
    owner: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.client is not None and not self.down.is_set()


class ServerConnection:
    """One configured MCP server and its session.

    ``slots`` bound the commands running on it at once; by default, the
    limits its ``mcp.json`` entry sets, else ``ConcurrencyLimits()``.
    """

    def __init__(
        self,
        name: str,
        spec: ServerSpec,
        *,
        start_timeout: float = 30.0,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        slots: Slots | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.slots = slots if slots is not None else Slots(replace(ConcurrencyLimits(), **spec.concurrency_limits()))
        self.start_timeout = start_timeout
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        #: The tools the server listed when it last started, by name.
        self.tools: dict[str, Tool] = {}
        #: Why the server is down, while it is.
        self.error: str | None = None
        self._run: _Run | None = None
        self._closed = False
        #: Failures since the last successful call: they set the restart delay.
        self._failures = 0
        self._next_start = 0.0

    @property
    def available(self) -> bool:
        return self._run is not None and self._run.up

    @property
    def starting(self) -> bool:
        return self._run is not None and not self._run.started.done()

    @property
    def restart_due(self) -> bool:
        """Down, not starting, not closed, and past its restart delay."""
        down = not self.available and not self.starting
        return down and not self._closed and time.monotonic() >= self._next_start

    @property
    def categories(self) -> tuple[str, ...]:
        return self.spec.category

    def __repr__(self) -> str:
        state = "up" if self.available else f"down: {self.error}"
        return f"<ServerConnection {self.name} ({self.spec.describe()}) {state}>"

    def launch(self) -> asyncio.Future[None]:
        """Start the server unless it is up or starting; resolves when it is up or has failed."""
        if self._closed:
            raise ServerStopped(f"MCP server {self.name!r} was stopped: its manager is closed")
        run = self._run
        if run is None or (run.started.done() and not run.up):
            run = self._run = _Run(started=asyncio.get_running_loop().create_future())
            run.owner = asyncio.create_task(self._own(run), name=f"mcp-server:{self.name}")
        return run.started

    async def start(self) -> None:
        """Start the server unless it runs; a failure is kept in ``error``, not raised."""
        # Shielded: a caller that gives up (its deadline) must not abort the start for the next one.
        await asyncio.shield(self.launch())

    async def _own(self, run: _Run) -> None:
        stderr: StderrTail | None = None
        transport: AbstractAsyncContextManager[Any]
        if isinstance(self.spec, StdioServer):
            stderr = StderrTail()
            transport = _stdio_transport(self.spec, stderr)
        else:
            transport = _http_transport(self.spec)
        try:
            async with AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(self.start_timeout):
                        client = await stack.enter_async_context(Client(transport))
                        tools = await _list_tools(client)
                except TimeoutError:
                    self.error = f"no answer within {self.start_timeout}s of starting"
                    return
                except Exception as error:
                    self.error = _start_failure(error)
                    return
                self.tools, self.error, run.client = {tool.name: tool for tool in tools}, None, client
                run.started.set_result(None)
                logger.info("MCP server %r is up with %d tools", self.name, len(self.tools))
                await _first_of(run.stop.wait(), stderr.closed.wait() if stderr else None)
                run.down.set()
                if not run.stop.is_set():
                    self.error = "the server process exited"
        except asyncio.CancelledError:
            run.stop.set()  # the manager or the event loop is closing: a stop, not a failure
            raise
        except Exception as error:  # the session failed after the start (an HTTP server went away)
            self.error = describe(error)
        finally:
            try:
                await self._wind_down(run, stderr)
            finally:
                if not run.started.done():
                    run.started.set_result(None)

    async def _wind_down(self, run: _Run, stderr: StderrTail | None) -> None:
        run.down.set()
        run.client = None
        failed = not run.stop.is_set()
        if failed:
            self._failures += 1
            delay = min(self.max_restart_delay, self.restart_delay * 2 ** (self._failures - 1))
            self._next_start = time.monotonic() + delay * (1 + random.random() / 4)
        if stderr is not None:
            await stderr.aclose()
            if failed and stderr.text():
                self.error = f"{self.error}; stderr: {stderr.text()}"
        if failed:
            logger.warning("MCP server %r is down: %s", self.name, self.error)

    async def _live_run(self) -> _Run:
        """The live run, starting the server if its restart delay has passed."""
        if not self.available:
            wait = self._next_start - time.monotonic()
            if not self._closed and not self.starting and wait > 0:
                raise ServerUnavailable(f"MCP server {self.name!r} is down ({self.error}); next start in {wait:.1f}s")
            await self.start()
        run = self._run
        if run is None or not run.up:
            raise ServerUnavailable(f"MCP server {self.name!r} failed to start: {self.error}")
        return run

    async def session(self) -> Client:
        """The live ``mcp.Client``, for what commands don't cover (resources, prompts, raw calls).

        Calls made through it hold no slot: ``slots`` bound commands, not raw calls.
        """
        run = await self._live_run()
        assert run.client is not None
        return run.client

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        run = await self._live_run()
        assert run.client is not None
        try:
            answer = await run.client.call_tool(tool, arguments)
        except MCPError as error:
            if error.code != CONNECTION_CLOSED:
                transient = error.code in TRANSIENT_CODES
                raise ProtocolError(f"{error.message} (code {error.code})", transient=transient) from None
            # Give the owner a moment to see the exit, so the next call starts a fresh server.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.down.wait(), timeout=0.5)
            raise ConnectionLost(f"MCP server {self.name!r} closed the connection mid-call ({self.error})") from None
        except (OSError, httpx2.TransportError) as error:
            raise ConnectionLost(f"MCP server {self.name!r}: {describe(error)}") from None
        self._failures = 0
        return answer

    async def close(self) -> None:
        """Stop the server for good: gracefully when it runs, at once when it is still starting."""
        self._closed = True
        run = self._run
        if run is None or run.owner is None:
            return
        run.stop.set()
        if not run.started.done():
            run.owner.cancel()
        await asyncio.wait({run.owner}, timeout=10)
        if not run.started.done():  # cancelled before it ever ran
            run.started.set_result(None)


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

        self.connections = {
            name: ServerConnection(name, spec, start_timeout=start_timeout, slots=slots_of(spec))
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
        wanted = self.connections if names is None else {name: self.connections[name] for name in names}
        return [c.launch() for c in wanted.values() if c.starting or c.restart_due]

    async def start(self) -> None:
        """Bring up every server that is down and due, and wait for each to be up or to have failed."""
        await asyncio.gather(*(asyncio.shield(started) for started in self.launch()))

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.connections.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


_shared: dict[asyncio.AbstractEventLoop, dict[str, MCPServerManager]] = {}


def shared_manager(source: str | Path | Mapping[str, Any]) -> MCPServerManager:
    """A manager for this config, shared by every batch run in the running event loop.

    Starting a server costs more than a whole batch of calls (about 0.6 s for
    a Python server), so batches that follow one another reuse the servers,
    as one dispatcher would. Its servers are launched here but not waited for:
    each command waits for the servers it needs, within its own deadline.
    Configs are told apart by their content. The servers stop when the event
    loop ends (its tasks are cancelled), or at ``close_shared_managers()``.
    """
    specs = load_config(source)
    # exclude_unset: an entry's "max_actions": null (no limit) is not the same config as no "max_actions" at all.
    key = json.dumps(
        {name: spec.model_dump(mode="json", exclude_unset=True) for name, spec in specs.items()}, sort_keys=True
    )
    for closed in [loop for loop in _shared if loop.is_closed()]:
        del _shared[closed]
    managers = _shared.setdefault(asyncio.get_running_loop(), {})
    manager = managers.get(key)
    if manager is None:
        manager = managers[key] = MCPServerManager(specs)
    manager.launch()
    return manager


async def close_shared_managers() -> None:
    """Stop the servers that ``shared_manager`` started in the running event loop."""
    managers = _shared.pop(asyncio.get_running_loop(), {})
    await asyncio.gather(*(manager.close() for manager in managers.values()))
