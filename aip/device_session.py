"""The device's protocol rules, free of I/O.

Like the protocol core of websockets, and like the hub's ``Switchboard``, a
``DeviceSession`` never touches a socket, starts no task and keeps no time of
its own: the device client (``aip.device``) tells it what happened (a frame
arrived at such a time, a connection ended, a batch finished, an attempt to
stay connected failed) and carries out the actions it returns. Every
decision of the device side of AIP is therefore testable with plain calls:

* registration: the register frame, and what the hub's first answer means
  (accepted, refused, another connection holds the id, garbled);
* each frame from the hub: a batch to start, a re-delivery of one still
  running (ignored), ``TASK_END`` failed (stop it) or ok (start nothing more
  of it), an error to log, a frame too odd to read (answered with an error
  that names its batch, so its controller learns now rather than at its
  deadline);
* which batches belong to which connection, and the time each one is given;
* the ``command_results`` answer: whole, with a failure in place of a result
  JSON cannot carry, in fragments when it is long;
* what the end of a connection means, which failures are permanent, and how
  long to wait before dialling in again.

Batch runs are identified by object, not by ``response_id``: a batch the hub
sends again after its connection was lost starts a new run while the old
one finishes into the call memory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import sys
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed

from .backoff import Backoff
from .budget import Budget
from .connect import CredentialRefused, HubRefused, HubUnavailable
from .failure import error_result
from .messages import (
    ClientMessage,
    ClientMessageType,
    CloseCode,
    Command,
    Result,
    RetryRule,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from .registration import DISPATCH_METADATA
from .switchboard import Reason, now_iso

__all__ = [
    "FRAGMENT_CHARS",
    "RECONNECT_BACKOFF",
    "Batch",
    "CancelBatch",
    "DeviceAction",
    "DeviceReplaced",
    "DeviceSession",
    "GiveUp",
    "InHand",
    "Log",
    "Reconnect",
    "Refusal",
    "StartBatch",
    "Transmit",
    "system_info",
]

#: Replies longer than this go out in fragments of this size, so heartbeats and
#: pongs still get through while a screenshot crawls up a slow link.
FRAGMENT_CHARS = 2**18
#: Where a frame too odd to parse (nested thousands deep) still names its batch.
_RESPONSE_ID = re.compile(r'"response_id"\s*:\s*"([^"\\]{1,200})"')

#: Whatever the client uses for a connection; the session only compares and hands them back.
Peer = TypeVar("Peer", bound=Hashable)

#: How a device dials in again: 0.5 s after a working connection drops, then
#: 1, 2, 4 … up to 30 s while the hub stays away, each spread over its lower half
#: so that devices that lost the same hub do not all return in the same instant.
RECONNECT_BACKOFF = Backoff(initial=0.5, maximum=30.0, jitter=0.5)


class DeviceReplaced(HubUnavailable):
    """Another connection holds this id, or took it: another machine may be using the same credential."""


def system_info(device_id: str) -> dict[str, Any]:
    """UFO's ``metadata.system_info`` for this machine."""
    return {
        "device_id": device_id,
        "platform": sys.platform,
        "os_version": platform.version(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "supported_features": ["mcp"],
        "platform_type": "computer",
        "schema_version": "1.0",
        "custom_metadata": {},
    }


@dataclass(eq=False)
class Batch(Generic[Peer]):
    """One run of a batch, on the connection that delivered it."""

    response_id: str
    peer: Peer
    commands: list[Command]
    #: Whose call memory it runs in (the hub names the sender from its credential).
    controller: str
    session_id: str | None
    retry: RetryRule | None
    #: When its sender stops waiting, less the way back, on the client's monotonic clock.
    expires_at: float
    #: Why it starts no new command (its connection or its controller is gone), once it does not.
    orphaned: str | None = None
    #: Why it was stopped outright (nobody waits for it), once it was.
    cancelled: str | None = None
    #: The characters of the frame that brought it: what holding it costs (``InHand``).
    size: int = 0


@dataclass(frozen=True)
class InHand:
    """At most ``batches`` runs at once on one connection, their frames ``chars`` characters in all.

    A device reads every frame (the hub's pings must keep being answered),
    so this is where a flood of batches stops growing its memory: a batch
    beyond either bound is answered at once with an error (``metadata.reason``
    ``device_busy``), which a controller of ours treats as not delivered and
    sends again, spaced by its backoff, until its deadline: the sender slows
    down, as it does behind a hub that stopped reading it.
    """

    batches: int = 1_000
    chars: int = 2**28

    def __str__(self) -> str:
        return f"at most {self.batches} batches, {self.chars // 2**20} MiB of frames, in hand"


@dataclass(frozen=True)
class Transmit(Generic[Peer]):
    """Transmit one message to ``peer``: ``parts`` are its fragments (a single one when it is short)."""

    peer: Peer
    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class StartBatch(Generic[Peer]):
    """Run ``batch``'s commands, then hand the Results to ``DeviceSession.answer``."""

    batch: Batch[Peer]


@dataclass(frozen=True)
class CancelBatch(Generic[Peer]):
    """Stop ``batch`` now (``batch.cancelled`` says why); it still answers for every command."""

    batch: Batch[Peer]


@dataclass(frozen=True)
class Log:
    """A line for the device's log (``aip.device``): the session says what is worth telling, and how loudly."""

    level: int
    message: str


@dataclass(frozen=True)
class Reconnect:
    """Dial in again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Stop for good with ``error``: trying again cannot cure it."""

    error: BaseException


#: What a frame, or the device stopping, asks the client to do.
DeviceAction = Transmit[Peer] | StartBatch[Peer] | CancelBatch[Peer] | Log


@dataclass(frozen=True)
class Refusal:
    """The hub answered register with an error frame; the close that follows says which refusal it was."""

    error: str | None

    def failure(self, close_code: int | None) -> HubUnavailable:
        """``DeviceReplaced`` when the hub closed as a duplicate (the id is live elsewhere), else ``HubRefused``."""
        if close_code == CloseCode.DUPLICATE:
            return DeviceReplaced(f"the hub refused the registration: {self.error}")
        return HubRefused(f"the hub refused the registration: {self.error}")


class DeviceSession(Generic[Peer]):
    """The batches a device runs, and its registrations and failures, for one ``device_id``.

    ``clock`` stamps the frames (as the hub's ``Switchboard`` does); every
    other time is passed in, so that tests decide what time it is.
    """

    def __init__(
        self,
        device_id: str,
        *,
        budget: Budget = Budget(),
        backoff: Backoff = RECONNECT_BACKOFF,
        fragment_chars: int = FRAGMENT_CHARS,
        clock: Callable[[], str] = now_iso,
        in_hand: InHand = InHand(),
    ) -> None:
        self.device_id = device_id
        self.in_hand = in_hand
        self.budget = budget
        self.backoff = backoff
        self.fragment_chars = fragment_chars
        self.clock = clock
        #: How many times the hub accepted this device.
        self.registrations = 0
        #: The newest run of each batch by response_id (a batch may be delivered again).
        self.batches: dict[str, Batch[Peer]] = {}
        #: Every run not finished yet, orphaned ones included.
        self.runs: set[Batch[Peer]] = set()
        #: The characters of their frames, together.
        self.chars_in_hand = 0
        self._failures = 0
        self._last_failure: str | None = None
        self._registered_since_failure = False

    # -- registration --------------------------------------------------------

    def register(self, tools: list[dict[str, Any]]) -> str:
        """The first frame of a connection: who this device is, and the tools it announces."""
        register = ClientMessage(
            type=ClientMessageType.REGISTER,
            status=TaskStatus.OK,
            client_id=self.device_id,
            timestamp=self.clock(),
            metadata={
                "system_info": system_info(self.device_id),
                "registration_time": self.clock(),
                "platform": sys.platform,
                DISPATCH_METADATA: {"tools": tools},
            },
        )
        return register.model_dump_json()

    def registration_answer(self, text: str | bytes) -> Refusal | None:
        """``None`` when the hub accepted the registration, a ``Refusal`` when it sent an error.

        Raises ``HubUnavailable`` for an answer that is not AIP: a hub (or a
        proxy) that garbles its answer may do better next time.
        """
        try:
            answer = ServerMessage.model_validate_json(text)
        except ValidationError as error:
            problem = error.errors()[0]["msg"]
            raise HubUnavailable(f"the hub answered register with a malformed frame: {problem}") from None
        return Refusal(answer.error) if answer.type is ServerMessageType.ERROR else None

    def registered(self) -> None:
        """The hub accepted this device: the next failure starts a new series of delays."""
        self.registrations += 1
        self._registered_since_failure = True

    def heartbeat(self) -> str:
        return ClientMessage(
            type=ClientMessageType.HEARTBEAT, status=TaskStatus.OK, client_id=self.device_id, timestamp=self.clock()
        ).model_dump_json()

    # -- frames from the hub -------------------------------------------------

    def receive(self, peer: Peer, frame: str | bytes, *, now: float, latency: float) -> list[DeviceAction[Peer]]:
        """A frame from the hub on ``peer``, at ``now`` on the client's monotonic clock, ``latency`` seconds away."""
        try:
            message = ServerMessage.model_validate_json(frame)
        except ValueError as error:
            warning = Log(logging.WARNING, f"device {self.device_id!r}: a malformed frame from the hub: {error}")
            return [warning, *self._complain(peer, frame, f"malformed frame: {error}")]
        match message.type:
            case ServerMessageType.COMMAND:
                response_id = message.response_id or str(uuid.uuid4())
                current = self.batches.get(response_id)
                if current is None or current.orphaned is not None:  # new, or sent again after its connection was lost
                    if len(self.runs) >= self.in_hand.batches or self.chars_in_hand + len(frame) > self.in_hand.chars:
                        return [self._busy(peer, response_id)]
                    started = self._start(peer, message, response_id, now, latency)
                    started.batch.size = len(frame)
                    self.chars_in_hand += len(frame)
                    return [started]
            case ServerMessageType.TASK_END:
                batch = self.batches.get(message.response_id or "")
                why = message.error or "the hub ended this batch"
                if batch is not None and message.status is TaskStatus.FAILED:
                    return self._cancel(batch, why)  # nobody waits for it: stop what runs too
                if batch is not None:
                    self._orphan(batch, why)  # its controller may send it again: what runs finishes into memory
            case ServerMessageType.ERROR:
                return [Log(logging.WARNING, f"device {self.device_id!r}: the hub reported: {message.error}")]
            case _:
                pass  # heartbeats and anything a UFO server may add: nothing to do
        return []

    def _busy(self, peer: Peer, response_id: str) -> Transmit[Peer]:
        """The answer to a batch beyond ``in_hand``: not run, try again later."""
        reply = ClientMessage(
            type=ClientMessageType.ERROR,
            status=TaskStatus.ERROR,
            client_id=self.device_id,
            prev_response_id=response_id,
            error=f"device {self.device_id!r} is busy ({self.in_hand}): not run, send it again later",
            metadata={"reason": Reason.DEVICE_BUSY.value},
            timestamp=self.clock(),
        )
        return self._send(peer, reply.model_dump_json())

    def _complain(self, peer: Peer, frame: str | bytes, error: str) -> list[DeviceAction[Peer]]:
        """Answer a frame we could not read with an error, so a batch in it fails now rather than at its deadline."""
        try:
            response_id = json.loads(frame).get("response_id")
        except (ValueError, AttributeError, RecursionError):
            found = _RESPONSE_ID.search(frame if isinstance(frame, str) else frame.decode(errors="replace"))
            response_id = found.group(1) if found else None
        if not isinstance(response_id, str):
            return []  # nothing anyone waits on can be named
        reply = ClientMessage(
            type=ClientMessageType.ERROR,
            status=TaskStatus.ERROR,
            client_id=self.device_id,
            prev_response_id=response_id,
            error=error,
            timestamp=self.clock(),
        )
        return [self._send(peer, reply.model_dump_json())]

    def _start(
        self, peer: Peer, message: ServerMessage, response_id: str, now: float, latency: float
    ) -> StartBatch[Peer]:
        batch = Batch(
            response_id=response_id,
            peer=peer,
            commands=list(message.actions or []),
            controller=message.controller_id or "",
            session_id=message.session_id,
            retry=message.retry,
            expires_at=now + self.budget.on_device(message.timeout, latency),
        )
        self.batches[response_id] = batch
        self.runs.add(batch)
        return StartBatch(batch)

    @staticmethod
    def _orphan(batch: Batch[Peer], why: str) -> None:
        batch.orphaned = batch.orphaned or why  # the first reason is the one that counts

    def cancel_copies(self, response_id: str, controller: str, why: str) -> list[DeviceAction[Peer]]:
        """``controller`` cancelled its batch ``response_id`` through another hub: stop the copies of it here too.

        A batch sent again through a second hub runs there, and its command
        still running belongs to the first copy, orphaned here: the cancel
        must reach it, or the command runs on to its deadline for nobody.
        """
        copies = [batch for batch in self.runs if batch.response_id == response_id and batch.controller == controller]
        return [action for batch in copies for action in self._cancel(batch, why)]

    def _cancel(self, batch: Batch[Peer], why: str) -> list[DeviceAction[Peer]]:
        if batch not in self.runs or batch.cancelled is not None:
            return []
        batch.cancelled = why
        return [CancelBatch(batch)]

    # -- batches -------------------------------------------------------------

    def answer(self, batch: Batch[Peer], results: list[Result]) -> Transmit[Peer] | Log:
        """The reply to ``batch`` (one Result per command), or, for a batch orphaned, only a note of it.

        An orphaned batch's controller is gone or will send it again: its
        results stay in the call memory. A cancelled one answers all the same,
        to whoever may still wait.
        """
        if batch.orphaned is not None and batch.cancelled is None:
            return Log(
                logging.INFO,
                f"device {self.device_id!r}: batch {batch.response_id} orphaned ({batch.orphaned}); "
                "its results stay in memory",
            )
        reply = ClientMessage(
            type=ClientMessageType.COMMAND_RESULTS,
            status=TaskStatus.CONTINUE,
            client_id=self.device_id,
            session_id=batch.session_id,
            prev_response_id=batch.response_id,
            action_results=results,
            request_id=str(uuid.uuid4()),
            timestamp=self.clock(),
        )
        try:
            text = reply.model_dump_json()
        except (ValueError, RecursionError):
            # A tool's result that JSON can't carry: that command fails, the others stand.
            sendable = [_sendable(command, result) for command, result in zip(batch.commands, results, strict=True)]
            text = reply.model_copy(update={"action_results": sendable}).model_dump_json()
        return self._send(batch.peer, text)

    def finished(self, batch: Batch[Peer]) -> None:
        """``batch``'s run ended, however: a later delivery of its response_id starts afresh."""
        if batch in self.runs:
            self.chars_in_hand -= batch.size
        self.runs.discard(batch)
        if self.batches.get(batch.response_id) is batch:
            del self.batches[batch.response_id]

    def lost(self, peer: Peer) -> None:
        """``peer``'s connection is gone: its batches start nothing new (the controller will send them again)."""
        for batch in self.runs:
            if batch.peer == peer:
                self._orphan(batch, "the connection to the hub was lost")

    def shutdown(self, why: str) -> list[DeviceAction[Peer]]:
        """The device is stopping: every run stops now, and answers while it still can."""
        return [action for batch in list(self.runs) for action in self._cancel(batch, why)]

    def _send(self, peer: Peer, text: str) -> Transmit[Peer]:
        if len(text) <= self.fragment_chars:
            return Transmit(peer, (text,))
        size = self.fragment_chars
        return Transmit(peer, tuple(text[start : start + size] for start in range(0, len(text), size)))

    # -- connections ---------------------------------------------------------

    def closed(self, error: ConnectionClosed | None) -> HubUnavailable:
        """What the end of a connection means (``None``: the hub closed it cleanly)."""
        if error is None:
            return HubUnavailable("the hub closed the connection")
        received = error.rcvd
        if received is not None and received.code == CloseCode.REVOKED:
            return CredentialRefused(f"the hub revoked this device's credential ({received.reason})")
        if received is not None and received.code == CloseCode.REPLACED:
            return DeviceReplaced(
                f"another connection registered as {self.device_id!r} and replaced this one; "
                "if two machines use the same --id, give each its own"
            )
        return HubUnavailable(f"the connection to the hub closed: {error}")

    def attempt_ended(self, error: BaseException | None) -> list[Log | Reconnect | GiveUp]:
        """A connection (or the attempt to open one) failed with ``error``: give up, or when to dial in again.

        Each state change is logged once, not once per retry. A connection
        that got as far as registering was a success, so the delays start
        again from the first; unless another device took our id, which would
        make two devices evict each other forever: then the longest delay.
        """
        if error is not None and _permanent(error):
            return [GiveUp(error)]
        actions: list[Log | Reconnect | GiveUp] = []
        failure = f"{type(error).__name__}: {error}"
        if failure != self._last_failure:
            level = logging.ERROR if isinstance(error, HubRefused | DeviceReplaced) else logging.WARNING
            actions.append(Log(level, f"device {self.device_id!r}: {error}"))
            self._last_failure = failure
        if self._registered_since_failure:  # the connection that dropped had worked: come back at once, nearly
            self._failures, self._last_failure, self._registered_since_failure = 0, None, False
        else:
            self._failures += 1
        # A drop after a registration waits the first delay; a failed dial, at least the second.
        delay = self.backoff.maximum if isinstance(error, DeviceReplaced) else self.backoff.delay(self._failures + 1)
        actions.append(Reconnect(delay))
        return actions


def _permanent(error: BaseException) -> bool:
    """Whether a connection failure can never be cured by trying again: then the device stops."""
    if isinstance(error, CredentialRefused):
        return True
    # Our own token or URL that can never work (checked before any byte is sent); not a peer's garbled frame.
    return isinstance(error, ValueError) and not isinstance(error, ValidationError)


def _sendable(command: Command, result: Result) -> Result:
    """``result`` if it serialises, else a failure Result that says why."""
    try:
        result.model_dump_json()
    except (ValueError, RecursionError) as error:
        cause = f"ProtocolError: the result could not be sent as JSON ({error})"
        return error_result(command, cause)
    return result
