"""Concurrency limits against real servers: at most N actions (and M reads) at once, and no slot ever leaks.

The demo server runs over stdio; its ``timed_action``/``timed_read`` tools
report when they ran, so overlap is measured where the work happens, not
guessed from the client. (The values themselves, ``ConcurrencyLimits`` and
``Slots``, are in ``tests/unit/test_concurrency_limits.py``.) Every test is
bounded in time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
from conftest import demo_server_spec

from aip.backoff import Backoff
from aip.failure import failure_cause
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    BatchPolicy,
    ConcurrencyLimits,
    ExecutionMode,
    LocalCommandDispatcher,
    MCPServerManager,
    RetryPolicy,
)

pytestmark = pytest.mark.timeout(60)

PARALLEL = BatchPolicy(mode=ExecutionMode.PARALLEL, max_concurrency=16)


# --- helpers -------------------------------------------------------------------------------------------------


def key() -> str:
    return uuid.uuid4().hex


@asynccontextmanager
async def running(config: dict[str, Any], **options: Any) -> AsyncIterator[MCPServerManager]:
    """A started manager whose servers are all up, closed on the way out; start and close are bounded."""
    manager = MCPServerManager.from_config(config, **options)
    try:
        async with asyncio.timeout(45):
            await manager.start()
        for name, connection in manager.servers.items():
            assert connection.available, f"{name}: {connection.error}"
        yield manager
    finally:
        async with asyncio.timeout(30):
            await manager.close()


async def run(dispatcher: LocalCommandDispatcher, *commands: Command, timeout: float = 20) -> list[Result]:
    async with asyncio.timeout(timeout + 10):
        return await dispatcher.execute_commands(list(commands), timeout=timeout)


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


def timed(tool: str, seconds: float, tag: str, **fields: Any) -> Command:
    return Command(tool_name=tool, parameters={"seconds": seconds, "key": tag}, **fields)


def spans(results: Sequence[Result]) -> list[tuple[float, float]]:
    """The (start, end) that each timed tool reported, all of which must have succeeded."""
    for result in results:
        assert result.status is ResultStatus.SUCCESS, result.error
    return [(r.result["started"], r.result["ended"]) for r in results]


def most_at_once(results: Sequence[Result]) -> int:
    """The largest number of the reported spans that overlap at one instant (touching ends don't count)."""
    events = sorted([(end, -1) for _, end in spans(results)] + [(start, 1) for start, _ in spans(results)])
    running = peak = 0
    for _, change in events:  # at equal times the end (-1) sorts first
        running += change
        peak = max(peak, running)
    return peak


# --- real servers: who runs at once --------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def demo() -> AsyncIterator[MCPServerManager]:
    """One demo server with the default limits, for tests that leave it as they found it."""
    async with running({"mcpServers": {"demo": demo_server_spec()}}) as manager:
        yield manager


async def test_actions_never_overlap_while_reads_do(demo: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(demo, batch=PARALLEL)
    actions, reads, typed_reads = key(), key(), key()
    commands = [
        timed("timed_action", 0.3, actions),
        timed("timed_read", 0.3, actions, tool_type="action"),  # called as an action: counts as one
        timed("timed_action", 0.3, actions),
        *(timed("timed_read", 0.8, reads) for _ in range(3)),  # read-only by its annotations
        *(timed("timed_action", 0.8, typed_reads, tool_type="data_collection") for _ in range(2)),
    ]
    begin = time.monotonic()

    results = await run(dispatcher, *commands)

    assert time.monotonic() - begin >= 0.9  # the three actions, one after the other
    assert most_at_once(results[:3]) == 1
    assert [r.result["alongside"] for r in results[:3]] == [0, 0, 0]
    assert most_at_once(results[3:6]) == 3
    assert most_at_once(results[6:]) == 2
    assert most_at_once(results) >= 6  # reads never waited for the actions
    assert demo.servers["demo"].slots.in_use("action") == 0


async def test_an_action_limit_of_two_lets_two_run_at_once() -> None:
    async with running({"mcpServers": {"demo": demo_server_spec()}}, limits=ConcurrencyLimits(action=2)) as manager:
        dispatcher = LocalCommandDispatcher(manager, batch=PARALLEL)
        tag = key()
        results = await run(dispatcher, *(timed("timed_action", 0.4, tag) for _ in range(5)))

    assert most_at_once(results) == 2
    assert max(r.result["alongside"] for r in results) == 1


async def test_mcp_json_limits_win_over_the_managers() -> None:
    config = {
        "mcpServers": {
            "wide": demo_server_spec(max_actions=3),
            "narrow": demo_server_spec(max_data_collection=1),
        }
    }
    async with running(config, limits=ConcurrencyLimits(action=1, data_collection=None)) as manager:
        dispatcher = LocalCommandDispatcher(manager, batch=PARALLEL)
        results = await run(
            dispatcher,
            *(timed("timed_action", 0.5, key(), namespace="wide") for _ in range(4)),
            *(timed("timed_action", 0.3, key(), namespace="narrow") for _ in range(2)),
            *(timed("timed_read", 0.3, key(), namespace="narrow") for _ in range(2)),
        )

    assert most_at_once(results[0:4]) == 3  # max_actions: 3 on "wide"
    assert most_at_once(results[4:6]) == 1  # the manager's limit on "narrow", which sets none
    assert most_at_once(results[6:8]) == 1  # max_data_collection: 1 on "narrow"


@pytest.mark.parametrize("per_manager", [True, False])
async def test_per_manager_limits_hold_across_servers(per_manager: bool) -> None:
    config = {"mcpServers": {"left": demo_server_spec(), "right": demo_server_spec()}}
    async with running(config, per_manager=per_manager) as manager:
        dispatcher = LocalCommandDispatcher(manager, batch=PARALLEL)
        results = await run(
            dispatcher,
            *(timed("timed_action", 0.4, key(), namespace=server) for server in ("left", "right", "left", "right")),
            *(timed("timed_read", 0.6, key(), namespace=server) for server in ("left", "right")),
        )

    assert [r.namespace for r in results[:4]] == ["left", "right", "left", "right"]
    # The spans come from two processes: one action at a time on the whole "device", or one per server.
    assert most_at_once(results[:4]) == (1 if per_manager else 2)
    assert most_at_once(results[4:]) == 2  # reads stay parallel either way


# --- real servers: no slot leaks -----------------------------------------------------------------------------


async def assert_the_slot_is_free(manager: MCPServerManager, tag: str | None = None) -> None:
    """The slot is neither held nor waited for, and a new action gets it at once.

    With the ``tag`` of an abandoned timed call: that call no longer runs in
    the server either (the client's ``notifications/cancelled`` stopped it).
    """
    slots = manager.servers["demo"].slots
    assert (slots.in_use("action"), slots.waiting("action")) == (0, 0), slots
    begin = time.monotonic()
    [result] = await run(LocalCommandDispatcher(manager), timed("timed_action", 0.05, tag or key()))
    assert result.status is ResultStatus.SUCCESS, result.error
    assert time.monotonic() - begin < 2  # of its 20 s timeout: it never waited for a slot
    assert result.result["alongside"] == 0


async def test_a_command_that_times_out_holding_the_slot_gives_it_back(demo: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(demo)
    tag = key()
    stuck = timed("timed_action", 30, tag, call_id="stuck")
    begin = time.monotonic()

    [result] = await run(dispatcher, stuck, timeout=1)

    assert time.monotonic() - begin < 3
    assert failure_cause(stuck, result) == "TimeoutError: no result within 1.0s"
    await assert_the_slot_is_free(demo, tag)


async def test_a_batch_cancelled_mid_call_gives_the_slot_back(demo: MCPServerManager) -> None:
    slots = demo.servers["demo"].slots
    dispatcher = LocalCommandDispatcher(demo)
    tag = key()
    batch = asyncio.ensure_future(run(dispatcher, timed("timed_action", 30, tag), timeout=30))
    await until(lambda: slots.in_use("action") == 1)

    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await batch

    await assert_the_slot_is_free(demo, tag)


async def test_a_server_crash_mid_call_gives_the_slot_back() -> None:
    async with running({"mcpServers": {"demo": demo_server_spec()}}) as manager:
        slots = manager.servers["demo"].slots
        patient = RetryPolicy(attempts=20, backoff=Backoff(initial=0.1, maximum=0.5, jitter=0))
        dispatcher = LocalCommandDispatcher(manager, batch=PARALLEL, retry=patient)
        crash = Command(tool_name="crash", call_id="crash")  # no hints: an action, holding the slot as it dies
        queued = timed("timed_action", 0.05, key(), call_id="queued")  # waits for that slot
        begin = time.monotonic()

        crashed, after = await run(dispatcher, crash, queued, timeout=30)

        assert failure_cause(crash, crashed).startswith("ConnectionLost: ")
        assert after.status is ResultStatus.SUCCESS, after.error  # got the slot, on the restarted server
        assert time.monotonic() - begin < 15
        assert slots.in_use("action") == 0
        await assert_the_slot_is_free(manager)


async def test_a_command_waiting_for_a_slot_times_out_and_never_takes_it(demo: MCPServerManager) -> None:
    """Two dispatchers (as two flow runs would have) share the server's slots; the waiter's deadline holds."""
    slots = demo.servers["demo"].slots
    tag = key()
    holder = asyncio.ensure_future(run(LocalCommandDispatcher(demo), timed("timed_action", 2, key()), timeout=20))
    await until(lambda: slots.in_use("action") == 1)

    waiter = Command(tool_name="count", parameters={"key": tag}, call_id="waiter")  # no hints: an action
    begin = time.monotonic()
    waiting = asyncio.ensure_future(run(LocalCommandDispatcher(demo), waiter, timeout=0.5))
    await until(lambda: slots.waiting("action") == 1)
    [result] = await waiting
    elapsed = time.monotonic() - begin

    assert failure_cause(waiter, result) == "TimeoutError: no result within 0.5s"
    assert 0.4 < elapsed < 1.5  # its own deadline, not the holder's 2 s
    assert slots.waiting("action") == 0
    assert not holder.done()
    [held] = await holder
    assert held.status is ResultStatus.SUCCESS, held.error
    [counted] = await run(LocalCommandDispatcher(demo), Command(tool_name="count", parameters={"key": tag}))
    assert counted.result == {"result": 1}  # the waiter's call never ran, not even after the slot came free
    await assert_the_slot_is_free(demo)


async def test_a_command_that_fails_before_its_call_never_waits_for_a_slot(demo: MCPServerManager) -> None:
    slots = demo.servers["demo"].slots
    holder = asyncio.ensure_future(run(LocalCommandDispatcher(demo), timed("timed_action", 2, key()), timeout=20))
    await until(lambda: slots.in_use("action") == 1)
    bad_parameters = Command(tool_name="count", parameters={"key": 7}, call_id="bad")
    unknown = Command(tool_name="no_such_tool", tool_type="action", call_id="unknown")
    begin = time.monotonic()

    results = await run(LocalCommandDispatcher(demo, batch=PARALLEL), bad_parameters, unknown, timeout=10)

    assert time.monotonic() - begin < 1  # at once, though the only action slot is taken
    assert failure_cause(bad_parameters, results[0]).startswith("InvalidParameters: ")
    assert failure_cause(unknown, results[1]).startswith("UnknownTool: ")
    assert slots.waiting("action") == 0 and not holder.done()
    await holder
