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
import time
from _json import make_encoder
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from .failure import error_result
from .messages import Command, Result, ResultStatus

__all__ = ["CallIdConflict", "CallMemory", "Key", "MemoryLimits", "Run", "fingerprint"]

#: Runs one command not seen before to its Result.
Run = Callable[[Command], Awaitable[Result]]
#: (controller, call_id): whose call it is, and which.
Key = tuple[str, str]

#: The JSON that identifies a command, keys sorted, compact, ``repr`` for what JSON lacks: json's own C encoder,
#: made once (``JSONEncoder.encode`` builds one per call, half of a fingerprint's time). Without a circular
#: check: a command's parameters came from JSON, or were checked as a ``Command`` was made.
_IDENTITY = make_encoder(None, repr, encode_basestring_ascii, None, ":", ",", True, False, True)
_DIGEST_CHARS = 64
#: A Result's JSON, as ``model_dump_json`` makes it without the keyword handling around it (half its time).
_RESULT_JSON = Result.__pydantic_serializer__.to_json
_SUCCESS = ResultStatus.SUCCESS


class CallIdConflict(ValueError):
    """A call_id this device already knows, for another command: neither run nor replayed."""


def fingerprint(command: Command) -> str:
    """What makes two commands the same call: tool, parameters, tool_type and server (not the timeout).

    Their JSON, keys sorted; its SHA-256 digest when that is shorter (a JSON
    array, opening with ``[``, is never taken for a hex digest).
    """
    text = "".join(_IDENTITY([command.tool_name, command.parameters or {}, command.tool_type, command.namespace], 0))
    return text if len(text) <= _DIGEST_CHARS else hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class MemoryLimits:
    """At most ``entries`` Results, ``bytes`` of their JSON in all, none older than ``seconds``."""

    entries: int = 10_000
    bytes: int = 64 * 2**20
    seconds: float = 3600.0


class _Running:
    """A call in progress: its command's fingerprint, and the future a repeat joins, made when one first does.

    Repeats are rare: a future made for every call would cost each command a
    future and its callbacks for nobody.
    """

    __slots__ = ("_future", "identity")

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self._future: asyncio.Future[Result] | None = None

    def joined(self) -> asyncio.Future[Result]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def ended(self, outcome: Result | BaseException) -> None:
        """Tell the repeats waiting: the Result, the exception the run raised, or a cancellation."""
        future = self._future
        if future is None:
            return
        if isinstance(outcome, Result):
            future.set_result(outcome)
        elif isinstance(outcome, Exception):
            future.set_exception(outcome)
            future.exception()  # marked retrieved: a repeat may never come to look
        else:
            future.cancel()


class CallMemory:
    """Results by (controller, call_id), and the calls still running, shared by every batch on one device."""

    def __init__(self, limits: MemoryLimits = MemoryLimits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        # Results are kept as JSON (bytes): 10,000 of them cost the garbage collector
        # nothing, 10,000 model trees cost every full collection a scan.
        # (when, the command's fingerprint, the Result's JSON, the batch it ran in if it failed)
        self._done: OrderedDict[Key, tuple[float, str, bytes, str | None]] = OrderedDict()
        self._bytes = 0
        self._running: dict[Key, _Running] = {}

    def __len__(self) -> int:
        return len(self._done)

    def recall(self, call_id: str, controller: str = "") -> Result | None:
        self._expire()
        entry = self._done.get((controller, call_id))
        return Result.model_validate_json(entry[2]) if entry and entry[3] is None else None

    async def call(self, command: Command, run: Run, controller: str = "", delivery: str = "") -> Result:
        """``command``'s Result: remembered, shared with a run in progress, refused, or from ``run``.

        ``controller`` is whose batch this is (the hub's word for it; empty
        when the hub does not say, as a UFO server does not); ``delivery`` is
        the batch's ``response_id``. Asked one command at a time, as a batch
        reaches each: a command that a copy of its batch is still running
        is joined, one that no copy has started is run here, and the Result
        is remembered the moment it exists, before the next command starts.
        """
        if not command.call_id:
            return await run(command)
        self._expire()
        key = (controller, command.call_id)
        identity = fingerprint(command)
        known = self._done.get(key)
        if known is not None and (known[3] is None or known[3] == delivery):  # a failure answers its own batch only
            return Result.model_validate_json(known[2]) if known[1] == identity else _refused(command)
        running = self._running.get(key)
        if running is not None:
            return await _join(command, running.joined()) if running.identity == identity else _refused(command)
        running = self._running[key] = _Running(identity)
        try:
            result = await run(command)
        except BaseException as error:
            del self._running[key]
            running.ended(error)
            raise
        del self._running[key]
        running.ended(result)
        self._remember(key, identity, result, None if result.status is _SUCCESS else delivery)
        return result

    def _remember(self, key: Key, command_fingerprint: str, result: Result, failed_in: str | None) -> None:
        try:
            text = _RESULT_JSON(result)
        except (ValueError, RecursionError):
            return  # a result that cannot travel is not worth replaying; the reply will say so
        done, limits, size = self._done, self.limits, len(text)
        if size > limits.bytes:
            return
        again = done.pop(key, None)  # remembered again (a failure run anew): it moves to the young end
        if again is not None:
            self._bytes -= len(again[2])
        done[key] = (self.clock(), command_fingerprint, text, failed_in)
        self._bytes += size
        while len(done) > limits.entries or self._bytes > limits.bytes:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        self._bytes -= len(self._done.popitem(last=False)[1][2])

    def _expire(self) -> None:
        done, oldest_kept = self._done, self.clock() - self.limits.seconds
        while done and next(iter(done.values()))[0] < oldest_kept:
            self._forget_oldest()


async def _join(command: Command, first_run: asyncio.Future[Result]) -> Result:
    """The Result of the run of ``command`` in progress elsewhere, or a failure saying why it has none."""
    try:
        # Shielded: a repeat that stops waiting must not cancel the first run's call.
        return await asyncio.shield(first_run)
    except Exception as error:
        return error_result(command, error)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return error_result(command, RuntimeError("the first run of this call_id was cancelled"))


def _refused(command: Command) -> Result:
    conflict = CallIdConflict(
        f"call_id {command.call_id!r} was already used on this device for a different command "
        "(another tool, parameters or tool_type): it is neither run nor answered from memory; "
        "give each command its own call_id"
    )
    return error_result(command, conflict)
