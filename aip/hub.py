"""The hub: a WebSocket server that routes batches between controllers and devices.

Devices connect at ``/ws`` exactly as a UFO device does; controllers (the
dispatchers inside flow runs) connect at ``/controller``. Each presents a
credential of its own (``AccessPolicy`` says who it is). All routing
decisions are the ``Switchboard``'s; this module only moves frames: it reads
each connection, feeds the switchboard, and carries out the sends, closes and
liveness probes it returns. A frame goes out at once when its connection's
socket takes it without waiting; otherwise it waits in that connection's
outbox, drained by a writer of its own, so a slow reader never holds up the
connections that do read. A burst is not a fault: while an outbox is full the
hub stops reading the connection that filled it, so TCP slows the sender
down (backpressure); only a peer that takes no bytes at all for
``stall_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import resource
import ssl
import time
import weakref
from collections import deque
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

__all__ = [
    "LISTEN_BACKLOG",
    "MAX_QUEUED_CHARS",
    "MAX_QUEUED_FRAMES",
    "RESERVED_DESCRIPTORS",
    "Hub",
    "HubObserver",
    "HubSettings",
    "descriptor_room",
]

#: Frames queued for one connection at which the hub stops reading whoever adds to them (its high-water
#: mark); reading resumes once a quarter of this (and of ``MAX_QUEUED_CHARS``) is left.
MAX_QUEUED_FRAMES = 256
#: Characters queued for one connection at which the same happens. One larger frame is still taken.
MAX_QUEUED_CHARS = 2**22
#: Connections the kernel holds for the hub before it accepts them: a restarted hub is dialled by its whole fleet
#: within a second or two, and asyncio's default of 100 would drop the rest of those SYNs (each then costs its
#: device a TCP retransmission, 1 s, 3 s, ...). The kernel caps it at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 4096

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


class _Now:
    """Says yes at most once per ``period`` seconds, and how many times it said no since: a log line, not a flood."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self.last = -period
        self.held = 0

    def __call__(self) -> int | None:
        """None: stay quiet; else how many were held back before this one."""
        now = time.monotonic()
        if now - self.last < self.period:
            self.held += 1
            return None
        held, self.last, self.held = self.held, now, 0
        return held


class _AcceptFailures(logging.Filter):
    """asyncio's "socket.accept() out of system resource" once per 10 s, without its traceback.

    At its descriptor limit a server's accept fails for every connection
    waiting, and asyncio (3.11) logs a traceback for each, thousands a second
    (82 MiB of log in 37 s, and most of a core, measured here). The hub
    refuses connections before it gets there (``HubSettings.max_connections``);
    a storm can still overshoot, and then this keeps the log to a line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = _Now()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("socket.accept() out of system resource"):
            return True
        held = self.now()
        if held is None:
            return False
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"socket.accept() out of system resource (descriptors): {held} more since the last such line",
            None,
            None,
            None,
        )
        return True


logging.getLogger("asyncio").addFilter(_AcceptFailures())

#: Descriptors a hub keeps for itself beyond its connections (its socket, files, logs, an API client), and for
#: handshakes in flight: it refuses connections beyond its descriptor limit less these, before accept() fails.
RESERVED_DESCRIPTORS = 200


def descriptor_room() -> int:
    """How many connections this process's descriptor limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, (2**31 if soft == resource.RLIM_INFINITY else soft) - RESERVED_DESCRIPTORS)


@dataclass(frozen=True)
class HubSettings:
    """Where the hub listens and how patient it is.

    A device must register within ``register_timeout`` seconds of connecting.
    After that it is alive for as long as its socket answers the WebSocket
    pings the hub sends every ``ping_interval`` seconds: it need send no data
    (a UFO device heartbeats only every 120 s and says nothing while a command
    runs). A ping not answered within ``ping_timeout`` drops the connection, so
    a dead peer is noticed within ``ping_interval + ping_timeout``; not one
    whose socket took bytes meanwhile (its pong waits behind what it reads).

    A peer that is sent frames faster than it reads them is not closed for
    it: once ``MAX_QUEUED_FRAMES`` (or ``MAX_QUEUED_CHARS``) wait for it, the
    hub stops reading each connection whose frame is bound for it, until a
    quarter is left, and TCP makes their senders wait. That holds up
    everything such a sender sends meanwhile (a controller's batches to other
    devices too): head-of-line blocking for as long as the burst drains. A
    held connection is not pinged (its pong would wait behind what the hub
    does not read); what bounds the hold is ``stall_timeout``: a peer whose
    socket takes no bytes for that long while frames wait for it is closed
    (4002), and the batches waiting on it fail as for any lost device.

    Memory: an idle device connection costs the hub about 15 KiB (VmRSS over
    2,000 raw UFO-style devices, pinged; the budget is 25 KiB): no task of its
    own, no outbox until a frame waits, no handshake headers kept. What waits
    for a peer is bounded by the marks above plus one frame per connection
    adding to it, and by the batches in flight (the errors when one is lost).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    register_timeout: float = 5.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: How long a peer with frames waiting for it may take no bytes from its socket before it is closed (4002).
    stall_timeout: float = 30.0
    #: How long a connection holding a device id has to answer the ping that decides a contested registration.
    probe_timeout: float = 3.0
    #: How often the credentials file is checked for changes (revocations close connections).
    credentials_check_interval: float = 1.0
    #: Connections beyond this are answered 503 ("full": devices and controllers try again, or another hub);
    #: None: what the descriptor limit leaves room for (``descriptor_room``).
    max_connections: int | None = None


class HubObserver(Protocol):
    """Told when devices come and go (``dispatch serve`` turns these into Prefect events)."""

    def device_connected(self, device: Device) -> None: ...

    def device_lost(self, device: Device, why: str, failed_batches: int) -> None: ...


class _Outbox:
    """Frames for one connection, written in order; a Close ends it.

    A frame for a connection with nothing queued, whose socket takes it
    without waiting, is written at once instead (``_write_now``): forwarding
    it then costs no turn of a task, the hub's largest per-frame cost after
    parsing. The rest wait in ``frames`` for a writer task; both exist only
    while something waits (an idle connection costs neither). Past its
    high-water mark (``full``) the outbox still takes frames, but the hub
    stops reading the connections that send them (``room``); a peer whose
    socket takes no bytes for ``stall`` seconds while frames wait is closed.
    """

    __slots__ = ("abandoned", "closer", "connection", "frames", "queued", "room", "stall", "taken_at", "writer")

    def __init__(self, connection: ServerConnection, stall: float) -> None:
        self.connection = connection
        self.stall = stall
        self.frames: deque[str | Close] | None = None
        self.queued = 0
        self.abandoned = False
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Future[None] | None = None
        #: Set when the frames fall to the low-water mark, or the connection is given up; made on demand.
        self.room: asyncio.Event | None = None
        #: When the writer last saw the socket take bytes it had been holding back (the event loop's clock).
        self.taken_at = 0.0

    @property
    def full(self) -> bool:
        return len(self.frames or ()) >= MAX_QUEUED_FRAMES or self.queued >= MAX_QUEUED_CHARS

    def put(self, item: str | Close) -> None:
        if self.abandoned:
            return
        if isinstance(item, Close) and item.now:
            self._abandon(item.code, item.reason)
            return
        if isinstance(item, str):
            if self._write_now(item):
                return
            self.queued += len(item)
        if self.frames is None:
            self.frames = deque()
        self.frames.append(item)
        if self.writer is None:
            self.writer = asyncio.create_task(self._write(self.frames))

    @property
    def low(self) -> bool:
        """At or below the low-water mark: a quarter of the high-water mark."""
        return len(self.frames or ()) <= MAX_QUEUED_FRAMES // 4 and self.queued <= MAX_QUEUED_CHARS // 4

    async def drained(self) -> None:
        """Until the frames fall to the low-water mark, or the connection is given up (or goes)."""
        if self.low or self.abandoned:
            return
        if self.room is None:
            self.room = asyncio.Event()
        await self.room.wait()

    def _release(self) -> None:
        if self.room is not None:
            self.room.set()
            self.room = None

    def _write_now(self, text: str) -> bool:
        """Write ``text`` now if nothing is queued and the socket is not pushing back; else False (queue it).

        What ``connection.send`` does when it need not wait, without its
        coroutine: hand the frame to the protocol, its bytes to the transport.
        Frames stay in order: whatever the writer took from the queue was
        written before it waited for the socket to drain. While the transport
        holds more than its high-water mark (``paused``) frames go to the
        queue.
        """
        connection = self.connection
        if self.frames or connection.paused or connection.protocol.state is not State.OPEN:
            return False
        connection.protocol.send_text(text.encode())
        connection.send_data()
        return True

    def _abandon(self, code: int, reason: str) -> None:
        """Drop what is queued and close the connection now, even with a write stuck on it."""
        self._give_up()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        self.closer = asyncio.ensure_future(self.connection.close(code, reason))

    def _give_up(self) -> None:
        """Nothing more is written: what waits is dropped, and whoever waits for room goes on."""
        self.abandoned = True
        if self.frames is not None:
            self.frames.clear()  # the writer's too, if one holds it
            self.frames = None
        self.queued = 0
        self._release()

    async def _write(self, frames: deque[str | Close]) -> None:
        connection = self.connection
        try:
            while frames:
                item = frames.popleft()
                if isinstance(item, Close):
                    self._give_up()
                    await connection.close(item.code, item.reason)
                    return
                self.queued -= len(item)
                if self.low:
                    self._release()
                if connection.protocol.state is not State.OPEN:
                    break
                connection.protocol.send_text(item.encode())
                connection.send_data()
                if not await self._taken():
                    logger.warning("closing %s: it took nothing it was sent for %gs", _address(connection), self.stall)
                    self._abandon(CloseCode.TOO_SLOW, f"read nothing for {self.stall:g}s")
                    return
        except (ConnectionClosed, OSError):
            pass
        finally:
            self.writer = None
        if frames:  # the connection closed under them
            self._give_up()
        elif self.frames is frames:
            self.frames = None

    async def _taken(self) -> bool:
        """Wait while the socket pushes back; False if it took no bytes at all for ``stall`` seconds."""
        connection = self.connection
        while connection.paused:
            left = connection.transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(self.stall):
                    await connection.drain()
            except TimeoutError:
                if connection.transport.get_write_buffer_size() >= left:
                    return False
            self.taken_at = asyncio.get_running_loop().time()
        return True

    async def finish(self, timeout: float) -> None:
        """Let queued frames go out (a refusal before its close), then stop writing."""
        self._release()  # nobody is held for a connection that is gone
        if self.writer is not None:
            await asyncio.wait({self.writer}, timeout=timeout)
        if self.writer is not None:
            self.writer.cancel()
        self._give_up()


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
        self._capacity = settings.max_connections or descriptor_room()
        self._full = _Now()
        self._pinger: asyncio.Task[None] | None = None
        #: Connections the hub is not reading (an outbox their frame went to is full), and when each was let go.
        self._held: set[ServerConnection] = set()
        self._released_at: dict[ServerConnection, float] = {}
        #: Why the pinger dropped a connection, for its reader to report.
        self._dropped: dict[ServerConnection, str] = {}

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
            ping_interval=None,  # the hub pings itself (_ping_all): a pong is when a device was last seen
            ssl=self.ssl_context,
            logger=_wire_logger,
            backlog=LISTEN_BACKLOG,
        )
        logger.info("hub listening on %s (devices at %s, controllers at %s)", self.url, DEVICE_PATH, CONTROLLER_PATH)
        if self.credential_file is not None:
            self._watcher = asyncio.create_task(self._watch_credentials())
        self._pinger = asyncio.create_task(self._ping_all())
        return self

    async def close(self) -> None:
        for task in (self._watcher, self._pinger):
            if task is not None:
                task.cancel()
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
        assert self._server is not None
        if len(self._server.handlers) > self._capacity:  # this one included: over, not at
            if (held := self._full()) is not None:
                logger.warning(
                    "the hub is full (%d connections): refusing more, %d since the last line", self._capacity, held
                )
            return connection.respond(503, f"the hub is full ({self._capacity} connections): try again later\n")
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

    def _apply(self, actions: Iterable[Action]) -> list[_Outbox]:
        """Carry out ``actions``; the outboxes a frame was put in that are now past their high-water mark."""
        full: list[_Outbox] = []
        for action in actions:
            outbox = self._outboxes.get(action.peer)
            if outbox is None or isinstance(action, Probe):
                continue
            if isinstance(action, Send):
                outbox.put(action.text)
                if outbox.full and outbox not in full:
                    full.append(outbox)
            else:
                outbox.put(action)
        return full

    async def _hold(self, connection: ServerConnection, full: list[_Outbox]) -> None:
        """Read no more from ``connection`` until the outboxes its frame filled (``_apply``) have drained.

        Not reading is the backpressure: websockets stops reading the socket
        once a few frames wait unread, and TCP makes the sender wait. The
        connection's own outbox (what goes back to it) has a writer of its
        own, so whatever it is owed still reaches it meanwhile.
        """
        self._held.add(connection)
        try:
            for outbox in full:
                await outbox.drained()
        finally:
            self._held.discard(connection)
            self._released_at[connection] = asyncio.get_running_loop().time()

    async def _serve(self, connection: ServerConnection) -> None:
        outbox = self._outboxes[connection] = _Outbox(connection, self.settings.stall_timeout)
        identity = self._admitted.pop(connection)
        for handshake in (connection.request, connection.response):
            if handshake is not None:
                handshake.headers.clear()  # ~3 KiB a connection, never read again
        self.switchboard.admit(connection, identity)
        if not self.access.credentials.is_current(identity):  # revoked between the handshake and now
            self._apply(self.switchboard.revoke(self.access.credentials.is_current))
        try:
            if identity.role is Role.DEVICE:
                await self._serve_device(connection)
            else:
                await self._serve_controller(connection)
        finally:
            del self._outboxes[connection]
            self._released_at.pop(connection, None)
            self._dropped.pop(connection, None)
            await outbox.finish(timeout=1.0)

    async def _ping_all(self) -> None:
        """Every ``ping_interval``, ping each connection; a pong refreshes its device's ``last_seen``.

        One task for every connection, not one each: an idle connection costs
        no task. A ping not answered within ``ping_timeout`` aborts the
        connection (a dead peer would not answer a closing handshake either),
        so its reader sees it closed at once. A connection the hub is not
        reading (``_held``) is neither pinged nor judged: its pong may wait
        unread behind its frames.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(settings.ping_interval)
            sent = loop.time()
            pongs: dict[asyncio.Future[float], ServerConnection] = {}
            for connection in [outbox.connection for outbox in self._outboxes.values()]:
                if connection in self._held or connection.protocol.state is not State.OPEN:
                    continue
                if connection.transport.is_closing():
                    continue  # aborted a moment ago: ping() would wait a turn for the close
                if connection.paused:  # ping() waits for the socket to drain: not here, for every other connection
                    pong: asyncio.Future[float] = asyncio.ensure_future(self._round_trip(connection))
                else:
                    try:
                        # No turn taken: the socket is open and not pushing back. A Future, typed Awaitable.
                        pong = asyncio.ensure_future(await connection.ping())
                    except ConnectionClosed:
                        continue
                pong.add_done_callback(functools.partial(self._ponged, connection))
                pongs[pong] = connection
            if pongs:
                loop.call_later(settings.ping_timeout, self._judge, pongs, sent)

    @staticmethod
    async def _round_trip(connection: ServerConnection) -> float:
        return await (await connection.ping())

    def _ponged(self, connection: ServerConnection, pong: asyncio.Future[float]) -> None:
        if pong.cancelled() or pong.exception() is not None:
            return  # closed meanwhile: its reader has seen it
        device = self.switchboard.device_by_peer.get(connection)
        if device is not None:
            device.last_seen = self.switchboard.clock()

    def _judge(self, pongs: dict[asyncio.Future[float], ServerConnection], sent: float) -> None:
        """``ping_timeout`` after a round of pings: drop the connections that did not answer.

        Not one that is reading what it is sent (its socket took bytes since
        the ping): its pong waits behind a burst, it is not lost.
        """
        why = f"no answer to a ping within {self.settings.ping_timeout:g}s"
        for pong, connection in pongs.items():
            if pong.done() or connection in self._held or self._released_at.get(connection, sent) > sent:
                continue  # answered, or not read for part of the time: its pong may be what the hub did not read
            outbox = self._outboxes.get(connection)
            if outbox is None or outbox.taken_at > sent:
                continue  # gone, or reading: its pong is behind what it is reading
            pong.cancel()
            if connection.protocol.state is State.OPEN:
                logger.warning("dropping %s: %s", _address(connection), why)
                self._dropped[connection] = why
                connection.transport.abort()

    async def _serve_device(self, connection: ServerConnection) -> None:
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
                if full := self._apply(self.switchboard.device_text(connection, data)):
                    await self._hold(connection, full)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else "no close frame"
            why = self._dropped.get(connection) or f"connection closed ({code})"
        finally:
            lost = self.switchboard.device_gone(connection, why)
            if self.switchboard.devices.get(device.id) is None:  # not replaced by a newer connection
                logger.info("device %r disconnected: %s; %d batches failed", device.id, why, len(lost))
                if self.observer is not None:
                    self.observer.device_lost(device, why, len(lost))
            self._apply(lost)

    async def _answers_ping(self, peer: Hashable) -> bool:
        """Whether the connection ``peer`` answers a WebSocket ping within ``probe_timeout``.

        One the hub is not reading counts as answering: it sent a frame a
        moment ago, and its pong would wait behind frames the hub left unread.
        """
        if not isinstance(peer, ServerConnection):
            return False
        if peer in self._held:
            return True
        try:
            async with asyncio.timeout(self.settings.probe_timeout):  # ping() itself waits while the buffer is full
                await (await peer.ping())
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    async def _serve_controller(self, connection: ServerConnection) -> None:
        try:
            async for data in connection:
                if full := self._apply(self.switchboard.controller_text(connection, data)):
                    await self._hold(connection, full)
        except ConnectionClosed:
            pass
        finally:
            self._apply(self.switchboard.controller_gone(connection))


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
