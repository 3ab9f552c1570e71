"""The owner of the MCP servers batch runs share: ``ServerPool``, against real demo server subprocesses.

Each test marks its servers' environment with a fresh id, so their processes
can be found (and found gone) whatever else runs. The flow tests use the
session's Prefect API.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from conftest import demo_server_spec
from process_support import processes_mentioning

from aip.messages import Command, ResultStatus
from dispatchers import ServerPool, ServerState, ensure_server_pool, shared_manager
from flows.batch import run_batch_flow

pytestmark = pytest.mark.timeout(90)


def marked_config() -> tuple[dict[str, Any], str]:
    """An ``mcp.json`` of the demo server, with a mark in its environment to find its process by."""
    mark = uuid.uuid4().hex
    return {"mcpServers": {"demo": demo_server_spec(env={"POOL_TEST_MARK": mark})}}, mark


async def test_a_pool_shares_one_manager_per_config_and_stops_its_servers_when_it_ends() -> None:
    config, mark = marked_config()
    other, other_mark = marked_config()
    async with ServerPool() as pool:
        assert ServerPool.current() is pool
        manager = shared_manager(config)
        assert shared_manager({"mcpServers": dict(config["mcpServers"])}) is manager  # told apart by content
        assert pool.manager(config) is manager
        assert shared_manager(other) is not manager
        await asyncio.wait_for(manager.start(), timeout=30)
        await asyncio.wait_for(shared_manager(other).start(), timeout=30)
        assert processes_mentioning(mark) and processes_mentioning(other_mark)
        servers = [*manager.servers.values(), *shared_manager(other).servers.values()]
        assert all(server.available for server in servers), [server.error for server in servers]
    assert ServerPool.current() is None
    assert [server.state for server in servers] == [ServerState.CLOSED] * 2
    assert not processes_mentioning(mark) and not processes_mentioning(other_mark)
    with pytest.raises(RuntimeError, match="not open"):
        pool.manager(config)


async def test_without_a_pool_there_is_no_shared_manager() -> None:
    config, _ = marked_config()
    with pytest.raises(RuntimeError, match="no ServerPool is open"):
        shared_manager(config)
    pool = ServerPool()
    with pytest.raises(RuntimeError, match="not open"):
        pool.manager(config)


async def test_ensure_server_pool_uses_the_open_one_else_opens_one_for_its_block() -> None:
    config, mark = marked_config()
    async with ServerPool() as outer:
        async with ensure_server_pool() as pool:
            assert pool is outer
            await asyncio.wait_for(shared_manager(config).start(), timeout=30)
        assert shared_manager(config).servers["demo"].available  # the block did not close the caller's pool
    assert not processes_mentioning(mark)

    async with ensure_server_pool() as own:
        assert ServerPool.current() is own
        manager = shared_manager(config)
        await asyncio.wait_for(manager.start(), timeout=30)
        assert processes_mentioning(mark)
    assert ServerPool.current() is None
    assert manager.servers["demo"].state is ServerState.CLOSED
    assert not processes_mentioning(mark)


async def test_a_pool_is_not_current_in_another_event_loop() -> None:
    """A thread gets a copy of this context: the pool is in it, but its servers belong to this loop."""
    async with ServerPool():

        async def seen_there() -> ServerPool | None:
            return ServerPool.current()

        assert await asyncio.to_thread(asyncio.run, seen_there()) is None


async def test_a_task_that_outlives_its_pool_sees_none_and_gets_a_fresh_one() -> None:
    inside = asyncio.Event()
    release = asyncio.Event()

    async def lingering() -> ServerPool | None:
        inside.set()
        await release.wait()
        return ServerPool.current()

    async with ServerPool() as pool:
        task = asyncio.create_task(lingering())  # copies the context: the pool is in it
        await inside.wait()
    release.set()
    assert await asyncio.wait_for(task, timeout=5) is None  # closed: not handed out again
    async with ensure_server_pool() as fresh:
        assert fresh is not pool


async def test_a_pool_is_entered_once() -> None:
    async with ServerPool() as pool:
        with pytest.raises(RuntimeError, match="entered once"):
            await pool.__aenter__()


@pytest.mark.usefixtures("prefect_api")
async def test_a_flow_run_without_a_pool_stops_its_servers_when_it_ends() -> None:
    config, mark = marked_config()
    count = [Command(tool_name="count", parameters={"key": "pool"})]

    first = await run_batch_flow(count, config=config, timeout=60)
    left = processes_mentioning(mark)
    second = await run_batch_flow(count, config=config, timeout=60)

    assert first[0].status is ResultStatus.SUCCESS, first[0].error
    assert left == []  # stopped with its flow run, not left running for the event loop's life
    assert (first[0].result, second[0].result) == ({"result": 1}, {"result": 1})  # each run its own server
    assert not processes_mentioning(mark)


@pytest.mark.usefixtures("prefect_api")
async def test_flow_runs_inside_one_pool_share_their_servers_until_it_ends() -> None:
    config, mark = marked_config()
    count = [Command(tool_name="count", parameters={"key": "pool"})]

    async with ServerPool():
        first = await run_batch_flow(count, config=config, timeout=60)
        second = await run_batch_flow(count, config=config, timeout=60)
        during = processes_mentioning(mark)

    assert (first[0].result, second[0].result) == ({"result": 1}, {"result": 2})  # one process counted both
    assert len(during) == 1
    assert not processes_mentioning(mark)
