"""The hub's routing rules, free of I/O.

Like the protocol core of websockets, a ``Switchboard`` never touches a
socket: the hub feeds it what arrived (a text frame, a connection gone) and
carries out the ``Send`` and ``Close`` actions it returns. Every rule of the
remote path (who may register, where a batch goes, who may answer it, what
happens to pending batches when either end goes away) is therefore testable
with plain function calls.

Two kinds of peer talk to the hub:

* **devices** speak AIP exactly as a UFO device does: ``register`` first,
  then heartbeats and ``command_results``;
* **controllers** (the dispatchers inside flow runs) send the ``command``
  frames that should reach a device, addressed with ``target_id``, and get the
  device's frames about that batch back unchanged. A controller's question
  for the device list is a ``device_info_request``.

Every peer arrives with the ``Identity`` its credential proved (``admit``).
A device may register only as the id its credential is bound to, and a live
id is never taken: a second connection with the same credential replaces the
first only once the hub has seen the first fail a liveness ping (``Probe``).
A controller reaches, and hears of, only the devices its credential allows.

The hub keeps no futures: a route maps a batch's ``response_id`` to the
device it went to and the controller waiting for it, nothing more.
"""

from __future__ import annotations

import bisect
import difflib
import heapq
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from .credentials import Identity, Role
from .messages import (
    TOOL_TYPES,
    ClientMessage,
    ClientMessageType,
    CloseCode,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ToolType,
)
from .registration import MAX_REGISTRATION_BYTES, Profile

__all__ = [
    "ABANDONED_LIMIT",
    "GUESSED_DEVICES",
    "GUESS_CUTOFF",
    "GUESS_POOL",
    "MAX_ID_CHARS",
    "MAX_LISTING_CHARS",
    "NAMED_DEVICES",
    "Action",
    "BatchInFlight",
    "Close",
    "Device",
    "Probe",
    "Reason",
    "Send",
    "Switchboard",
    "error_frame",
    "failure_frame",
    "now_iso",
]

#: The tool_types a UFO device accepts; others are sent to it as ``action``.
#: Batches whose controller left, remembered so the device's late answer is
#: dropped quietly instead of being refused as unknown.
ABANDONED_LIMIT = 10_000
#: A device listing stops growing at this many characters (and says how many it left out),
#: well inside any client's frame limit.
MAX_LISTING_CHARS = 8 * 2**20
#: How many devices an error about an unknown device names.
NAMED_DEVICES = 5
#: How many of those may be "did you mean" guesses (the rest are simply the first connected).
GUESSED_DEVICES = 3
#: The longest device id a credential can name: a longer target is cut to this in errors and matches nothing.
MAX_ID_CHARS = 128
#: With more usable devices than this, "did you mean" compares only the ids sorted nearest the target:
#: difflib over 10,000 ids takes a tenth of a second of the hub's one event loop, on every retry.
GUESS_POOL = 256
#: How alike (difflib's ratio) an id must be to the target to be guessed: ``get_close_matches``'s default.
GUESS_CUTOFF = 0.6


class Reason(StrEnum):
    """Why a batch got an error frame instead of results (``metadata.reason``)."""

    DEVICE_UNAVAILABLE = "device_unavailable"  # nothing was sent
    DEVICE_LOST = "device_lost"  # sent, and the device went away before answering
    REJECTED = "rejected"  # the hub refused the frame itself
    FORBIDDEN = "forbidden"  # this controller's credential does not cover that device
    DEVICE_BUSY = "device_busy"  # the device's own answer: too much in hand already, not run (try again later)


@dataclass(frozen=True)
class Send:
    peer: Hashable
    text: str


@dataclass(frozen=True)
class Close:
    """Close ``peer``'s connection; ``now``: drop what is queued for it first (it has no right to it)."""

    peer: Hashable
    code: int
    reason: str
    now: bool = False


@dataclass(frozen=True)
class Probe:
    """Ping ``peer`` (a device's live connection, contested by ``contender``) and report with ``probe_answered``."""

    peer: Hashable
    contender: Hashable


Action = Send | Close | Probe


@dataclass
class Device:
    id: str
    peer: Hashable
    identity: Identity
    profile: Profile
    connected_at: str
    last_seen: str
    pending: set[str] = field(default_factory=set)

    @property
    def speaks_dispatch(self) -> bool:
        """Our own device client: it understands cancels and keeps call memory per controller."""
        return self.profile.speaks_dispatch

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            **self.profile.describe(),
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "pending_batches": len(self.pending),
        }


@dataclass(frozen=True)
class _Contest:
    """A registration waiting for the probe of the live connection that holds its id."""

    message: ClientMessage
    stale: Device


@dataclass
class BatchInFlight:
    """A batch the hub has passed to a device: whose answer it is, and where it goes back (its route)."""

    response_id: str
    device: Device
    controller: Hashable
    #: The credential the controller sent it with: only that credential may send it again.
    credential: str = ""


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def error_frame(error: str, response_id: str | None = None) -> str:
    """What the hub answers a device with when a frame cannot be accepted."""
    return ServerMessage(
        type=ServerMessageType.ERROR, status=TaskStatus.ERROR, error=error, response_id=response_id, timestamp=now_iso()
    ).model_dump_json()


def failure_frame(response_id: str | None, error: str, reason: Reason, device: Device | None = None) -> str:
    """What a controller gets instead of results: the batch's id and why."""
    metadata: dict[str, Any] = {"reason": reason.value}
    if device is not None:
        metadata["device"] = device.id
    return ClientMessage(
        type=ClientMessageType.ERROR,
        status=TaskStatus.ERROR,
        error=error,
        prev_response_id=response_id,
        metadata=metadata,
        timestamp=now_iso(),
    ).model_dump_json()


def _heartbeat() -> str:
    return ServerMessage(
        type=ServerMessageType.HEARTBEAT, status=TaskStatus.OK, response_id=str(uuid.uuid4()), timestamp=now_iso()
    ).model_dump_json()


def _close_ids(target: str, usable: list[str]) -> list[str]:
    """Up to ``GUESSED_DEVICES`` ids of ``usable`` (sorted) that look like ``target``, the closest first.

    A large fleet is searched only around where ``target`` would sort: a typo
    near the end of an id is found there, and the hub stays responsive.
    """
    if not target or len(target) > MAX_ID_CHARS:
        return []
    pool = usable
    if len(usable) > GUESS_POOL:
        at = bisect.bisect_left(usable, target)
        start = max(0, min(at - GUESS_POOL // 2, len(usable) - GUESS_POOL))
        pool = usable[start : start + GUESS_POOL]
    scored = [(score, candidate) for candidate in pool if (score := _likeness(target, candidate)) is not None]
    return [candidate for _, candidate in heapq.nsmallest(GUESSED_DEVICES, scored)]


def _likeness(target: str, candidate: str) -> tuple[float, int] | None:
    """How like ``target`` ``candidate`` is, smaller first; ``None`` below difflib's usual cutoff.

    Numbered ids tie on difflib's ratio alone (``dev-0143l`` is as like
    ``dev-01543`` as ``dev-01431``): the longer common prefix wins the tie.
    The cheap upper bounds go first, as in ``difflib.get_close_matches``.
    """
    matcher = difflib.SequenceMatcher(None, candidate, target)
    if matcher.real_quick_ratio() < GUESS_CUTOFF or matcher.quick_ratio() < GUESS_CUTOFF:
        return None
    ratio = matcher.ratio()
    return None if ratio < GUESS_CUTOFF else (-ratio, -_shared_prefix(candidate, target))


def _shared_prefix(one: str, other: str) -> int:
    """How many leading characters ``one`` and ``other`` have in common."""
    for at, (a, b) in enumerate(zip(one, other, strict=False)):
        if a != b:
            return at
    return min(len(one), len(other))


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(frame)"
    return f"{where}: {first['msg']}"


class Switchboard:
    """Who is connected, and where each batch in flight goes and comes back."""

    def __init__(self, clock: Callable[[], str] = now_iso) -> None:
        self.clock = clock
        self.devices: dict[str, Device] = {}
        self.device_by_peer: dict[Hashable, Device] = {}
        self.routes: dict[str, BatchInFlight] = {}
        self.routes_by_controller: dict[Hashable, set[str]] = {}
        #: response_id -> (the device it went to, the credential of the controller that sent it)
        self.abandoned: OrderedDict[str, tuple[Hashable, str]] = OrderedDict()
        self.identities: dict[Hashable, Identity] = {}
        self._contests: dict[Hashable, _Contest] = {}

    def admit(self, peer: Hashable, identity: Identity) -> None:
        """A connection opened with this identity's credential; nothing it sends is accepted before this."""
        self.identities[peer] = identity

    def revoke(self, is_current: Callable[[Identity], bool]) -> list[Action]:
        """Take every right from the connections whose credential no longer holds, and close them now.

        Revoked devices are unregistered (their batches fail), revoked
        controllers' batches are abandoned: nothing waits for the close to
        reach a peer that may not be reading.
        """
        actions: list[Action] = []
        for peer, identity in list(self.identities.items()):
            if is_current(identity):
                continue
            if identity.role is Role.DEVICE:
                actions += self.device_gone(peer, "its credential was revoked")
            else:
                actions += self.controller_gone(peer, revoked=True)
            actions.append(Close(peer, CloseCode.REVOKED, "credential revoked", now=True))
        return actions

    # -- devices -------------------------------------------------------------

    def device_registers(self, peer: Hashable, text: str | bytes) -> tuple[Device | None, list[Action]]:
        """The first frame of a device connection: a valid ``register``, a refusal and a close, or a ``Probe``.

        A ``Probe`` means the id is held by a live-looking connection with the
        same credential: the hub pings it and calls ``probe_answered``.
        """
        identity = self.identities.get(peer)
        if identity is None or identity.role is not Role.DEVICE:
            return None, self._refuse(peer, "this connection holds no device credential")
        if isinstance(text, bytes):
            return None, self._refuse(peer, "the first frame must be a register message in a text frame, not binary")
        size = len(text) if text.isascii() else len(text.encode())
        if size > MAX_REGISTRATION_BYTES:
            return None, self._refuse(
                peer, f"the register message is {size} bytes; at most {MAX_REGISTRATION_BYTES} are accepted"
            )
        try:
            message = ClientMessage.model_validate_json(text)
        except ValidationError as error:
            return None, self._refuse(peer, f"the first frame must be a register message ({_first_problem(error)})")
        if message.type is not ClientMessageType.REGISTER:
            return None, self._refuse(peer, f"the first frame must be a register message, not {message.type.value!r}")
        if not message.client_id:
            return None, self._refuse(peer, "register needs a client_id")
        if message.client_id != identity.name:
            return None, self._refuse(
                peer, f"this credential is for device {identity.name!r}: it cannot register as another id"
            )
        stale = self.devices.get(message.client_id)
        if stale is not None:
            if stale.identity.credential != identity.credential:  # its credential was replaced since
                return None, self._refuse(peer, f"device {stale.id!r} is connected with another credential")
            self._contests[peer] = _Contest(message, stale)
            return None, [Probe(stale.peer, peer)]
        return self._register(peer, identity, message)

    def probe_answered(self, contender: Hashable, alive: bool) -> tuple[Device | None, list[Action]]:
        """The live connection ``contender`` contested answered its ping (``alive``) or did not."""
        contest = self._contests.pop(contender, None)
        identity = self.identities.get(contender)
        if contest is None or identity is None:
            return None, []  # the contender left meanwhile
        holder = self.devices.get(identity.name)
        actions: list[Action] = []
        if holder is not None and (alive or holder is not contest.stale):
            return None, self._refuse(
                contender,
                f"device {holder.id!r} is already connected and answering: "
                "if two machines use the same credential, give each its own",
                CloseCode.DUPLICATE,
            )
        if holder is not None:  # the old connection is dead: the new one takes its place
            actions += self._drop_device(holder, f"device {holder.id!r} reconnected")
            actions.append(
                Close(holder.peer, CloseCode.REPLACED, "replaced: this connection did not answer a ping", now=True)
            )
        device, registered = self._register(contender, identity, contest.message)
        return device, actions + registered

    def _register(
        self, peer: Hashable, identity: Identity, message: ClientMessage
    ) -> tuple[Device | None, list[Action]]:
        stamp = self.clock()
        profile = Profile.from_metadata(message.metadata)
        device = Device(identity.name, peer, identity, profile, connected_at=stamp, last_seen=stamp)
        self.devices[device.id] = device
        self.device_by_peer[peer] = device
        return device, [Send(peer, _heartbeat())]  # the acknowledgement: nothing may precede it

    def _refuse(self, peer: Hashable, error: str, code: int = CloseCode.POLICY) -> list[Action]:
        return [Send(peer, error_frame(error)), Close(peer, code, error[:120])]

    def device_text(self, peer: Hashable, text: str | bytes) -> list[Action]:
        """A frame from a registered device."""
        device = self.device_by_peer.get(peer)
        if device is None:
            return [Close(peer, CloseCode.POLICY, "not registered")]
        device.last_seen = self.clock()
        if isinstance(text, bytes):
            return [Send(peer, error_frame("binary frames are not AIP: send JSON text frames"))]
        try:
            message = ClientMessage.model_validate_json(text)
        except ValidationError as error:
            return [Send(peer, error_frame(f"malformed frame: {_first_problem(error)}"))]
        match message.type:
            case ClientMessageType.HEARTBEAT:
                return [Send(peer, _heartbeat())]
            case ClientMessageType.COMMAND_RESULTS | ClientMessageType.ERROR:
                return self._answer(device, message, text)
            case _:
                return [Send(peer, error_frame(f"this hub routes commands; it does not take {message.type.value!r}"))]

    def _answer(self, device: Device, message: ClientMessage, text: str) -> list[Action]:
        response_id = message.prev_response_id
        route = self.routes.get(response_id) if response_id else None
        if route is None or route.device is not device:
            if response_id is not None and self.abandoned.get(response_id, (None,))[0] == device.peer:
                del self.abandoned[response_id]  # the late answer to a batch nobody waits for
                return []
            if message.type is ClientMessageType.ERROR and response_id is None:
                return []  # a device's own complaint about something we sent: nothing to route
            return [
                Send(
                    device.peer,
                    error_frame(
                        f"unknown prev_response_id {response_id!r}: no batch with that id "
                        "was sent to this device and is still waited for"
                    ),
                )
            ]
        self._forget(route)
        return [Send(route.controller, text)]

    def device_gone(self, peer: Hashable, why: str) -> list[Action]:
        """A device connection ended (closed, broken, silent): its batches fail now."""
        self.identities.pop(peer, None)
        self._contests.pop(peer, None)
        device = self.device_by_peer.get(peer)
        if device is None:
            return []
        return self._drop_device(device, f"device {device.id!r} disconnected: {why}")

    def _drop_device(self, device: Device, error: str) -> list[Action]:
        del self.device_by_peer[device.peer]
        if self.devices.get(device.id) is device:
            del self.devices[device.id]
        actions: list[Action] = []
        for response_id in sorted(device.pending):
            route = self.routes[response_id]
            self._forget(route)
            actions.append(Send(route.controller, failure_frame(response_id, error, Reason.DEVICE_LOST, device)))
        for response_id in [rid for rid, (peer, _) in self.abandoned.items() if peer == device.peer]:
            del self.abandoned[response_id]
        return actions

    # -- controllers ---------------------------------------------------------

    def controller_text(self, peer: Hashable, text: str | bytes) -> list[Action]:
        """A frame from a controller: a batch for a device, a cancel, or a question."""
        identity = self.identities.get(peer)
        if identity is None or identity.role is not Role.CONTROLLER:
            return [Close(peer, CloseCode.POLICY, "this connection holds no controller credential")]
        if isinstance(text, bytes):
            return [Send(peer, failure_frame(None, "binary frames are not AIP: send JSON text", Reason.REJECTED))]
        try:
            message = ServerMessage.model_validate_json(text)
        except ValidationError as error:
            return [Send(peer, failure_frame(None, f"malformed frame: {_first_problem(error)}", Reason.REJECTED))]
        match message.type:
            case ServerMessageType.COMMAND:
                return self._route_batch(peer, identity, message)
            case ServerMessageType.TASK_END:
                return self._cancel(peer, message.response_id)
            case ServerMessageType.DEVICE_INFO_REQUEST:
                return [Send(peer, self._device_list(identity, message.response_id))]
            case ServerMessageType.HEARTBEAT:
                return [Send(peer, self._controller_heartbeat())]
            case _:
                return [
                    Send(
                        peer,
                        failure_frame(
                            message.response_id, f"unsupported frame {message.type.value!r}", Reason.REJECTED
                        ),
                    )
                ]

    def _route_batch(self, peer: Hashable, identity: Identity, message: ServerMessage) -> list[Action]:
        response_id = message.response_id
        if not response_id:
            return [Send(peer, failure_frame(None, "a command needs a response_id", Reason.REJECTED))]
        abandoned = self.abandoned.get(response_id)
        if abandoned is not None and abandoned[1] == identity.credential:
            del self.abandoned[response_id]  # its controller, back after losing its connection, sends it again
        elif response_id in self.routes or abandoned is not None:
            return [
                Send(
                    peer, failure_frame(response_id, f"response_id {response_id!r} is already in use", Reason.REJECTED)
                )
            ]
        target = message.target_id or ""
        if not identity.may_use(target):  # the same answer whether or not such a device exists
            error = f"this controller's credential ({identity.name!r}) does not cover device {target[:MAX_ID_CHARS]!r}"
            return [Send(peer, failure_frame(response_id, error, Reason.FORBIDDEN))]
        device = self.devices.get(target)
        if device is None:
            error = f"device {target[:MAX_ID_CHARS]!r} is not connected{self._which_devices(identity, target)}"
            return [Send(peer, failure_frame(response_id, error, Reason.DEVICE_UNAVAILABLE))]
        if message.resent and not device.speaks_dispatch:
            error = (
                f"device {device.id!r} is a UFO device, which keeps no memory of what ran: "
                "a batch that may have reached it is not sent to it again"
            )
            return [Send(peer, failure_frame(response_id, error, Reason.DEVICE_LOST, device))]
        route = BatchInFlight(response_id, device, peer, identity.credential)
        self.routes[response_id] = route
        self.routes_by_controller.setdefault(peer, set()).add(response_id)
        device.pending.add(response_id)
        return [Send(device.peer, self._for_device(device, identity, message))]

    def _which_devices(self, identity: Identity, target: str) -> str:
        """A few of the devices this controller may use, a close match first: never a list of thousands.

        The message is logged on every retry, so it stays short whatever the
        fleet's size, and it names only devices the credential covers: an
        error must not tell a ``lab-*`` controller what else is connected.
        """
        usable = sorted(device_id for device_id in self.devices if identity.may_use(device_id))
        if not usable:
            return " (no device this controller may use is connected)"
        close = _close_ids(target, usable)
        others = [device_id for device_id in usable[:NAMED_DEVICES] if device_id not in close]
        named = [*close, *others][:NAMED_DEVICES]
        listed = ", ".join(map(repr, named[len(close) :]))
        more = f" and {len(usable) - len(named)} more" if len(usable) > len(named) else ""
        guess = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        connected = f" ({'also ' if close else ''}connected: {listed}{more})" if listed else ""
        return guess + connected

    @staticmethod
    def _for_device(device: Device, identity: Identity, message: ServerMessage) -> str:
        """The frame as the device should see it: no routing field, tool_types a UFO device accepts.

        Our own devices also learn which controller sent the batch (from its
        credential, whatever the frame claimed), to keep each controller's
        call memory apart.
        """
        # The message was parsed for this forward alone: edited in place, not copied.
        message.target_id = None
        message.controller_id = None
        if device.speaks_dispatch:  # the credential, not just the name: a name issued again starts afresh
            message.controller_id = f"{identity.name}#{identity.credential[:16]}"
        elif message.actions:
            message.actions = [
                action
                if action.tool_type in TOOL_TYPES
                else action.model_copy(update={"tool_type": ToolType.ACTION.value})
                for action in message.actions
            ]
        return message.model_dump_json()

    def _cancel(self, peer: Hashable, response_id: str | None) -> list[Action]:
        route = self.routes.get(response_id or "")
        if route is None or route.controller != peer:
            return []  # already answered, or never ours: nothing to stop
        return self._abandon(route, "the controller cancelled this batch", TaskStatus.FAILED)

    def controller_gone(self, peer: Hashable, *, revoked: bool = False) -> list[Action]:
        """A controller left: its batches start nothing new; it may come back and send them again (same response_id).

        A ``revoked`` one cannot come back: its batches are stopped outright.
        """
        self.identities.pop(peer, None)
        status = TaskStatus.FAILED if revoked else TaskStatus.OK
        actions: list[Action] = []
        for response_id in sorted(self.routes_by_controller.pop(peer, set())):
            route = self.routes[response_id]
            actions += self._abandon(route, "the controller that sent this batch disconnected", status)
        return actions

    def _abandon(self, route: BatchInFlight, why: str, status: TaskStatus) -> list[Action]:
        """Nobody waits for this batch now. ``TASK_END`` tells our device: ``failed``, stop it outright;
        ``ok``, start none of its commands (what runs finishes into the device's memory)."""
        self._forget(route)
        self.abandoned[route.response_id] = (route.device.peer, route.credential)
        while len(self.abandoned) > ABANDONED_LIMIT:
            self.abandoned.popitem(last=False)
        if not route.device.speaks_dispatch:
            return []  # a UFO device has no way to stop a batch; its answer will be dropped
        cancel = ServerMessage(
            type=ServerMessageType.TASK_END,
            status=status,
            response_id=route.response_id,
            error=why,
            timestamp=now_iso(),
        )
        return [Send(route.device.peer, cancel.model_dump_json())]

    def _forget(self, route: BatchInFlight) -> None:
        self.routes.pop(route.response_id, None)
        route.device.pending.discard(route.response_id)
        mine = self.routes_by_controller.get(route.controller)
        if mine is not None:
            mine.discard(route.response_id)
            if not mine:
                del self.routes_by_controller[route.controller]

    def _device_list(self, identity: Identity, request_id: str | None) -> str:
        """The devices this controller may use (and only those), within ``MAX_LISTING_CHARS``."""
        listed: list[dict[str, Any]] = []
        size = omitted = 0
        for device_id, device in sorted(self.devices.items()):
            if not identity.may_use(device_id):
                continue
            described = device.describe()
            size += len(json.dumps(described))
            if size > MAX_LISTING_CHARS:
                omitted += 1
                continue
            listed.append(described)
        metadata: dict[str, Any] = {"devices": listed}
        if omitted:
            metadata["omitted"] = omitted
        return ClientMessage(
            type=ClientMessageType.DEVICE_INFO_RESPONSE,
            status=TaskStatus.OK,
            prev_response_id=request_id,
            metadata=metadata,
            timestamp=now_iso(),
        ).model_dump_json()

    @staticmethod
    def _controller_heartbeat() -> str:
        return ClientMessage(
            type=ClientMessageType.HEARTBEAT, status=TaskStatus.OK, timestamp=now_iso()
        ).model_dump_json()
