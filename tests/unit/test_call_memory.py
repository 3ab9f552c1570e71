"""``aip.call_memory.CallMemory``: a device's memory of call_ids, so a repeated command is answered, not run again.

Plain calls with in-memory runs: what is remembered (and for whom: per
controller), for how long and in how many bytes, and what a conflicting
reuse of a call_id gets. No socket; the memory on a real device is tried in
``tests/integration/test_hub.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aip.call_memory import CallMemory, MemoryLimits
from aip.messages import Command, Result, ResultStatus
from dispatchers.base import error_result

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


def fail(commands: list[Command], error: BaseException) -> list[Result]:
    return [
        Result(status=ResultStatus.FAILURE, error=f"{type(error).__name__}: {error}", call_id=c.call_id)
        for c in commands
    ]


class Recorder:
    """A ``run`` that records the call_ids it was given and answers each with ``ok`` (by ``by``)."""

    def __init__(self, by: str = "") -> None:
        self.calls: list[list[str | None]] = []
        self.ran = asyncio.Event()
        self.by = by

    async def __call__(self, commands: list[Command]) -> list[Result]:
        self.calls.append([c.call_id for c in commands])
        self.ran.set()
        return [ok(c, self.by) for c in commands]


async def test_a_repeat_is_answered_from_memory_without_running_again() -> None:
    memory, run = CallMemory(), Recorder()
    first = await memory.execute([cmd("a"), cmd("b")], run, fail)
    again = await memory.execute([cmd("b"), cmd("c"), cmd("a")], run, fail)
    assert run.calls == [["a", "b"], ["c"]]
    assert again == [first[1], ok(cmd("c")), first[0]]
    assert memory.recall("a") == first[0] and memory.recall("zzz") is None
    assert len(memory) == 3


async def test_a_failure_answers_a_redelivery_of_its_batch_and_another_batch_runs_it_again() -> None:
    memory = CallMemory()

    async def run(commands: list[Command]) -> list[Result]:
        return fail(commands, RuntimeError("tool said no"))

    first = await memory.execute([cmd("a")], run, fail, delivery="r1")
    assert first[0].status is ResultStatus.FAILURE and memory.recall("a") is None  # recall: successes only
    again = Recorder()
    assert await memory.execute([cmd("a")], again, fail, delivery="r1") == first and again.calls == []
    rerun = Recorder()
    assert await memory.execute([cmd("a")], rerun, fail, delivery="r2") == [ok(cmd("a"))] and rerun.calls == [["a"]]


async def test_memory_is_bounded_in_bytes_and_forgets_the_oldest_first() -> None:
    memory, run = CallMemory(MemoryLimits(bytes=200)), Recorder()  # about 80 bytes each
    for call_id in ("a", "b", "c", "d"):
        await memory.execute([cmd(call_id)], run, fail)
    kept = [call_id for call_id in "abcd" if memory.recall(call_id) is not None]
    assert kept and kept == list("abcd")[-len(kept) :] and len(kept) < 4


async def test_a_result_that_cannot_be_serialised_is_answered_but_not_remembered() -> None:
    memory = CallMemory()

    async def run(commands: list[Command]) -> list[Result]:
        return [Result(status=ResultStatus.SUCCESS, result=b"\xff\xfe", call_id=c.call_id) for c in commands]

    [result] = await memory.execute([cmd("raw")], run, fail)
    assert result.result == b"\xff\xfe" and len(memory) == 0
    again = Recorder()
    await memory.execute([cmd("raw")], again, fail)
    assert again.calls == [["raw"]]


@pytest.mark.parametrize("call_id", [None, ""])
async def test_commands_without_call_id_are_always_run(call_id: str | None) -> None:
    memory, run = CallMemory(), Recorder()
    await memory.execute([cmd(call_id)], run, fail)
    await memory.execute([cmd(call_id), cmd(call_id)], run, fail)
    assert run.calls == [[call_id], [call_id, call_id]]
    assert len(memory) == 0


async def test_a_call_id_twice_in_one_batch_runs_once() -> None:
    memory, run = CallMemory(), Recorder()
    results = await memory.execute([cmd("a"), cmd("a")], run, fail)
    assert run.calls == [["a"]]
    assert results == [ok(cmd("a")), ok(cmd("a"))]


class Gate:
    """A ``run`` that blocks until released, so batches can overlap deterministically."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[list[str | None]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.error = error

    async def __call__(self, commands: list[Command]) -> list[Result]:
        self.calls.append([c.call_id for c in commands])
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [ok(c) for c in commands]


async def test_concurrent_batches_with_the_same_call_id_run_the_tool_once() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(memory.execute([cmd("shared")], slow, fail))
    await slow.entered.wait()

    other_ran = asyncio.Event()
    other_calls: list[list[str | None]] = []

    async def second_run(commands: list[Command]) -> list[Result]:
        other_calls.append([c.call_id for c in commands])
        other_ran.set()
        return [ok(c) for c in commands]

    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await other_ran.wait()  # the second batch has looked "shared" up and is waiting for it
    assert not second.done()
    slow.release.set()
    first_results, second_results = await asyncio.gather(first, second)

    assert slow.calls == [["shared"]] and other_calls == [["own"]]
    assert first_results == [ok(cmd("shared"))]
    assert second_results == [ok(cmd("shared")), ok(cmd("own"))]
    assert memory.recall("shared") == ok(cmd("shared"))


async def test_a_run_that_raises_is_not_remembered_and_a_waiting_repeat_gets_a_failure() -> None:
    memory = CallMemory()
    broken = Gate(error=RuntimeError("executor exploded"))
    first = asyncio.create_task(memory.execute([cmd("shared")], broken, fail))
    await broken.entered.wait()

    second_run = Recorder()
    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await second_run.ran.wait()
    broken.release.set()

    with pytest.raises(RuntimeError, match="executor exploded"):
        await first
    shared, own = await second
    assert shared.status is ResultStatus.FAILURE and shared.call_id == "shared"
    assert shared.error == "RuntimeError: executor exploded"
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None
    # a later repeat runs it for real
    run = Recorder()
    assert await memory.execute([cmd("shared")], run, fail) == [ok(cmd("shared"))]
    assert run.calls == [["shared"]]


async def test_a_cancelled_first_run_gives_a_waiting_repeat_a_failure() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(memory.execute([cmd("shared")], slow, fail))
    await slow.entered.wait()
    second_run = Recorder()
    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await second_run.ran.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    shared, own = await second
    assert shared.status is ResultStatus.FAILURE and "cancelled" in (shared.error or "")
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None


async def test_a_run_with_the_wrong_number_of_results_raises_and_remembers_nothing() -> None:
    memory = CallMemory()

    async def short(commands: list[Command]) -> list[Result]:
        return [ok(commands[0])]

    with pytest.raises(RuntimeError, match="2 commands"):
        await memory.execute([cmd("a"), cmd("b")], short, fail)
    assert len(memory) == 0 and memory.recall("a") is None
    run = Recorder()
    await memory.execute([cmd("a")], run, fail)
    assert run.calls == [["a"]]


async def test_memory_is_bounded_in_entries() -> None:
    memory, run = CallMemory(MemoryLimits(entries=2)), Recorder()
    for call_id in ("a", "b", "c"):
        await memory.execute([cmd(call_id)], run, fail)
    assert len(memory) == 2
    assert memory.recall("a") is None and memory.recall("b") is not None and memory.recall("c") is not None
    await memory.execute([cmd("a")], run, fail)
    assert run.calls == [["a"], ["b"], ["c"], ["a"]]
    assert memory.recall("b") is None  # the oldest went to make room


async def test_memory_is_bounded_in_age() -> None:
    now = [100.0]
    memory, run = CallMemory(MemoryLimits(seconds=10.0), clock=lambda: now[0]), Recorder()
    await memory.execute([cmd("old")], run, fail)
    now[0] = 105.0
    await memory.execute([cmd("young")], run, fail)
    now[0] = 110.0  # exactly the limit: still remembered
    await memory.execute([cmd("old")], run, fail)
    assert run.calls == [["old"], ["young"]]
    now[0] = 110.5
    assert memory.recall("old") is None and memory.recall("young") is not None
    await memory.execute([cmd("old"), cmd("young")], run, fail)
    assert run.calls == [["old"], ["young"], ["old"]]
    now[0] = 1000.0
    assert len(memory) == 2  # len does not expire by itself...
    assert memory.recall("young") is None and len(memory) == 0  # ...a lookup does


async def test_the_same_call_id_from_another_controller_runs_again_and_reads_nothing() -> None:
    memory, one, two = CallMemory(), Recorder("one: "), Recorder("two: ")
    [first] = await memory.execute([cmd("a")], one, fail, controller="one")
    [second] = await memory.execute([cmd("a")], two, fail, controller="two")
    assert one.calls == [["a"]] and two.calls == [["a"]]  # it ran for each controller
    assert first == ok(cmd("a"), "one: ") and second == ok(cmd("a"), "two: ")
    # each controller's repeat gets its own answer, without running again
    assert await memory.execute([cmd("a")], one, fail, controller="one") == [first]
    assert await memory.execute([cmd("a")], two, fail, controller="two") == [second]
    assert one.calls == [["a"]] and two.calls == [["a"]]
    assert memory.recall("a", "one") == first and memory.recall("a", "two") == second
    assert memory.recall("a") is None  # nor is it a batch without a controller's
    assert len(memory) == 2


async def test_a_controller_cannot_plant_a_result_for_another_controllers_call_id() -> None:
    memory, mallory, victim = CallMemory(), Recorder("planted: "), Recorder("real: ")
    await memory.execute([cmd("next-call")], mallory, fail, controller="mallory")
    [answer] = await memory.execute([cmd("next-call")], victim, fail, controller="victim")
    assert victim.calls == [["next-call"]] and answer == ok(cmd("next-call"), "real: ")
    assert memory.recall("next-call", "victim") == answer
    assert memory.recall("next-call", "mallory") == ok(cmd("next-call"), "planted: ")


async def test_another_controllers_run_in_progress_is_not_shared() -> None:
    memory, slow = CallMemory(), Gate()
    first = asyncio.create_task(memory.execute([cmd("shared")], slow, fail, controller="one"))
    await slow.entered.wait()
    other = Recorder("two: ")
    async with asyncio.timeout(5):  # it must not wait for the other controller's run
        [answer] = await memory.execute([cmd("shared")], other, fail, controller="two")
    assert other.calls == [["shared"]] and answer == ok(cmd("shared"), "two: ")
    assert not first.done()
    slow.release.set()
    assert await first == [ok(cmd("shared"))]
    assert memory.recall("shared", "one") == ok(cmd("shared"))


def assert_conflict(result: Result, call_id: str) -> None:
    assert result.status is ResultStatus.FAILURE and result.call_id == call_id and result.result is None
    assert (result.error or "").startswith(f"CallIdConflict: call_id {call_id!r} was already used"), result.error


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
    [first] = await memory.execute([ORIGINAL], run, fail)
    conflict, fresh = await memory.execute([other, cmd("b")], run, fail)
    assert run.calls == [["a"], ["b"]]  # the conflicting command did not run; the rest of the batch did
    assert_conflict(conflict, "a")
    assert fresh == ok(cmd("b"))
    # the first answer is kept for the real repeat
    assert memory.recall("a") == first
    assert await memory.execute([ORIGINAL], run, fail) == [first] and run.calls == [["a"], ["b"]]


@pytest.mark.parametrize("other", CONFLICTING, ids=CONFLICT_IDS)
async def test_a_running_call_id_for_another_command_is_refused_at_once(other: Command) -> None:
    memory, slow = CallMemory(), Gate()
    first = asyncio.create_task(memory.execute([ORIGINAL], slow, fail))
    await slow.entered.wait()
    run = Recorder()
    async with asyncio.timeout(5):  # refused, not left waiting for the first run
        [conflict] = await memory.execute([other], run, fail)
    assert_conflict(conflict, "a")
    assert run.calls == [] and not first.done()
    slow.release.set()
    assert await first == [ok(ORIGINAL)] and slow.calls == [["a"]]
    assert memory.recall("a") == ok(ORIGINAL)


async def test_a_call_id_twice_in_one_batch_for_two_commands_runs_the_first_only() -> None:
    memory, run = CallMemory(), Recorder()
    first, second = await memory.execute([ORIGINAL, CONFLICTING[0]], run, fail)
    assert run.calls == [["a"]]
    assert first == ok(ORIGINAL)
    assert_conflict(second, "a")


async def test_another_timeout_or_key_order_is_the_same_call() -> None:
    memory, run = CallMemory(), Recorder()
    [first] = await memory.execute([cmd("a", parameters={"x": 1, "y": 2}, timeout=5.0)], run, fail)
    [again] = await memory.execute([cmd("a", parameters={"y": 2, "x": 1}, timeout=30.0)], run, fail)
    assert again == first and run.calls == [["a"]]


async def test_a_conflict_is_per_controller() -> None:
    memory, run = CallMemory(), Recorder()
    await memory.execute([ORIGINAL], run, fail, controller="one")
    [other] = await memory.execute([CONFLICTING[0]], run, fail, controller="two")
    assert other == ok(CONFLICTING[0]) and run.calls == [["a"], ["a"]]


# -- the call memory is bounded in bytes ------------------------------------------------


async def test_the_call_memory_is_bounded_in_bytes() -> None:
    limit = 64 * 1024
    memory = CallMemory(MemoryLimits(bytes=limit))
    size = {"value": 10_000}

    async def run(commands: list[Command]) -> list[Result]:
        return [
            Result(status=ResultStatus.SUCCESS, result="A" * size["value"], call_id=c.call_id, namespace="m")
            for c in commands
        ]

    def fail(commands: list[Command], error: BaseException) -> list[Result]:
        return [error_result(c, error) for c in commands]

    async with asyncio.timeout(10):
        for n in range(50):  # ~500 KB of results through a 64 KiB memory
            await memory.execute([Command(tool_name="shot", call_id=f"shot-{n}")], run, fail)
        held = sum(len(text) for _, _, text, _ in memory._done.values())  # (stamp, fingerprint, text, failed_in)
        assert 0 < held <= limit, held
        assert memory._bytes == held
        assert memory.recall("shot-49") is not None, "the newest result was not kept"
        assert memory.recall("shot-0") is None, "the oldest result was kept past the byte limit"
        kept = len(memory)
        # A result larger than the whole memory is not kept, and pushes nothing out.
        size["value"] = 2 * limit
        await memory.execute([Command(tool_name="shot", call_id="huge")], run, fail)
        assert memory.recall("huge") is None
        assert len(memory) == kept and memory.recall("shot-49") is not None
    assert MemoryLimits().bytes <= 64 * 2**20
