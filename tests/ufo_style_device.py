"""A device that behaves as Microsoft UFO's stock device client does, written from /work/shared/aip-wire.md.

Plain ``websockets`` (asyncio client), nothing of ours: it connects to
``<hub>/ws`` with its credential as ``Authorization: Bearer``, sends
``register`` (``client_id``, ``metadata.system_info``), takes the first frame
back as the acknowledgement, then heartbeats every ``heartbeat_interval``
seconds (UFO: 120 s). A ``command`` runs INSIDE its receive loop, as UFO's
does: while it runs, the device sends nothing at all (no heartbeat either)
and reads nothing; only the websockets library answers the hub's pings.

Tools: ``sleep`` awaits ``parameters.seconds``; ``echo`` returns its parameters;
anything else is a failure Result. Like UFO, a ``command`` whose
``agent_name`` is null raises inside the loop's handling and gets NO answer
(it is logged and recorded in ``errors``).

The client's own keepalive is off (``ping_interval=None``): whatever keeps this
device connected is the hub's pings and its pongs. Like UFO it reconnects
after a drop (``reconnect_delay``); ``connections`` counts the connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger("tests.ufo_style_device")

#: UFO's device client heartbeat period.
UFO_HEARTBEAT_INTERVAL = 120.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class UfoStyleDevice:
    def __init__(
        self,
        hub_url: str,
        device_id: str,
        token: str,
        *,
        heartbeat_interval: float = UFO_HEARTBEAT_INTERVAL,
        reconnect_delay: float = 0.2,
    ) -> None:
        self.url = hub_url.rstrip("/") + "/ws"
        self.device_id = device_id
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.reconnect_delay = reconnect_delay
        #: Every ``command`` frame received, parsed, in order.
        self.commands: list[dict[str, Any]] = []
        #: Every frame this device sent, parsed, in order.
        self.sent: list[dict[str, Any]] = []
        #: Failures inside the receive loop (a command it would not answer).
        self.errors: list[str] = []
        self.connections = 0
        #: Set once the acknowledgement of the latest registration came.
        self.registered = asyncio.Event()
        #: Set each time a command frame arrives (cleared by whoever waits on it).
        self.command_received = asyncio.Event()
        self.connection: ClientConnection | None = None

    def _frame(self, kind: str, **fields: Any) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "type": kind,
            "status": "ok",
            "client_type": "device",
            "session_id": None,
            "task_name": None,
            "client_id": self.device_id,
            "target_id": None,
            "request": None,
            "action_results": None,
            "timestamp": _now(),
            "request_id": str(uuid.uuid4()),
            "prev_response_id": None,
            "error": None,
            "metadata": None,
        }
        frame.update(fields)
        return frame

    async def _send(self, connection: ClientConnection, frame: dict[str, Any]) -> None:
        self.sent.append(frame)
        await connection.send(json.dumps(frame))

    def _register_frame(self) -> dict[str, Any]:
        system_info = {
            "device_id": self.device_id,
            "platform": "linux",
            "os_version": "test",
            "cpu_count": 2,
            "memory_total_gb": 4.0,
            "hostname": "ufo-vm",
            "ip_address": "127.0.0.1",
            "supported_features": ["gui", "cli"],
            "platform_type": "computer",
            "schema_version": "1.0",
            "custom_metadata": {},
        }
        metadata = {"system_info": system_info, "registration_time": _now(), "platform": "linux"}
        return self._frame("register", metadata=metadata)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, and connect again after a drop, until ``stop`` is set."""
        while not stop.is_set():
            session = asyncio.create_task(self._session())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({session, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not session.done():
                session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session
                return
            if session.exception() is not None:
                logger.info("ufo-style device %s: session ended: %r", self.device_id, session.exception())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.reconnect_delay):
                    await stop.wait()

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with connect(
            self.url, additional_headers=headers, ping_interval=None, proxy=None, max_size=100 * 2**20
        ) as connection:
            self.connection = connection
            self.connections += 1
            self.registered.clear()
            await self._send(connection, self._register_frame())
            ack = json.loads(await connection.recv())  # whatever comes first is the answer
            if ack.get("type") == "error":
                raise RuntimeError(f"registration refused: {ack.get('error')}")
            self.registered.set()
            beating = asyncio.create_task(self._heartbeats(connection))
            try:
                await self._receive_loop(connection)
            finally:
                beating.cancel()

    async def _heartbeats(self, connection: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.heartbeat_interval)
                await self._send(connection, self._frame("heartbeat"))

    async def _receive_loop(self, connection: ClientConnection) -> None:
        async for raw in connection:
            message = json.loads(raw)
            if message.get("type") != "command":
                continue  # heartbeat answers and the rest: nothing to do
            self.commands.append(message)
            self.command_received.set()
            try:
                results = await self._execute(message)
            except Exception as error:  # UFO logs it and sends no reply
                logger.error("ufo-style device %s: command failed: %r", self.device_id, error)
                self.errors.append(repr(error))
                continue
            await self._send(
                connection,
                self._frame(
                    "command_results",
                    status="continue",
                    session_id=message.get("session_id"),
                    prev_response_id=message.get("response_id"),
                    action_results=results,
                ),
            )

    async def _execute(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        if message.get("agent_name") is None:
            raise ValueError("agent_name is required to run a command")
        return [await self._run(action) for action in message.get("actions") or []]

    async def _run(self, action: dict[str, Any]) -> dict[str, Any]:
        parameters = action.get("parameters") or {}
        result: dict[str, Any] = {"status": "success", "error": None, "result": None, "namespace": "ufo_style"}
        if action.get("tool_name") == "sleep":
            seconds = float(parameters.get("seconds", 1))
            await asyncio.sleep(seconds)
            result["result"] = seconds
        elif action.get("tool_name") == "echo":
            result["result"] = parameters
        else:
            result.update(status="failure", error=f"no tool {action.get('tool_name')!r}")
        result["call_id"] = action.get("call_id")
        return result
