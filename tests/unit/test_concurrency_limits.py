"""Concurrency limits as values: ``ConcurrencyLimits``, ``Slots``, which category a command is, the ``mcp.json`` keys.

No server is started; the limits against real servers (who runs at once, no
slot leaks) are in ``tests/integration/test_concurrency.py``. Every test is
bounded in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from conftest import demo_server_spec
from mcp.types import Tool, ToolAnnotations

from aip.messages import Command
from dispatchers import (
    ConcurrencyLimits,
    ConfigError,
    MCPServerManager,
    load_config,
)
from dispatchers.concurrency import Slots, command_category

pytestmark = pytest.mark.timeout(60)


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


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
