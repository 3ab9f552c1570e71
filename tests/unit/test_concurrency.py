"""Concurrency limits: at most N actions (and M reads) at once per server or per device, and no slot ever leaks.

The pure parts (``ConcurrencyLimits``, ``Slots``, which category a command is, the
``mcp.json`` keys) are tested directly; the rest against the demo server over
stdio, whose ``timed_action``/``timed_read`` tools report when they ran, so
overlap is measured where the work happens, not guessed from the client.
Every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio
from conftest import demo_server_spec
from mcp.types import Tool, ToolAnnotations

from aip.backoff import Backoff
from aip.failure import failure_cause
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    BatchPolicy,
    ConcurrencyLimits,
    ConfigError,
    ExecutionMode,
    LocalCommandDispatcher,
    MCPServerManager,
    RetryPolicy,
    load_config,
)
from dispatchers.concurrency import Slots, command_category

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


def tool(name: str, annotations: ToolAnnotations | None = None) -> Tool:
    return Tool(name=name, input_schema={"type": "object"}, annotations=annotations)


# --- the values: ConcurrencyLimits ---------------------------------------------------------------------------


def test_limits_are_small_comparable_printable_values() -> None:
    default = ConcurrencyLimits()
    assert default.action == 1 and default.data_collection is None
    assert default == ConcurrencyLimits(action=1, data_collection=None)
    assert ConcurrencyLimits(action=2) != default
    assert hash(default) == hash(ConcurrencyLimits())
    assert repr(default) == "ConcurrencyLimits(action=1, data_collection=None)"
    assert repr(ConcurrencyLimits(None, 4)) == "ConcurrencyLimits(action=None, data_collection=4)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.action = 2  # type: ignore[misc]
    assert default.limit("action") == 1 and default.limit("data_collection") is None
    with pytest.raises(ValueError, match="category 'write'"):
        default.limit("write")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
@pytest.mark.parametrize("category", ["action", "data_collection"])
def test_limits_must_be_whole_numbers_of_at_least_one(category: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=f"{category} must be a whole number of at least 1, or None"):
        ConcurrencyLimits(**{category: bad})


# --- the values: Slots ---------------------------------------------------------------------------------------


async def test_an_unlimited_kind_is_a_no_op() -> None:
    slots = Slots(ConcurrencyLimits(action=1, data_collection=None))
    async with asyncio.timeout(5), AsyncExitStack() as stack:
        for _ in range(100):
            await stack.enter_async_context(slots.slot("data_collection"))  # would block if it were limited
        await stack.enter_async_context(slots.slot("action"))
        assert slots.in_use("action") == 1
        assert slots.in_use("data_collection") == 0  # not even counted
    assert slots.in_use("action") == 0
    everything = Slots(ConcurrencyLimits(action=None))
    async with asyncio.timeout(5), AsyncExitStack() as stack:
        for _ in range(100):
            await stack.enter_async_context(everything.slot("action"))
    with pytest.raises(ValueError, match="category 'write'"):
        slots.slot("write")
    assert repr(Slots()) == "<Slots action 0/1, data_collection 0/unlimited>"


async def test_a_limit_of_n_admits_n_at_once_and_the_next_on_a_release() -> None:
    slots = Slots(ConcurrencyLimits(action=2, data_collection=3))
    first, second, third = (slots.slot("action") for _ in range(3))
    async with asyncio.timeout(5):
        await first.__aenter__()
        await second.__aenter__()
        waiter = asyncio.ensure_future(third.__aenter__())
        await until(lambda: slots.waiting("action") == 1)
        assert not waiter.done()
        assert repr(slots) == "<Slots action 2/2 (+1 waiting), data_collection 0/3>"
        await first.__aexit__(None, None, None)
        await waiter
        assert (slots.in_use("action"), slots.waiting("action")) == (2, 0)
        await second.__aexit__(None, None, None)
        await third.__aexit__(None, None, None)
    assert slots.in_use("action") == 0


async def test_a_slot_is_given_back_however_its_block_ends() -> None:
    slots = Slots()

    async def free_at_once() -> None:
        assert slots.in_use("action") == 0 and slots.waiting("action") == 0
        async with asyncio.timeout(1), slots.slot("action"):
            pass

    async with asyncio.timeout(10):
        # An error in the block.
        with pytest.raises(RuntimeError):
            async with slots.slot("action"):
                raise RuntimeError("the tool crashed")
        await free_at_once()

        # A timeout while holding the slot.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), slots.slot("action"):
                await asyncio.Event().wait()
        await free_at_once()

        # The holder's task cancelled.
        held = asyncio.Event()

        async def hold() -> None:
            async with slots.slot("action"):
                held.set()
                await asyncio.Event().wait()

        holder = asyncio.ensure_future(hold())
        await held.wait()
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        await free_at_once()

        # A waiter that times out never takes the slot, before or after its holder lets go.
        holder = asyncio.ensure_future(hold())
        held.clear()
        await held.wait()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), slots.slot("action"):
                raise AssertionError("a timed-out waiter ran")
        assert slots.waiting("action") == 0
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await free_at_once()

        # The race: the slot is handed to a waiter, which is cancelled before it runs.
        holding = slots.slot("action")
        await holding.__aenter__()
        waiter = asyncio.ensure_future(slots.slot("action").__aenter__())
        await until(lambda: slots.waiting("action") == 1)
        await holding.__aexit__(None, None, None)  # wakes the waiter ...
        waiter.cancel()  # ... which is cancelled before it gets to run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await free_at_once()


async def test_slots_within_shared_slots_respect_both_limits() -> None:
    device = Slots(ConcurrencyLimits(action=1, data_collection=2))
    one = Slots(ConcurrencyLimits(action=None, data_collection=1), within=device)
    other = Slots(ConcurrencyLimits(action=None, data_collection=None), within=device)
    async with asyncio.timeout(5):
        async with one.slot("action"):
            assert device.in_use("action") == 1
            with pytest.raises(TimeoutError):  # the device's one action slot is taken, whichever server asks
                async with asyncio.timeout(0.05), other.slot("action"):
                    pass
        assert device.in_use("action") == 0
        async with one.slot("data_collection"):
            with pytest.raises(TimeoutError):  # the server's own limit of 1
                async with asyncio.timeout(0.05), one.slot("data_collection"):
                    pass
            async with other.slot("data_collection"):  # the device allows 2
                assert device.in_use("data_collection") == 2
                with pytest.raises(TimeoutError):  # and no more
                    async with asyncio.timeout(0.05), other.slot("data_collection"):
                        pass
        assert device.in_use("data_collection") == one.in_use("data_collection") == 0
    assert "within <Slots action 0/1" in repr(one)


# --- which category a command is ---------------------------------------------------------------------------------

READ_ONLY = ToolAnnotations(read_only_hint=True)


@pytest.mark.parametrize(
    ("tool_type", "annotations", "category"),
    [
        ("data_collection", None, "data_collection"),  # the command says so
        ("data_collection", ToolAnnotations(destructive_hint=True), "data_collection"),
        ("action", READ_ONLY, "action"),  # the command says so, whatever the tool claims
        ("", READ_ONLY, "data_collection"),  # the tool is read-only
        ("demo", READ_ONLY, "data_collection"),  # tool_type naming a server says nothing of effects
        ("", None, "action"),  # unknown effects are side effects
        ("", ToolAnnotations(idempotent_hint=True), "action"),  # idempotent still writes
        ("", ToolAnnotations(read_only_hint=False), "action"),
        ("demo", None, "action"),
    ],
)
def test_which_category_a_command_is(tool_type: str, annotations: ToolAnnotations | None, category: str) -> None:
    command = Command(tool_name="t", tool_type=tool_type)
    assert command_category(command, tool("t", annotations)) == category


# --- mcp.json ------------------------------------------------------------------------------------------------


def test_mcp_json_limits_per_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_ACTIONS", "3")
    specs = load_config(
        {
            "mcpServers": {
                "plain": demo_server_spec(),
                "two": demo_server_spec(max_actions=2),
                "reads": demo_server_spec(max_data_collection=4),
                "free": demo_server_spec(max_actions=None),
                "env": demo_server_spec(max_actions="${DEMO_ACTIONS}"),
                "web": {"url": "http://127.0.0.1:1/mcp", "max_actions": 5, "max_data_collection": 6},
            }
        }
    )
    assert {name: spec.concurrency_limits() for name, spec in specs.items()} == {
        "plain": {},
        "two": {"action": 2},
        "reads": {"data_collection": 4},
        "free": {"action": None},
        "env": {"action": 3},
        "web": {"action": 5, "data_collection": 6},
    }


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "many"])
def test_mcp_json_limits_are_checked(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"config: mcpServers\.demo\.max_actions: "):
        load_config({"mcpServers": {"demo": demo_server_spec(max_actions=bad)}})


def test_the_manager_gives_each_server_its_slots() -> None:
    """Nothing is started: the slots are decided when the manager is made."""
    specs = load_config(
        {
            "mcpServers": {
                "plain": demo_server_spec(),
                "two": demo_server_spec(max_actions=2),
                "free": demo_server_spec(max_actions=None, max_data_collection=3),
            }
        }
    )
    limits = {name: c.slots.limits for name, c in MCPServerManager(specs).servers.items()}
    assert limits == {
        "plain": ConcurrencyLimits(),
        "two": ConcurrencyLimits(action=2),
        "free": ConcurrencyLimits(action=None, data_collection=3),
    }
    given = ConcurrencyLimits(action=4, data_collection=8)
    manager = MCPServerManager(specs, limits=given)
    assert manager.slots is None
    limits = {name: c.slots.limits for name, c in manager.servers.items()}
    assert limits == {
        "plain": given,
        "two": ConcurrencyLimits(action=2, data_collection=8),
        "free": ConcurrencyLimits(action=None, data_collection=3),
    }
    assert len({id(c.slots) for c in manager.servers.values()}) == 3

    device = MCPServerManager(specs, limits=given, per_manager=True)
    assert device.slots is not None and device.slots.limits == given
    connections = device.servers
    assert connections["plain"].slots is device.slots
    assert connections["two"].slots.within is device.slots  # its own limit, inside the device's
    assert connections["two"].slots.limits == ConcurrencyLimits(action=2, data_collection=None)
    assert MCPServerManager(specs, per_manager=True).slots.limits == ConcurrencyLimits()  # type: ignore[union-attr]


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
