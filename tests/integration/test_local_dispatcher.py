"""LocalCommandDispatcher and MCPServerManager against real MCP server subprocesses.

The demo server (examples/demo_server.py) and the third-party
``mcp-server-time`` run over stdio; one test reaches the demo server over
streamable HTTP on 127.0.0.1. Every test is bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from conftest import DEMO_SERVER, EXAMPLES, demo_server_spec
from mcp.types import CallToolResult, ImageContent, TextContent

from aip.backoff import Backoff
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    BatchPolicy,
    ExecutionMode,
    LocalCommandDispatcher,
    MCPServerManager,
    RetryPolicy,
    ServerPool,
    load_config,
    shared_manager,
)
from dispatchers.mcp_results import tool_output
from flows.batch_file import check_tool_types, load_batch

pytestmark = pytest.mark.timeout(60)

TIME_SERVER = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]}
#: Quick retries, for tests that expect some.
QUICK = RetryPolicy(attempts=3, backoff=Backoff(initial=0.05, maximum=0.2, jitter=0))
SUFFIX = ", please retry or execute a different command."


# --- helpers -------------------------------------------------------------------------------------------------


def child_processes() -> dict[int, str]:
    """This process's children (zombies included), by pid, with their command lines."""
    me = os.getpid()
    children: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(fields[1]) == me:
            children[int(entry)] = f"[{fields[0]}] {command}"
    return children


def demo_children() -> set[int]:
    """Children running the demo server over stdio (not the session's HTTP one)."""
    return {
        pid for pid, command in child_processes().items() if str(DEMO_SERVER) in command and "--http" not in command
    }


@asynccontextmanager
async def running(config: dict[str, Any], **options: Any) -> AsyncIterator[MCPServerManager]:
    """A started manager, closed on the way out; start and close are bounded."""
    manager = MCPServerManager.from_config(config, **options)
    try:
        async with asyncio.timeout(45):
            await manager.start()
        yield manager
    finally:
        async with asyncio.timeout(30):
            await manager.close()


def count_calls(manager: MCPServerManager, server: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every tool call the dispatcher sends to ``server`` (the names), to prove how often it ran."""
    connection = manager.servers[server]
    original = connection.call_tool
    calls: list[str] = []

    async def counting(tool: str, arguments: dict[str, Any]) -> CallToolResult:
        calls.append(tool)
        return await original(tool, arguments)

    monkeypatch.setattr(connection, "call_tool", counting)
    return calls


def failure_cause(result: Result, command: Command) -> str:
    """Checks the documented failure format and returns the cause."""
    assert result.status is ResultStatus.FAILURE, result
    assert result.call_id == command.call_id
    prefix = f"Error occurred while executing command {command}: "
    assert result.error is not None
    assert result.error.startswith(prefix), result.error
    assert result.result == result.error + SUFFIX
    cause = result.error[len(prefix) :]
    assert cause.strip()
    return cause


async def run(dispatcher: LocalCommandDispatcher, *commands: Command, timeout: float = 20) -> list[Result]:
    return await dispatcher.execute_commands(list(commands), timeout=timeout)


def key() -> str:
    return uuid.uuid4().hex


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared() -> AsyncIterator[MCPServerManager]:
    """The demo server and mcp-server-time, for tests that don't disturb them."""
    async with running({"mcpServers": {"demo": demo_server_spec(), "time": TIME_SERVER}}) as manager:
        assert manager.servers["demo"].available, manager.servers["demo"].error
        assert manager.servers["time"].available, manager.servers["time"].error
        yield manager


# --- outputs -------------------------------------------------------------------------------------------------


async def test_structured_output(shared: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(shared, agent="test")
    nested = {"list": [1, "two", None], "flag": True, "inner": {"x": 1.5}}
    commands = [
        Command(tool_name="add", parameters={"a": 2, "b": 3.5}, call_id="sum"),
        Command(tool_name="echo", parameters={"value": nested}, call_id="nested"),
    ]

    results = await run(dispatcher, *commands)

    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS]
    assert results[0].result == {"result": 5.5}
    assert results[1].result == {"result": nested}
    assert [r.namespace for r in results] == ["demo", "demo"]
    assert [r.call_id for r in results] == ["sum", "nested"]


async def test_text_output(shared: MCPServerManager) -> None:
    """The demo's ``text`` tool answers with unstructured text; invariant 6 says that text is the result."""
    dispatcher = LocalCommandDispatcher(shared)
    [result] = await run(dispatcher, Command(tool_name="text", parameters={"message": "hello, world"}))
    assert result.status is ResultStatus.SUCCESS
    assert result.result == "hello, world"


def test_text_content_becomes_the_result() -> None:
    """How an MCP answer maps to Result.result when it carries only content blocks."""
    one = CallToolResult(content=[TextContent(type="text", text="")])
    assert tool_output(one) == ""
    two = CallToolResult(content=[TextContent(type="text", text="a"), TextContent(type="text", text="b")])
    assert tool_output(two) == ["a", "b"]
    assert tool_output(CallToolResult(content=[])) is None
    image = CallToolResult(content=[ImageContent(type="image", data="aGk=", mime_type="image/png")])
    assert tool_output(image) == [{"type": "image", "data": "aGk=", "mimeType": "image/png"}]
    structured = CallToolResult(content=[TextContent(type="text", text="0")], structured_content={"result": 0})
    assert tool_output(structured) == {"result": 0}


@pytest.mark.parametrize("mode", [ExecutionMode.SEQUENTIAL, ExecutionMode.PARALLEL])
async def test_falsy_outputs_are_kept(shared: MCPServerManager, mode: ExecutionMode) -> None:
    dispatcher = LocalCommandDispatcher(shared, batch=BatchPolicy(mode=mode))
    values: list[Any] = [0, "", [], False, {}, None]

    results = await run(dispatcher, *(Command(tool_name="echo", parameters={"value": v}) for v in values))

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * len(values)
    for value, result in zip(values, results, strict=True):
        assert result.result == {"result": value}
        assert type(result.result["result"]) is type(value)


async def test_mcp_server_time_get_current_time(shared: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(shared)
    commands = [
        Command(tool_name="get_current_time", parameters={"timezone": "UTC"}, call_id="plain"),
        Command(tool_name="time.get_current_time", parameters={"timezone": "Europe/Paris"}),
        Command(tool_name="get_current_time", parameters={"timezone": "Asia/Tokyo"}, tool_type="time"),
        Command(tool_name="get_current_time", parameters={"timezone": "UTC"}, tool_type="data_collection"),
    ]

    results = await run(dispatcher, *commands)

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 4, [r.error for r in results]
    assert [r.namespace for r in results] == ["time"] * 4
    assert results[0].call_id == "plain"
    answer = results[0].result
    assert answer["timezone"] == "UTC"
    moment = datetime.fromisoformat(answer["datetime"])
    assert moment.utcoffset() is not None
    assert abs(moment.timestamp() - time.time()) < 600
    assert results[1].result["timezone"] == "Europe/Paris"
    assert results[2].result["timezone"] == "Asia/Tokyo"


# --- failures ------------------------------------------------------------------------------------------------


async def test_a_tool_reporting_an_error_fails_with_its_message_and_runs_once(
    shared: MCPServerManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = count_calls(shared, "demo", monkeypatch)
    dispatcher = LocalCommandDispatcher(shared, retry=RetryPolicy(attempts=5, backoff=Backoff(initial=0, jitter=0)))
    message = f"disk on fire {key()}"
    command = Command(tool_name="fail", parameters={"message": message}, call_id="f1")
    caplog.set_level(logging.WARNING, logger="dispatchers")

    [result] = await run(dispatcher, command)

    cause = failure_cause(result, command)
    assert cause.startswith("ToolError: ")
    assert message in cause
    assert calls == ["fail"]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_invalid_parameters_fail_naming_the_field_without_calling_the_tool(
    shared: MCPServerManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(shared, "demo", monkeypatch)
    dispatcher = LocalCommandDispatcher(shared)
    wrong_type = Command(tool_name="add", parameters={"a": "two", "b": 2}, call_id="p1")
    missing = Command(tool_name="count", parameters={"key": 5}, call_id="p2")
    no_value = Command(tool_name="echo", parameters={}, call_id="p3")

    results = await run(dispatcher, wrong_type, missing, no_value)

    cause = failure_cause(results[0], wrong_type)
    assert cause.startswith("InvalidParameters: ")
    assert "'a'" in cause
    assert "number" in cause
    assert "'key'" in failure_cause(results[1], missing)
    assert "'value'" in failure_cause(results[2], no_value)
    assert calls == []


async def test_an_unknown_tool_fails_with_a_suggestion(shared: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(shared)
    typo = Command(tool_name="ecoh", parameters={"value": 1}, call_id="u1")
    nowhere = Command(tool_name="echo", parameters={"value": 1}, namespace="nope", call_id="u2")

    results = await run(dispatcher, typo, nowhere)

    cause = failure_cause(results[0], typo)
    assert cause.startswith("UnknownTool: ")
    assert "did you mean 'echo'" in cause
    cause = failure_cause(results[1], nowhere)
    assert "'nope'" in cause
    assert "demo" in cause
    assert "time" in cause


async def test_an_ambiguous_tool_names_both_servers(demo_config: dict[str, Any]) -> None:
    config = {"mcpServers": {"left": demo_server_spec(), "right": demo_server_spec()}}
    async with running(config) as manager:
        dispatcher = LocalCommandDispatcher(manager)
        ambiguous = Command(tool_name="count", parameters={"key": "k"}, call_id="amb")
        results = await run(
            dispatcher,
            ambiguous,
            Command(tool_name="left.count", parameters={"key": "k"}),
            Command(tool_name="count", parameters={"key": "k"}, namespace="left"),
            Command(tool_name="count", parameters={"key": "k"}, tool_type="right"),
        )

    cause = failure_cause(results[0], ambiguous)
    assert cause.startswith("AmbiguousTool: ")
    assert "left.count" in cause
    assert "right.count" in cause
    # Pinned calls reach one server each: two calls on left, one on right.
    assert [(r.namespace, r.result) for r in results[1:]] == [
        ("left", {"result": 1}),
        ("left", {"result": 2}),
        ("right", {"result": 1}),
    ]


# --- retries -------------------------------------------------------------------------------------------------


async def test_a_flaky_data_collection_tool_is_retried_to_success_with_the_same_call_id(
    shared: MCPServerManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = count_calls(shared, "demo", monkeypatch)
    dispatcher = LocalCommandDispatcher(shared, retry=QUICK)
    command = Command(
        tool_name="flaky", parameters={"key": key(), "failures": 2}, tool_type="data_collection", call_id="flaky-1"
    )
    caplog.set_level(logging.WARNING, logger="dispatchers")

    [result] = await run(dispatcher, command)

    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.result == {"attempts": 3}
    assert result.call_id == "flaky-1"
    assert result.namespace == "demo"
    assert calls == ["flaky", "flaky", "flaky"]
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert all(line.startswith("flaky[flaky-1] attempt ") for line in retries)
    assert "transient failure 1 of 2" in retries[0]


async def test_a_flaky_action_is_not_retried(shared: MCPServerManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``action`` has side effects: a call that reached the server is not repeated."""
    calls = count_calls(shared, "demo", monkeypatch)
    dispatcher = LocalCommandDispatcher(shared, retry=QUICK)
    command = Command(tool_name="flaky", parameters={"key": key(), "failures": 1}, tool_type="action", call_id="a1")

    [result] = await run(dispatcher, command)

    cause = failure_cause(result, command)
    assert "transient failure 1 of 1" in cause
    assert calls == ["flaky"]


# --- servers that fail ------------------------------------------------------------------------------------


async def test_broken_servers_fail_only_their_commands(demo_config: dict[str, Any], tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-server-binary")
    config = {
        "mcpServers": {
            **demo_config["mcpServers"],
            "missing": {"command": missing},
            "dies": {
                "command": sys.executable,
                "args": ["-c", "import sys; sys.stderr.write('fatal: licence key missing\\n'); sys.exit(2)"],
            },
        }
    }
    begin = time.monotonic()
    async with running(config) as manager:
        started = time.monotonic() - begin
        assert not manager.servers["missing"].available
        assert not manager.servers["dies"].available
        dispatcher = LocalCommandDispatcher(manager, retry=QUICK, batch=BatchPolicy(mode=ExecutionMode.PARALLEL))
        to_missing = Command(tool_name="anything", namespace="missing", call_id="m")
        to_dies = Command(tool_name="anything", tool_type="dies", call_id="d")
        results = await run(
            dispatcher,
            to_missing,
            to_dies,
            Command(tool_name="echo", parameters={"value": "still here"}),
            Command(tool_name="get_current_time", parameters={"timezone": "UTC"}),
        )

    assert started < 20
    cause = failure_cause(results[0], to_missing)
    assert cause.startswith("ServerUnavailable: ")
    assert "no-such-server-binary" in cause or "FileNotFoundError" in cause
    cause = failure_cause(results[1], to_dies)
    assert cause.startswith("ServerUnavailable: ")
    assert "fatal: licence key missing" in cause
    assert results[2].status is ResultStatus.SUCCESS
    assert results[2].result == {"result": "still here"}
    assert results[3].status is ResultStatus.SUCCESS
    assert results[3].namespace == "time"


async def test_a_server_whose_program_does_not_exist_is_unavailable_by_every_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``ServerUnavailable`` naming the server and the missing program, never ``UnknownTool``.

    Transient, as the README says of a server that can't start: the router can't
    tell a program that is missing from a server in its restart delay, so
    the retries (within the deadline) try again, and end soon.
    """
    missing = "/nonexistent/program"
    caplog.set_level(logging.WARNING, logger="dispatchers")
    config = {"mcpServers": {"ghost": {"command": missing}, "demo": demo_server_spec()}}
    async with running(config) as manager:
        assert "No such file or directory" in (manager.servers["ghost"].error or "")
        dispatcher = LocalCommandDispatcher(manager, retry=QUICK)
        commands = [
            Command(tool_name="add", parameters={"a": 1, "b": 2}, namespace="ghost", call_id="by-namespace"),
            Command(tool_name="ghost.add", parameters={"a": 1, "b": 2}, call_id="by-qualified-name"),
            Command(tool_name="add", parameters={"a": 1, "b": 2}, tool_type="ghost", call_id="by-tool-type"),
            Command(tool_name="only_on_ghost", call_id="by-name"),
        ]
        begin = time.monotonic()
        results = await run(dispatcher, *commands, timeout=20)
        elapsed = time.monotonic() - begin

    for result, command in zip(results, commands, strict=True):
        cause = failure_cause(result, command)
        assert cause.startswith("ServerUnavailable: "), cause
        assert "'ghost'" in cause
        assert f"FileNotFoundError: [Errno 2] No such file or directory: {missing!r}" in cause
    assert "MCP server 'ghost' is down: FileNotFoundError" in (results[0].error or "")
    assert "have not listed their tools yet: 'ghost'" in (results[3].error or "")
    retried = {r.getMessage().split("]")[0] for r in caplog.records if "retrying" in r.getMessage()}
    assert len(retried) == len(commands), retried  # transient: each was tried again
    assert elapsed < 10


async def test_a_server_that_failed_its_first_start_comes_back(tmp_path: Path) -> None:
    """A server down at start is restarted (with backoff) when a command needs it, like one that died later."""
    marker = tmp_path / "started-once"
    first_start_fails = (
        "import os, runpy, sys\n"
        "marker, server = sys.argv[1], sys.argv[2]\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        "    sys.exit('first start fails on purpose')\n"
        "sys.argv = [server]\n"
        "runpy.run_path(server, run_name='__main__')\n"
    )
    config = {
        "mcpServers": {
            "flappy": {"command": sys.executable, "args": ["-c", first_start_fails, str(marker), str(DEMO_SERVER)]}
        }
    }
    async with running(config) as manager:
        connection = manager.servers["flappy"]
        assert not connection.available
        assert "first start fails on purpose" in (connection.error or "")
        patient = RetryPolicy(attempts=8, backoff=Backoff(initial=0.25, maximum=0.5, jitter=0))
        dispatcher = LocalCommandDispatcher(manager, retry=patient)
        begin = time.monotonic()
        [result] = await run(dispatcher, Command(tool_name="echo", parameters={"value": 1}, namespace="flappy"))
        elapsed = time.monotonic() - begin

    assert elapsed < 15
    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.result == {"result": 1}


def first_start_fails(tmp_path: Path) -> dict[str, Any]:
    """An ``mcp.json`` entry for the demo server behind a wrapper that exits 1 on its first start only."""
    marker = tmp_path / "started-once"
    wrapper = tmp_path / "first_start_fails.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"marker, server = {str(marker)!r}, {str(DEMO_SERVER)!r}\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close()\n"
        "    sys.stderr.write('first start fails on purpose\\n')\n"
        "    sys.exit(1)\n"
        "sys.argv = [server]\n"
        "runpy.run_path(server, run_name='__main__')\n"
    )
    return {"command": sys.executable, "args": [str(wrapper)]}


async def test_a_tool_of_a_server_that_failed_its_first_start_is_retried_until_it_is_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server never listed its tools: routing by name waits for it (default retries) instead of giving up."""
    caplog.set_level(logging.WARNING, logger="dispatchers")
    async with running({"mcpServers": {"flappy": first_start_fails(tmp_path)}}) as manager:
        connection = manager.servers["flappy"]
        assert not connection.available and not connection.tools
        dispatcher = LocalCommandDispatcher(manager)  # RetryPolicy() as it comes
        echo = Command(tool_name="echo", parameters={"value": 1}, call_id="e1")
        begin = time.monotonic()
        [result] = await run(dispatcher, echo, timeout=20)
        elapsed = time.monotonic() - begin
        retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        # Every server has listed its tools now: a tool none offers is a verdict, not retried.
        caplog.clear()
        typo = Command(tool_name="ecoh", parameters={"value": 1}, call_id="e2")
        [unknown] = await run(dispatcher, typo)

    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.result == {"result": 1}
    assert result.namespace == "flappy"
    assert elapsed < 15
    assert retries  # the first attempt came before the restart delay had passed
    assert all("ServerUnavailable: " in line and "'flappy'" in line for line in retries), retries
    cause = failure_cause(unknown, typo)
    assert cause.startswith("UnknownTool: ")
    assert "did you mean 'echo'" in cause
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_with_no_retry_left_a_server_that_never_listed_its_tools_is_a_transient_failure_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dispatchers")
    config = {"mcpServers": {"flappy": first_start_fails(tmp_path), "time": TIME_SERVER}}
    # flappy's restart is not due while the test runs
    async with running(config, restart_backoff=Backoff(initial=60, maximum=60, jitter=0)) as manager:
        assert not manager.servers["flappy"].available
        assert manager.servers["time"].available, manager.servers["time"].error
        dispatcher = LocalCommandDispatcher(manager, retry=RetryPolicy(attempts=1))
        echo = Command(tool_name="echo", parameters={"value": 1}, call_id="n1")
        typo = Command(tool_name="get_curent_time", parameters={"timezone": "UTC"}, call_id="n2")
        results = await run(dispatcher, echo, typo)

    for result, command in zip(results, (echo, typo), strict=True):
        cause = failure_cause(result, command)
        assert cause.startswith("ServerUnavailable: "), cause  # transient, not UnknownTool
        assert "have not listed their tools yet" in cause
        assert "'flappy'" in cause
        assert "first start fails on purpose" in cause
    assert "did you mean 'get_current_time'" in failure_cause(results[1], typo)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_a_crash_mid_call_fails_at_once_and_the_server_restarts(demo_config: dict[str, Any]) -> None:
    others = demo_children()  # e.g. the module's shared server
    async with running(demo_config) as manager:
        first = demo_children() - others
        assert len(first) == 1
        dispatcher = LocalCommandDispatcher(manager, retry=RetryPolicy(attempts=6))
        crash = Command(tool_name="crash", parameters={"exit_code": 3}, call_id="boom")

        begin = time.monotonic()
        [crashed] = await run(dispatcher, crash, timeout=60)
        crash_seconds = time.monotonic() - begin

        begin = time.monotonic()
        results = await run(
            dispatcher,
            Command(tool_name="count", parameters={"key": "after-crash"}, call_id="next"),
            Command(tool_name="get_current_time", parameters={"timezone": "UTC"}),
            timeout=30,
        )
        restart_seconds = time.monotonic() - begin
        second = demo_children() - others

    assert crash_seconds < 5
    cause = failure_cause(crashed, crash)
    assert cause.startswith("ConnectionLost: ")
    assert "'demo'" in cause
    next_result = results[0]
    assert next_result.status is ResultStatus.SUCCESS, next_result.error
    assert next_result.result == {"result": 1}  # a fresh process: its counter starts again
    assert next_result.call_id == "next"
    assert restart_seconds < 20
    assert results[1].status is ResultStatus.SUCCESS  # the other server was never disturbed
    assert len(second) == 1
    assert not first & second  # the crashed process is gone (reaped), a new one serves


async def test_a_parallel_batch_past_its_timeout_returns_partial_results(shared: MCPServerManager) -> None:
    dispatcher = LocalCommandDispatcher(shared, batch=BatchPolicy(mode=ExecutionMode.PARALLEL))
    slow = Command(tool_name="sleep", parameters={"seconds": 30}, call_id="slow")
    commands = [
        Command(tool_name="echo", parameters={"value": "fast"}),
        slow,
        Command(tool_name="add", parameters={"a": 1, "b": 1}),
        Command(tool_name="get_current_time", parameters={"timezone": "UTC"}),
    ]
    deadline = 1.5
    begin = time.monotonic()

    results = await run(dispatcher, *commands, timeout=deadline)

    assert time.monotonic() - begin < deadline + 1.0
    assert results[0].result == {"result": "fast"}
    assert results[2].result == {"result": 2.0}
    assert results[3].status is ResultStatus.SUCCESS
    assert failure_cause(results[1], slow) == "TimeoutError: no result within 1.5s"
    # The abandoned call does not wedge the session.
    begin = time.monotonic()
    [after] = await run(dispatcher, Command(tool_name="echo", parameters={"value": 0}), timeout=10)
    assert after.result == {"result": 0}
    assert time.monotonic() - begin < 5


async def test_a_single_command_past_its_timeout_fails_at_its_deadline_in_the_callers_task(
    shared: MCPServerManager,
) -> None:
    """A batch of one runs in the caller's task (no driver task); its deadline still ends it, and the task is clean."""
    dispatcher = LocalCommandDispatcher(shared)
    slow = Command(tool_name="sleep", parameters={"seconds": 30}, call_id="alone-slow")
    task = asyncio.current_task()
    assert task is not None
    begin = time.monotonic()

    [result] = await run(dispatcher, slow, timeout=1.0)

    assert time.monotonic() - begin < 1.0 + 1.0
    assert failure_cause(result, slow) == "TimeoutError: no result within 1.0s"
    assert result.namespace == "demo"
    assert task.cancelling() == 0
    [after] = await run(dispatcher, Command(tool_name="echo", parameters={"value": 0}), timeout=10)
    assert after.result == {"result": 0}


async def test_a_server_that_never_answers_at_start_times_out_and_does_not_block_the_others() -> None:
    config = {
        "mcpServers": {
            "demo": demo_server_spec(),
            "silent": {"command": sys.executable, "args": ["-c", "import time; time.sleep(120)"]},
        }
    }
    before = set(child_processes())
    begin = time.monotonic()
    async with running(config, start_timeout=1.5) as manager:
        started = time.monotonic() - begin
        silent = manager.servers["silent"]
        assert not silent.available
        assert "1.5" in (silent.error or "")
        [result] = await run(LocalCommandDispatcher(manager), Command(tool_name="echo", parameters={"value": 1}))
    assert started < 15
    assert result.status is ResultStatus.SUCCESS
    assert set(child_processes()) - before == set()


# --- transports and lifecycle ----------------------------------------------------------------------------


async def test_the_demo_server_over_streamable_http(http_demo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running({"mcpServers": {"web": {"url": http_demo_url}}}) as manager:
        assert manager.servers["web"].available, manager.servers["web"].error
        dispatcher = LocalCommandDispatcher(manager, retry=QUICK)
        failing = Command(tool_name="fail", parameters={"message": "over http"}, call_id="h3")
        results = await run(
            dispatcher,
            Command(tool_name="add", parameters={"a": 40, "b": 2}, call_id="h1"),
            Command(tool_name="echo", parameters={"value": 0}, call_id="h2"),
            failing,
            Command(tool_name="flaky", parameters={"key": key(), "failures": 2}, tool_type="data_collection"),
        )

    assert results[0].result == {"result": 42.0}
    assert results[0].namespace == "web"
    assert results[1].result == {"result": 0}
    assert "over http" in failure_cause(results[2], failing)
    assert results[3].result == {"attempts": 3}


async def test_the_example_config_file_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCH_PYTHON", raising=False)
    async with running(EXAMPLES / "mcp.json") as manager:  # type: ignore[arg-type]
        assert {name for name, c in manager.servers.items() if c.available} == {"demo", "time"}
        dispatcher = LocalCommandDispatcher(manager)
        results = await run(
            dispatcher,
            Command(tool_name="echo", parameters={"value": "x"}),
            Command(tool_name="get_current_time", parameters={"timezone": "UTC"}, tool_type="data_collection"),
        )
    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS]


async def test_closing_the_manager_leaves_no_server_process(demo_config: dict[str, Any]) -> None:
    before = set(child_processes())
    manager = MCPServerManager.from_config(demo_config)
    async with asyncio.timeout(45):
        await manager.start()
    try:
        during = child_processes()
        started = {pid: command for pid, command in during.items() if pid not in before}
        assert any(str(DEMO_SERVER) in command for command in started.values()), started
        assert any("mcp_server_time" in command for command in started.values()), started
        [result] = await run(LocalCommandDispatcher(manager), Command(tool_name="echo", parameters={"value": 1}))
        assert result.status is ResultStatus.SUCCESS
    finally:
        begin = time.monotonic()
        async with asyncio.timeout(30):
            await manager.close()
        closing = time.monotonic() - begin
    left = {pid: command for pid, command in child_processes().items() if pid in started}
    assert left == {}
    assert closing < 10
    assert not any(c.available for c in manager.servers.values())
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- edge cases ---------------------------------------------------------------------------------------------

HUGE_STDERR_THEN_SERVE = (
    "import runpy, sys; sys.stderr.write('x' * 200_000 + '\\n'); sys.stderr.flush(); "
    f"sys.argv = [{str(DEMO_SERVER)!r}]; runpy.run_path({str(DEMO_SERVER)!r}, run_name='__main__')"
)
HUGE_STDERR_THEN_EXIT = "import sys; sys.stderr.write('y' * 200_000 + ' the real reason\\n'); sys.exit(1)"


async def test_a_stderr_line_longer_than_any_buffer_neither_kills_a_server_nor_hangs_a_start() -> None:
    config = {
        "mcpServers": {
            "chatty": {"command": sys.executable, "args": ["-c", HUGE_STDERR_THEN_SERVE]},
            "doomed": {"command": sys.executable, "args": ["-c", HUGE_STDERR_THEN_EXIT]},
        }
    }
    async with running(config, start_timeout=20) as manager:
        dispatcher = LocalCommandDispatcher(manager)
        [result] = await run(dispatcher, Command(tool_name="echo", parameters={"value": 7}, namespace="chatty"))

        assert result.status is ResultStatus.SUCCESS and result.result == {"result": 7}
        doomed = manager.servers["doomed"]
        assert not doomed.available and not doomed.starting
        assert doomed.error is not None and doomed.error.endswith("the real reason")
        assert len(doomed.error) < 600


async def test_a_server_that_hangs_at_start_does_not_hold_up_commands_for_the_others() -> None:
    config = {
        "mcpServers": {
            "demo": demo_server_spec(),
            "hangs": {"command": sys.executable, "args": ["-c", "import time; time.sleep(120)"]},
        }
    }
    async with ServerPool():
        manager = shared_manager(config)  # launches the servers, does not wait for them
        dispatcher = LocalCommandDispatcher(manager)
        started = time.monotonic()
        add = Command(tool_name="add", parameters={"a": 2, "b": 2})
        [result] = await run(dispatcher, add, timeout=15)
        elapsed = time.monotonic() - started

    assert result.status is ResultStatus.SUCCESS and result.result == {"result": 4.0}
    assert elapsed < 10  # the demo server's start, not the hanging server's 30 s start timeout


async def test_a_closed_manager_stays_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    others = demo_children()
    async with running({"mcpServers": {"demo": demo_server_spec()}}) as manager:
        connection = manager.servers["demo"]
        original, sent = connection.call_tool, asyncio.Event()

        async def call_tool(tool: str, arguments: dict[str, Any]) -> CallToolResult:
            sent.set()
            return await original(tool, arguments)

        monkeypatch.setattr(connection, "call_tool", call_tool)
        dispatcher = LocalCommandDispatcher(manager, retry=QUICK)
        sleeper = Command(tool_name="sleep", parameters={"seconds": 30}, tool_type="data_collection")
        in_flight = asyncio.ensure_future(run(dispatcher, sleeper, timeout=20))
        await sent.wait()
    # Closing ended the call in flight; its retry found the server stopped instead of restarting it.
    [result] = await in_flight
    after = await run(dispatcher, Command(tool_name="echo", parameters={"value": 1}))

    assert result.status is ResultStatus.FAILURE
    assert "stopped" in (result.error or "") or "closed" in (result.error or "")
    assert after[0].status is ResultStatus.FAILURE and "stopped" in (after[0].error or "")
    assert not manager.servers["demo"].available
    assert not demo_children() - others


def write_batch(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_a_checked_batch_file_runs_on_the_servers_of_its_config(tmp_path: Path) -> None:
    """The path ``dispatch run`` takes: load the file, load the config, check, run on the real demo server."""
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    commands = [
        {"tool_name": "add", "parameters": {"a": 1, "b": 2}, "tool_type": "demo"},
        {"tool_name": "echo", "parameters": {"value": "x"}, "tool_type": "data_collection"},
        {"tool_name": "add", "parameters": {"a": 2, "b": 2}},
    ]
    batch = load_batch(write_batch(tmp_path, {"config": "mcp.json", "commands": commands}))
    assert batch.config is not None

    check_tool_types(batch, load_config(batch.config))
    async with MCPServerManager.from_config(batch.config) as manager:
        results = await LocalCommandDispatcher(manager).execute_commands(batch.commands, timeout=20)

    assert [result.status for result in results] == [ResultStatus.SUCCESS] * 3, [r.error for r in results]
    assert [result.result for result in results] == [{"result": 3.0}, {"result": "x"}, {"result": 4.0}]
