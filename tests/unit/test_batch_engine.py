"""The batch engine and the retry loop, over in-memory tools: no process, no socket.

Each test names the DESIGN.md invariant it checks. Synchronisation is done
with asyncio events, never with sleeps; time is only measured (monotonic
clock) with generous bounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from aip.backoff import Backoff
from aip.budget import Budget, Deadline
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    DEFAULT_TIMEOUT,
    BatchPolicy,
    ExecutionMode,
    InMemoryCommandDispatcher,
    RetryPolicy,
    error_result,
    run_batch,
)
from dispatchers.batch import CancelAt
from dispatchers.errors import (
    CommandTimeout,
    ConnectionLost,
    InvalidParameters,
    ProtocolError,
    ServerUnavailable,
    ToolReportedError,
)
from dispatchers.interrupt import interruptible, unless_interrupted
from dispatchers.retry_conditions import RETRY_TOOL_ERRORS_TOO

#: Retries without waiting, so that retry tests take no time.
NO_WAIT = RetryPolicy(attempts=3, backoff=Backoff(initial=0, maximum=0, jitter=0))
SEQUENTIAL = BatchPolicy(mode=ExecutionMode.SEQUENTIAL)
PARALLEL = BatchPolicy(mode=ExecutionMode.PARALLEL)
MODES = pytest.mark.parametrize("batch", [SEQUENTIAL, PARALLEL], ids=["sequential", "parallel"])

#: How late after its deadline a batch may return (the engine allows 0.5 s to unwind).
SLACK = 1.0

SUFFIX = ", please retry or execute a different command."


def echo(command: Command) -> Any:
    return (command.parameters or {}).get("value")


def failure_texts(command: Command, cause: str) -> tuple[str, str]:
    """The documented (error, result) pair of a failed command."""
    error = f"Error occurred while executing command {command}: {cause}"
    return error, error + SUFFIX


def assert_failure(result: Result, command: Command, cause: str) -> None:
    """``result`` is the documented failure of ``command`` (which carries its call_id) for ``cause``."""
    assert command.call_id
    error, text = failure_texts(command, cause)
    assert result.status is ResultStatus.FAILURE
    assert result.call_id == command.call_id
    assert result.error == error
    assert result.result == text


def cause_of(result: Result, command: Command) -> str:
    """The cause part of a failure's error text."""
    prefix = f"Error occurred while executing command {command}: "
    assert result.error is not None
    assert result.error.startswith(prefix), result.error
    return result.error[len(prefix) :]


def recorder(
    behaviour: Callable[[Command, int], Any] | None = None,
) -> tuple[Callable[[Command], Any], list[str | None]]:
    """A tool that records the call_id of every call, then does ``behaviour(command, call_number)``."""
    seen: list[str | None] = []

    def tool(command: Command) -> Any:
        seen.append(command.call_id)
        if behaviour is None:
            return len(seen)
        return behaviour(command, len(seen))

    return tool, seen


async def wait_for(event: asyncio.Event, seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        await event.wait()


# --- invariant 1: one result per command, in order, with its call_id ---------------------------


@MODES
async def test_one_result_per_command_in_order_with_call_ids(batch: BatchPolicy) -> None:
    seen: list[str | None] = []

    def tool(command: Command) -> Any:
        seen.append(command.call_id)
        return echo(command)

    dispatcher = InMemoryCommandDispatcher({"echo": tool}, batch=batch)
    call_ids = ["first", None, "third", "", None, "sixth"]
    commands = [
        Command(tool_name="echo", parameters={"value": index}, call_id=call_id)
        for index, call_id in enumerate(call_ids)
    ]

    results = await dispatcher.execute_commands(commands, timeout=10)

    assert len(results) == len(commands)
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * len(commands)
    assert [r.result for r in results] == list(range(len(commands)))
    for command, result in zip(commands, results, strict=True):
        if command.call_id:
            assert result.call_id == command.call_id
        else:
            assert result.call_id
            assert uuid.UUID(result.call_id).version == 4
    filled = [r.call_id for c, r in zip(commands, results, strict=True) if not c.call_id]
    assert len(set(filled)) == len(filled) == 3
    # The tool saw exactly the call_ids that came back.
    assert sorted(seen, key=str) == sorted((r.call_id for r in results), key=str)


async def test_parallel_results_are_in_command_order_when_they_finish_in_reverse() -> None:
    """Command i can only finish after command i+1 did: completion order is the reverse of the batch."""
    size = 5
    gates = [asyncio.Event() for _ in range(size)]
    gates[-1].set()
    finished: list[int] = []

    async def chained(command: Command) -> int:
        index = echo(command)
        await gates[index].wait()
        finished.append(index)
        if index > 0:
            gates[index - 1].set()
        return index

    dispatcher = InMemoryCommandDispatcher({"chained": chained}, batch=PARALLEL)
    commands = [Command(tool_name="chained", parameters={"value": i}, call_id=f"c{i}") for i in range(size)]

    results = await dispatcher.execute_commands(commands, timeout=10)

    assert finished == list(reversed(range(size)))
    assert [r.result for r in results] == list(range(size))
    assert [r.call_id for r in results] == [c.call_id for c in commands]


@MODES
async def test_an_empty_batch_gives_no_results(batch: BatchPolicy) -> None:
    dispatcher = InMemoryCommandDispatcher({"echo": echo}, batch=batch)
    assert await dispatcher.execute_commands([], timeout=5) == []


@MODES
async def test_failures_and_successes_keep_their_places(batch: BatchPolicy) -> None:
    def sometimes(command: Command) -> Any:
        if echo(command) % 2:
            raise ValueError(f"odd {echo(command)}")
        return echo(command)

    dispatcher = InMemoryCommandDispatcher({"sometimes": sometimes}, batch=batch, retry=NO_WAIT)
    commands = [Command(tool_name="sometimes", parameters={"value": i}, call_id=f"id-{i}") for i in range(6)]

    results = await dispatcher.execute_commands(commands, timeout=10)

    assert [r.call_id for r in results] == [c.call_id for c in commands]
    for index, (command, result) in enumerate(zip(commands, results, strict=True)):
        if index % 2:
            assert_failure(result, command, f"ToolError: odd {index}")
        else:
            assert result.status is ResultStatus.SUCCESS
            assert result.result == index


# --- invariant 2: call_ids kept, filled only when empty, the same on every retry ---------------------------


@pytest.mark.parametrize("missing", [None, ""])
async def test_an_empty_call_id_is_filled_and_the_tool_sees_it(missing: str | None) -> None:
    tool, seen = recorder()
    dispatcher = InMemoryCommandDispatcher({"t": tool})

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id=missing)], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    assert result.call_id
    assert uuid.UUID(result.call_id).version == 4
    assert seen == [result.call_id]


async def test_a_given_call_id_is_kept_even_if_it_is_not_a_uuid() -> None:
    tool, seen = recorder()
    dispatcher = InMemoryCommandDispatcher({"t": tool})

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id="not-a-uuid")], timeout=5)

    assert result.call_id == "not-a-uuid"
    assert seen == ["not-a-uuid"]


@pytest.mark.parametrize("call_id", ["mine", None])
async def test_a_retried_command_keeps_its_call_id_on_every_attempt(call_id: str | None) -> None:
    def flaky(command: Command, number: int) -> Any:
        if number < 3:
            raise ConnectionLost(f"dropped on attempt {number}")
        return {"attempts": number}

    tool, seen = recorder(flaky)
    dispatcher = InMemoryCommandDispatcher({"flaky": tool}, retry=NO_WAIT)

    [result] = await dispatcher.execute_commands([Command(tool_name="flaky", call_id=call_id)], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    assert result.result == {"attempts": 3}
    assert len(seen) == 3
    assert len(set(seen)) == 1
    assert seen[0] == result.call_id
    if call_id:
        assert result.call_id == call_id


# --- invariant 3: every failure is a Result in the documented format ----------------------------------


async def test_a_tool_exception_is_a_failure_in_the_documented_format() -> None:
    def broken(command: Command) -> Any:
        raise ValueError("the disk is full")

    dispatcher = InMemoryCommandDispatcher({"broken": broken})
    command = Command(tool_name="broken", parameters={"path": "/tmp/x"}, tool_type="action", call_id="c-1")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert_failure(result, command, "ToolError: the disk is full")
    assert result.error == (
        "Error occurred while executing command tool_name='broken' parameters={'path': '/tmp/x'} "
        "tool_type='action' call_id='c-1': ToolError: the disk is full"
    )


async def test_the_error_text_names_the_filled_call_id() -> None:
    def broken(command: Command) -> Any:
        raise RuntimeError("nope")

    dispatcher = InMemoryCommandDispatcher({"broken": broken})

    [result] = await dispatcher.execute_commands([Command(tool_name="broken")], timeout=5)

    assert result.call_id
    assert_failure(result, Command(tool_name="broken", call_id=result.call_id), "ToolError: nope")


@pytest.mark.parametrize(
    "error",
    [ValueError(), RuntimeError(""), ToolReportedError(""), ConnectionLost("   "), KeyError()],
    ids=["ValueError()", "RuntimeError('')", "ToolReportedError('')", "ConnectionLost(blank)", "KeyError()"],
)
async def test_a_failure_never_has_an_empty_cause(error: Exception) -> None:
    def broken(command: Command) -> Any:
        raise error

    dispatcher = InMemoryCommandDispatcher({"broken": broken}, retry=NO_WAIT)
    command = Command(tool_name="broken", call_id="c")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    cause = cause_of(result, command)
    kind, _, message = cause.partition(": ")
    assert kind
    assert message.strip()
    assert result.result == result.error + SUFFIX


async def test_an_unknown_tool_is_a_failure_naming_the_tools() -> None:
    dispatcher = InMemoryCommandDispatcher({"echo": echo, "add": echo})
    command = Command(tool_name="ecko", call_id="u")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert_failure(result, command, "UnknownTool: no tool named 'ecko'; tools: add, echo")


async def test_a_failure_carries_the_command_namespace() -> None:
    def broken(command: Command) -> Any:
        raise ValueError("x")

    dispatcher = InMemoryCommandDispatcher({"broken": broken})
    command = Command(tool_name="broken", call_id="n", namespace="somewhere")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert_failure(result, command, "ToolError: x")
    assert result.namespace == "somewhere"
    assert "namespace='somewhere'" in (result.error or "")


async def test_run_batch_turns_any_exception_of_run_one_into_a_failure() -> None:
    async def run_one(command: Command, deadline: Deadline) -> Result:
        raise Exception()

    commands = [Command(tool_name="x", call_id="a"), Command(tool_name="y", call_id="b")]

    results = await run_batch(commands, run_one, Deadline.after(5))

    for command, result in zip(commands, results, strict=True):
        assert_failure(result, command, "Exception: Exception()")


async def test_run_batch_rejects_a_result_for_another_call_id() -> None:
    async def run_one(command: Command, deadline: Deadline) -> Result:
        return Result(status=ResultStatus.SUCCESS, result=1, call_id="someone-else")

    command = Command(tool_name="x", call_id="mine")

    [result] = await run_batch([command], run_one, Deadline.after(5))

    assert_failure(result, command, "the result came back for call_id 'someone-else'")


def test_error_result_and_generate_error_results_use_the_documented_format() -> None:
    command = Command(tool_name="x", call_id="1")
    assert_failure(error_result(command, ConnectionLost("gone")), command, "ConnectionLost: gone")
    assert_failure(error_result(command, "plain text cause"), command, "plain text cause")
    commands = [Command(tool_name="a", call_id="1"), Command(tool_name="b", call_id="2")]
    dispatcher = InMemoryCommandDispatcher({})
    results = dispatcher.generate_error_results(commands, CommandTimeout(30))
    for command, result in zip(commands, results, strict=True):
        assert_failure(result, command, "TimeoutError: no result within 30.0s")


def test_the_default_batch_timeout_is_ufos() -> None:
    assert DEFAULT_TIMEOUT == 6000.0


# --- invariant 4: a batch timeout keeps finished results ------------------------------------------------


async def test_parallel_batch_timeout_keeps_finished_results() -> None:
    never = asyncio.Event()
    started = asyncio.Event()

    async def stuck(command: Command) -> Any:
        started.set()
        await never.wait()

    dispatcher = InMemoryCommandDispatcher({"echo": echo, "stuck": stuck}, batch=PARALLEL)
    commands = [
        Command(tool_name="echo", parameters={"value": "a"}, call_id="1"),
        Command(tool_name="stuck", call_id="2"),
        Command(tool_name="echo", parameters={"value": "c"}, call_id="3"),
    ]
    deadline = 0.5
    begin = time.monotonic()

    results = await dispatcher.execute_commands(commands, timeout=deadline)

    elapsed = time.monotonic() - begin
    assert started.is_set()
    assert elapsed < deadline + SLACK
    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.FAILURE, ResultStatus.SUCCESS]
    assert results[0].result == "a"
    assert results[2].result == "c"
    assert_failure(results[1], commands[1], "TimeoutError: no result within 0.5s")


async def test_sequential_batch_timeout_fails_the_running_and_the_unstarted_commands() -> None:
    never = asyncio.Event()
    calls: list[str] = []

    async def stuck(command: Command) -> Any:
        calls.append("stuck")
        await never.wait()

    def later(command: Command) -> Any:
        calls.append("later")
        return "should not run"

    dispatcher = InMemoryCommandDispatcher({"echo": echo, "stuck": stuck, "later": later}, batch=SEQUENTIAL)
    commands = [
        Command(tool_name="echo", parameters={"value": 0}, call_id="1"),
        Command(tool_name="stuck", call_id="2"),
        Command(tool_name="later", call_id="3"),
    ]
    begin = time.monotonic()

    results = await dispatcher.execute_commands(commands, timeout=0.4)

    assert time.monotonic() - begin < 0.4 + SLACK
    assert results[0].status is ResultStatus.SUCCESS
    assert results[0].result == 0
    assert_failure(results[1], commands[1], "TimeoutError: no result within 0.4s")
    assert_failure(results[2], commands[2], "TimeoutError: no result within 0.4s")
    assert calls == ["stuck"]


async def test_batch_timeout_fills_call_ids_of_unfinished_commands() -> None:
    never = asyncio.Event()

    async def stuck(command: Command) -> Any:
        await never.wait()

    dispatcher = InMemoryCommandDispatcher({"stuck": stuck}, batch=PARALLEL)

    results = await dispatcher.execute_commands([Command(tool_name="stuck"), Command(tool_name="stuck")], timeout=0.3)

    for result in results:
        assert result.call_id
        assert_failure(
            result, Command(tool_name="stuck", call_id=result.call_id), "TimeoutError: no result within 0.3s"
        )
    assert results[0].call_id != results[1].call_id


async def test_batch_returns_at_the_deadline_even_if_a_tool_ignores_cancellation() -> None:
    never = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(command: Command) -> Any:
        try:
            await never.wait()
        except asyncio.CancelledError:
            await release.wait()  # refuses to stop until the test lets it
            raise

    dispatcher = InMemoryCommandDispatcher({"stubborn": stubborn, "echo": echo}, batch=PARALLEL)
    commands = [Command(tool_name="stubborn", call_id="s"), Command(tool_name="echo", parameters={"value": 7})]
    begin = time.monotonic()
    try:
        results = await dispatcher.execute_commands(commands, timeout=0.3)
        elapsed = time.monotonic() - begin
    finally:
        release.set()
    assert elapsed < 0.3 + SLACK
    assert_failure(results[0], commands[0], "TimeoutError: no result within 0.3s")
    assert results[1].status is ResultStatus.SUCCESS
    assert results[1].result == 7


async def test_results_are_reported_as_they_finish() -> None:
    never = asyncio.Event()

    async def stuck(command: Command) -> Any:
        await never.wait()

    reported: list[tuple[int, ResultStatus]] = []
    dispatcher = InMemoryCommandDispatcher({"echo": echo, "stuck": stuck}, batch=PARALLEL)
    commands = [Command(tool_name="stuck", call_id="1"), Command(tool_name="echo", parameters={"value": 2})]

    results = await dispatcher.execute_commands(
        commands, timeout=0.3, on_result=lambda index, result: reported.append((index, result.status))
    )

    # The finished command is reported at once, before anything about the stuck one.
    assert reported[0] == (1, ResultStatus.SUCCESS)
    assert (1, ResultStatus.SUCCESS) not in reported[1:]
    assert results[0].status is ResultStatus.FAILURE
    assert results[1].result == 2


async def test_command_timeout_bounds_a_single_command() -> None:
    never = asyncio.Event()
    tool, seen = recorder()

    async def stuck(command: Command) -> Any:
        seen.append(command.call_id)
        await never.wait()

    dispatcher = InMemoryCommandDispatcher({"stuck": stuck, "count": tool}, batch=SEQUENTIAL)
    commands = [
        Command(tool_name="stuck", call_id="slow", timeout=0.25),
        Command(tool_name="count", call_id="after"),
    ]
    begin = time.monotonic()

    results = await dispatcher.execute_commands(commands, timeout=30)

    assert time.monotonic() - begin < 0.25 + SLACK
    assert_failure(results[0], commands[0], "TimeoutError: no result within 0.25s")
    assert results[1].status is ResultStatus.SUCCESS
    # The timed-out command was not retried: there was no time left to.
    assert seen == ["slow", "after"]


async def test_an_infinite_command_timeout_is_rejected_or_means_no_bound() -> None:
    """A Command the model accepts must be runnable: ``timeout=inf`` either fails validation or bounds nothing."""
    try:
        command = Command(tool_name="echo", parameters={"value": 1}, call_id="inf", timeout=math.inf)
    except ValidationError:
        return
    dispatcher = InMemoryCommandDispatcher({"echo": echo})

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.result == 1


async def test_dispatcher_command_timeout_bounds_every_command() -> None:
    never = asyncio.Event()

    async def stuck(command: Command) -> Any:
        await never.wait()

    dispatcher = InMemoryCommandDispatcher({"stuck": stuck, "echo": echo}, batch=PARALLEL, command_timeout=0.2)
    commands = [Command(tool_name="stuck", call_id="1"), Command(tool_name="echo", parameters={"value": 1})]
    begin = time.monotonic()

    results = await dispatcher.execute_commands(commands, timeout=30)

    assert time.monotonic() - begin < 0.2 + SLACK
    assert_failure(results[0], commands[0], "TimeoutError: no result within 0.2s")
    assert results[1].result == 1


async def test_retries_stop_at_the_deadline() -> None:
    tool, seen = recorder(lambda command, number: (_ for _ in ()).throw(ConnectionLost(f"lost {number}")))
    dispatcher = InMemoryCommandDispatcher(
        {"lost": tool}, retry=RetryPolicy(attempts=1000, backoff=Backoff(initial=0.1, maximum=0.1, jitter=0))
    )
    begin = time.monotonic()

    [result] = await dispatcher.execute_commands([Command(tool_name="lost", call_id="l")], timeout=0.6)

    assert time.monotonic() - begin < 0.6 + SLACK
    assert result.status is ResultStatus.FAILURE
    assert 1 < len(seen) < 20
    assert set(seen) == {"l"}


# --- invariant 6: falsy outputs are kept ------------------------------------------------------------------


@MODES
async def test_falsy_outputs_are_kept(batch: BatchPolicy) -> None:
    values: list[Any] = [0, "", [], False, None, {}, 0.0]
    dispatcher = InMemoryCommandDispatcher({"echo": echo}, batch=batch)
    commands = [Command(tool_name="echo", parameters={"value": v}) for v in values]

    results = await dispatcher.execute_commands(commands, timeout=5)

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * len(values)
    for value, result in zip(values, results, strict=True):
        assert result.result == value
        assert type(result.result) is type(value)
        assert result.error is None


async def test_async_tools_return_their_values() -> None:
    async def answer(command: Command) -> Any:
        return {"async": True, "value": echo(command)}

    dispatcher = InMemoryCommandDispatcher({"answer": answer}, namespace="mem")

    [result] = await dispatcher.execute_commands([Command(tool_name="answer", parameters={"value": 0})], timeout=5)

    assert result.result == {"async": True, "value": 0}
    assert result.namespace == "mem"


# --- batch modes --------------------------------------------------------------------------------------------


async def test_stop_on_failure_skips_the_rest_in_sequential_mode() -> None:
    calls: list[str] = []

    def tool(command: Command) -> Any:
        calls.append(command.tool_name)
        if command.tool_name == "bad":
            raise ValueError("broken")
        return command.tool_name

    dispatcher = InMemoryCommandDispatcher(
        {"ok": tool, "bad": tool, "more": tool, "last": tool},
        batch=BatchPolicy(mode=ExecutionMode.SEQUENTIAL, stop_on_failure=True),
    )
    commands = [
        Command(tool_name="ok", call_id="1"),
        Command(tool_name="bad", call_id="2"),
        Command(tool_name="more", call_id="3"),
        Command(tool_name="last"),
    ]

    results = await dispatcher.execute_commands(commands, timeout=5)

    assert calls == ["ok", "bad"]
    assert results[0].status is ResultStatus.SUCCESS
    assert_failure(results[1], commands[1], "ToolError: broken")
    assert [r.status for r in results[2:]] == [ResultStatus.SKIPPED, ResultStatus.SKIPPED]
    assert results[2].call_id == "3"
    assert results[3].call_id
    assert all(r.error for r in results[2:])


async def test_without_stop_on_failure_every_command_runs() -> None:
    calls: list[str] = []

    def tool(command: Command) -> Any:
        calls.append(command.tool_name)
        if command.tool_name == "bad":
            raise ValueError("broken")
        return 1

    dispatcher = InMemoryCommandDispatcher({"ok": tool, "bad": tool}, batch=SEQUENTIAL)
    commands = [Command(tool_name=name) for name in ("bad", "ok", "bad", "ok")]

    results = await dispatcher.execute_commands(commands, timeout=5)

    assert calls == ["bad", "ok", "bad", "ok"]
    assert [r.status for r in results] == [
        ResultStatus.FAILURE,
        ResultStatus.SUCCESS,
        ResultStatus.FAILURE,
        ResultStatus.SUCCESS,
    ]


class ConcurrencyProbe:
    """A tool that counts how many calls run at once and holds them until released.

    ``full`` is set when ``expected`` calls are inside together; every caller
    that can enter before the test wakes up has entered by then (they were all
    ready in the same loop iteration), so ``peak`` is the real bound.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.active = 0
        self.peak = 0
        self.entered = 0
        self.full = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, command: Command) -> Any:
        self.active += 1
        self.entered += 1
        self.peak = max(self.peak, self.active)
        if self.active >= self.expected:
            self.full.set()
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        return self.entered


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_parallel_mode_respects_max_concurrency(limit: int) -> None:
    probe = ConcurrencyProbe(expected=limit)
    dispatcher = InMemoryCommandDispatcher(
        {"probe": probe}, batch=BatchPolicy(mode=ExecutionMode.PARALLEL, max_concurrency=limit)
    )
    async with asyncio.timeout(10), asyncio.TaskGroup() as group:
        pending = group.create_task(
            dispatcher.execute_commands([Command(tool_name="probe") for _ in range(limit * 3)], timeout=10)
        )
        await wait_for(probe.full)
        active_when_full = probe.active
        probe.release.set()
    results = pending.result()
    assert active_when_full == limit
    assert probe.peak == limit
    assert probe.entered == limit * 3
    assert all(r.status is ResultStatus.SUCCESS for r in results)


async def test_parallel_mode_runs_commands_concurrently() -> None:
    """Every call waits until all are in (a barrier): only possible if they really run at once."""
    size = 4
    inside = 0
    everyone_in = asyncio.Event()

    async def barrier(command: Command) -> Any:
        nonlocal inside
        inside += 1
        if inside == size:
            everyone_in.set()
        await everyone_in.wait()
        return inside

    dispatcher = InMemoryCommandDispatcher({"b": barrier}, batch=BatchPolicy(mode=ExecutionMode.PARALLEL))
    results = await dispatcher.execute_commands([Command(tool_name="b") for _ in range(size)], timeout=5)
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * size
    assert [r.result for r in results] == [size] * size


async def test_sequential_mode_runs_one_command_at_a_time() -> None:
    active = 0
    peak = 0
    order: list[int] = []

    async def tool(command: Command) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        order.append(echo(command))
        await asyncio.sleep(0)  # give any concurrent call a chance to enter (not a synchronisation)
        active -= 1
        return echo(command)

    dispatcher = InMemoryCommandDispatcher({"t": tool}, batch=SEQUENTIAL)
    results = await dispatcher.execute_commands([Command(tool_name="t", parameters={"value": i}) for i in range(5)], 5)
    assert peak == 1
    assert order == [0, 1, 2, 3, 4]
    assert [r.result for r in results] == order


def test_batch_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        BatchPolicy(max_concurrency=0)
    assert BatchPolicy() == BatchPolicy(mode=ExecutionMode.SEQUENTIAL, stop_on_failure=False, max_concurrency=8)


# --- retries ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ToolReportedError("the tool said no"),
        ValueError("plain exception"),
        InvalidParameters("parameter 'x': wrong"),
        ProtocolError("method not found (code -32601)", transient=False),
    ],
    ids=["ToolReportedError", "plain", "InvalidParameters", "ProtocolError-permanent"],
)
async def test_a_non_retryable_error_is_called_exactly_once(error: Exception) -> None:
    def fails(command: Command, number: int) -> Any:
        raise error

    tool, seen = recorder(fails)
    dispatcher = InMemoryCommandDispatcher(
        {"t": tool}, retry=RetryPolicy(attempts=5, backoff=Backoff(initial=0, jitter=0))
    )
    command = Command(tool_name="t", call_id="once")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert seen == ["once"]
    assert result.status is ResultStatus.FAILURE
    assert str(error) in cause_of(result, command)


async def test_a_tool_error_is_retried_when_configured() -> None:
    def fails(command: Command, number: int) -> Any:
        if number < 3:
            raise ToolReportedError(f"no {number}")
        return "yes"

    tool, seen = recorder(fails)
    dispatcher = InMemoryCommandDispatcher(
        {"t": tool}, retry=RetryPolicy(attempts=3, when=RETRY_TOOL_ERRORS_TOO, backoff=Backoff(initial=0, jitter=0))
    )

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id="r")], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    assert result.result == "yes"
    assert seen == ["r", "r", "r"]


@pytest.mark.parametrize("attempts", [1, 2, 4])
async def test_a_transient_error_is_retried_up_to_the_attempts(attempts: int) -> None:
    def fails(command: Command, number: int) -> Any:
        raise ConnectionLost(f"dropped {number}")

    tool, seen = recorder(fails)
    dispatcher = InMemoryCommandDispatcher(
        {"t": tool}, retry=RetryPolicy(attempts=attempts, backoff=Backoff(initial=0, jitter=0))
    )
    command = Command(tool_name="t", call_id="same")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert seen == ["same"] * attempts
    assert_failure(result, command, f"ConnectionLost: dropped {attempts}")


@pytest.mark.parametrize(
    "error",
    [ConnectionLost("lost"), ProtocolError("internal (code -32603)", transient=True), CommandTimeout(1)],
    ids=["ConnectionLost", "ProtocolError-transient", "CommandTimeout"],
)
async def test_a_transient_error_is_retried_to_success(error: Exception) -> None:
    def flaky(command: Command, number: int) -> Any:
        if number < 3:
            raise error
        return {"attempts": number}

    tool, seen = recorder(flaky)
    dispatcher = InMemoryCommandDispatcher({"t": tool}, retry=NO_WAIT)

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id="x")], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    assert result.result == {"attempts": 3}
    assert seen == ["x", "x", "x"]


async def test_a_sent_transient_error_is_not_retried_when_not_repeatable() -> None:
    def fails(command: Command, number: int) -> Any:
        raise ConnectionLost("dropped after sending")

    tool, seen = recorder(fails)
    dispatcher = InMemoryCommandDispatcher({"t": tool}, repeatable=False, retry=NO_WAIT)
    command = Command(tool_name="t", call_id="side-effect")

    [result] = await dispatcher.execute_commands([command], timeout=5)

    assert seen == ["side-effect"]
    assert_failure(result, command, "ConnectionLost: dropped after sending")


async def test_an_unsent_transient_error_is_retried_even_when_not_repeatable() -> None:
    def flaky(command: Command, number: int) -> Any:
        if number < 3:
            raise ServerUnavailable("restarting")
        return "up"

    tool, seen = recorder(flaky)
    dispatcher = InMemoryCommandDispatcher({"t": tool}, repeatable=False, retry=NO_WAIT)

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id="u")], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    assert result.result == "up"
    assert seen == ["u", "u", "u"]


async def test_an_explicitly_unsent_connection_loss_is_retried_when_not_repeatable() -> None:
    def flaky(command: Command, number: int) -> Any:
        if number == 1:
            raise ConnectionLost("could not connect", sent=False)
        return "ok"

    tool, seen = recorder(flaky)
    dispatcher = InMemoryCommandDispatcher({"t": tool}, repeatable=False, retry=NO_WAIT)

    [result] = await dispatcher.execute_commands([Command(tool_name="t", call_id="v")], timeout=5)

    assert result.result == "ok"
    assert seen == ["v", "v"]


async def test_the_retry_log_line_names_the_reason_and_the_delay(caplog: pytest.LogCaptureFixture) -> None:
    def flaky(command: Command, number: int) -> Any:
        if number < 3:
            raise ConnectionLost(f"socket closed {number}")
        return "done"

    tool, _ = recorder(flaky)
    dispatcher = InMemoryCommandDispatcher(
        {"flaky": tool}, retry=RetryPolicy(attempts=3, backoff=Backoff(initial=0.01, maximum=1.0, jitter=0))
    )
    caplog.set_level(logging.WARNING, logger="dispatchers")

    [result] = await dispatcher.execute_commands([Command(tool_name="flaky", call_id="log-me")], timeout=5)

    assert result.status is ResultStatus.SUCCESS
    lines = [r.getMessage() for r in caplog.records if r.name == "dispatchers" and r.levelno == logging.WARNING]
    assert lines == [
        "flaky[log-me] attempt 1 failed (ConnectionLost: socket closed 1); retrying in 0.01s",
        "flaky[log-me] attempt 2 failed (ConnectionLost: socket closed 2); retrying in 0.02s",
    ]


async def test_no_retry_log_line_for_a_permanent_failure(caplog: pytest.LogCaptureFixture) -> None:
    def fails(command: Command) -> Any:
        raise ValueError("permanent")

    dispatcher = InMemoryCommandDispatcher({"t": fails}, retry=NO_WAIT)
    caplog.set_level(logging.DEBUG, logger="dispatchers")

    [result] = await dispatcher.execute_commands([Command(tool_name="t")], timeout=5)

    assert result.status is ResultStatus.FAILURE
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


# --- policies as values -------------------------------------------------------------------------------------


def test_retry_policy_is_a_value() -> None:
    assert RetryPolicy() == RetryPolicy(attempts=3, backoff=Backoff(initial=0.4, maximum=5.0, jitter=0.5))
    assert hash(RetryPolicy()) == hash(RetryPolicy())
    assert RetryPolicy(attempts=4) != RetryPolicy()
    text = repr(RetryPolicy(attempts=7, backoff=Backoff(initial=0.5)))
    assert "RetryPolicy(" in text
    assert "attempts=7" in text
    assert "initial=0.5" in text and "when=transient & (unsent | repeatable)" in text
    assert str(RetryPolicy()) == repr(RetryPolicy())
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().attempts = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    "fields",
    [{"attempts": 0}, {"attempts": -1}, {"attempt_timeout": 0}, {"attempt_timeout": float("inf")}],
)
def test_invalid_retry_policies_raise_value_error(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        RetryPolicy(**fields)


def test_command_timeout_text() -> None:
    assert str(CommandTimeout(30)) == "no result within 30.0s"
    assert isinstance(CommandTimeout(1), TimeoutError)


# --- edge cases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan])
async def test_an_unusable_batch_timeout_gives_failure_results_not_an_exception(timeout: float) -> None:
    dispatcher = InMemoryCommandDispatcher({"echo": lambda command: 1})
    commands = [Command(tool_name="echo", call_id="kept"), Command(tool_name="echo")]

    results = await dispatcher.execute_commands(commands, timeout=timeout)

    assert [r.status for r in results] == [ResultStatus.FAILURE, ResultStatus.FAILURE]
    assert results[0].call_id == "kept" and results[1].call_id
    assert "a deadline needs a finite number of seconds above 0" in (results[0].error or "")


async def test_a_failing_result_listener_costs_no_result_and_leaves_nothing_running() -> None:
    finished: list[str] = []

    async def slow(command: Command) -> str:
        await asyncio.sleep(0.2)
        finished.append(command.call_id or "")
        return "slow"

    def listener(index: int, result: Result) -> None:
        raise RuntimeError("listener bug")

    dispatcher = InMemoryCommandDispatcher(
        {"fast": lambda command: "fast", "slow": slow}, batch=BatchPolicy(mode=ExecutionMode.PARALLEL)
    )
    results = await dispatcher.execute_commands(
        [Command(tool_name="fast"), Command(tool_name="slow", call_id="s")], timeout=5, on_result=listener
    )

    assert [r.result for r in results] == ["fast", "slow"]
    assert finished == ["s"]


async def test_an_attempt_timeout_lets_a_hung_attempt_be_retried() -> None:
    attempts: list[str] = []
    release = asyncio.Event()

    async def hangs_once(command: Command) -> str:
        attempts.append(command.call_id or "")
        if len(attempts) == 1:
            await release.wait()  # never set: this attempt hangs until abandoned
        return "second time lucky"

    dispatcher = InMemoryCommandDispatcher(
        {"hangs_once": hangs_once},
        retry=RetryPolicy(attempts=3, attempt_timeout=0.2, backoff=Backoff(initial=0.01, jitter=0)),
    )
    [result] = await dispatcher.execute_commands([Command(tool_name="hangs_once", call_id="h")], timeout=10)

    assert result.status is ResultStatus.SUCCESS and result.result == "second time lucky"
    assert attempts == ["h", "h"]


async def test_without_an_attempt_timeout_a_hung_command_times_out_once_with_the_command_budget() -> None:
    async def hangs(command: Command) -> str:
        await asyncio.Event().wait()
        return "never"

    dispatcher = InMemoryCommandDispatcher({"hangs": hangs}, retry=RetryPolicy(backoff=Backoff(initial=0.01)))
    [result] = await dispatcher.execute_commands([Command(tool_name="hangs")], timeout=0.3)

    assert (result.error or "").endswith("TimeoutError: no result within 0.3s")


WHILE_IT_RAN = "Interrupted: stopped by the user (Ctrl-C) while it ran"
BEFORE_IT_STARTED = "Interrupted: stopped by the user (Ctrl-C) before it started"


# --- the batch engine, interrupted (no processes) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [BatchPolicy(ExecutionMode.SEQUENTIAL), BatchPolicy(ExecutionMode.PARALLEL, max_concurrency=1)],
    ids=["sequential", "parallel-1-at-a-time"],
)
@pytest.mark.parametrize("answering", [False, True], ids=["cancelled-by-the-engine", "answering-the-interruption"])
async def test_run_batch_interrupted_while_the_second_command_runs(policy: BatchPolicy, answering: bool) -> None:
    """Finished: its Result; running: Interrupted, started; not started: Interrupted, did not run; at once.

    ``answering`` wraps each command in ``unless_interrupted`` as the task
    does (it answers at once); without it the engine cancels it after ``settle``.
    """
    running, ended, calls = asyncio.Event(), asyncio.Event(), []

    async def hold(command: Command) -> str:
        calls.append(command.tool_name)
        running.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()
        return "held to the end"

    dispatcher = InMemoryCommandDispatcher({"add": lambda command: 3, "hold": hold, "last": lambda command: "ran"})

    async def run_one(command: Command, deadline: Deadline) -> Result:
        if answering:
            return await unless_interrupted(command, dispatcher.execute_command(command, deadline))
        return await dispatcher.execute_command(command, deadline)

    commands = [Command(tool_name=name) for name in ("add", "hold", "last")]
    with interruptible() as interruption:
        batch = asyncio.ensure_future(run_batch(commands, run_one, Deadline.after(120), policy, Budget(settle=0.2)))
        async with asyncio.timeout(10):
            await running.wait()
        began = time.monotonic()
        interruption.interrupt()
        async with asyncio.timeout(5):
            results = await batch
        seconds = time.monotonic() - began

    assert seconds < 2.0, f"run_batch took {seconds:.2f} s to answer the interruption"
    assert ended.is_set(), "the running command was not cancelled"
    assert calls == ["hold"]  # the last command never ran
    assert [result.status for result in results] == [ResultStatus.SUCCESS, ResultStatus.FAILURE, ResultStatus.FAILURE]
    assert results[0].result == 3
    assert WHILE_IT_RAN in (results[1].error or "")
    assert BEFORE_IT_STARTED in (results[2].error or "")
    assert all(result.call_id for result in results) and len({result.call_id for result in results}) == 3


# --- a batch of one in the caller's task (alone_in_task) ---------------------------------------------------------


def success(command: Command, value: Any = "done") -> Result:
    return Result(status=ResultStatus.SUCCESS, result=value, call_id=command.call_id)


async def test_alone_in_task_a_batch_of_one_runs_in_the_callers_task_and_a_batch_of_two_does_not() -> None:
    tasks: list[asyncio.Task[Any] | None] = []
    told: list[tuple[int, Any]] = []

    async def run_one(command: Command, deadline: Deadline) -> Result:
        tasks.append(asyncio.current_task())
        return success(command, command.tool_name)

    caller = asyncio.current_task()
    one = await run_batch(
        [Command(tool_name="a")],
        run_one,
        Deadline.after(5),
        alone_in_task=True,
        on_result=lambda i, r: told.append((i, r.result)),
    )
    two = await run_batch(
        [Command(tool_name="b"), Command(tool_name="c")], run_one, Deadline.after(5), alone_in_task=True
    )

    assert [r.result for r in one + two] == ["a", "b", "c"]
    assert one[0].call_id  # filled, as for any batch
    assert told == [(0, "a")]
    assert tasks[0] is caller
    assert tasks[1] is not caller and tasks[2] is not caller
    assert caller is not None and caller.cancelling() == 0


async def test_alone_in_task_failures_are_results_in_the_documented_format() -> None:
    async def run_one(command: Command, deadline: Deadline) -> Result:
        if command.tool_name == "raises":
            raise Exception()
        return success(Command(tool_name="x", call_id="someone-else"))

    raising, lying = Command(tool_name="raises", call_id="r"), Command(tool_name="lies", call_id="l")

    [raised] = await run_batch([raising], run_one, Deadline.after(5), alone_in_task=True)
    [lied] = await run_batch([lying], run_one, Deadline.after(5), alone_in_task=True)

    assert_failure(raised, raising, "Exception: Exception()")
    assert_failure(lied, lying, "the result came back for call_id 'someone-else'")


async def test_alone_in_task_a_run_one_past_its_deadline_is_cancelled_and_times_out() -> None:
    """A run_one that ignores its deadline (but not a cancel) ends ``settle`` after it, a timeout failure."""
    ended = asyncio.Event()

    async def run_one(command: Command, deadline: Deadline) -> Result:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        return success(command)

    command = Command(tool_name="stuck", call_id="s")
    begin = time.monotonic()
    [result] = await run_batch([command], run_one, Deadline.after(0.2), budget=Budget(settle=0.1), alone_in_task=True)

    assert time.monotonic() - begin < 0.2 + SLACK
    assert ended.is_set()
    assert_failure(result, command, "TimeoutError: no result within 0.2s")
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_alone_in_task_a_clean_up_that_outlives_the_first_cancel_ends_at_the_second() -> None:
    """As MCP's courtesy cancel does: a run_one's own timeout ends the call, then a slow clean-up awaits."""
    cleaned: list[str] = []

    async def run_one(command: Command, deadline: Deadline) -> Result:
        try:
            async with asyncio.timeout_at(deadline.expires_at):
                await asyncio.Event().wait()
        except TimeoutError:
            try:
                await asyncio.sleep(30)  # the clean-up: it would hold the batch for 30 s
            finally:
                cleaned.append("cut short")
        return success(command)

    command = Command(tool_name="courteous", call_id="c")
    begin = time.monotonic()
    [result] = await run_batch([command], run_one, Deadline.after(0.2), budget=Budget(settle=0.1), alone_in_task=True)

    assert time.monotonic() - begin < 0.2 + SLACK
    assert cleaned == ["cut short"]
    assert_failure(result, command, "TimeoutError: no result within 0.2s")


async def test_alone_in_task_a_result_after_the_wait_is_over_is_too_late() -> None:
    """What the driver does with a Result past ``settle``: the command timed out."""

    async def run_one(command: Command, deadline: Deadline) -> Result:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return success(command, "late")
        return success(command)

    command = Command(tool_name="shrugs", call_id="l")

    [result] = await run_batch([command], run_one, Deadline.after(0.1), budget=Budget(settle=0.05), alone_in_task=True)

    assert_failure(result, command, "TimeoutError: no result within 0.1s")
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_alone_in_task_a_cancellation_from_outside_stays_a_cancellation() -> None:
    started, ended = asyncio.Event(), asyncio.Event()

    async def run_one(command: Command, deadline: Deadline) -> Result:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        return success(command)

    batch = asyncio.ensure_future(run_batch([Command(tool_name="x")], run_one, Deadline.after(30), alone_in_task=True))
    await wait_for(started)
    batch.cancel()

    with pytest.raises(asyncio.CancelledError):
        await batch
    assert ended.is_set()


async def test_alone_in_task_an_expired_deadline_runs_nothing() -> None:
    calls: list[str] = []

    async def run_one(command: Command, deadline: Deadline) -> Result:
        calls.append(command.tool_name)
        return success(command)

    deadline = Deadline(expires_at=time.monotonic() - 1, seconds=0.01)  # spent before the batch starts
    command = Command(tool_name="late", call_id="x")
    heard: list[tuple[int, Result]] = []

    [result] = await run_batch(
        [command], run_one, deadline, on_result=lambda at, result: heard.append((at, result)), alone_in_task=True
    )

    assert calls == []
    assert_failure(result, command, "TimeoutError: no result within 0.01s")
    assert heard == [(0, result)], "the listener did not hear of the command that never ran, as the driver tells it"


async def test_alone_in_task_a_batch_of_one_under_an_interruption_is_interrupted() -> None:
    running = asyncio.Event()

    async def run_one(command: Command, deadline: Deadline) -> Result:
        running.set()
        await asyncio.sleep(60)
        return success(command)

    with interruptible() as interruption:
        batch = asyncio.ensure_future(
            run_batch(
                [Command(tool_name="hold")], run_one, Deadline.after(120), budget=Budget(settle=0.1), alone_in_task=True
            )
        )
        await wait_for(running)
        interruption.interrupt()
        async with asyncio.timeout(5):
            [result] = await batch

    assert WHILE_IT_RAN in (result.error or "")


# --- CancelAt: every clock of a loop under one timer ---------------------------------------------------------------


async def _cancelled_at(seconds: float, order: list[str], label: str, made: asyncio.Event | None = None) -> None:
    """A task's body: a clock of ``seconds``, and the label recorded when its timeout ends the block."""
    deadline = Deadline.after(seconds)
    try:
        with CancelAt(deadline.expires_at, deadline):
            if made is not None:
                made.set()
            await asyncio.Event().wait()
    except CommandTimeout:
        order.append(label)


async def test_cancel_at_a_clock_due_sooner_than_the_armed_one_fires_first_and_each_fires_once() -> None:
    order: list[str] = []
    made = asyncio.Event()
    late = asyncio.ensure_future(_cancelled_at(0.3, order, "late", made))
    await wait_for(made)  # the late clock is made (and the timer armed for it) first
    early = asyncio.ensure_future(_cancelled_at(0.05, order, "early"))
    also_early = asyncio.ensure_future(_cancelled_at(0.05, order, "also early"))

    async with asyncio.timeout(5):
        await asyncio.gather(late, early, also_early)

    assert order[-1] == "late" and sorted(order[:2]) == ["also early", "early"]


async def test_cancel_at_a_clock_that_ended_never_fires_and_the_next_still_does() -> None:
    order: list[str] = []
    task = asyncio.current_task()
    assert task is not None
    gone = Deadline.after(0.05)
    with CancelAt(gone.expires_at, gone) as clock:
        pass  # ends at once: the timer armed for it finds nothing due, and is armed for the next clock

    async with asyncio.timeout(5):
        await _cancelled_at(0.2, order, "next")

    assert not clock.expired
    assert order == ["next"]
    assert task.cancelling() == 0


def test_cancel_at_a_closed_event_loop_takes_its_watch_with_it() -> None:
    """The watch's timer is the loop's: a loop closed with one armed (30 s out) is not kept alive by it."""

    async def one_clock() -> None:
        deadline = Deadline.after(30)
        with CancelAt(deadline.expires_at, deadline):
            pass

    loop = asyncio.new_event_loop()
    loop.run_until_complete(one_clock())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()

    assert gone() is None


def test_cancel_at_a_loop_closed_with_a_task_inside_a_block_is_not_kept_alive_by_the_watch() -> None:
    """The watch holds its pending clocks; a clock holds its task only weakly, so not the loop through it."""

    async def stuck() -> None:
        deadline = Deadline.after(30)
        with CancelAt(deadline.expires_at, deadline):
            await asyncio.Event().wait()

    loop = asyncio.new_event_loop()
    task = loop.create_task(stuck())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()  # with the task still inside its block, never cancelled
    gone = weakref.ref(loop)
    del loop, task
    gc.collect()

    assert gone() is None


class _TimerCountingLoop(asyncio.SelectorEventLoop):
    """An event loop that notes the instant of every timer set on it."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[float] = []

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        self.timers.append(when)
        return super().call_at(when, callback, *args, context=context)


def test_cancel_at_a_long_clock_outliving_many_short_ones_gets_one_timer() -> None:
    """Each short clock's timer finds nothing due and re-arms for the long one: once, not once each."""
    loop = _TimerCountingLoop()

    async def churn() -> None:
        long = Deadline.after(3600)
        held = asyncio.Event()

        async def holder() -> None:
            with CancelAt(long.expires_at, long):
                await held.wait()

        holding = asyncio.create_task(holder())
        await asyncio.sleep(0)
        for _ in range(20):
            short = Deadline.after(0.001)
            with CancelAt(short.expires_at, short):
                pass  # ends before its instant: its timer comes to nothing
            await asyncio.sleep(0.005)  # past it: the timer fires, and arms for the long clock
        held.set()
        await holding
        assert loop.timers.count(long.expires_at) == 1

    try:
        loop.run_until_complete(churn())
    finally:
        loop.close()
