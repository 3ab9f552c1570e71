"""A device's memory of recent call_ids: a repeated command is answered, not run again.

A controller that lost its connection mid-batch sends the same commands again
with the same call_ids (invariant 2). Whatever state each one is in on the
device, the repeat gets the first run's answer: a finished call its stored
Result, a call still running the Result it is about to produce.

The memory is kept per controller (the hub names the sender of each batch
from its credential): one controller can neither read another's Results by
replaying its call_ids nor plant a Result for a call_id another will use. And
each call_id is remembered with the command it belongs to: the same call_id
with another tool, parameters or tool_type is refused (``CallIdConflict``),
neither run nor answered from memory.

A success answers every repeat. A failure answers only a re-delivery of the
batch it ran in (the same ``response_id``: the controller re-sending after a
hub restart must not run a failed action twice); a new batch with that call_id
(a resumed flow run) is meant to run it again. A run that was cancelled, or a
command never started, has no answer to remember. The memory is bounded in
entries, bytes and age, so a device that runs for months stays small.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .messages import Command, Result, ResultStatus

__all__ = ["CallIdConflict", "CallMemory", "Fail", "Key", "MemoryLimits", "Run", "fingerprint"]

#: Runs the commands not seen before; returns one Result each, in order.
Run = Callable[[list[Command]], Awaitable[list[Result]]]
#: One failure Result per command, naming ``error``: how a shared run's failure reaches a repeat.
Fail = Callable[[list[Command], BaseException], list[Result]]
#: (controller, call_id): whose call it is, and which.
Key = tuple[str, str]


class CallIdConflict(ValueError):
    """A call_id this device already knows, for another command: neither run nor replayed."""


def fingerprint(command: Command) -> str:
    """What makes two commands the same call: tool, parameters, tool_type and server (not the timeout)."""
    identity = [command.tool_name, command.parameters or {}, command.tool_type, command.namespace]
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class MemoryLimits:
    """At most ``entries`` Results, ``bytes`` of their JSON in all, none older than ``seconds``."""

    entries: int = 10_000
    bytes: int = 64 * 2**20
    seconds: float = 3600.0


class CallMemory:
    """Results by (controller, call_id), and the calls still running, shared by every batch on one device."""

    def __init__(self, limits: MemoryLimits = MemoryLimits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        # Results are kept as JSON text: 10,000 strings cost the garbage collector
        # nothing, 10,000 model trees cost every full collection a scan.
        # (when, the command's fingerprint, the Result's JSON, the batch it ran in if it failed)
        self._done: OrderedDict[Key, tuple[float, str, str, str | None]] = OrderedDict()
        self._bytes = 0
        self._running: dict[Key, tuple[str, asyncio.Future[Result]]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def recall(self, call_id: str, controller: str = "") -> Result | None:
        self._expire()
        entry = self._done.get((controller, call_id))
        return Result.model_validate_json(entry[2]) if entry and entry[3] is None else None

    async def execute(
        self, commands: Sequence[Command], run: Run, fail: Fail, controller: str = "", delivery: str = ""
    ) -> list[Result]:
        """One Result per command: remembered, shared with a run in progress, refused, or from ``run``.

        ``controller`` is whose batch this is (the hub's word for it; empty
        when the hub does not say, as a UFO server does not); ``delivery`` is
        the batch's ``response_id``.
        """
        self._expire()
        answers: list[Result | asyncio.Future[Result] | BaseException | None] = []
        fresh: list[tuple[int, Command]] = []
        mine: dict[Key, asyncio.Future[Result]] = {}
        for index, command in enumerate(commands):
            key = (controller, command.call_id) if command.call_id else None
            known = self._done.get(key) if key else None
            if known is not None and known[3] is not None and known[3] != delivery:
                known = None  # a failure, asked for by another batch: run it again
            running = self._running.get(key) if key else None
            if key is None:
                answers.append(None)
                fresh.append((index, command))
            elif known is not None:
                same = known[1] == fingerprint(command)
                answers.append(Result.model_validate_json(known[2]) if same else _conflict(command))
            elif running is not None:
                answers.append(running[1] if running[0] == fingerprint(command) else _conflict(command))
            else:
                answers.append(None)
                fresh.append((index, command))
                future = asyncio.get_running_loop().create_future()
                self._running[key] = (fingerprint(command), future)
                mine[key] = future
        try:
            results = await run([command for _, command in fresh]) if fresh else []
            if len(results) != len(fresh):
                raise RuntimeError(f"the executor returned {len(results)} results for {len(fresh)} commands")
        except BaseException as error:
            for key, future in mine.items():
                del self._running[key]
                if isinstance(error, Exception):
                    future.set_exception(error)
                    future.exception()  # marked retrieved: a repeat may never come to look
                else:
                    future.cancel()
            raise
        for (index, command), result in zip(fresh, results, strict=True):
            answers[index] = result
            key = (controller, command.call_id or "")
            if key in mine:
                fingerprint_of_command, _ = self._running.pop(key)
                mine.pop(key).set_result(result)
                failed_in = None if result.status is ResultStatus.SUCCESS else delivery
                self._remember(key, fingerprint_of_command, result, failed_in)
        return [
            answer if isinstance(answer, Result) else await self._settle(command, answer, fail)
            for command, answer in zip(commands, answers, strict=True)
        ]

    @staticmethod
    async def _settle(command: Command, answer: asyncio.Future[Result] | BaseException | None, fail: Fail) -> Result:
        """The Result of a command answered by a refusal or by another run (a Result needs no settling)."""
        if isinstance(answer, BaseException):
            return fail([command], answer)[0]
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

    def _remember(self, key: Key, command_fingerprint: str, result: Result, failed_in: str | None) -> None:
        try:
            text = result.model_dump_json()
        except (ValueError, RecursionError):
            return  # a result that cannot travel is not worth replaying; the reply will say so
        if len(text) > self.limits.bytes:
            return
        self._forget(key)
        self._done[key] = (self.clock(), command_fingerprint, text, failed_in)
        self._bytes += len(text)
        while len(self._done) > self.limits.entries or self._bytes > self.limits.bytes:
            self._forget(next(iter(self._done)))

    def _forget(self, key: Key) -> None:
        entry = self._done.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[2])

    def _expire(self) -> None:
        oldest_kept = self.clock() - self.limits.seconds
        while self._done:
            key, (stamp, *_) = next(iter(self._done.items()))
            if stamp >= oldest_kept:
                break
            self._forget(key)


def _conflict(command: Command) -> CallIdConflict:
    return CallIdConflict(
        f"call_id {command.call_id!r} was already used on this device for a different command "
        "(another tool, parameters or tool_type): it is neither run nor answered from memory; "
        "give each command its own call_id"
    )
