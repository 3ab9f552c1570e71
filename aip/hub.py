"""The hub: a WebSocket server that routes batches between controllers and devices.

Devices connect at ``/ws`` exactly as a UFO device does; controllers (the
dispatchers inside flow runs) connect at ``/controller``. Each presents a
credential of its own (``AccessPolicy`` says who it is). All routing
decisions are the ``Switchboard``'s; this module only moves frames: it reads
each connection, feeds the switchboard, and carries out the sends, closes and
liveness probes it returns. A frame goes out at once when its connection's
socket takes it without waiting; otherwise it waits in that connection's
outbox, drained by a writer of its own, so a slow reader never holds up the
connection that wrote to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from .access import CONTROLLER_PATH, DEVICE_PATH, AccessPolicy, Refusal
from .connect import DEFAULT_MAX_MESSAGE_BYTES
from .credential_file import CredentialFile
from .credentials import Identity, Role
from .messages import CloseCode
from .registration import MAX_REGISTRATION_BYTES
from .switchboard import Action, Close, Device, Probe, Send, Switchboard, error_frame

__all__ = ["MAX_QUEUED_FRAMES", "Hub", "HubObserver", "HubSettings"]

#: Frames queued for one connection before the hub gives up on it as not reading.
MAX_QUEUED_FRAMES = 256

logger = logging.getLogger("aip.hub")
# websockets logs request paths (``?token=``) and headers at DEBUG: its logger
# stays at WARNING whatever the root level, so a token never reaches a log.
_wire_logger = logging.getLogger("aip.hub.wire")
_wire_logger.setLevel(logging.WARNING)


class _QuietHandshakeFailures(logging.Filter):
    """A connection that never finished its handshake (a port scan, a bare TCP connect) is one INFO line.

    websockets logs it as an ERROR with a traceback: 2.5 KB of log per
    connect, which anyone who can reach the port could use to fill a disk.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "opening handshake failed":
            return True
        error = record.exc_info[1] if record.exc_info else None
        connection = getattr(record, "websocket", None)
        where = _address(connection) if isinstance(connection, ServerConnection) else "a client"
        logger.info("%s did not complete a WebSocket handshake (%s)", where, type(error).__name__ if error else "?")
        return False


_wire_logger.addFilter(_QuietHandshakeFailures())


@dataclass(frozen=True)
class HubSettings:
    """Where the hub listens and how patient it is.

    A device must register within ``register_timeout`` seconds of connecting.
    After that it is alive for as long as its socket answers the WebSocket
    pings the hub sends every ``ping_interval`` seconds: it need send no data
    (a UFO device heartbeats only every 120 s and says nothing while a command
    runs). A ping not answered within ``ping_timeout`` drops the connection, so
    a dead peer is noticed within ``ping_interval + ping_timeout``.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    register_timeout: float = 5.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: How long a connection holding a device id has to answer the ping that decides a contested registration.
    probe_timeout: float = 3.0
    #: How often the credentials file is checked for changes (revocations close connections).
    credentials_check_interval: float = 1.0


class HubObserver(Protocol):
    """Told when devices come and go (``dispatch serve`` turns these into Prefect events)."""

    def device_connected(self, device: Device) -> None: ...

    def device_lost(self, device: Device, why: str, failed_batches: int) -> None: ...


class _Outbox:
    """Frames for one connection, written in order by one writer task; a Close (or None) ends it.

    A frame for a connection with nothing queued, whose socket takes it
    without waiting, is written at once instead (``_write_now``): forwarding
    it then costs no turn of the writer task, the hub's largest per-frame
    cost after parsing. Bounded: a peer that stops reading while frames pile
    up for it (more than ``MAX_QUEUED_FRAMES``, or ``limit`` characters) is
    closed, instead of growing the hub until it dies and takes every other
    connection with it.
    """

    def __init__(self, connection: ServerConnection, limit: int) -> None:
        self.connection = connection
        self.limit = limit
        self.queued = 0
        self.abandoned = False
        self.closer: asyncio.Future[None] | None = None
        self.queue: asyncio.Queue[str | Close | None] = asyncio.Queue()
        self.writer = asyncio.create_task(self._write())

    def put(self, item: str | Close) -> None:
        if self.abandoned:
            return
        if isinstance(item, Close) and item.now:
            self._abandon(item.code, item.reason)
            return
        if isinstance(item, str):
            if self._write_now(item):
                return
            if self.queued and (self.queue.qsize() >= MAX_QUEUED_FRAMES or self.queued + len(item) > self.limit):
                logger.warning("closing %s: it does not read what it is sent", _address(self.connection))
                self._abandon(CloseCode.TOO_SLOW, "too many frames queued")
                return
            self.queued += len(item)
        self.queue.put_nowait(item)

    def _write_now(self, text: str) -> bool:
        """Write ``text`` now if nothing is queued and the socket is not pushing back; else False (queue it).

        What ``connection.send`` does when it need not wait, without its
        coroutine: hand the frame to the protocol, its bytes to the transport.
        Frames stay in order: whatever the writer took from the queue was
        written before it waited for the socket to drain. While the transport
        holds more than its high-water mark (``paused``) frames go to the
        queue and its bounds, as before.
        """
        connection = self.connection
        if self.queue.qsize() or connection.paused or connection.protocol.state is not State.OPEN:
            return False
        connection.protocol.send_text(text.encode())
        connection.send_data()
        return True

    def _abandon(self, code: int, reason: str) -> None:
        """Drop what is queued and close the connection now, even with a send stuck on it."""
        self.abandoned = True
        self.writer.cancel()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queued = 0
        self.closer = asyncio.ensure_future(self.connection.close(code, reason))

    async def _write(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, Close):
                    await self.connection.close(item.code, item.reason)
                    return
                await self.connection.send(item)
                self.queued -= len(item)
        except ConnectionClosed:
            pass

    async def finish(self, timeout: float) -> None:
        """Let queued frames go out (a refusal before its close), then stop writing."""
        self.queue.put_nowait(None)
        await asyncio.wait({self.writer}, timeout=timeout)
        self.writer.cancel()


class Hub:
    """Serve devices and controllers until closed (``async with Hub(...)``)."""

    def __init__(
        self,
        access: AccessPolicy,
        settings: HubSettings = HubSettings(),
        ssl_context: ssl.SSLContext | None = None,
        observer: HubObserver | None = None,
        credential_file: CredentialFile | None = None,
    ) -> None:
        self.access = access
        self.observer = observer
        self.settings = settings
        self.ssl_context = ssl_context
        self.credential_file = credential_file
        self.switchboard = Switchboard()
        self._outboxes: dict[Hashable, _Outbox] = {}
        self._server: Server | None = None
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, Identity] = weakref.WeakKeyDictionary()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        assert self._server is not None, "the hub is not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> Hub:
        settings = self.settings
        self._server = await serve(
            self._serve,
            settings.host,
            settings.port,
            process_request=self._admit,  # Origin included: every rule of the door is the AccessPolicy's
            max_size=settings.max_message_bytes,
            compression=None,  # see connect.open_connection: deflate costs more than it saves here
            ping_interval=None,  # the hub pings itself (_keepalive): a pong is when a device was last seen
            ssl=self.ssl_context,
            logger=_wire_logger,
        )
        logger.info("hub listening on %s (devices at %s, controllers at %s)", self.url, DEVICE_PATH, CONTROLLER_PATH)
        if self.credential_file is not None:
            self._watcher = asyncio.create_task(self._watch_credentials())
        return self

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Hub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None, "the hub is not started"
        await self._server.serve_forever()

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        arguments = (request.path, headers.get_all("Host"), headers.get_all("Authorization"), headers.get_all("Origin"))
        verdict = self.access.admit(*arguments)
        if isinstance(verdict, Refusal) and verdict.status == 401 and self._reload_credentials():
            verdict = self.access.admit(*arguments)  # a credential issued a moment ago works at once
        if isinstance(verdict, Refusal):
            logger.warning("refused a connection from %s: %s", _address(connection), verdict.reason)
            return connection.respond(verdict.status, verdict.reason + "\n")
        self._admitted[connection] = verdict
        return None

    async def _watch_credentials(self) -> None:
        """Apply changes to the credentials file: new ones work at once, revoked ones are cut off."""
        while True:
            await asyncio.sleep(self.settings.credentials_check_interval)
            self._reload_credentials()

    def _reload_credentials(self) -> bool:
        """Read the credentials file again if it changed (a stat otherwise); True if the store changed."""
        if self.credential_file is None:
            return False
        try:
            changed = self.credential_file.refresh()
        except Exception as error:  # whatever the file holds now, revocation must go on working
            logger.error("kept the previous credentials: %s", error)
            return False
        if changed:
            self.access = dataclasses.replace(self.access, credentials=self.credential_file.store)
            actions = self.switchboard.revoke(self.access.credentials.is_current)
            closed = sum(isinstance(action, Close) for action in actions)
            logger.info("credentials reloaded (%d); %d connections closed", len(self.access.credentials), closed)
            self._apply(actions)
        return changed

    def _apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            outbox = self._outboxes.get(action.peer)
            if outbox is not None and not isinstance(action, Probe):
                outbox.put(action.text if isinstance(action, Send) else action)

    async def _serve(self, connection: ServerConnection) -> None:
        # Room for the largest frame and then some, so one big result never trips it.
        outbox = self._outboxes[connection] = _Outbox(connection, self.settings.max_message_bytes + 2**24)
        identity = self._admitted.pop(connection)
        self.switchboard.admit(connection, identity)
        if not self.access.credentials.is_current(identity):  # revoked between the handshake and now
            self._apply(self.switchboard.revoke(self.access.credentials.is_current))
        keepalive = asyncio.create_task(self._keepalive(connection))
        try:
            if identity.role is Role.DEVICE:
                await self._serve_device(connection, outbox, keepalive)
            else:
                await self._serve_controller(connection)
        finally:
            keepalive.cancel()
            del self._outboxes[connection]
            await outbox.finish(timeout=1.0)

    async def _keepalive(self, connection: ServerConnection) -> str | None:
        """Ping ``connection`` every ``ping_interval``; a pong refreshes its device's ``last_seen``.

        A ping not answered within ``ping_timeout`` aborts the connection (a dead
        peer would not answer a closing handshake either), so its reader sees it
        closed at once; the task returns why (None: the connection closed otherwise).
        """
        settings = self.settings
        while True:
            await asyncio.sleep(settings.ping_interval)
            try:
                async with asyncio.timeout(settings.ping_timeout):  # ping() itself waits while the buffer is full
                    await (await connection.ping())
            except ConnectionClosed:
                return None
            except TimeoutError:
                why = f"no answer to a ping within {settings.ping_timeout:g}s"
                logger.warning("dropping %s: %s", _address(connection), why)
                connection.transport.abort()
                return why
            device = self.switchboard.device_by_peer.get(connection)
            if device is not None:
                device.last_seen = self.switchboard.clock()

    async def _serve_device(
        self, connection: ServerConnection, outbox: _Outbox, keepalive: asyncio.Task[str | None]
    ) -> None:
        settings = self.settings
        # Until it has registered, a device may send no more than a registration: no 100 MiB buffered first.
        connection.protocol.max_message_size = min(MAX_REGISTRATION_BYTES, settings.max_message_bytes)
        try:
            async with asyncio.timeout(settings.register_timeout):
                first = await connection.recv()
        except TimeoutError:
            error = f"no register message within {settings.register_timeout:g}s"
            self._apply([Send(connection, error_frame(error)), Close(connection, CloseCode.POLICY, error)])
            self.switchboard.device_gone(connection, error)
            return
        except ConnectionClosed:
            self.switchboard.device_gone(connection, "closed before registering")
            return
        device, actions = self.switchboard.device_registers(connection, first)
        probe = next((action for action in actions if isinstance(action, Probe)), None)
        if probe is not None:
            alive = await self._answers_ping(probe.peer)
            device, actions = self.switchboard.probe_answered(connection, alive)
        self._apply(actions)
        if device is None:
            self.switchboard.device_gone(connection, "registration refused")
            return
        connection.protocol.max_message_size = settings.max_message_bytes
        logger.info("device %r connected from %s", device.id, _address(connection))
        if self.observer is not None:
            self.observer.device_connected(device)
        why = "connection closed"
        try:
            while True:
                data = await connection.recv()  # fragments and all: a large result is read as it arrives
                self._apply(self.switchboard.device_text(connection, data))
        except ConnectionClosed as closed:
            dropped = keepalive.result() if keepalive.done() and not keepalive.cancelled() else None
            why = dropped or f"connection closed ({closed.rcvd.code if closed.rcvd else 'no close frame'})"
        finally:
            lost = self.switchboard.device_gone(connection, why)
            if self.switchboard.devices.get(device.id) is None:  # not replaced by a newer connection
                logger.info("device %r disconnected: %s; %d batches failed", device.id, why, len(lost))
                if self.observer is not None:
                    self.observer.device_lost(device, why, len(lost))
            self._apply(lost)

    async def _answers_ping(self, peer: Hashable) -> bool:
        """Whether the connection ``peer`` answers a WebSocket ping within ``probe_timeout``."""
        if not isinstance(peer, ServerConnection):
            return False
        try:
            async with asyncio.timeout(self.settings.probe_timeout):  # ping() itself waits while the buffer is full
                await (await peer.ping())
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    async def _serve_controller(self, connection: ServerConnection) -> None:
        try:
            async for data in connection:
                self._apply(self.switchboard.controller_text(connection, data))
        except ConnectionClosed:
            pass
        finally:
            self._apply(self.switchboard.controller_gone(connection))


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
