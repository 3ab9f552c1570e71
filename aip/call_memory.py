"""A device's memory of recent call_ids: a repeated command is answered, not run again.

A controller that lost its connection mid-batch sends the same commands again
with the same call_ids (invariant 2). Whatever state each one is in on the
device, the repeat gets the first run's answer: a finished call its stored
Result, a call still running the Result it is about to produce.

Only successes are remembered. A failure may not have reached the tool at all
(a server restarting, a timeout), and a retry of a failed command (a resumed
batch) is meant to run it again. A run that was cancelled has no answer to
remember. The memory is bounded in entries, bytes and age, so a device that
runs for months stays small.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .messages import Command, Result, ResultStatus

#: Runs the commands not seen before; returns one Result each, in order.
Run = Callable[[list[Command]], Awaitable[list[Result]]]
#: One failure Result per command, naming ``error``: how a shared run's failure reaches a repeat.
Fail = Callable[[list[Command], BaseException], list[Result]]


@dataclass(frozen=True)
class MemoryLimits:
    """At most ``entries`` Results, ``bytes`` of their JSON in all, none older than ``seconds``."""

    entries: int = 10_000
    bytes: int = 64 * 2**20
    seconds: float = 3600.0


class CallMemory:
    """Results by call_id, and the calls still running, shared by every batch on one device."""

    def __init__(self, limits: MemoryLimits = MemoryLimits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        # Results are kept as JSON text: 10,000 strings cost the garbage collector
        # nothing, 10,000 model trees cost every full collection a scan.
        self._done: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._bytes = 0
        self._running: dict[str, asyncio.Future[Result]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def recall(self, call_id: str) -> Result | None:
        self._expire()
        entry = self._done.get(call_id)
        return Result.model_validate_json(entry[1]) if entry else None

    async def execute(self, commands: Sequence[Command], run: Run, fail: Fail) -> list[Result]:
        """One Result per command: remembered, shared with a run in progress, or from ``run``."""
        answers: list[Result | asyncio.Future[Result] | None] = []
        fresh: list[tuple[int, Command]] = []
        mine: dict[str, asyncio.Future[Result]] = {}
        for index, command in enumerate(commands):
            call_id = command.call_id
            known = self.recall(call_id) if call_id else None
            running = self._running.get(call_id) if call_id else None
            if known is not None:
                answers.append(known)
            elif running is not None:
                answers.append(running)
            else:
                answers.append(None)
                fresh.append((index, command))
                if call_id:
                    mine[call_id] = self._running[call_id] = asyncio.get_running_loop().create_future()
        try:
            results = await run([command for _, command in fresh]) if fresh else []
            if len(results) != len(fresh):
                raise RuntimeError(f"the executor returned {len(results)} results for {len(fresh)} commands")
        except BaseException as error:
            for call_id, future in mine.items():
                del self._running[call_id]
                if isinstance(error, Exception):
                    future.set_exception(error)
                    future.exception()  # marked retrieved: a repeat may never come to look
                else:
                    future.cancel()
            raise
        for (index, command), result in zip(fresh, results, strict=True):
            answers[index] = result
            if command.call_id and command.call_id in mine:
                del self._running[command.call_id]
                mine.pop(command.call_id).set_result(result)
                if result.status is ResultStatus.SUCCESS:
                    self._remember(command.call_id, result)
        return [await self._settle(command, answer, fail) for command, answer in zip(commands, answers, strict=True)]

    @staticmethod
    async def _settle(command: Command, answer: Result | asyncio.Future[Result] | None, fail: Fail) -> Result:
        if isinstance(answer, Result):
            return answer
        assert answer is not None
        try:
            # Shielded: a repeat that stops waiting must not cancel the first run's call.
            return await asyncio.shield(answer)
        except Exception as error:
            return fail([command], error)[0]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return fail([command], RuntimeError("the first run of this call_id was cancelled"))[0]

    def _remember(self, call_id: str, result: Result) -> None:
        try:
            text = result.model_dump_json()
        except ValueError:
            return  # a result that cannot travel is not worth replaying; the reply will say so
        if len(text) > self.limits.bytes:
            return
        self._forget(call_id)
        self._done[call_id] = (self.clock(), text)
        self._bytes += len(text)
        while len(self._done) > self.limits.entries or self._bytes > self.limits.bytes:
            self._forget(next(iter(self._done)))

    def _forget(self, call_id: str) -> None:
        entry = self._done.pop(call_id, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    def _expire(self) -> None:
        oldest_kept = self.clock() - self.limits.seconds
        while self._done:
            call_id, (stamp, _) = next(iter(self._done.items()))
            if stamp >= oldest_kept:
                break
            self._forget(call_id)
