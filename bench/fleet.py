"""Issue 11: a fleet of idle devices across hubs, one hub's connection ceiling, and a hub restart.

Run it from the project root::

    python bench/fleet.py --devices 50000 --hubs 3     # the fleet, about 10 minutes on 2 cores
    python bench/fleet.py --ceiling                    # one hub, connected until it can take no more
    python bench/fleet.py --restart --devices 10000    # kill -9 a hub with 10,000 devices, start it again
    python bench/fleet.py --quick [--ceiling | --restart]   # the same at small sizes, under a minute each

Every hub is ``dispatch serve`` in a process of its own (as deployed, under
``timeout -s KILL``: it dies with the run whatever happens to this process),
with a credentials file holding one credential per device it serves, bound to
that device id, and one controller credential (``*``) for this process. The
devices are UFO-style raw ``websockets`` clients, nothing of ours: connect
to ``/ws`` with the device's own bearer token, send UFO's register frame, read
the acknowledgement, then stay idle. The websockets library answers the
hub's pings; a device heartbeats every ``--heartbeat`` (120) seconds as UFO's
does (the first at a random point of the period: the phases of a fleet that
has been up a while); a ``command`` frame is answered with ``command_results`` echoing each
command's parameters. After a drop a device dials again after the delays our
own ``DeviceClient`` waits (``aip.device_session.RECONNECT_BACKOFF``: 0.5 s
doubling to 30 s, each delay scaled by a random factor in [0.5, 1]), which is
what spreads a reconnect storm. Thousands of devices live in one process
(``--per-process``, 4,000), each process binding its own source address
(127.0.0.2, .3, ...: one address has ~28,000 ephemeral ports), each process
serving one hub.

Modes:

- the fleet (default; ``--devices 50000 --hubs 3``): each hub's ``VmRSS``
  before (with ``--warm`` devices connected, so that lazy imports are not
  counted) and after its share of the devices registered, KiB per connection
  (the budget: <= 25), its open descriptors; then ``--idle`` (60) seconds
  idle: each hub's CPU seconds per minute at the default ping interval (20 s);
  then every hub is killed (-9) and started again with ``--short-ping`` (5 s),
  the devices come back by themselves (timed), and the idle minute again.
- ``--ceiling``: one hub, whose descriptor limit is the hard one (20,000 on
  these machines; ``--hub-fd-limit`` lowers it), and ``--hub-fd-limit`` + 200
  devices that each try once: how many registered, the hub's descriptors and
  memory at the ceiling; then 100 devices leave and a controller lists the
  devices and sends a batch: does the hub still work at its limit?
- ``--restart --devices 10000``: one hub; a one-command batch to each device
  (the floor: the same round with nothing restarted); the hub killed with
  SIGKILL and started again on the same port; the time until it listens, until
  every device is registered again (the hub's own device list,
  ``aip.controller.list_devices``), and until a one-command batch to each
  device (through one ``aip.controller.HubLink``) has succeeded.

Bounded and self-stopping: ``--limit`` (1,500 s) bounds the run; every child
is stopped at the end (``processes.Children``); the hubs die after the limit
by themselves (``timeout``), the device processes too (and as soon as this
process is gone). Each hub's log, and each device process's, are in the run's
temporary folder, printed at the start and removed at the end unless
``--keep-logs``. The last line is every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import Provenance, arguments, broken, print_json, table, verdict
from processes import Children, Noise, free_port, memory_kib, proc_table, process_cpu, raise_file_limit, subtree
from remote_rtt import RUN_SECRET, SECRET_VARIABLE, bearer, controller_token, device_token, register_frame
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from aip.credential_file import read_store
from aip.credentials import FILE_VERSION, Entry, Identity, Role, digest
from aip.device_session import RECONNECT_BACKOFF

SCRIPT = Path(__file__).resolve()
#: The code under test: the hub (aip) and the command that runs it (cli).
CODE_PACKAGES = ("aip", "cli")
HOST = "127.0.0.1"
#: The controller credential this process uses (every device).
CONTROLLER = "fleet"
#: The budget from issue 11.
TARGET_KIB_PER_CONNECTION = 25.0
#: UFO's device heartbeat period, seconds.
UFO_HEARTBEAT = 120.0
#: The hub's default ping interval (``dispatch serve --ping-interval``).
DEFAULT_PING = 20.0
#: Devices that try once beyond the hub's descriptor limit in --ceiling; devices that then leave.
CEILING_EXCESS = 200
CEILING_RELEASE = 100
#: How often a device process writes its status file, and how often this process reads them.
STATUS_PERIOD = 0.25
#: Bound on one connect-and-register, seconds (a hub at its descriptor limit never answers).
OPEN_TIMEOUT = 10.0
#: The largest frame a device takes (UFO's limit).
MAX_FRAME = 100 * 2**20


def device_id(index: int) -> str:
    return f"fleet-{index:05d}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# -- the device processes -------------------------------------------------------------------------


@dataclass
class Tally:
    """What a device process reports in its status file."""

    count: int = 0
    #: Connected and registered now.
    registered: int = 0
    #: Devices whose first attempt has ended, registered or not (``--once``: when all have, it is done).
    settled: int = 0
    registrations: int = 0
    commands: int = 0
    heartbeats: int = 0
    #: Registered connections that ended.
    drops: int = 0
    #: Connects or registrations that failed, by exception.
    failures: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "failures": dict(self.failures)}


class Refused(Exception):
    """The hub answered a registration with an error."""


class Fleet:
    """UFO-style raw devices in this process, each keeping one connection to the hub at ``port``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = f"ws://{HOST}:{args.port}/ws"
        self.source = args.source
        self.once = args.once
        self.heartbeat = args.heartbeat
        self.ids = [device_id(i) for i in range(args.first, args.first + args.count)]
        self.tally = Tally(count=args.count)
        self.slots = asyncio.Semaphore(args.concurrency)
        self.connections: dict[str, ClientConnection] = {}
        #: (when, device id, connection): the heartbeats due, a heap.
        self.beats: list[tuple[float, int, str, ClientConnection]] = []
        self.beat_order = itertools.count()
        self.released: set[str] = set()
        self.closing: set[asyncio.Future[None]] = set()

    async def run(self, status: Path) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.release)
        lives = [asyncio.create_task(self.life(name)) for name in self.ids]
        chores = [asyncio.create_task(self.heartbeats()), asyncio.create_task(self.report(status))]
        try:
            await asyncio.gather(*lives)
            await asyncio.Event().wait()  # --once: the devices that registered stay until the process is stopped
        finally:
            for task in [*lives, *chores]:
                task.cancel()

    async def open(self, name: str) -> ClientConnection:
        """Connect as ``name`` from this process's source address, register, read the acknowledgement."""
        connection = await connect(
            self.url,
            additional_headers=bearer(device_token(name)),
            local_addr=(self.source, 0),
            ping_interval=None,  # as UFO's device: the hub's pings alone keep it alive
            compression=None,
            open_timeout=OPEN_TIMEOUT,
            max_size=MAX_FRAME,
            proxy=None,
        )
        try:
            await connection.send(register_frame(name))
            async with asyncio.timeout(OPEN_TIMEOUT):
                ack = json.loads(await connection.recv())
            if not isinstance(ack, dict) or ack.get("type") == "error":
                raise Refused(str(ack.get("error") if isinstance(ack, dict) else ack)[:200])
        except BaseException:
            connection.transport.abort()
            raise
        return connection

    async def life(self, name: str) -> None:
        """Stay connected as ``name``; after a drop dial again as our DeviceClient would (``attempt_ended``)."""
        failures, first = 0, True
        loop = asyncio.get_running_loop()
        while name not in self.released:
            try:
                async with self.slots:
                    connection = await self.open(name)
            except Exception as error:  # refused, reset, timed out, a garbled answer: counted, tried again
                self.tally.failures[type(error).__name__] += 1
                failures += 1
            else:
                failures = 0  # a connection that registered was a success: the delays start again from the first
                self.tally.registered += 1
                self.tally.registrations += 1
                self.connections[name] = connection
                # The first one at a random point of the period: the phases of a fleet that has been up a while.
                first_beat = loop.time() + random.uniform(0, self.heartbeat)
                heapq.heappush(self.beats, (first_beat, next(self.beat_order), name, connection))
                if first:
                    self.tally.settled += 1
                    first = False
                try:
                    await self.serve(name, connection)
                except (ConnectionClosed, ValueError):
                    connection.transport.abort()
                finally:
                    self.tally.registered -= 1
                    self.tally.drops += 1
                    if self.connections.get(name) is connection:
                        del self.connections[name]
            if first:
                self.tally.settled += 1
                first = False
            if self.once:
                return
            await asyncio.sleep(RECONNECT_BACKOFF.delay(failures + 1))

    async def serve(self, name: str, connection: ClientConnection) -> None:
        """Answer each ``command`` with ``command_results`` (its parameters echoed), as UFO's device does."""
        async for raw in connection:
            message = json.loads(raw)
            if not isinstance(message, dict) or message.get("type") != "command":
                continue
            self.tally.commands += 1
            actions = message.get("actions")
            results = [
                {
                    "status": "success",
                    "error": None,
                    "result": action.get("parameters"),
                    "namespace": "fleet",
                    "call_id": action.get("call_id"),
                }
                for action in (actions if isinstance(actions, list) else [])
                if isinstance(action, dict)
            ]
            frame = {
                "type": "command_results",
                "status": "continue",
                "client_type": "device",
                "client_id": name,
                "session_id": message.get("session_id"),
                "prev_response_id": message.get("response_id"),
                "action_results": results,
                "timestamp": now_iso(),
            }
            await connection.send(json.dumps(frame))

    async def heartbeats(self) -> None:
        """Every registered device's heartbeats, one per period."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.beats or self.beats[0][0] > loop.time():
                await asyncio.sleep(min(1.0, self.beats[0][0] - loop.time()) if self.beats else 1.0)
                continue
            due, _, name, connection = heapq.heappop(self.beats)
            if self.connections.get(name) is not connection:
                continue
            frame = {"type": "heartbeat", "status": "ok", "client_type": "device", "client_id": name}
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps({**frame, "timestamp": now_iso()}))
                self.tally.heartbeats += 1
            heapq.heappush(self.beats, (due + self.heartbeat, next(self.beat_order), name, connection))

    def release(self) -> None:
        """SIGUSR1: ``CEILING_RELEASE`` registered devices leave for good."""
        for name in list(self.connections)[:CEILING_RELEASE]:
            self.released.add(name)
            closing = asyncio.ensure_future(self.connections.pop(name).close())
            self.closing.add(closing)
            closing.add_done_callback(self.closing.discard)

    async def report(self, status: Path) -> None:
        """Write the tally to ``status`` when it changes; end this process once its parent is gone."""
        parent, last = os.getppid(), ""
        while True:
            text = json.dumps(self.tally.to_json())
            if text != last:
                temporary = status.with_suffix(".tmp")
                temporary.write_text(text)
                os.replace(temporary, status)
                last = text
            if os.getppid() != parent:
                os._exit(0)
            await asyncio.sleep(STATUS_PERIOD)


def devices_entry(args: argparse.Namespace) -> None:
    """A device process: as many descriptors as the hard limit allows, then the devices until the lifetime ends."""
    raise_file_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1])

    async def main() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.lifetime):
                await Fleet(args).run(Path(args.status))

    asyncio.run(main())


# -- hubs and device processes, seen from here -------------------------------------------------------


@dataclass
class HubProcess:
    """One ``dispatch serve``: its port, credentials file, ping interval and the pid of the hub itself."""

    name: str
    port: int
    credentials: Path
    log: Path
    ping_interval: float = DEFAULT_PING
    fd_limit: int = 0
    pid: int = 0
    devices: int = 0

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"


@dataclass
class DeviceProcess:
    name: str
    hub: HubProcess
    first: int
    count: int
    source: str
    status: Path
    pid: int = 0

    def tally(self) -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads(self.status.read_text())
            return found
        except (OSError, ValueError):
            return {"registered": 0, "settled": 0, "registrations": 0, "failures": {}}


def write_credentials(path: Path, device_ids: Iterable[str]) -> None:
    """The hub's credentials file: this run's controller, and one credential per device id, bound to it.

    Written from ``Entry``s, not through ``CredentialStore.issue``: issuing
    looks the name up among every credential already issued, so n of them
    cost O(n^2) (the hub pays that once, as it reads the file).
    """
    created = now_iso()
    entries = [Entry(Identity(Role.CONTROLLER, CONTROLLER, digest(controller_token()), ("*",)), created)]
    entries += [Entry(Identity(Role.DEVICE, name, digest(device_token(name))), created) for name in device_ids]
    path.write_text(json.dumps({"version": FILE_VERSION, "credentials": [entry.to_json() for entry in entries]}))
    path.chmod(0o600)


def credentials_load(hub: HubProcess) -> float:
    """Seconds to read ``hub``'s credentials file, as the hub does at each start (before it listens)."""
    started = time.perf_counter()
    read_store(hub.credentials)
    return round(time.perf_counter() - started, 2)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Run:
    """The run's children and the folder of their files; every wait bounded by the run's deadline."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.children = Children(log_dir=folder, cwd=SCRIPT.parent.parent)
        self.deadline = time.monotonic() + float(args.limit)
        self.dispatch = Path(sys.executable).with_name("dispatch")
        if not self.dispatch.exists():
            raise broken(f"no dispatch command beside {sys.executable}: pip install -e . first")
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # no Prefect events
        self.env = {**env, "DISPATCH_SERVICE": "off", SECRET_VARIABLE: RUN_SECRET}
        self.hard_fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.sources = 0

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise broken(f"the run's time limit ({self.args.limit:g} s) passed")
        return left

    def lifetime(self) -> str:
        """What a child may live: the rest of the run and a minute to report in."""
        return str(int(self.remaining()) + 60)

    async def until(self, done: Callable[[], bool], limit: float, what: str, period: float = STATUS_PERIOD) -> float:
        """Wait until ``done()``, at most ``limit`` seconds (and the run's own limit); the seconds it took."""
        started = time.monotonic()
        while not done():
            dead = self.children.died()
            if dead is not None:
                raise broken(f"{dead} exited (its log: {self.folder / (dead + '.log')})")
            if time.monotonic() - started > min(limit, self.remaining()):
                raise broken(f"{what}: not within {limit:g} s")
            await asyncio.sleep(period)
        return time.monotonic() - started

    def new_hub(self, index: int, device_ids: Sequence[str], ping_interval: float, fd_limit: int = 0) -> HubProcess:
        name = f"hub-{index}"
        path = self.folder / f"{name}-credentials.json"
        write_credentials(path, device_ids)
        hub = HubProcess(name, free_port(), path, self.folder / f"{name}.log", ping_interval, fd_limit)
        hub.devices = len(device_ids)
        return hub

    async def start_hub(self, hub: HubProcess) -> float:
        """Start ``dispatch serve`` for ``hub``; the seconds until it listens."""
        started = time.monotonic()
        offset = hub.log.stat().st_size if hub.log.exists() else 0
        argv = ["timeout", "-s", "KILL", self.lifetime()]
        if hub.fd_limit:  # soft and hard: dispatch serve raises its soft limit to the hard one
            argv = ["prlimit", f"--nofile={hub.fd_limit}:{hub.fd_limit}", "--", *argv]
        argv += [str(self.dispatch), "serve", "--host", HOST, "--port", str(hub.port)]
        argv += ["--credentials", str(hub.credentials), "--ping-interval", f"{hub.ping_interval:g}"]
        leader = self.children.start(hub.name, argv, self.env)

        def listening() -> bool:
            with hub.log.open("rb") as log:
                log.seek(offset)
                return b"hub listening on" in log.read()

        await self.until(listening, 120, f"{hub.name} listening")
        table_now = proc_table()
        hubs = [pid for pid in subtree(leader.pid, table_now) if pid != leader.pid]
        if len(hubs) != 1:
            raise broken(f"{hub.name}: expected one process under timeout, found {hubs}")
        hub.pid = hubs[0]
        return time.monotonic() - started

    def kill_hub(self, hub: HubProcess) -> None:
        """kill -9 the hub (and its ``timeout``): no goodbye to any device."""
        process = self.children.started.pop(hub.name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def start_devices(self, name: str, hub: HubProcess, first: int, count: int, once: bool = False) -> DeviceProcess:
        """A device process for ``count`` devices of ``hub`` from ``first``, binding the next source address."""
        self.sources += 1
        if self.sources > 250:
            raise broken("more than 250 device processes: raise --per-process")
        source = f"127.0.0.{1 + self.sources}"
        status = self.folder / f"{name}.status"
        argv = [sys.executable, str(SCRIPT), "--role", "devices", "--port", str(hub.port), "--source", source]
        argv += ["--first", str(first), "--count", str(count), "--status", str(status)]
        argv += ["--heartbeat", f"{self.args.heartbeat:g}", "--concurrency", str(self.args.concurrency)]
        argv += ["--lifetime", self.lifetime(), *(["--once"] if once else [])]
        process = self.children.start(name, argv, self.env)
        return DeviceProcess(name, hub, first, count, source, status, process.pid)

    def fleet_processes(self, hub: HubProcess, first: int, count: int, once: bool = False) -> list[DeviceProcess]:
        """``count`` devices of ``hub`` from ``first``, in processes of at most ``--per-process``."""
        shares = split(count, math.ceil(count / self.args.per_process))
        found: list[DeviceProcess] = []
        start = first
        for share in shares:
            found.append(self.start_devices(f"{hub.name}-devices-{len(found)}", hub, start, share, once))
            start += share
        return found


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares as equal as can be."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def registered(processes: Sequence[DeviceProcess]) -> int:
    return sum(int(p.tally()["registered"]) for p in processes)


def failures(processes: Sequence[DeviceProcess]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for process in processes:
        total.update(process.tally().get("failures", {}))
    return dict(total)


async def hub_devices(hub: HubProcess, timeout: float = 60.0) -> list[str]:
    """The ids of the devices the hub says are connected (its own list, as ``dispatch devices`` asks for it)."""
    from aip.controller import list_devices

    return [str(device.get("id")) for device in await list_devices(hub.url, controller_token(), timeout=timeout)]


async def settled_memory(pid: int, pause: float = 2.0) -> dict[str, int]:
    await asyncio.sleep(pause)
    return memory_kib(pid)


async def batch_each(hub: HubProcess, ids: Sequence[str], limit: float, concurrency: int = 200) -> dict[str, Any]:
    """A one-command batch to each device through one controller connection, until each has succeeded.

    A batch the hub could not deliver (the device not connected yet) is sent
    again after half a second. The seconds until the last one succeeded, the
    batches sent and the ones answered with something other than results.
    """
    from aip.controller import HubLink
    from aip.messages import ClientMessage, ClientMessageType, Command, ServerMessage, ServerMessageType, TaskStatus

    pending: dict[str, asyncio.Future[ClientMessage]] = {}

    def on_frame(message: ClientMessage) -> None:
        future = pending.pop(message.prev_response_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    def on_lost(error: Exception) -> None:
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        pending.clear()

    link = HubLink(hub.url, controller_token(), open_timeout=30)
    link.attach(on_frame, on_lost)
    slots = asyncio.Semaphore(concurrency)
    counts: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    async def one(name: str, index: int) -> None:
        command = Command(tool_name="echo", parameters={"value": index}, call_id=f"{name}-{uuid.uuid4().hex[:8]}")
        while True:
            response_id = str(uuid.uuid4())
            future: asyncio.Future[ClientMessage] = loop.create_future()
            pending[response_id] = future
            message = ServerMessage(
                type=ServerMessageType.COMMAND,
                status=TaskStatus.CONTINUE,
                agent_name="fleet",
                actions=[command],
                response_id=response_id,
                target_id=name,
                timeout=30,
                timestamp=now_iso(),
            )
            async with slots:
                counts["sent"] += 1
                await link.send(message)
                async with asyncio.timeout(30):
                    reply = await future
            results = reply.action_results or []
            if reply.type is ClientMessageType.COMMAND_RESULTS and [r.result for r in results] == [command.parameters]:
                return
            counts["not delivered"] += 1
            await asyncio.sleep(0.5)

    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            await link.open()
            await asyncio.gather(*(one(name, i) for i, name in enumerate(ids)))
    finally:
        await link.close()
    return {"seconds": round(time.monotonic() - started, 2), **counts}


# -- the modes --------------------------------------------------------------------------------------


def hub_memory(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, float]:
    return {
        "before_mib": round(before["VmRSS"] / 1024, 1),
        "after_mib": round(after["VmRSS"] / 1024, 1),
        "kib_per_connection": round((after["VmRSS"] - before["VmRSS"]) / count, 1),
        "anon_kib_per_connection": round((after["RssAnon"] - before["RssAnon"]) / count, 1),
    }


async def idle_window(
    hubs: Sequence[HubProcess],
    devices: Sequence[DeviceProcess],
    seconds: float,
    floor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hub and device CPU over ``seconds`` with nothing to do but pings and heartbeats.

    ``floor``: an earlier window's figures (the hubs with their warm devices
    alone), whose CPU is taken off before dividing by the pings and heartbeats.
    """

    def beats(hub: HubProcess) -> int:
        return sum(int(p.tally().get("heartbeats", 0)) for p in devices if p.hub is hub)

    hub_cpu = {hub.name: process_cpu(hub.pid) for hub in hubs}
    hub_beats = {hub.name: beats(hub) for hub in hubs}
    device_cpu = sum(process_cpu(p.pid) for p in devices)
    noise = {hub.name: Noise(hub.pid) for hub in hubs}
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    per_minute = 60 / elapsed
    found: dict[str, Any] = {"seconds": round(elapsed, 1)}
    for hub in hubs:
        cpu = (process_cpu(hub.pid) - hub_cpu[hub.name]) * per_minute
        pings = hub.devices / hub.ping_interval
        heartbeats = (beats(hub) - hub_beats[hub.name]) / elapsed
        found[hub.name] = {
            "cpu_s_per_min": round(cpu, 3),
            "cpu_s_per_min_per_1000": round(cpu / hub.devices * 1000, 4),
            "pings_per_s": round(pings, 1),
            "heartbeats_per_s": round(heartbeats, 1),
            "waited_for_cpu": noise[hub.name].share(),
        }
        if floor is not None:
            above = cpu - floor[hub.name]["cpu_s_per_min"]
            found[hub.name]["cpu_us_per_event"] = round(above / 60 / (pings + heartbeats) * 1e6, 1)
    found["devices_cpu_s_per_min"] = round((sum(process_cpu(p.pid) for p in devices) - device_cpu) * per_minute, 2)
    return found


def client_memory(warm: DeviceProcess, fleet: Sequence[DeviceProcess]) -> float:
    """KiB per device in a device process: its VmRSS over that of a process with the warm devices alone."""
    base = memory_kib(warm.pid)["VmRSS"]
    return round(statistics.median((memory_kib(p.pid)["VmRSS"] - base) / (p.count - warm.count) for p in fleet), 1)


async def measure_hubs(run: Run, hubs: Sequence[HubProcess], before: dict[str, dict[str, int]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for hub in hubs:
        after = await settled_memory(hub.pid)
        found[hub.name] = {
            **hub_memory(before[hub.name], after, hub.devices),
            "devices": hub.devices,
            "open_fds": open_fds(hub.pid),
            "listed": len(await hub_devices(hub)),
        }
    return found


async def mode_fleet(run: Run) -> dict[str, Any]:
    args = run.args
    shares = split(args.devices, args.hubs)
    hubs, first, ids_by_hub = [], 0, []
    for index, share in enumerate(shares):
        ids = [device_id(i) for i in range(first, first + share + args.warm)]
        hubs.append(run.new_hub(index, ids, DEFAULT_PING))
        ids_by_hub.append((first, share))
        first += share + args.warm
    figures: dict[str, Any] = {"devices": args.devices, "hubs": args.hubs, "warm_per_hub": args.warm}
    figures["credentials_load_s"] = credentials_load(hubs[0])
    figures["hub_start_s"] = [round(seconds, 2) for seconds in await asyncio.gather(*map(run.start_hub, hubs))]
    warm = [
        run.start_devices(f"{hub.name}-warm", hub, start, args.warm)
        for hub, (start, _) in zip(hubs, ids_by_hub, strict=True)
    ]
    await run.until(lambda: registered(warm) == args.warm * len(hubs), 120, "the warm devices registering")
    before = {hub.name: await settled_memory(hub.pid) for hub in hubs}
    floor = figures["floor"] = await idle_window(hubs, warm, min(args.idle, 15.0))
    fleet: list[DeviceProcess] = []
    started = time.monotonic()
    connect_cpu = {hub.name: process_cpu(hub.pid) for hub in hubs}
    for hub, (start, share) in zip(hubs, ids_by_hub, strict=True):
        fleet += run.fleet_processes(hub, start + args.warm, share)
    everyone = [*warm, *fleet]
    total = args.devices + args.warm * len(hubs)
    await run.until(lambda: registered(everyone) == total, args.limit, f"{args.devices} devices registering")
    figures["connect_s"] = round(time.monotonic() - started, 1)
    figures["connect_hub_cpu_ms_per_device"] = {
        hub.name: round((process_cpu(hub.pid) - connect_cpu[hub.name]) / (hub.devices - args.warm) * 1000, 2)
        for hub in hubs
    }
    figures["device_processes"] = len(fleet)
    figures["connect_failures"] = failures(everyone)
    figures["default"] = await measure_hubs(run, hubs, before)
    figures["client_kib_per_device"] = client_memory(warm[0], fleet)
    figures["default"]["idle"] = await idle_window(hubs, everyone, args.idle, floor)
    figures["default"]["ping_interval"] = DEFAULT_PING

    # Every hub killed and started again with the short ping interval: the devices come back by themselves.
    registrations = sum(int(p.tally()["registrations"]) for p in everyone)
    killed = time.monotonic()
    for hub in hubs:
        run.kill_hub(hub)
        hub.ping_interval = args.short_ping
    listening = await asyncio.gather(*(run.start_hub(hub) for hub in hubs))
    await run.until(
        lambda: sum(int(p.tally()["registrations"]) for p in everyone) >= registrations + total,
        args.limit,
        "every device back after the hubs restarted",
    )
    figures["restart_all"] = {
        "listening_s": [round(seconds, 2) for seconds in listening],
        "all_back_s": round(time.monotonic() - killed, 1),
        "connects_failed": failures(everyone),
    }
    baseline = {hub.name: before[hub.name] for hub in hubs}
    figures["short"] = await measure_hubs(run, hubs, baseline)
    figures["short"]["idle"] = await idle_window(hubs, everyone, args.idle, floor)
    figures["short"]["ping_interval"] = args.short_ping
    figures["short"]["note"] = "memory against the first start's baseline (warm devices connected)"
    figures["per_event_us"] = {hub.name: per_event(figures, hub.name) for hub in hubs}
    return figures


def per_event(figures: dict[str, Any], name: str) -> dict[str, float]:
    """A hub's CPU per ping and per heartbeat, microseconds, from the two idle windows.

    The windows differ in the ping rate alone: their difference is what the
    extra pings cost; what the default window spent above the floor and
    beyond its pings is what the heartbeats cost.
    """
    default, short = figures["default"]["idle"][name], figures["short"]["idle"][name]
    extra_pings = (short["pings_per_s"] - default["pings_per_s"]) * 60
    ping = (short["cpu_s_per_min"] - default["cpu_s_per_min"]) / extra_pings if extra_pings > 0 else math.nan
    beats = default["heartbeats_per_s"] * 60
    rest = default["cpu_s_per_min"] - figures["floor"][name]["cpu_s_per_min"] - ping * default["pings_per_s"] * 60
    return {"ping": round(ping * 1e6, 1), "heartbeat": round(rest / beats * 1e6, 1) if beats else math.nan}


async def mode_ceiling(run: Run) -> dict[str, Any]:
    args = run.args
    limit = args.hub_fd_limit or run.hard_fd_limit
    count = limit + CEILING_EXCESS
    hub = run.new_hub(0, [device_id(i) for i in range(count)], DEFAULT_PING, limit)
    figures: dict[str, Any] = {"hub_fd_limit": limit, "devices_tried": count}
    figures["hub_start_s"] = round(await run.start_hub(hub), 2)
    figures["idle_fds"] = open_fds(hub.pid)
    before = await settled_memory(hub.pid)
    started, cpu = time.monotonic(), process_cpu(hub.pid)
    devices = run.fleet_processes(hub, 0, count, once=True)
    await run.until(lambda: sum(int(p.tally()["settled"]) for p in devices) == count, args.limit, "every device tried")
    figures["tried_s"] = round(time.monotonic() - started, 1)
    figures["hub_cpu_s_while_trying"] = round(process_cpu(hub.pid) - cpu, 1)
    log = hub.log.read_bytes()
    figures["hub_log"] = {
        "mib": round(len(log) / 2**20, 1),
        "accept_out_of_resource_errors": log.count(b"socket.accept() out of system resource"),
    }
    del log
    peak = registered(devices)
    after = await settled_memory(hub.pid)
    figures.update(ceiling=peak, fds_at_ceiling=open_fds(hub.pid), failures=failures(devices))
    figures["memory"] = hub_memory(before, after, max(1, peak))
    # Some devices leave: does the hub, having hit its limit, take a controller and carry a batch?
    os.kill(devices[0].pid, signal.SIGUSR1)
    await run.until(lambda: registered(devices) <= peak - CEILING_RELEASE, 60, "devices leaving")
    hub.devices = peak - CEILING_RELEASE
    listed: list[str] = []
    for _ in range(10):  # the hub may first accept connections that waited in its backlog, long given up
        with contextlib.suppress(Exception):
            listed = await hub_devices(hub, timeout=10)
            break
        await asyncio.sleep(1)
    after_release: dict[str, Any] = {"left": CEILING_RELEASE, "listed": len(listed), "batch": None}
    if listed:
        with contextlib.suppress(TimeoutError, ConnectionError):
            after_release["batch"] = await batch_each(hub, listed[:1], 60)
    figures["after_release"] = after_release
    return figures


async def mode_restart(run: Run) -> dict[str, Any]:
    args = run.args
    ids = [device_id(i) for i in range(args.devices)]
    hub = run.new_hub(0, ids, DEFAULT_PING)
    figures: dict[str, Any] = {"devices": args.devices, "credentials_load_s": credentials_load(hub)}
    figures["hub_start_s"] = round(await run.start_hub(hub), 2)
    started = time.monotonic()
    devices = run.fleet_processes(hub, 0, args.devices)
    await run.until(lambda: registered(devices) == args.devices, args.limit, f"{args.devices} devices registering")
    figures["connect_s"] = round(time.monotonic() - started, 1)
    figures["device_processes"] = len(devices)
    if len(await hub_devices(hub)) != args.devices:
        raise broken("the hub lists a different number of devices than registered")
    figures["floor"] = await batch_each(hub, ids, run.remaining())
    registrations = sum(int(p.tally()["registrations"]) for p in devices)
    failed_before = failures(devices)
    await asyncio.sleep(2)

    killed = time.monotonic()
    run.kill_hub(hub)
    listening = await run.start_hub(hub)
    hub_cpu = process_cpu(hub.pid)
    back: dict[str, float] = {}

    def devices_back() -> bool:
        again = sum(int(p.tally()["registrations"]) for p in devices) - registrations
        for share in (0.5, 0.9, 1.0):
            if again >= share * args.devices and f"{share:.0%}" not in back:
                back[f"{share:.0%}"] = round(time.monotonic() - killed, 2)
        return bool(again >= args.devices)

    await run.until(devices_back, run.remaining(), "every device re-registering", period=0.05)
    listed = 0

    async def poll() -> None:
        nonlocal listed
        while listed < args.devices:
            with contextlib.suppress(Exception):
                listed = len(await hub_devices(hub, timeout=30))
            if listed < args.devices:
                await asyncio.sleep(0.5)

    async with asyncio.timeout(run.remaining()):
        await poll()
    hub_back = time.monotonic() - killed
    batches = await batch_each(hub, ids, run.remaining())
    all_done = time.monotonic() - killed
    hub_cpu = process_cpu(hub.pid) - hub_cpu
    figures["restart"] = {
        "listening_s": round(listening, 2),
        "devices_back_s": back,
        "hub_lists_all_s": round(hub_back, 2),
        "batch_each": batches,
        "all_batched_s": round(all_done, 2),
        "hub_cpu_s_from_listening": round(hub_cpu, 2),
        "connects_failed": {
            kind: n - failed_before.get(kind, 0)
            for kind, n in failures(devices).items()
            if n > failed_before.get(kind, 0)
        },
    }
    return figures


# -- report -----------------------------------------------------------------------------------------


def print_fleet(figures: dict[str, Any]) -> None:
    print(
        f"{figures['devices']:,} devices on {figures['hubs']} hubs ({figures['warm_per_hub']} warm devices per hub "
        f"in the baseline), {figures['device_processes']} device processes: all registered in {figures['connect_s']} s"
    )
    print(
        f"hubs listening {figures['hub_start_s']} s after their start; reading one hub's credentials file "
        f"takes {figures['credentials_load_s']} s of that"
    )
    cost = ", ".join(f"{name} {ms:.2f}" for name, ms in figures["connect_hub_cpu_ms_per_device"].items())
    print(
        f"hub CPU per device connected and registered, ms: {cost}; "
        f"client side {figures['client_kib_per_device']} KiB per device"
    )
    floor = ", ".join(
        f"{name} {hub['cpu_s_per_min']:.3f}" for name, hub in figures["floor"].items() if name.startswith("hub-")
    )
    print(f"floor: each hub with its warm devices alone, CPU s/min over {figures['floor']['seconds']} s: {floor}")
    rows = []
    for label in ("default", "short"):
        block = figures[label]
        for name, hub in block.items():
            if not name.startswith("hub-"):
                continue
            idle = block["idle"][name]
            rows.append(
                (
                    f"{name}, ping every {block['ping_interval']:g} s",
                    f"{hub['devices']:,}",
                    f"{hub['listed']:,}",
                    f"{hub['before_mib']:.1f} -> {hub['after_mib']:.1f} MiB",
                    f"{hub['kib_per_connection']:.1f}",
                    f"{hub['open_fds']:,}",
                    f"{idle['pings_per_s']:,.0f}",
                    f"{idle['heartbeats_per_s']:,.0f}",
                    f"{idle['cpu_s_per_min']:.2f}",
                    f"{idle['cpu_us_per_event']:.0f}",
                )
            )
    header = ("hub", "devices", "listed", "VmRSS", "KiB/conn", "fds", "pings/s", "beats/s", "CPU s/min", "us/event")
    table(header, rows)
    waits = ", ".join(
        f"{name} {figures[label]['idle'][name]['waited_for_cpu']:.0%}"
        for label in ("default", "short")
        for name in figures[label]["idle"]
        if name.startswith("hub-")
    )
    print("(idle: CPU s/min of the hub; us/event: its CPU above the floor per ping or heartbeat)")
    print(f"share of each idle window a hub waited for a CPU (20 s pings, then 5 s): {waits}")
    for label in ("default", "short"):
        idle = figures[label]["idle"]
        print(
            f"idle {idle['seconds']} s at a {figures[label]['ping_interval']:g} s ping: device processes "
            f"{idle['devices_cpu_s_per_min']} CPU s/min in all"
        )
    events = ", ".join(
        f"{name} {us['ping']:.0f} / {us['heartbeat']:.0f}" for name, us in figures["per_event_us"].items()
    )
    print(f"hub CPU per ping / per heartbeat, us (from the two windows' difference): {events}")
    restart = figures["restart_all"]
    print(
        f"all hubs killed and started again: listening after {restart['listening_s']} s; every device back after "
        f"{restart['all_back_s']} s"
    )
    worst = max(
        hub["kib_per_connection"] for hub in figures["default"].values() if isinstance(hub, dict) and "devices" in hub
    )
    print(
        f"target <= {TARGET_KIB_PER_CONNECTION:g} KiB per connection (the worst hub): {worst:.1f}, "
        f"{verdict(worst <= TARGET_KIB_PER_CONNECTION)}"
    )


def print_ceiling(figures: dict[str, Any]) -> None:
    after = figures["after_release"]
    table(
        ("one hub", "value"),
        [
            ("descriptor limit", f"{figures['hub_fd_limit']:,}"),
            ("hub listening after its start, s", f"{figures['hub_start_s']}"),
            ("descriptors idle", f"{figures['idle_fds']}"),
            ("devices tried (once each)", f"{figures['devices_tried']:,}"),
            ("devices registered: the ceiling", f"{figures['ceiling']:,}"),
            ("descriptors at the ceiling", f"{figures['fds_at_ceiling']:,}"),
            ("VmRSS at the ceiling", f"{figures['memory']['after_mib']:.1f} MiB"),
            ("KiB per connection", f"{figures['memory']['kib_per_connection']:.1f}"),
            ("seconds to try them all", f"{figures['tried_s']}"),
            ("hub CPU seconds meanwhile", f"{figures['hub_cpu_s_while_trying']}"),
            ("hub log: accept() out of resource errors", f"{figures['hub_log']['accept_out_of_resource_errors']:,}"),
            ("hub log size", f"{figures['hub_log']['mib']} MiB"),
            (f"after {after['left']} left: devices listed", f"{after['listed']:,}"),
            ("and a batch to one", "ok" if after["batch"] else "FAILED"),
        ],
    )
    print(f"failures: {figures['failures']}")


def print_restart(figures: dict[str, Any]) -> None:
    restart = figures["restart"]
    print(
        f"{figures['devices']:,} devices on one hub ({figures['device_processes']} device processes), "
        f"registered in {figures['connect_s']} s; a batch to each, nothing restarted: {figures['floor']['seconds']} s"
    )
    back = restart["devices_back_s"]
    table(
        ("after kill -9 of the hub", "seconds"),
        [
            (
                f"hub listening again (its credentials read in {figures['credentials_load_s']})",
                f"{restart['listening_s']}",
            ),
            *((f"{share} of the devices registered again", f"{seconds}") for share, seconds in back.items()),
            ("the hub lists every device", f"{restart['hub_lists_all_s']}"),
            ("a batch to each has succeeded", f"{restart['all_batched_s']}"),
        ],
    )
    print(f"connects that failed during the storm: {restart['connects_failed']}; batches: {restart['batch_each']}")
    print(f"hub CPU from listening to the last batch: {restart['hub_cpu_s_from_listening']} s")


#: The options only a device process uses: not part of a run's figures.
ROLE_OPTIONS = ("role", "port", "first", "count", "source", "status", "lifetime", "once")


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ceiling", action="store_true", help="one hub, connected until it can take no more")
    mode.add_argument("--restart", action="store_true", help="kill -9 a hub with --devices connected, time the return")
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--devices", type=int, help="devices in all (fleet: 50,000; --restart: 10,000)")
    parser.add_argument("--hubs", type=int, default=3, help="hubs of the fleet (default 3)")
    parser.add_argument("--per-process", type=int, default=4000, help="devices per device process (default 4,000)")
    parser.add_argument("--warm", type=int, default=20, help="devices per hub connected before the baseline")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of each idle window (default 60)")
    parser.add_argument("--short-ping", type=float, default=5.0, help="the short ping interval, seconds (default 5)")
    parser.add_argument("--heartbeat", type=float, default=UFO_HEARTBEAT, help="device heartbeat period (UFO: 120)")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight per device process")
    parser.add_argument("--hub-fd-limit", type=int, default=0, help="--ceiling: the hub's descriptor limit")
    parser.add_argument("--limit", type=float, default=1500.0, help="the whole run's time limit, seconds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the run's folder of logs")
    parser.add_argument("--role", choices=("devices",), help=argparse.SUPPRESS)
    for hidden in ("--port", "--first", "--count"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="127.0.0.2", help=argparse.SUPPRESS)
    parser.add_argument("--status", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        devices_entry(args)
        return
    if args.quick:
        args.devices = args.devices or 2000
        args.hubs, args.idle, args.per_process = 2, 20.0, 700
        args.hub_fd_limit = args.hub_fd_limit or 1000
    args.devices = args.devices or (10_000 if args.restart else 50_000)
    if min(args.devices, args.hubs, args.per_process, args.concurrency) < 1 or args.idle <= 0:
        parser.error("every count must be at least 1")
    soft, hard = raise_file_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if not shutil.which("timeout") or (args.ceiling and not shutil.which("prlimit")):
        raise broken("this needs coreutils' timeout (and util-linux's prlimit for --ceiling)")

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "mode": "ceiling" if args.ceiling else "restart" if args.restart else "fleet",
        "args": {k: v for k, v in vars(args).items() if v is not None and k not in ROLE_OPTIONS},
        "code": provenance.code,
        "nofile": [soft, hard],
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
    }
    folder = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    print(f"logs in {folder}", file=sys.stderr)
    run = Run(args, folder)

    async def measure() -> dict[str, Any]:
        async with asyncio.timeout(args.limit):
            if args.ceiling:
                return await mode_ceiling(run)
            if args.restart:
                return await mode_restart(run)
            return await mode_fleet(run)

    def stopped(signum: int, _: object) -> None:
        raise SystemExit(f"benchmark stopped by signal {signum}")  # the children are stopped on the way out

    signal.signal(signal.SIGTERM, stopped)
    try:
        figures.update(asyncio.run(measure()))
    finally:
        run.children.stop()
        if not args.keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
    provenance.finish(figures)
    figures["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    print()
    {"ceiling": print_ceiling, "restart": print_restart, "fleet": print_fleet}[figures["mode"]](figures)
    print(
        f"load average {figures['load_average_start']} at the start, {figures['load_average_end']} at the end "
        "(the machine is shared)"
    )
    provenance.print(f"; {figures['elapsed_s']} s in all.")
    print_json(figures)


if __name__ == "__main__":
    main()
