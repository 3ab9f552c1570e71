"""One MCP server's life as a ``ServerState``, against real server subprocesses.

The demo server (examples/demo_server.py) starts, serves, crashes on
request (its ``crash`` tool) and is closed; a one-line Python program that
exits at once stands for a server that cannot start. The only fault injected
from outside is the cancellation of a server's owner task, which is what an
event loop's shutdown does to it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import demo_server_spec
from process_support import processes_mentioning

from aip.backoff import Backoff
from dispatchers import ManagedServer, ServerState, load_config
from dispatchers.errors import ConnectionLost, ServerStopped, ServerUnavailable
from dispatchers.managed_server import RESTART_BACKOFF

pytestmark = pytest.mark.timeout(60)

#: A server that exits at once, saying why on stderr: it never comes up.
CANNOT_START = {"command": sys.executable, "args": ["-c", "import sys; sys.exit('no luck on purpose')"]}


def server_of(entry: dict[str, Any], **options: Any) -> ManagedServer:
    """A ``ManagedServer`` for one ``mcp.json`` entry."""
    [(name, spec)] = load_config({"mcpServers": {"it": entry}}).items()
    return ManagedServer(name, spec, **options)


def marked_demo() -> tuple[dict[str, Any], str]:
    """The demo server's entry with a mark in its environment, to find its process by."""
    mark = uuid.uuid4().hex
    return demo_server_spec(env={"LIFECYCLE_TEST_MARK": mark}), mark


@asynccontextmanager
async def closing(server: ManagedServer) -> AsyncIterator[ManagedServer]:
    try:
        yield server
    finally:
        async with asyncio.timeout(30):
            await server.close()


async def until(check: Callable[[], bool], limit: float = 5) -> float:
    """Seconds until ``check()`` holds (polled), at most ``limit``."""
    begin = time.monotonic()
    while not check():
        assert time.monotonic() - begin < limit, f"not so within {limit}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - begin


def test_the_default_restart_delays_are_those_of_before() -> None:
    """0.5 to 0.625 s after a first failure, doubling, at most 30 to 37.5 s: ``min(30, 0.5 * 2**(n-1)) * [1, 1.25]``."""
    for failures in (1, 2, 3, 7, 8, 20):
        before = min(30.0, 0.5 * 2 ** (failures - 1))
        delays = [RESTART_BACKOFF.delay(failures) for _ in range(500)]
        assert before <= min(delays) and max(delays) <= before * 1.25, (failures, min(delays), max(delays))


async def test_a_server_goes_from_stopped_through_starting_to_up_and_ends_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dispatchers.mcp")
    entry, mark = marked_demo()
    async with closing(server_of(entry)) as server:
        assert server.state is ServerState.STOPPED and server.restart_due and not server.available
        started = server.launch()
        assert server.state is ServerState.STARTING and server.starting and not server.restart_due
        assert server.launch() is started  # a second launch joins the start under way
        await asyncio.wait_for(asyncio.shield(started), timeout=30)
        assert server.state is ServerState.UP and server.available, server.error
        assert server.error is None and "echo" in server.tools
        answer = await server.call_tool("echo", {"value": 5})
        assert answer.structured_content == {"result": 5}
        assert processes_mentioning(mark)
    assert server.state is ServerState.CLOSED
    assert not server.available and not server.starting and not server.restart_due
    assert not processes_mentioning(mark)
    with pytest.raises(ServerStopped, match="its manager is closed"):
        server.launch()
    with pytest.raises(ServerStopped):
        await server.client()
    await server.close()  # closing again changes nothing
    assert server.state is ServerState.CLOSED
    moves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MCP server 'it'")]
    assert moves[0] == "MCP server 'it' is starting"
    assert moves[1].startswith("MCP server 'it' is up with ")
    assert moves[-1] == "MCP server 'it' is closed", moves


async def test_a_crashed_server_is_down_until_its_backoff_passes_then_restarts() -> None:
    entry, mark = marked_demo()
    backoff = Backoff(initial=0.4, maximum=0.4, jitter=0)
    async with closing(server_of(entry, restart_backoff=backoff)) as server:
        await server.start()
        first = processes_mentioning(mark)
        assert len(first) == 1, first

        with pytest.raises(ConnectionLost):
            await server.call_tool("crash", {"exit_code": 3})
        await until(lambda: server.state is ServerState.DOWN)
        assert server.error is not None and server.error.startswith("the server process exited")
        assert not server.restart_due
        with pytest.raises(ServerUnavailable, match=r"is down \(the server process exited.*next start in 0\.\d"):
            await server.call_tool("echo", {"value": 1})

        assert await until(lambda: server.restart_due) >= 0.3
        answer = await server.call_tool("count", {"key": "after"})  # starts it again, then calls
        assert server.state is ServerState.UP
        assert answer.structured_content == {"result": 1}  # a fresh process: its counter starts again
        second = processes_mentioning(mark)
    assert len(second) == 1 and second != first
    assert not processes_mentioning(mark)


async def test_each_failed_start_doubles_the_wait_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.2, maximum=0.8, jitter=0)
    async with closing(server_of(CANNOT_START, restart_backoff=backoff)) as server:
        waits = []
        for _ in range(4):
            await server.start()
            assert server.state is ServerState.DOWN
            assert server.error is not None and "no luck on purpose" in server.error  # its stderr's last line
            waits.append(await until(lambda: server.restart_due))
    for wait, nominal in zip(waits, (0.2, 0.4, 0.8, 0.8), strict=True):
        assert nominal - 0.05 <= wait < nominal + 1.0, waits


async def test_closing_a_server_that_is_starting_ends_its_start_at_once() -> None:
    mark = uuid.uuid4().hex
    hangs = {"command": sys.executable, "args": ["-c", "import time; time.sleep(120)"], "env": {"MARK": mark}}
    server = server_of(hangs)
    started = server.launch()
    await asyncio.sleep(0.3)  # its process runs, and will never answer
    assert server.state is ServerState.STARTING
    begin = time.monotonic()
    await server.close()
    assert time.monotonic() - begin < 5
    assert started.done()  # whoever waited for the start is told at once
    assert server.state is ServerState.CLOSED  # the cancelled start's late report changed nothing
    assert not processes_mentioning(mark)


async def test_a_server_whose_owner_is_cancelled_is_stopped_not_failed_and_starts_again_at_once() -> None:
    """Injected fault: cancel the server's owner task, as the shutdown of its event loop would."""
    entry, mark = marked_demo()
    async with closing(server_of(entry, restart_backoff=Backoff(initial=60, maximum=60, jitter=0))) as server:
        await server.start()
        [owner] = [task for task in asyncio.all_tasks() if task.get_name() == "mcp-server:it"]
        owner.cancel()
        await asyncio.wait({owner}, timeout=10)
        assert server.state is ServerState.STOPPED
        assert server.error is None  # a stop is no failure: nothing to report, no backoff to wait out
        assert server.restart_due
        answer = await server.call_tool("echo", {"value": "again"})
        assert answer.structured_content == {"result": "again"}
        assert server.state is ServerState.UP
    assert not processes_mentioning(mark)
