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

The hub keeps no futures: a route maps a batch's ``response_id`` to the
device it went to and the controller waiting for it, nothing more.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from .messages import ClientMessage, ClientMessageType, ServerMessage, ServerMessageType, TaskStatus

#: The tool_types a UFO device accepts; others are sent to it as ``action``.
UFO_TOOL_TYPES = frozenset({"action", "data_collection"})
#: Batches whose controller left, remembered so the device's late answer is
#: dropped quietly instead of being refused as unknown.
ABANDONED_LIMIT = 10_000
#: The registration metadata key under which our own device client describes
#: itself (its tools); its presence says the device understands cancels.
DISPATCH_METADATA = "dispatch"


class CloseCode:
    """WebSocket close codes the hub uses (RFC 6455 and the private range)."""

    NORMAL = 1000
    UNSUPPORTED = 1003
    POLICY = 1008
    REPLACED = 4000
    SILENT = 4001
    TOO_SLOW = 4002


class Reason(StrEnum):
    """Why a batch got an error frame instead of results (``metadata.reason``)."""

    DEVICE_UNAVAILABLE = "device_unavailable"  # nothing was sent
    DEVICE_LOST = "device_lost"  # sent, and the device went away before answering
    REJECTED = "rejected"  # the hub refused the frame itself


@dataclass(frozen=True)
class Send:
    peer: Hashable
    text: str


@dataclass(frozen=True)
class Close:
    peer: Hashable
    code: int
    reason: str


Action = Send | Close


@dataclass
class Device:
    id: str
    peer: Hashable
    metadata: dict[str, Any]
    connected_at: str
    last_seen: str
    pending: set[str] = field(default_factory=set)

    @property
    def speaks_dispatch(self) -> bool:
        """Our own device client: it understands cancels."""
        return isinstance(self.metadata.get(DISPATCH_METADATA), dict)

    def describe(self) -> dict[str, Any]:
        system = self.metadata.get("system_info")
        system = system if isinstance(system, dict) else None  # whatever a device sent, the listing must work
        dispatch = self.metadata.get(DISPATCH_METADATA)
        return {
            "id": self.id,
            "kind": "dispatch" if self.speaks_dispatch else "ufo",
            "platform": self.metadata.get("platform") or (system or {}).get("platform"),
            "system_info": system,
            "tools": [tool for tool in tools if isinstance(tool, dict)]
            if isinstance(dispatch, dict) and isinstance(tools := dispatch.get("tools"), list)
            else [],
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "pending_batches": len(self.pending),
        }


@dataclass
class Route:
    response_id: str
    device: Device
    controller: Hashable


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
        self.routes: dict[str, Route] = {}
        self.routes_by_controller: dict[Hashable, set[str]] = {}
        self.abandoned: OrderedDict[str, Hashable] = OrderedDict()

    # -- devices -------------------------------------------------------------

    def device_registers(self, peer: Hashable, text: str | bytes) -> tuple[Device | None, list[Action]]:
        """The first frame of a device connection: a valid ``register`` or a refusal and a close."""
        if isinstance(text, bytes):
            return None, self._refuse(peer, "the first frame must be a register message in a text frame, not binary")
        try:
            message = ClientMessage.model_validate_json(text)
        except ValidationError as error:
            return None, self._refuse(peer, f"the first frame must be a register message ({_first_problem(error)})")
        if message.type is not ClientMessageType.REGISTER:
            return None, self._refuse(peer, f"the first frame must be a register message, not {message.type.value!r}")
        if not message.client_id:
            return None, self._refuse(peer, "register needs a client_id")
        actions: list[Action] = []
        stale = self.devices.get(message.client_id)
        if stale is not None:  # a reconnect: the new connection wins, the old one is dead or dying
            actions += self._drop_device(stale, f"device {stale.id!r} reconnected")
            actions.append(Close(stale.peer, CloseCode.REPLACED, "replaced by a new connection with the same id"))
        stamp = self.clock()
        device = Device(message.client_id, peer, message.metadata or {}, connected_at=stamp, last_seen=stamp)
        self.devices[device.id] = device
        self.device_by_peer[peer] = device
        actions.append(Send(peer, _heartbeat()))  # the acknowledgement: nothing may precede it
        return device, actions

    def _refuse(self, peer: Hashable, error: str) -> list[Action]:
        return [Send(peer, error_frame(error)), Close(peer, CloseCode.POLICY, error[:120])]

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
            if response_id is not None and self.abandoned.get(response_id) == device.peer:
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
        for response_id in [rid for rid, peer in self.abandoned.items() if peer == device.peer]:
            del self.abandoned[response_id]
        return actions

    # -- controllers ---------------------------------------------------------

    def controller_text(self, peer: Hashable, text: str | bytes) -> list[Action]:
        """A frame from a controller: a batch for a device, a cancel, or a question."""
        if isinstance(text, bytes):
            return [Send(peer, failure_frame(None, "binary frames are not AIP: send JSON text", Reason.REJECTED))]
        try:
            message = ServerMessage.model_validate_json(text)
        except ValidationError as error:
            return [Send(peer, failure_frame(None, f"malformed frame: {_first_problem(error)}", Reason.REJECTED))]
        match message.type:
            case ServerMessageType.COMMAND:
                return self._route_batch(peer, message)
            case ServerMessageType.TASK_END:
                return self._cancel(peer, message.response_id)
            case ServerMessageType.DEVICE_INFO_REQUEST:
                return [Send(peer, self._device_list(message.response_id))]
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

    def _route_batch(self, peer: Hashable, message: ServerMessage) -> list[Action]:
        response_id = message.response_id
        if not response_id:
            return [Send(peer, failure_frame(None, "a command needs a response_id", Reason.REJECTED))]
        if response_id in self.routes or response_id in self.abandoned:
            return [
                Send(
                    peer, failure_frame(response_id, f"response_id {response_id!r} is already in use", Reason.REJECTED)
                )
            ]
        device = self.devices.get(message.target_id or "")
        if device is None:
            connected = ", ".join(sorted(self.devices)) or "none"
            error = f"device {message.target_id!r} is not connected (connected: {connected})"
            return [Send(peer, failure_frame(response_id, error, Reason.DEVICE_UNAVAILABLE))]
        route = Route(response_id, device, peer)
        self.routes[response_id] = route
        self.routes_by_controller.setdefault(peer, set()).add(response_id)
        device.pending.add(response_id)
        return [Send(device.peer, self._for_device(device, message))]

    @staticmethod
    def _for_device(device: Device, message: ServerMessage) -> str:
        """The frame as the device should see it: no routing field, tool_types a UFO device accepts."""
        update: dict[str, Any] = {"target_id": None}
        if not device.speaks_dispatch and message.actions:
            update["actions"] = [
                action if action.tool_type in UFO_TOOL_TYPES else action.model_copy(update={"tool_type": "action"})
                for action in message.actions
            ]
        return message.model_copy(update=update).model_dump_json()

    def _cancel(self, peer: Hashable, response_id: str | None) -> list[Action]:
        route = self.routes.get(response_id or "")
        if route is None or route.controller != peer:
            return []  # already answered, or never ours: nothing to stop
        return self._abandon(route, "the controller cancelled this batch")

    def controller_gone(self, peer: Hashable) -> list[Action]:
        """A controller left: nobody waits for its batches, so the devices may stop them."""
        actions: list[Action] = []
        for response_id in sorted(self.routes_by_controller.pop(peer, set())):
            actions += self._abandon(self.routes[response_id], "the controller that sent this batch disconnected")
        return actions

    def _abandon(self, route: Route, why: str) -> list[Action]:
        self._forget(route)
        self.abandoned[route.response_id] = route.device.peer
        while len(self.abandoned) > ABANDONED_LIMIT:
            self.abandoned.popitem(last=False)
        if not route.device.speaks_dispatch:
            return []  # a UFO device has no way to stop a batch; its answer will be dropped
        cancel = ServerMessage(
            type=ServerMessageType.TASK_END,
            status=TaskStatus.FAILED,
            response_id=route.response_id,
            error=why,
            timestamp=now_iso(),
        )
        return [Send(route.device.peer, cancel.model_dump_json())]

    def _forget(self, route: Route) -> None:
        self.routes.pop(route.response_id, None)
        route.device.pending.discard(route.response_id)
        mine = self.routes_by_controller.get(route.controller)
        if mine is not None:
            mine.discard(route.response_id)
            if not mine:
                del self.routes_by_controller[route.controller]

    def _device_list(self, request_id: str | None) -> str:
        return ClientMessage(
            type=ClientMessageType.DEVICE_INFO_RESPONSE,
            status=TaskStatus.OK,
            prev_response_id=request_id,
            metadata={"devices": [device.describe() for _, device in sorted(self.devices.items())]},
            timestamp=now_iso(),
        ).model_dump_json()

    @staticmethod
    def _controller_heartbeat() -> str:
        return ClientMessage(
            type=ClientMessageType.HEARTBEAT, status=TaskStatus.OK, timestamp=now_iso()
        ).model_dump_json()
