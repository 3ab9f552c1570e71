"""A controller's side of the hub: send frames for devices, hear what comes back.

``HubLink`` owns one authenticated connection to the hub's controller
endpoint, opens it on first use and again after a loss, and hands every frame
it receives to ``on_frame``. Matching answers to questions is the caller's
job (the ``WebSocketCommandDispatcher`` keeps its futures by response_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .access import CONTROLLER_PATH
from .connect import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HubUnavailable,
    endpoint,
    first_latency,
    open_connection,
    safe_url,
)
from .messages import ClientMessage, ClientMessageType, ServerMessage, ServerMessageType, TaskStatus
from .switchboard import MAX_LISTING_CHARS, now_iso

__all__ = [
    "CLOSE_TIMEOUT",
    "PING_AFTER",
    "SILENCE_LIMIT",
    "WATCH_TICK",
    "FrameListener",
    "HubLink",
    "LinkLost",
    "LossListener",
    "list_devices",
]

logger = logging.getLogger("aip.controller")


class LinkLost(HubUnavailable):
    """A connection ended that carried only some of the batches out: ``batches`` (their response_ids) are lost.

    A plain ``HubUnavailable`` given to a ``LossListener`` loses every batch
    out; a ``FailoverLink`` over several hubs names the ones its lost hub carried.
    """

    def __init__(self, message: str, batches: frozenset[str]) -> None:
        super().__init__(message)
        self.batches = batches


#: A hub is alive while anything comes from it or drains to it. After PING_AFTER seconds of neither a controller
#: pings it, and after SILENCE_LIMIT it leaves it: a hub that hangs, or whose machine is gone with no TCP reset
#: to say so, is left within ~6.5 s and its batches go again, through another hub. A large result arriving
#: slowly, or a large batch draining slowly, is progress: no ping waits behind it and times out.
PING_AFTER = 2.0
SILENCE_LIMIT = 6.0
#: How often the link looks; and how long it waits for the closing handshake of a connection it ends.
WATCH_TICK = 0.5
CLOSE_TIMEOUT = 1.0

FrameListener = Callable[[ClientMessage], None]
LossListener = Callable[[HubUnavailable], None]


def _ignore(_: Any) -> None:
    return None


class _Heard(ClientConnection):
    """A client connection that notes when bytes last arrived, frame finished or not."""

    heard_at = 0.0

    def data_received(self, data: bytes) -> None:
        self.heard_at = self.loop.time()
        super().data_received(data)


class HubLink:
    """One controller connection to a hub, (re)opened on demand."""

    def __init__(
        self,
        hub_url: str,
        token: str | None = None,
        *,
        open_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        silence_limit: float = SILENCE_LIMIT,
    ) -> None:
        if "," in hub_url:
            raise ValueError("a HubLink reaches one hub: aip.failover.controller_link() uses several")
        self.url = endpoint(hub_url, CONTROLLER_PATH)
        self.token = token
        self.open_timeout = open_timeout
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.silence_limit = silence_limit
        self._on_frame: FrameListener = _ignore
        self._on_lost: LossListener = _ignore
        self._attached = False
        self._connection: _Heard | None = None
        self._first_latency = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"HubLink({safe_url(self.url)!r}, token=<hidden>)"

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def latency(self) -> float:
        """Seconds of the last ping round trip to the hub (0 before the first)."""
        if self._connection is None:
            return 0.0
        return self._connection.latency or self._first_latency

    def attach(self, on_frame: FrameListener, on_lost: LossListener) -> None:
        """Name the one listener for what the hub sends and for the connection's end."""
        if self._attached:
            raise ValueError("this HubLink already has a listener: give each dispatcher its own link")
        self._on_frame, self._on_lost, self._attached = on_frame, on_lost, True

    async def open(self, timeout: float | None = None) -> None:
        """Connect now (``send`` would anyway), within ``timeout`` (``open_timeout``); else ``HubUnavailable``."""
        async with self._opening:
            if self._closed:
                raise HubUnavailable("this hub link was closed")
            if self._connection is not None:
                return
            patience = self.open_timeout if timeout is None else min(timeout, self.open_timeout)
            connection = await open_connection(
                self.url,
                self.token,
                open_timeout=patience,
                max_message_bytes=self.max_message_bytes,
                ssl_context=self.ssl_context,
                ping_interval=None,  # _watch: pings only when nothing else says the hub is there
                close_timeout=CLOSE_TIMEOUT,
                create_connection=_Heard,
            )
            assert isinstance(connection, _Heard)
            self._first_latency = await first_latency(connection, patience)
            self._connection = connection
            self._reader = asyncio.create_task(self._read(connection))
            self._watcher = asyncio.create_task(self._watch(connection))

    async def send(self, message: ServerMessage) -> None:
        """Send one frame, connecting first if needed; ``HubUnavailable`` if that cannot be done."""
        connection = self._connection
        if connection is None:  # connected: no lock to take on every frame (close() clears it)
            await self.open()
            connection = self._connection
        assert connection is not None
        try:
            await connection.send(message.model_dump_json())
        except ConnectionClosed as closed:
            raise HubUnavailable(f"the connection to the hub closed: {closed}") from None

    async def _watch(self, connection: _Heard) -> None:
        """End the connection once nothing has come from the hub or drained to it for ``silence_limit`` seconds.

        websockets' own keepalive would not do: its ping waits behind a
        frame stuck in the send buffer (a hung hub reads nothing, so the
        ping never leaves and never times out), and its pong waits behind a
        large result (a slow link then looks dead).
        """
        loop = asyncio.get_running_loop()
        transport = connection.transport
        progress_at, buffered = loop.time(), transport.get_write_buffer_size()
        while connection.protocol.state is State.OPEN:
            await asyncio.sleep(WATCH_TICK)
            now, size = loop.time(), transport.get_write_buffer_size()
            if size < buffered:
                progress_at = now
            buffered = size
            quiet = now - max(progress_at, connection.heard_at)
            if quiet >= self.silence_limit:
                logger.warning("leaving the hub at %s: nothing from it for %.1fs", safe_url(self.url), quiet)
                transport.abort()
                return
            if quiet >= min(PING_AFTER, self.silence_limit / 3) and not size:
                with contextlib.suppress(ConnectionClosed):
                    await connection.ping()  # its pong is something heard; nothing waits for it

    async def _read(self, connection: ClientConnection) -> None:
        why = "the hub closed the connection"
        try:
            async for frame in connection:
                try:
                    message = ClientMessage.model_validate_json(frame)
                except ValidationError as error:
                    logger.warning("ignored a malformed frame from the hub: %s", error)
                    continue
                self._on_frame(message)
        except ConnectionClosed as closed:
            why = f"the connection to the hub closed: {closed}"
        finally:
            if self._connection is connection:
                self._connection = None
            if not self._closed:
                self._on_lost(HubUnavailable(why))

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if self._watcher is not None:
            self._watcher.cancel()
        if connection is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):  # close() waits for a full send buffer to drain
                    await connection.close()
            except TimeoutError:
                connection.transport.abort()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=1)

    async def __aenter__(self) -> HubLink:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def list_devices(
    hub_url: str, token: str | None, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> list[dict[str, Any]]:
    """The devices connected to the hub now: id, kind, platform, tools, when connected and last seen."""
    answer: asyncio.Future[ClientMessage] = asyncio.get_running_loop().create_future()
    request_id = str(uuid.uuid4())

    def on_frame(message: ClientMessage) -> None:
        if message.prev_response_id == request_id and not answer.done():
            answer.set_result(message)

    def on_lost(error: HubUnavailable) -> None:
        if not answer.done():
            answer.set_exception(error)

    # A listing of ours stops at MAX_LISTING_CHARS: a hub sending far more is not one to buffer 100 MiB for.
    link = HubLink(
        hub_url, token, open_timeout=timeout, ssl_context=ssl_context, max_message_bytes=4 * MAX_LISTING_CHARS
    )
    link.attach(on_frame, on_lost)
    async with asyncio.timeout(timeout):
        async with link:
            request = ServerMessage(
                type=ServerMessageType.DEVICE_INFO_REQUEST,
                status=TaskStatus.OK,
                response_id=request_id,
                timestamp=now_iso(),
            )
            await link.send(request)
            message = await answer
    if message.type is not ClientMessageType.DEVICE_INFO_RESPONSE:
        raise HubUnavailable(f"the hub answered the device list request with an error: {message.error}")
    devices: list[dict[str, Any]] = (message.metadata or {}).get("devices", [])
    return devices
