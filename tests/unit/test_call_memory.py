"""``aip.call_memory.CallMemory``: a device's memory of call_ids, so a repeated command is answered, not run again.

Plain calls with in-memory runs: what is remembered (and for whom: per
controller), for how long and in how many bytes, and what a conflicting
reuse of a call_id gets. A batch is asked one command at a time, in order,
as the device runs it (``in_order``). No socket; the memory on a real device
is tried in ``tests/integration/test_hub.py`` and ``tests/integration/test_device_client.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from aip.call_memory import CallMemory, MemoryLimits, Run
from aip.failure import error_result, failure_cause
from aip.messages import Command, Result, ResultStatus

# -- CallMemory ------------------------------------------------------------------------


def cmd(
    call_id: str | None,
    tool: str = "echo",
    *,
    parameters: dict[str, Any] | None = None,
    tool_type: str = "action",
    namespace: str | None = None,
    timeout: float | None = None,
) -> Command:
    return Command(
        tool_name=tool,
        parameters=parameters or {},
        tool_type=tool_type,
        call_id=call_id,
        namespace=namespace,
        timeout=timeout,
    )


def ok(command: Command, by: str = "") -> Result:
    """What ``command`` answers when run; ``by`` tells apart the runs of different controllers."""
    return Result(status=ResultStatus.SUCCESS, result=f"{by}ran {command.tool_name}", call_id=command.call_id)


async def in_order(
    memory: CallMemory, commands: Sequence[Command], run: Run, controller: str = "", delivery: str = ""
) -> list[Result]:
    """A batch as the device runs it: each command through the memory, one after the other."""
    return [await memory.call(command, run, controller, delivery) for command in commands]


class Recorder:
    """A ``run`` that records the call_ids it was given and answers each with ``ok`` (by ``by``)."""

    def __init__(self, by: str = "") -> None:
        self.calls: list[str | None] = []
        self.ran = asyncio.Event()
        self.by = by

    async def __call__(self, command: Command) -> Result:
        self.calls.append(command.call_id)
        self.ran.set()
        return ok(command, self.by)


async def test_a_repeat_is_answered_from_memory_without_running_again() -> None:
    memory, run = CallMemory(), Recorder()
    first = await in_order(memory, [cmd("a"), cmd("b")], run)
    again = await in_order(memory, [cmd("b"), cmd("c"), cmd("a")], run)
    assert run.calls == ["a", "b", "c"]
    assert again == [first[1], ok(cmd("c")), first[0]]
    assert memory.recall("a") == first[0] and memory.recall("zzz") is None
    assert len(memory) == 3


async def test_a_failure_answers_a_redelivery_of_its_batch_and_another_batch_runs_it_again() -> None:
    memory = CallMemory()

    async def run(command: Command) -> Result:
        return error_result(command, RuntimeError("tool said no"))

    first = await in_order(memory, [cmd("a")], run, delivery="r1")
    assert first[0].status is ResultStatus.FAILURE and memory.recall("a") is None  # recall: successes only
    again = Recorder()
    assert await in_order(memory, [cmd("a")], again, delivery="r1") == first and again.calls == []
    rerun = Recorder()
    assert await in_order(memory, [cmd("a")], rerun, delivery="r2") == [ok(cmd("a"))] and rerun.calls == ["a"]


async def test_memory_is_bounded_in_bytes_and_forgets_the_oldest_first() -> None:
    memory, run = CallMemory(MemoryLimits(bytes=200)), Recorder()  # about 80 bytes each
    for call_id in ("a", "b", "c", "d"):
        await in_order(memory, [cmd(call_id)], run)
    kept = [call_id for call_id in "abcd" if memory.recall(call_id) is not None]
    assert kept and kept == list("abcd")[-len(kept) :] and len(kept) < 4


async def test_a_result_that_cannot_be_serialised_is_answered_but_not_remembered() -> None:
    memory = CallMemory()

    async def run(command: Command) -> Result:
        return Result(status=ResultStatus.SUCCESS, result=b"\xff\xfe", call_id=command.call_id)

    [result] = await in_order(memory, [cmd("raw")], run)
    assert result.result == b"\xff\xfe" and len(memory) == 0
    again = Recorder()
    await in_order(memory, [cmd("raw")], again)
    assert again.calls == ["raw"]


@pytest.mark.parametrize("call_id", [None, ""])
async def test_commands_without_call_id_are_always_run(call_id: str | None) -> None:
    memory, run = CallMemory(), Recorder()
    await in_order(memory, [cmd(call_id)], run)
    await in_order(memory, [cmd(call_id), cmd(call_id)], run)
    assert run.calls == [call_id, call_id, call_id]
    assert len(memory) == 0


async def test_a_call_id_twice_in_one_batch_runs_once() -> None:
    memory, run = CallMemory(), Recorder()
    results = await in_order(memory, [cmd("a"), cmd("a")], run)
    assert run.calls == ["a"]
    assert results == [ok(cmd("a")), ok(cmd("a"))]


class Gate:
    """A ``run`` that blocks until released, so batches can overlap deterministically."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[str | None] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.error = error

    async def __call__(self, command: Command) -> Result:
        self.calls.append(command.call_id)
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return ok(command)


async def test_concurrent_batches_with_the_same_call_id_run_the_tool_once() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(in_order(memory, [cmd("shared")], slow))
    await slow.entered.wait()

    second_run = Recorder()
    second = asyncio.create_task(in_order(memory, [cmd("own"), cmd("shared")], second_run))
    await second_run.ran.wait()  # it ran "own", then looked "shared" up and is waiting for it
    assert not second.done()
    slow.release.set()
    first_results, second_results = await asyncio.gather(first, second)

    assert slow.calls == ["shared"] and second_run.calls == ["own"]
    assert first_results == [ok(cmd("shared"))]
    assert second_results == [ok(cmd("own")), ok(cmd("shared"))]
    assert memory.recall("shared") == ok(cmd("shared"))


async def test_a_run_that_raises_is_not_remembered_and_a_waiting_repeat_gets_a_failure() -> None:
    memory = CallMemory()
    broken = Gate(error=RuntimeError("executor exploded"))
    first = asyncio.create_task(in_order(memory, [cmd("shared")], broken))
    await broken.entered.wait()

    second_run = Recorder()
    second = asyncio.create_task(in_order(memory, [cmd("own"), cmd("shared")], second_run))
    await second_run.ran.wait()
    broken.release.set()

    with pytest.raises(RuntimeError, match="executor exploded"):
        await first
    own, shared = await second
    assert shared == error_result(cmd("shared"), RuntimeError("executor exploded"))
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None
    # a later repeat runs it for real
    run = Recorder()
    assert await in_order(memory, [cmd("shared")], run) == [ok(cmd("shared"))]
    assert run.calls == ["shared"]


async def test_a_cancelled_first_run_gives_a_waiting_repeat_a_failure() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(in_order(memory, [cmd("shared")], slow))
    await slow.entered.wait()
    second_run = Recorder()
    second = asyncio.create_task(in_order(memory, [cmd("own"), cmd("shared")], second_run))
    await second_run.ran.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    own, shared = await second
    assert shared.status is ResultStatus.FAILURE and "cancelled" in (shared.error or "")
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None


async def test_each_result_is_remembered_before_the_next_command_starts() -> None:
    """A connection lost mid-batch: the delivery after it must find every command that had finished."""
    memory, seen = CallMemory(), []

    async def run(command: Command) -> Result:
        seen.append([call_id for call_id in "abc" if memory.recall(call_id) is not None])
        return ok(command)

    await in_order(memory, [cmd("a"), cmd("b"), cmd("c")], run)
    assert seen == [[], ["a"], ["a", "b"]]


async def test_a_run_that_raises_remembers_nothing_and_the_next_delivery_runs_it() -> None:
    memory = CallMemory()

    async def broken(command: Command) -> Result:
        raise RuntimeError("executor exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        await memory.call(cmd("a"), broken)
    assert len(memory) == 0 and memory.recall("a") is None
    run = Recorder()
    await in_order(memory, [cmd("a")], run)
    assert run.calls == ["a"]


async def test_memory_is_bounded_in_entries() -> None:
    memory, run = CallMemory(MemoryLimits(entries=2)), Recorder()
    for call_id in ("a", "b", "c"):
        await in_order(memory, [cmd(call_id)], run)
    assert len(memory) == 2
    assert memory.recall("a") is None and memory.recall("b") is not None and memory.recall("c") is not None
    await in_order(memory, [cmd("a")], run)
    assert run.calls == ["a", "b", "c", "a"]
    assert memory.recall("b") is None  # the oldest went to make room


async def test_memory_is_bounded_in_age() -> None:
    now = [100.0]
    memory, run = CallMemory(MemoryLimits(seconds=10.0), clock=lambda: now[0]), Recorder()
    await in_order(memory, [cmd("old")], run)
    now[0] = 105.0
    await in_order(memory, [cmd("young")], run)
    now[0] = 110.0  # exactly the limit: still remembered
    await in_order(memory, [cmd("old")], run)
    assert run.calls == ["old", "young"]
    now[0] = 110.5
    assert memory.recall("old") is None and memory.recall("young") is not None
    await in_order(memory, [cmd("old"), cmd("young")], run)
    assert run.calls == ["old", "young", "old"]
    now[0] = 1000.0
    assert len(memory) == 2  # len does not expire by itself...
    assert memory.recall("young") is None and len(memory) == 0  # ...a lookup does


async def test_the_same_call_id_from_another_controller_runs_again_and_reads_nothing() -> None:
    memory, one, two = CallMemory(), Recorder("one: "), Recorder("two: ")
    [first] = await in_order(memory, [cmd("a")], one, controller="one")
    [second] = await in_order(memory, [cmd("a")], two, controller="two")
    assert one.calls == ["a"] and two.calls == ["a"]  # it ran for each controller
    assert first == ok(cmd("a"), "one: ") and second == ok(cmd("a"), "two: ")
    # each controller's repeat gets its own answer, without running again
    assert await in_order(memory, [cmd("a")], one, controller="one") == [first]
    assert await in_order(memory, [cmd("a")], two, controller="two") == [second]
    assert one.calls == ["a"] and two.calls == ["a"]
    assert memory.recall("a", "one") == first and memory.recall("a", "two") == second
    assert memory.recall("a") is None  # nor is it a batch without a controller's
    assert len(memory) == 2


async def test_a_controller_cannot_plant_a_result_for_another_controllers_call_id() -> None:
    memory, mallory, victim = CallMemory(), Recorder("planted: "), Recorder("real: ")
    await in_order(memory, [cmd("next-call")], mallory, controller="mallory")
    [answer] = await in_order(memory, [cmd("next-call")], victim, controller="victim")
    assert victim.calls == ["next-call"] and answer == ok(cmd("next-call"), "real: ")
    assert memory.recall("next-call", "victim") == answer
    assert memory.recall("next-call", "mallory") == ok(cmd("next-call"), "planted: ")


async def test_another_controllers_run_in_progress_is_not_shared() -> None:
    memory, slow = CallMemory(), Gate()
    first = asyncio.create_task(in_order(memory, [cmd("shared")], slow, controller="one"))
    await slow.entered.wait()
    other = Recorder("two: ")
    async with asyncio.timeout(5):  # it must not wait for the other controller's run
        [answer] = await in_order(memory, [cmd("shared")], other, controller="two")
    assert other.calls == ["shared"] and answer == ok(cmd("shared"), "two: ")
    assert not first.done()
    slow.release.set()
    assert await first == [ok(cmd("shared"))]
    assert memory.recall("shared", "one") == ok(cmd("shared"))


def assert_conflict(command: Command, result: Result) -> None:
    assert result.status is ResultStatus.FAILURE and result.call_id == command.call_id
    cause = failure_cause(command, result)
    assert cause.startswith(f"CallIdConflict: call_id {command.call_id!r} was already used"), cause


ORIGINAL = cmd("a", parameters={"x": 1})
CONFLICTING = [
    cmd("a", parameters={"x": 2}),
    cmd("a", parameters={}),
    cmd("a", "delete", parameters={"x": 1}),
    cmd("a", parameters={"x": 1}, tool_type="data_collection"),
    cmd("a", parameters={"x": 1}, namespace="other-server"),
]


CONFLICT_IDS = ["parameters", "no-parameters", "tool", "tool_type", "namespace"]


@pytest.mark.parametrize("other", CONFLICTING, ids=CONFLICT_IDS)
async def test_a_known_call_id_for_another_command_is_refused_and_not_run(other: Command) -> None:
    memory, run = CallMemory(), Recorder()
    [first] = await in_order(memory, [ORIGINAL], run)
    conflict, fresh = await in_order(memory, [other, cmd("b")], run)
    assert run.calls == ["a", "b"]  # the conflicting command did not run; the rest of the batch did
    assert_conflict(other, conflict)
    assert fresh == ok(cmd("b"))
    # the first answer is kept for the real repeat
    assert memory.recall("a") == first
    assert await in_order(memory, [ORIGINAL], run) == [first] and run.calls == ["a", "b"]


@pytest.mark.parametrize("other", CONFLICTING, ids=CONFLICT_IDS)
async def test_a_running_call_id_for_another_command_is_refused_at_once(other: Command) -> None:
    memory, slow = CallMemory(), Gate()
    first = asyncio.create_task(in_order(memory, [ORIGINAL], slow))
    await slow.entered.wait()
    run = Recorder()
    async with asyncio.timeout(5):  # refused, not left waiting for the first run
        [conflict] = await in_order(memory, [other], run)
    assert_conflict(other, conflict)
    assert run.calls == [] and not first.done()
    slow.release.set()
    assert await first == [ok(ORIGINAL)] and slow.calls == ["a"]
    assert memory.recall("a") == ok(ORIGINAL)


async def test_a_call_id_twice_in_one_batch_for_two_commands_runs_the_first_only() -> None:
    memory, run = CallMemory(), Recorder()
    first, second = await in_order(memory, [ORIGINAL, CONFLICTING[0]], run)
    assert run.calls == ["a"]
    assert first == ok(ORIGINAL)
    assert_conflict(CONFLICTING[0], second)


async def test_another_timeout_or_key_order_is_the_same_call() -> None:
    memory, run = CallMemory(), Recorder()
    [first] = await in_order(memory, [cmd("a", parameters={"x": 1, "y": 2}, timeout=5.0)], run)
    [again] = await in_order(memory, [cmd("a", parameters={"y": 2, "x": 1}, timeout=30.0)], run)
    assert again == first and run.calls == ["a"]


async def test_a_conflict_is_per_controller() -> None:
    memory, run = CallMemory(), Recorder()
    await in_order(memory, [ORIGINAL], run, controller="one")
    [other] = await in_order(memory, [CONFLICTING[0]], run, controller="two")
    assert other == ok(CONFLICTING[0]) and run.calls == ["a", "a"]


# -- the call memory is bounded in bytes ------------------------------------------------


async def test_the_call_memory_is_bounded_in_bytes() -> None:
    limit = 64 * 1024
    memory = CallMemory(MemoryLimits(bytes=limit))
    size = {"value": 10_000}

    async def run(command: Command) -> Result:
        return Result(status=ResultStatus.SUCCESS, result="A" * size["value"], call_id=command.call_id, namespace="m")

    async with asyncio.timeout(10):
        for n in range(50):  # ~500 KB of results through a 64 KiB memory
            await in_order(memory, [Command(tool_name="shot", call_id=f"shot-{n}")], run)
        held = sum(len(text) for _, _, text, _ in memory._done.values())  # (stamp, fingerprint, text, failed_in)
        assert 0 < held <= limit, held
        assert memory._bytes == held
        assert memory.recall("shot-49") is not None, "the newest result was not kept"
        assert memory.recall("shot-0") is None, "the oldest result was kept past the byte limit"
        kept = len(memory)
        # A result larger than the whole memory is not kept, and pushes nothing out.
        size["value"] = 2 * limit
        await in_order(memory, [Command(tool_name="shot", call_id="huge")], run)
        assert memory.recall("huge") is None
        assert len(memory) == kept and memory.recall("shot-49") is not None
    assert MemoryLimits().bytes <= 64 * 2**20


@pytest.mark.parametrize("size", [1, 100], ids=["short-parameters", "long-parameters"])
async def test_a_call_is_told_apart_by_its_parameters_whatever_their_length(size: int) -> None:
    memory, run = CallMemory(), Recorder()
    first = cmd("a", parameters={"text": "x" * size})
    [answer] = await in_order(memory, [first], run)
    [again] = await in_order(memory, [cmd("a", parameters={"text": "x" * size})], run)
    conflicting = cmd("a", parameters={"text": "y" * size})
    [other] = await in_order(memory, [conflicting], run)
    assert again == answer and run.calls == ["a"]
    assert_conflict(conflicting, other)
