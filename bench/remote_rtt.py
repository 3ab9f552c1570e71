"""What the remote path costs: controller -> hub -> device -> back, against raw websockets.

Run it from the project root::

    python bench/remote_rtt.py            # about 1 minute on 2 cores
    python bench/remote_rtt.py --quick    # a smoke run, about 10 s

Everything runs on 127.0.0.1 with credentials as a hub has them: a
``CredentialStore`` holding one controller credential and one credential per
device id used, each device connecting with its own (tokens derived from a
secret made for the run; a hub in a subprocess reads them from a credentials
file, as ``dispatch serve --credentials`` does). The device's executor is an
``InMemoryCommandDispatcher`` with one tool, ``echo`` (returns its parameters),
so what is measured is the path, not a tool.

(a) one-command batches, one at a time: ``WebSocketCommandDispatcher
    .execute_commands([cmd])`` through a hub to a ``DeviceClient`` and back,
    against a raw ``websockets`` echo round trip that uses pydantic at both
    ends as any AIP peer must (the client serialises a ``ServerMessage`` with
    one ``Command``, the server parses it and answers a ``ClientMessage`` with
    one ``Result``, the client parses that). Two topologies:

    * in-process (the headline): hub, device, controller, the raw echo server
      and its client all in this process and event loop, as
      ``tests/hub_support.py`` runs them. Both sides then share one loop and
      one core, so the ratio is code alone. A second raw client on a second
      echo server is the A/A row (its ratio far from 1.00 means the run was
      too noisy to trust). A raw client through a relay that forwards frames
      untouched (client -> relay -> echo server) is context: the floor of any
      design with a hop in the middle, which the hub path has. Two more
      context rows swap parts of our path for raw ones: a raw controller
      (a websocket at ``/controller`` sending the frame by hand) through the
      hub to a raw device (one that parses the command and answers, as the
      echo server does), and the same raw controller to our ``DeviceClient``.
      Differences of these medians say where the time goes: the second hop,
      the hub's own work, the DeviceClient with its executor, the dispatcher.
    * three processes: the hub and the device each in a subprocess of their
      own, as deployed; the raw echo server in a subprocess too. The headline
      here is ours against its floor (issue 10): a raw client through a raw
      relay in a process of its own (forwarding each frame untouched) to a
      raw echo server in another (client -> relay process -> echo process ->
      back), the same three processes and two hops as controller -> hub
      process -> device process -> back. The CPU time each process spent per
      round trip (from ``/proc/<pid>``) is the cost split: how much of a
      round trip is the hub, the device, the controller.

    Subjects take turns in rounds (blocks of ``--calls`` calls each, the order
    rotating per round, the two topologies alternating); the median of each
    round's median is the figure, the p99 is over all calls pooled. Last, one
    command carrying ``--payload-kib`` (256) KiB of base64 there and back (a
    screenshot-sized result), ours against the raw echo, in-process.
(b) commands per second to one device with many batches in flight: 64
    concurrent one-command batches, and 8 concurrent 50-command batches (each
    worker sends its next batch when its last one is answered), in both
    topologies, against the raw echo with as many frames in flight on one
    connection (context), and, with three processes, against the floor (the
    headline): the raw pipelined client through the relay process to its
    echo process, as many frames in flight. Median over repetitions, order
    rotating.
(c) memory per idle device connection: a hub in a subprocess of its own
    (``aip.hub.Hub`` with default settings, what ``dispatch serve`` runs);
    its ``VmRSS`` from ``/proc/<pid>/status`` before and after ``--devices``
    (1,000) minimal raw ``websockets`` clients connect and register as UFO
    devices do (``?token=`` with the device's own credential, a register
    frame, the acknowledgement read).
    Twenty devices connect first, untimed, so that lazy imports and
    first-use caches are not counted. Then the same with our own
    ``DeviceClient`` objects, all in one more subprocess: that process's RSS
    per device (the client side) and a fresh hub's RSS per connection again.

Every figure is a median over repetitions; ratios are subject/baseline of the
medians; rows marked ``*`` are the headlines the targets apply to. The
"Noise" line gives the share of each phase this process spent waiting for a
CPU (``/proc/self/schedstat``) and the load average: the machine is shared.
``--profile N`` adds a cProfile of N in-process round trips (own time by
component, top functions), then of N round trips with three processes: the
controller here, the hub and the device each profiled in its own process
(own time by component, per process). The last line is every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import hashlib
import os
import pstats
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import (
    Provenance,
    arguments,
    broken,
    echo_commands,
    ms,
    p99,
    print_json,
    rotation,
    table,
    us,
    verdict,
)
from processes import START_TIMEOUT, Noise, Role, memory_kib, process_cpu, raise_file_limit, say, stdin_reader
from processes import role as role_process
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve

from aip.credential_file import CredentialFile, write_store
from aip.credentials import CredentialStore
from aip.credentials import Role as CredentialRole
from aip.messages import (
    ClientMessage,
    ClientMessageType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from aip.registration import DISPATCH_METADATA
from aip.switchboard import now_iso

if TYPE_CHECKING:
    from aip.device import DeviceClient
    from dispatchers import InMemoryCommandDispatcher, WebSocketCommandDispatcher

SCRIPT = Path(__file__).resolve()
#: Where the code under test was imported from (the checkout, unless ``PYTHONPATH`` points elsewhere).
CODE_PACKAGES = ("aip", "dispatchers")
HOST = "127.0.0.1"
#: The secret every credential of this run is derived from; the role subprocesses get it from the environment.
SECRET_VARIABLE = "DISPATCH_BENCH_SECRET"
RUN_SECRET = os.environ.get(SECRET_VARIABLE) or secrets.token_hex(16)
#: The controller (this process's dispatchers and raw controllers; it may use every device).
CONTROLLER = "bench"
DEVICE_ID = "bench-device"
RAW_DEVICE_ID = "raw-device"

#: Targets from the project brief.
TARGET_RATIO = 3.0
#: Issue 10: three processes, ours against the raw relay through two processes (round trip, at most) ...
TARGET_RELAY_RATIO = 1.5
#: ... and commands per second to one device against the raw pipelined relay (at least).
TARGET_RELAY_THROUGHPUT = 0.5
TARGET_KIB_PER_CONNECTION = 100.0

#: Bounds on every wait, in seconds.
CALL_TIMEOUT = 30.0
PHASE_TIMEOUT = 300.0
#: A role subprocess exits by itself after this long, whatever happens to its parent.
ROLE_LIFETIME = 900.0
#: Set in a role subprocess's environment: profile it, and write the stats to this file when it ends.
PROFILE_VARIABLE = "DISPATCH_BENCH_PROFILE"


def screenshot_like(kib: int) -> str:
    """``kib`` KiB of base64 of random bytes: about as compressible as a base64 PNG (not much)."""
    return base64.b64encode(os.urandom(kib * 768)).decode()


def check_results(results: Sequence[Result], commands: Sequence[Command]) -> None:
    ok = len(results) == len(commands) and all(
        r.status is ResultStatus.SUCCESS and r.call_id == c.call_id and r.result == c.parameters
        for r, c in zip(results, commands, strict=False)
    )
    if not ok:
        bad = [r for r in results if r.status is not ResultStatus.SUCCESS]
        raise broken(f"{len(results)} results for {len(commands)} commands, e.g. {bad[:1]}")


# -- credentials ---------------------------------------------------------------------------------


def controller_token() -> str:
    return f"bench-controller-{RUN_SECRET}"


def device_token(device_id: str) -> str:
    """The credential of ``device_id``: its own, derived from the run's secret (visible ASCII, unguessable)."""
    return "bench-device-" + hashlib.sha256(f"{RUN_SECRET}:{device_id}".encode()).hexdigest()


def bench_credentials(device_ids: Iterable[str]) -> CredentialStore:
    """A hub's credentials: the controller (every device) and one credential per device id, bound to it."""
    store = CredentialStore()
    store.issue(CredentialRole.CONTROLLER, CONTROLLER, token=controller_token())
    for device_id in device_ids:
        store.issue(CredentialRole.DEVICE, device_id, token=device_token(device_id))
    return store


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- raw websockets: the baselines ----------------------------------------------------------------


def command_frame(commands: list[Command], response_id: str, target_id: str | None = None) -> str:
    return ServerMessage(
        type=ServerMessageType.COMMAND,
        status=TaskStatus.CONTINUE,
        actions=commands,
        response_id=response_id,
        timestamp=now_iso(),
        target_id=target_id,
    ).model_dump_json()


def results_frame(message: ServerMessage, client_id: str | None = None) -> str:
    """The raw echo's answer: a ClientMessage with one Result per Command, each echoing its parameters."""
    return ClientMessage(
        type=ClientMessageType.COMMAND_RESULTS,
        status=TaskStatus.CONTINUE,
        client_id=client_id,
        prev_response_id=message.response_id,
        action_results=[
            Result(status=ResultStatus.SUCCESS, result=command.parameters, call_id=command.call_id)
            for command in message.actions or []
        ],
        timestamp=now_iso(),
    ).model_dump_json()


async def echo_handler(connection: ServerConnection) -> None:
    """The raw echo server: parse the ServerMessage, answer a ClientMessage with one Result per Command."""
    async for frame in connection:
        await connection.send(results_frame(ServerMessage.model_validate_json(frame)))


async def start_echo_server() -> Server:
    return await serve(echo_handler, HOST, 0)


def server_url(server: Server) -> str:
    return f"ws://{HOST}:{server.sockets[0].getsockname()[1]}"


async def relay_to(upstream_url: str) -> Server:
    """A server that forwards each frame, untouched, to ``upstream_url`` and back (one upstream per client)."""

    async def pump(source: ClientConnection | ServerConnection, sink: ClientConnection | ServerConnection) -> None:
        async for frame in source:
            await sink.send(frame)

    async def handler(downstream: ServerConnection) -> None:
        async with connect(upstream_url) as upstream:
            tasks = {asyncio.create_task(pump(downstream, upstream)), asyncio.create_task(pump(upstream, downstream))}
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=5)

    return await serve(handler, HOST, 0)


class RawEcho:
    """A raw client, one frame at a time: send, then ``recv`` the answer (``target``: through a hub, to it)."""

    def __init__(self, connection: ClientConnection, target: str | None = None) -> None:
        self.connection = connection
        self.target = target

    async def run(self, commands: list[Command]) -> None:
        response_id = str(uuid.uuid4())
        await self.connection.send(command_frame(commands, response_id, self.target))
        reply = ClientMessage.model_validate_json(await self.connection.recv())
        if reply.prev_response_id != response_id:
            raise broken("the raw echo answered another frame")
        check_results(reply.action_results or [], commands)


class RawPipelined:
    """A raw client with many frames in flight: a reader task matches answers to futures by response_id."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.pending: dict[str, asyncio.Future[ClientMessage]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.connection:
            message = ClientMessage.model_validate_json(frame)
            future = self.pending.pop(message.prev_response_id or "", None)
            if future is not None:
                future.set_result(message)

    async def run(self, commands: list[Command]) -> None:
        response_id = str(uuid.uuid4())
        future: asyncio.Future[ClientMessage] = asyncio.get_running_loop().create_future()
        self.pending[response_id] = future
        await self.connection.send(command_frame(commands, response_id))
        async with asyncio.timeout(CALL_TIMEOUT):
            reply = await future
        check_results(reply.action_results or [], commands)

    async def close(self) -> None:
        await self.connection.close()
        await asyncio.wait({self.reader}, timeout=5)


# -- our path -------------------------------------------------------------------------------------


def echo_executor() -> InMemoryCommandDispatcher:
    from dispatchers import InMemoryCommandDispatcher

    def echo(command: Command) -> Any:
        return command.parameters

    return InMemoryCommandDispatcher({"echo": echo})


class Ours:
    """Batches through ``WebSocketCommandDispatcher.execute_commands``."""

    def __init__(self, dispatcher: WebSocketCommandDispatcher) -> None:
        self.dispatcher = dispatcher

    async def run(self, commands: list[Command]) -> None:
        check_results(await self.dispatcher.execute_commands(commands, timeout=CALL_TIMEOUT), commands)


@contextlib.asynccontextmanager
async def running_devices(
    hub_url: str, ids: Sequence[str], executor: InMemoryCommandDispatcher, group: int = 50
) -> AsyncIterator[list[DeviceClient]]:
    """``DeviceClient``s for ``ids``, started ``group`` at a time, each registered; all stopped on exit."""
    from aip.device import DeviceClient

    clients: list[DeviceClient] = []
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        for start in range(0, len(ids), group):
            batch = [
                DeviceClient(hub_url, name, executor, token=device_token(name)) for name in ids[start : start + group]
            ]
            clients += batch
            tasks += [asyncio.create_task(client.run(stop)) for client in batch]
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(client.registered.wait() for client in batch))
        yield clients
    finally:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def raw_device(hub_url: str, device_id: str) -> AsyncIterator[None]:
    """A raw device on the hub: answers each command frame as the raw echo server does, heartbeats every 10 s.

    It registers with the ``dispatch`` metadata our DeviceClient sends, so the
    hub forwards frames to it exactly as it does to a DeviceClient.
    """
    headers = bearer(device_token(device_id))
    async with connect(f"{hub_url}/ws", additional_headers=headers, open_timeout=START_TIMEOUT) as connection:
        await connection.send(register_frame(device_id, dispatch=True))
        async with asyncio.timeout(START_TIMEOUT):
            ack = ServerMessage.model_validate_json(await connection.recv())
        if ack.type is not ServerMessageType.HEARTBEAT:
            raise broken(f"the hub refused the raw device: {ack.error}")

        async def answer() -> None:
            async for frame in connection:
                message = ServerMessage.model_validate_json(frame)
                if message.type is ServerMessageType.COMMAND:
                    await connection.send(results_frame(message, device_id))

        async def heartbeat() -> None:
            beat = ClientMessage(type=ClientMessageType.HEARTBEAT, status=TaskStatus.OK, client_id=device_id)
            while True:
                await asyncio.sleep(10)
                await connection.send(beat.model_dump_json())

        tasks = {asyncio.create_task(answer()), asyncio.create_task(heartbeat())}
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=5)


@dataclass
class InProcess:
    hub_url: str
    dispatcher: WebSocketCommandDispatcher


@contextlib.asynccontextmanager
async def in_process_path(with_raw_device: bool = False) -> AsyncIterator[InProcess]:
    """Hub, device (and a raw device) and controller in this event loop, over real loopback sockets."""
    from aip.access import AccessPolicy
    from aip.hub import Hub, HubSettings
    from dispatchers import WebSocketCommandDispatcher

    credentials = bench_credentials([DEVICE_ID, RAW_DEVICE_ID] if with_raw_device else [DEVICE_ID])
    async with (
        Hub(AccessPolicy(credentials), HubSettings(host=HOST, port=0)) as hub,
        running_devices(hub.url, [DEVICE_ID], echo_executor()),
        raw_device(hub.url, RAW_DEVICE_ID) if with_raw_device else contextlib.nullcontext(),
    ):
        dispatcher = await WebSocketCommandDispatcher.connect(hub.url, DEVICE_ID, token=controller_token())
        try:
            yield InProcess(hub.url, dispatcher)
        finally:
            await dispatcher.close()


# -- role subprocesses ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def role(*args: str, profile: Path | None = None) -> AsyncIterator[Role]:
    """Start ``python bench/remote_rtt.py --role ...``, wait for its READY/WARM line; stop it on exit.

    ``profile``: the subprocess runs under cProfile and writes its stats there as it ends.
    """
    argv = [sys.executable, str(SCRIPT), "--role", *args]
    env = {**os.environ, SECRET_VARIABLE: RUN_SECRET}
    if profile is not None:
        env[PROFILE_VARIABLE] = str(profile)
    async with role_process(args[0], argv, env) as started:
        yield started


def fleet_ids(prefix: str, count: int) -> list[str]:
    """The ids of a ``device`` role subprocess's DeviceClients."""
    return [f"{prefix}-{i}" for i in range(count)]


@contextlib.asynccontextmanager
async def hub_role(device_ids: Iterable[str], profile: Path | None = None) -> AsyncIterator[Role]:
    """A hub subprocess with a credentials file of ``bench_credentials(device_ids)``; the file goes with it."""
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as folder:
        path = Path(folder) / "credentials.json"
        write_store(path, bench_credentials(device_ids))
        async with role("hub", "--credentials", str(path), profile=profile) as hub:
            yield hub


def role_entry(args: argparse.Namespace) -> None:
    """A role subprocess's life, under cProfile (CPU time) if its parent asked for a profile (``PROFILE_VARIABLE``)."""
    target = os.environ.get(PROFILE_VARIABLE)
    if not target:
        asyncio.run(role_main(args))
        return
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        asyncio.run(role_main(args))
    finally:
        profiler.disable()
        profiler.dump_stats(target)


async def role_main(args: argparse.Namespace) -> None:
    """What a role subprocess does: start, say READY (or WARM, then READY after GO), serve until stdin closes."""
    stdin = await stdin_reader()
    async with asyncio.timeout(ROLE_LIFETIME):
        if args.role == "hub":
            from aip.access import AccessPolicy
            from aip.hub import Hub, HubSettings

            # As ``dispatch serve --credentials FILE`` runs it: the file watched for changes.
            credential_file = CredentialFile(Path(args.credentials))
            access = AccessPolicy(credential_file.store)
            async with Hub(access, HubSettings(host=HOST, port=0), credential_file=credential_file) as hub:
                say(f"READY {hub.port}")
                await stdin.read()
        elif args.role in ("echo", "relay"):
            server = await (start_echo_server() if args.role == "echo" else relay_to(args.upstream))
            say(f"READY {server.sockets[0].getsockname()[1]}")
            await stdin.read()
            server.close()
            await server.wait_closed()
        elif args.role == "device":
            executor = echo_executor()
            ids = fleet_ids(args.prefix, args.count)
            async with running_devices(args.hub, ids[: args.warm], executor):
                if args.warm < args.count:
                    say(f"WARM {args.warm}")
                    await stdin.readline()
                async with running_devices(args.hub, ids[args.warm :], executor):
                    say(f"READY {args.count}")
                    await stdin.read()


# -- (a) one command at a time --------------------------------------------------------------------

Run = Callable[[list[Command]], Awaitable[None]]


@dataclass
class Subject:
    run: Run
    #: Processes whose CPU time is charged to this subject, by name ("here" is this process).
    processes: dict[str, int] = field(default_factory=dict)


@dataclass
class RoundTimes:
    """Per-call wall times, per-round medians and per-round CPU per call, by subject."""

    calls: dict[str, list[float]] = field(default_factory=dict)
    round_medians: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    async def block(self, label: str, subject: Subject, commands: list[list[Command]]) -> None:
        times: list[float] = []
        cpu_before = {name: process_cpu(pid) for name, pid in subject.processes.items()}
        for batch in commands:
            start = time.perf_counter()
            await subject.run(batch)
            times.append(time.perf_counter() - start)
        cpu = self.cpu.setdefault(label, {})
        for name, pid in subject.processes.items():
            cpu.setdefault(name, []).append((process_cpu(pid) - cpu_before[name]) / len(commands))
        self.calls.setdefault(label, []).extend(times)
        self.round_medians.setdefault(label, []).append(statistics.median(times))

    def median(self, label: str) -> float:
        return statistics.median(self.round_medians[label])

    def p99(self, label: str) -> float:
        return p99(self.calls[label])

    def cpu_per_call(self, label: str) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.cpu.get(label, {}).items()}


async def bench_single(
    groups: dict[str, dict[str, Subject]], calls: int, rounds: int, blob: str = ""
) -> dict[str, RoundTimes]:
    """Each group's subjects in turn, ``calls`` one-command batches per block, order rotating per round."""
    times = {name: RoundTimes() for name in groups}
    for rnd in range(-1, rounds):  # round -1 is a warm-up, not recorded
        order = list(groups) if rnd % 2 == 0 else list(reversed(groups))
        for name in order:
            target = times[name] if rnd >= 0 else RoundTimes()
            for label in rotation(list(groups[name]), rnd):
                batches = [[command] for command in echo_commands(calls, f"a{rnd}-{name}-{label}", blob)]
                await target.block(label, groups[name][label], batches)
    return times


def single_figures(times: RoundTimes, subject: str, baseline: str) -> dict[str, Any]:
    return {
        "baseline_ms": ms(times.median(baseline)),
        "ours_ms": ms(times.median(subject)),
        "ratio": round(times.median(subject) / times.median(baseline), 3),
        "baseline_p99_ms": ms(times.p99(baseline)),
        "ours_p99_ms": ms(times.p99(subject)),
        "p99_ratio": round(times.p99(subject) / times.p99(baseline), 3),
        "baseline_cpu_us": {name: us(value) for name, value in times.cpu_per_call(baseline).items()},
        "ours_cpu_us": {name: us(value) for name, value in times.cpu_per_call(subject).items()},
    }


# -- (b) commands per second ----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    workers: int
    size: int
    batches: int  # per worker

    @property
    def label(self) -> str:
        return f"{self.workers} x {self.size}"

    @property
    def commands(self) -> int:
        return self.workers * self.size * self.batches


async def load_rate(run: Run, load: Load, prefix: str) -> float:
    """Commands per second: ``workers`` loops, each sending its next batch once its last one is answered."""
    plans = [[echo_commands(load.size, f"{prefix}-{w}-{b}") for b in range(load.batches)] for w in range(load.workers)]

    async def worker(plan: list[list[Command]]) -> None:
        for batch in plan:
            await run(batch)

    start = time.perf_counter()
    async with asyncio.timeout(PHASE_TIMEOUT):
        await asyncio.gather(*(worker(plan) for plan in plans))
    return load.commands / (time.perf_counter() - start)


async def bench_throughput(
    subjects: dict[str, Subject], loads: Sequence[Load], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median commands per second, and median CPU per command (us, all the subject's processes), per subject and load.

    The order rotates per repetition; the first repetition is a warm-up.
    """
    runs = [(f"{name} {load.label}", subject, load) for name, subject in subjects.items() for load in loads]
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for rep in range(-1, repeats):
        for label, subject, load in rotation(runs, rep):
            before = sum(process_cpu(pid) for pid in subject.processes.values())
            rate = await load_rate(subject.run, load, f"b{rep}-{label.replace(' ', '')}")
            used = sum(process_cpu(pid) for pid in subject.processes.values()) - before
            if rep >= 0:
                rates.setdefault(label, []).append(rate)
                cpu.setdefault(label, []).append(used / load.commands)
    return (
        {label: round(statistics.median(values)) for label, values in rates.items()},
        {label: us(statistics.median(values)) for label, values in cpu.items()},
    )


# -- (c) memory per connection --------------------------------------------------------------------


def register_frame(device_id: str, dispatch: bool = False) -> str:
    """A register frame as UFO's device client sends it (see shared/vectors/ufo-aip-frames.jsonl).

    ``dispatch``: with the metadata our own DeviceClient adds (its tools).
    """
    now = now_iso()
    metadata: dict[str, Any] = {
        "system_info": {
            "device_id": device_id,
            "platform": "linux",
            "os_version": "#1 SMP PREEMPT_DYNAMIC",
            "cpu_count": 2,
            "memory_total_gb": 23.54,
            "hostname": "vm",
            "ip_address": "192.0.2.2",
            "supported_features": ["gui", "cli", "browser", "file_system", "office", "linux_apps"],
            "platform_type": "computer",
            "schema_version": "1.0",
            "custom_metadata": {},
        },
        "registration_time": now,
        "platform": "linux",
    }
    if dispatch:
        metadata[DISPATCH_METADATA] = {"tools": [{"name": "echo", "server": "memory", "description": "echo"}]}
    return ClientMessage(
        type=ClientMessageType.REGISTER, status=TaskStatus.OK, client_id=device_id, timestamp=now, metadata=metadata
    ).model_dump_json()


async def connect_ufo_devices(port: int, ids: Sequence[str], concurrency: int = 50) -> list[ClientConnection]:
    """Raw clients that register as UFO devices do: ``?token=``, a register frame, the acknowledgement read."""
    slots = asyncio.Semaphore(concurrency)
    connections: list[ClientConnection] = []

    async def one(device_id: str) -> None:
        async with slots:
            url = f"ws://{HOST}:{port}/ws?token={device_token(device_id)}"
            connection = await connect(url, open_timeout=START_TIMEOUT)
            connections.append(connection)
            await connection.send(register_frame(device_id))
            async with asyncio.timeout(START_TIMEOUT):
                ack = ServerMessage.model_validate_json(await connection.recv())
            if ack.type is not ServerMessageType.HEARTBEAT:
                raise broken(f"the hub refused device {device_id}: {ack.error}")

    try:
        async with asyncio.timeout(PHASE_TIMEOUT):
            await asyncio.gather(*(one(device_id) for device_id in ids))
    except BaseException:
        await close_all(connections)
        raise
    return connections


async def close_all(connections: Sequence[ClientConnection]) -> None:
    if connections:
        await asyncio.wait([asyncio.ensure_future(c.close()) for c in connections], timeout=30)


async def settled_memory(pid: int, pause: float = 1.0) -> dict[str, int]:
    await asyncio.sleep(pause)
    return memory_kib(pid)


async def count_devices(port: int, prefix: str) -> int:
    from aip.controller import list_devices

    devices = await list_devices(f"ws://{HOST}:{port}", controller_token(), timeout=START_TIMEOUT)
    return sum(1 for device in devices if str(device.get("id", "")).startswith(prefix))


def per_connection(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, float]:
    return {
        "before_kib": before["VmRSS"],
        "after_kib": after["VmRSS"],
        "kib_per_connection": round((after["VmRSS"] - before["VmRSS"]) / count, 1),
        "anon_kib_per_connection": round((after["RssAnon"] - before["RssAnon"]) / count, 1),
    }


async def bench_memory(count: int, warm: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": count}
    # 1. raw UFO-style clients in this process, the hub in a subprocess.
    warm_ids, ufo_ids = [f"warm-{i}" for i in range(warm)], [f"ufo-{i}" for i in range(count)]
    async with hub_role(warm_ids + ufo_ids) as hub:
        warm_connections = await connect_ufo_devices(hub.port, warm_ids)
        try:
            before = await settled_memory(hub.pid)
            started = time.perf_counter()
            connections = await connect_ufo_devices(hub.port, ufo_ids)
            connect_s = time.perf_counter() - started
            try:
                after = await settled_memory(hub.pid)
                connected = await count_devices(hub.port, "ufo-")
            finally:
                await close_all(connections)
        finally:
            await close_all(warm_connections)
    if connected != count:
        raise broken(f"{connected} of {count} raw devices were connected at the measurement")
    figures["hub_ufo"] = {**per_connection(before, after, count), "connect_s": round(connect_s, 2)}
    # 2. our DeviceClient, all in one subprocess; a fresh hub in another.
    async with hub_role(fleet_ids("ours", count + warm)) as hub:
        hub_url = f"ws://{HOST}:{hub.port}"
        args = ("device", "--hub", hub_url, "--count", str(count + warm), "--warm", str(warm), "--prefix", "ours")
        async with role(*args) as fleet:
            hub_before, fleet_before = await settled_memory(hub.pid), memory_kib(fleet.pid)
            fleet.tell("GO")
            await fleet.expect("READY", timeout=PHASE_TIMEOUT)
            hub_after, fleet_after = await settled_memory(hub.pid), memory_kib(fleet.pid)
            connected = await count_devices(hub.port, "ours-")
    if connected != count + warm:
        raise broken(f"{connected} of {count + warm} DeviceClients were connected")
    figures["hub_ours"] = per_connection(hub_before, hub_after, count)
    figures["device_client"] = per_connection(fleet_before, fleet_after, count)
    return figures


# -- profile (optional) ---------------------------------------------------------------------------


def bucket(filename: str, name: str) -> str:
    """Which component a profiled function's own time belongs to."""
    path = filename.replace("\\", "/")
    rules = [
        ("'poll' of 'select.epoll'" in name, "waiting for I/O (epoll)"),
        ("pydantic" in path or "pydantic_core" in name, "pydantic"),
        ("zlib" in name or "permessage_deflate" in path, "permessage-deflate (zlib)"),
        ("/websockets/" in path, "websockets"),
        ("_socket.socket" in name, "socket send/recv"),
        (path.endswith("aip/messages.py"), "aip/messages.py (serialiser)"),
        (path.endswith(("aip/hub.py", "aip/switchboard.py")), "hub (hub.py, switchboard.py)"),
        (
            path.endswith(("aip/device.py", "aip/device_session.py", "aip/call_memory.py")),
            "device (device.py, call_memory.py)",
        ),
        (path.endswith(("aip/controller.py", "dispatchers/remote.py")), "controller (controller.py, remote.py)"),
        ("/dispatchers/" in path, "executor (dispatchers/*)"),
        ("/asyncio/" in path or "select" in path or "epoll" in name or "_contextvars" in name, "asyncio"),
        ("/uuid.py" in path or "datetime" in name or "urandom" in name, "uuid4 / timestamps"),
    ]
    return next((label for matches, label in rules if matches), "other")


async def profile_in_process(calls: int) -> None:
    """cProfile ``calls`` in-process round trips; print own time by component and the top functions."""
    async with in_process_path() as path:
        ours = Ours(path.dispatcher)
        for batch in echo_commands(50, "pw"):
            await ours.run([batch])
        profiler = cProfile.Profile()
        commands = echo_commands(calls, "pr")
        profiler.enable()
        for command in commands:
            await ours.run([command])
        profiler.disable()
    stats = pstats.Stats(profiler)
    print_buckets(stats, calls, f"Profile: {calls} in-process round trips")
    print("Top functions by own time:")
    stats.sort_stats("tottime").print_stats(25)


def print_buckets(stats: pstats.Stats, calls: int, title: str) -> None:
    """Own time per round trip by component (``bucket``), the largest first."""
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    by_bucket: dict[str, float] = {}
    total = 0.0
    for (filename, _, name), (_, _, own, _, _) in raw.items():
        by_bucket[bucket(filename, name)] = by_bucket.get(bucket(filename, name), 0.0) + own
        total += own
    print(f"\n{title}, own time per round trip by component (under cProfile)")
    for name, own in sorted(by_bucket.items(), key=lambda item: -item[1]):
        print(f"  {name:<40} {own / calls * 1e6:8.1f} us  {own / total:6.1%}")


async def profile_processes(calls: int) -> None:
    """cProfile ``calls`` round trips with three processes: the controller here, the hub and the device in theirs.

    Timed in CPU time (``time.process_time``), not wall time: with more
    processes than cores, a ``send`` on loopback is charged the time its
    process spends preempted by the receiver it woke. The subprocesses'
    profiles cover their whole lives (start-up, warm-up and shutdown too), so
    their figures per round trip are a little high.
    """
    from dispatchers import WebSocketCommandDispatcher

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        hub_stats, device_stats = Path(folder) / "hub.prof", Path(folder) / "device.prof"
        async with hub_role(fleet_ids(DEVICE_ID, 1), profile=hub_stats) as hub:
            hub_url = f"ws://{HOST}:{hub.port}"
            device_args = ("device", "--hub", hub_url, "--count", "1", "--warm", "1", "--prefix", DEVICE_ID)
            async with (
                role(*device_args, profile=device_stats),
                await WebSocketCommandDispatcher.connect(
                    hub_url, f"{DEVICE_ID}-0", token=controller_token()
                ) as dispatcher,
            ):
                ours = Ours(dispatcher)
                for batch in echo_commands(50, "pw"):
                    await ours.run([batch])
                profiler = cProfile.Profile(time.process_time)
                commands = echo_commands(calls, "pp")
                profiler.enable()
                for command in commands:
                    await ours.run([command])
                profiler.disable()
        named = {
            f"Profile: {calls} round trips, 3 processes: the controller": pstats.Stats(profiler),
            "... the hub process (its whole life)": pstats.Stats(str(hub_stats)),
            "... the device process (its whole life)": pstats.Stats(str(device_stats)),
        }
    for title, stats in named.items():
        print_buckets(stats, calls, title)
        stats.sort_stats("tottime").print_stats(15)


# -- the run --------------------------------------------------------------------------------------


async def bench_all(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    loads = [Load(64, 1, args.batches_1), Load(8, 50, args.batches_50)]
    async with contextlib.AsyncExitStack() as stack:
        # In-process: hub, device, controller, echo servers, relay, clients.
        path = await stack.enter_async_context(in_process_path(with_raw_device=True))
        dispatcher = path.dispatcher
        controller_a = await stack.enter_async_context(
            connect(
                f"{path.hub_url}/controller", additional_headers=bearer(controller_token()), open_timeout=START_TIMEOUT
            )
        )
        controller_b = await stack.enter_async_context(
            connect(
                f"{path.hub_url}/controller", additional_headers=bearer(controller_token()), open_timeout=START_TIMEOUT
            )
        )
        echo_a, echo_b = await start_echo_server(), await start_echo_server()
        relay = await relay_to(server_url(echo_a))
        for server in (relay, echo_b, echo_a):
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)
        raw_a = await stack.enter_async_context(connect(server_url(echo_a)))
        raw_b = await stack.enter_async_context(connect(server_url(echo_b)))
        relayed = await stack.enter_async_context(connect(server_url(relay)))
        # Three processes: a hub and a device of their own, an echo server (two, for the A/A pair).
        hub = await stack.enter_async_context(hub_role(fleet_ids(DEVICE_ID, 1)))
        hub_url = f"ws://{HOST}:{hub.port}"
        device = await stack.enter_async_context(
            role("device", "--hub", hub_url, "--count", "1", "--warm", "1", "--prefix", DEVICE_ID)
        )
        far_echo_a = await stack.enter_async_context(role("echo"))
        far_echo_b = await stack.enter_async_context(role("echo"))
        # The floor: a relay process forwarding to an echo process of its own.
        relay_echo = await stack.enter_async_context(role("echo"))
        far_relay = await stack.enter_async_context(role("relay", "--upstream", f"ws://{HOST}:{relay_echo.port}"))
        relay_url = f"ws://{HOST}:{far_relay.port}"
        relay_processes = {"here": os.getpid(), "relay": far_relay.pid, "server": relay_echo.pid}
        from dispatchers import WebSocketCommandDispatcher

        far = await WebSocketCommandDispatcher.connect(hub_url, f"{DEVICE_ID}-0", token=controller_token())
        stack.push_async_callback(far.close)
        far_raw_a = await stack.enter_async_context(connect(f"ws://{HOST}:{far_echo_a.port}"))
        far_raw_b = await stack.enter_async_context(connect(f"ws://{HOST}:{far_echo_b.port}"))
        far_relayed = await stack.enter_async_context(connect(relay_url))

        here = os.getpid()
        groups = {
            "in_process": {
                "ours": Subject(Ours(dispatcher).run, {"here": here}),
                "raw": Subject(RawEcho(raw_a).run, {"here": here}),
                "raw_aa": Subject(RawEcho(raw_b).run, {"here": here}),
                "relay": Subject(RawEcho(relayed).run, {"here": here}),
                "hub": Subject(RawEcho(controller_a, RAW_DEVICE_ID).run, {"here": here}),
                "hub_device": Subject(RawEcho(controller_b, DEVICE_ID).run, {"here": here}),
            },
            "processes": {
                "ours": Subject(Ours(far).run, {"here": here, "hub": hub.pid, "device": device.pid}),
                "raw": Subject(RawEcho(far_raw_a).run, {"here": here, "server": far_echo_a.pid}),
                "raw_aa": Subject(RawEcho(far_raw_b).run, {"here": here, "server": far_echo_b.pid}),
                "relay": Subject(RawEcho(far_relayed).run, relay_processes),
            },
        }
        noise = Noise()
        async with asyncio.timeout(PHASE_TIMEOUT):
            times = await bench_single(groups, args.calls, args.rounds)
        if args.payload_kib > 0:
            large = {
                "ours": Subject(Ours(dispatcher).run, {"here": here}),
                "raw": Subject(RawEcho(raw_a).run, {"here": here}),
            }
            async with asyncio.timeout(PHASE_TIMEOUT):
                big = await bench_single(
                    {"large": large}, args.payload_calls, min(args.rounds, 10), screenshot_like(args.payload_kib)
                )
            figures["a_large"] = {
                "kib": args.payload_kib,
                "calls": args.payload_calls * min(args.rounds, 10),
                **single_figures(big["large"], "ours", "raw"),
            }
        figures["a_s"] = round(time.perf_counter() - noise.since, 1)
        figures["a_wait"] = noise.share()
        inner, outer = times["in_process"], times["processes"]
        figures["a"] = {
            "calls": args.calls * args.rounds,
            "in_process": single_figures(inner, "ours", "raw"),
            "in_process_aa": single_figures(inner, "raw_aa", "raw"),
            "in_process_relay": single_figures(inner, "relay", "raw"),
            "in_process_hub": single_figures(inner, "hub", "raw"),
            "in_process_hub_device": single_figures(inner, "hub_device", "raw"),
            "processes": single_figures(outer, "ours", "raw"),
            "processes_aa": single_figures(outer, "raw_aa", "raw"),
            "processes_relay": single_figures(outer, "relay", "raw"),
            "processes_vs_relay": single_figures(outer, "ours", "relay"),
            "target": TARGET_RATIO,
            "target_vs_relay": TARGET_RELAY_RATIO,
        }

        # (b): the pipelined raw clients need connections of their own.
        pipe_near = RawPipelined(await connect(server_url(echo_b)))
        stack.push_async_callback(pipe_near.close)
        pipe_far = RawPipelined(await connect(f"ws://{HOST}:{far_echo_b.port}"))
        stack.push_async_callback(pipe_far.close)
        pipe_relay = RawPipelined(await connect(relay_url))
        stack.push_async_callback(pipe_relay.close)
        noise = Noise()
        subjects = {
            "in-process ours": Subject(Ours(dispatcher).run, {"here": here}),
            "in-process raw": Subject(pipe_near.run, {"here": here}),
            "processes ours": Subject(Ours(far).run, {"here": here, "hub": hub.pid, "device": device.pid}),
            "processes raw": Subject(pipe_far.run, {"here": here, "server": far_echo_b.pid}),
            "processes relay": Subject(pipe_relay.run, relay_processes),
        }
        rates, cpu = await bench_throughput(subjects, loads, args.repeats)
        figures["b"] = {
            "loads": [load.label for load in loads],
            "commands_per_run": {load.label: load.commands for load in loads},
            "rates": rates,
            "cpu_us_per_command": cpu,
            "vs_relay": {
                load.label: round(rates[f"processes ours {load.label}"] / rates[f"processes relay {load.label}"], 3)
                for load in loads
            },
            "target_vs_relay": TARGET_RELAY_THROUGHPUT,
        }
        figures["b_s"] = round(time.perf_counter() - noise.since, 1)
        figures["b_wait"] = noise.share()
    if not args.skip_memory:
        soft, hard = raise_file_limit(2 * (args.devices + args.warm) + 256)
        count = args.devices
        if soft < 2 * (args.devices + args.warm) + 256:
            count = max(1, (soft - 256) // 2 - args.warm)
            print(
                f"RLIMIT_NOFILE is {soft} (hard {hard}): measuring (c) with {count} devices, not {args.devices}",
                file=sys.stderr,
            )
        started = time.perf_counter()
        figures["c"] = await bench_memory(count, args.warm)
        figures["c"]["nofile_limit"] = soft
        figures["c_s"] = round(time.perf_counter() - started, 1)
    return figures


def cpu_text(cpu: dict[str, float], names: Sequence[str]) -> str:
    return " + ".join(f"{cpu[name]:.0f}" for name in names if name in cpu) + f" = {sum(cpu.values()):.0f} us"


def print_figures(figures: dict[str, Any]) -> None:
    a = figures["a"]
    print()
    rows: list[tuple[str, ...]] = []

    def add(label: str, f: dict[str, Any]) -> None:
        medians = (f"{f['baseline_ms']:.3f}", f"{f['ours_ms']:.3f}", f"{f['ratio']:.2f}")
        tails = (f"{f['baseline_p99_ms']:.3f}", f"{f['ours_p99_ms']:.3f}", f"{f['p99_ratio']:.2f}")
        rows.append((label, *medians, *tails))

    add("(a) in-process, ours vs raw echo *", a["in_process"])
    add("    A/A: 2nd raw client, 2nd echo server", a["in_process_aa"])
    add("    floor: raw echo through a relay", a["in_process_relay"])
    add("    raw controller > hub > raw device", a["in_process_hub"])
    add("    raw controller > hub > DeviceClient", a["in_process_hub_device"])
    add("(a) 3 processes, ours vs raw echo", a["processes"])
    add("    A/A: 2nd raw client, 2nd echo process", a["processes_aa"])
    add("    raw echo through a relay process", a["processes_relay"])
    add("(a) 3 processes, ours vs the relay floor *", a["processes_vs_relay"])
    print(f"(a) one-command batch round trip, ms ({a['calls']} calls per subject; median of round medians, p99 pooled)")
    table(("case (* = headline)", "baseline", "ours", "ratio", "base p99", "ours p99", "p99 ratio"), rows)
    inner, outer = a["in_process"], a["processes"]
    steps = [
        ("raw echo", a["in_process"]["baseline_ms"]),
        ("2nd hop (relay)", a["in_process_relay"]["ours_ms"]),
        ("hub's own work", a["in_process_hub"]["ours_ms"]),
        ("DeviceClient+executor", a["in_process_hub_device"]["ours_ms"]),
        ("WebSocketCommandDispatcher", a["in_process"]["ours_ms"]),
    ]
    parts = [f"{steps[0][0]} {steps[0][1]:.3f}"]
    parts += [f"{name} {value - previous:+.3f}" for (name, value), (_, previous) in zip(steps[1:], steps, strict=False)]
    print(f"Where the in-process round trip goes, ms (differences of medians): {' | '.join(parts)}")
    print("CPU per round trip, us (median over rounds):")
    table(
        ("topology", "raw echo", "ours"),
        [
            (
                "in-process: this process",
                f"{inner['baseline_cpu_us']['here']:.0f} us",
                f"{inner['ours_cpu_us']['here']:.0f} us",
            ),
            (
                "3 processes: client + server",
                cpu_text(outer["baseline_cpu_us"], ("here", "server")),
                "",
            ),
            (
                "3 processes: client + relay + server",
                cpu_text(a["processes_relay"]["ours_cpu_us"], ("here", "relay", "server")),
                "",
            ),
            (
                "3 processes: controller + hub + device",
                "",
                cpu_text(outer["ours_cpu_us"], ("here", "hub", "device")),
            ),
        ],
    )
    large = figures.get("a_large")
    if large:
        print(
            f"(a) one command carrying {large['kib']} KiB (base64 of random bytes) there and back, in-process, "
            f"{large['calls']} calls: raw echo {large['baseline_ms']:.1f} ms, ours {large['ours_ms']:.1f} ms, "
            f"ratio {large['ratio']:.2f}; CPU {large['baseline_cpu_us']['here'] / 1000:.1f} / "
            f"{large['ours_cpu_us']['here'] / 1000:.1f} ms"
        )
    print(
        f"(a) target ratio <= {TARGET_RATIO:g} (in-process, medians): {inner['ratio']:.3f}, "
        f"{verdict(inner['ratio'] <= TARGET_RATIO)}"
    )
    floor = a["processes_vs_relay"]
    print(
        f"(a) target ratio <= {TARGET_RELAY_RATIO:g} (3 processes, ours vs the relay floor, medians): "
        f"{floor['ratio']:.3f}, {verdict(floor['ratio'] <= TARGET_RELAY_RATIO)}"
    )

    b = figures["b"]
    print()
    print("(b) commands per second to one device, workers x commands per batch, each worker with one batch in flight")
    rates = b["rates"]
    cpu = b["cpu_us_per_command"]
    rows_b = []
    for topology in ("in-process", "processes"):
        for load in b["loads"]:
            ours, raw = f"{topology} ours {load}", f"{topology} raw {load}"
            rows_b.append(
                (
                    f"{topology}, {load}",
                    f"{rates[raw]:,}",
                    f"{rates[ours]:,}",
                    f"{rates[ours] / rates[raw]:.2f}",
                    f"{cpu[raw]:.0f}",
                    f"{cpu[ours]:.0f}",
                )
            )
    table(("case", "raw echo /s", "ours /s", "ratio", "raw CPU us/cmd", "ours CPU us/cmd"), rows_b)
    print("(b) 3 processes, ours vs the floor: a raw pipelined client through the relay process to its echo process")
    rows_floor = [
        (
            f"processes, {load} *",
            f"{rates[f'processes relay {load}']:,}",
            f"{rates[f'processes ours {load}']:,}",
            f"{b['vs_relay'][load]:.2f}",
            f"{cpu[f'processes relay {load}']:.0f}",
            f"{cpu[f'processes ours {load}']:.0f}",
        )
        for load in b["loads"]
    ]
    table(("case (* = headline)", "relay /s", "ours /s", "ratio", "relay CPU us/cmd", "ours CPU us/cmd"), rows_floor)
    print(
        f"(b) target ratio >= {TARGET_RELAY_THROUGHPUT:g} (3 processes, ours / the pipelined relay): "
        + ", ".join(
            f"{load} {ratio:.2f} {verdict(ratio >= TARGET_RELAY_THROUGHPUT)}" for load, ratio in b["vs_relay"].items()
        )
    )

    print()
    print(
        "Noise: this process waited for a CPU "
        + ", ".join(
            f"{figures[key]:.0%} of {name}" for key, name in (("a_wait", "(a)"), ("b_wait", "(b)")) if figures.get(key)
        )
        + f" (schedstat); load average {figures['load_average_start']} at the start, "
        f"{figures.get('load_average_end')} at the end"
    )
    c = figures.get("c")
    if c:
        print()
        print(f"(c) memory per idle device connection, {c['devices']} devices (VmRSS delta / devices)")
        processes = {
            "hub_ufo": "hub process, raw UFO-style devices *",
            "hub_ours": "hub process, our DeviceClients",
            "device_client": "client process, per DeviceClient",
        }
        rows_c = [
            (
                label,
                f"{c[key]['before_kib'] / 1024:.1f} MiB",
                f"{c[key]['after_kib'] / 1024:.1f} MiB",
                f"{c[key]['kib_per_connection']:.1f}",
                f"{c[key]['anon_kib_per_connection']:.1f}",
            )
            for key, label in processes.items()
        ]
        table(("process", "before", "after", "KiB/conn", "anon KiB/conn"), rows_c)
        print(
            f"(c) target <= {TARGET_KIB_PER_CONNECTION:g} KiB per connection (hub, raw UFO-style devices): "
            f"{verdict(c['hub_ufo']['kib_per_connection'] <= TARGET_KIB_PER_CONNECTION)}; "
            f"{c['devices']} devices connected in {c['hub_ufo']['connect_s']} s"
        )


#: The options only a role subprocess uses: not part of a run's figures.
ROLE_OPTIONS = ("role", "hub", "upstream", "count", "prefix")


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, 100 devices")
    parser.add_argument("--rounds", type=int, default=20, help="rounds in (a) (default 20)")
    parser.add_argument("--calls", type=int, default=200, help="calls per subject and round in (a) (default 200)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions in (b) (default 7)")
    parser.add_argument("--batches-1", type=int, default=32, help="one-command batches per worker in (b)")
    parser.add_argument("--batches-50", type=int, default=20, help="50-command batches per worker in (b)")
    parser.add_argument("--devices", type=int, default=1000, help="idle devices in (c) (default 1000)")
    parser.add_argument("--warm", type=int, default=20, help="devices connected before the baseline in (c)")
    parser.add_argument("--payload-kib", type=int, default=256, help="size of the large result in (a); 0: skip")
    parser.add_argument("--payload-calls", type=int, default=5, help="calls per subject and round with it")
    parser.add_argument("--skip-memory", action="store_true", help="skip (c)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N in-process round trips")
    parser.add_argument("--role", choices=("hub", "echo", "relay", "device"), help=argparse.SUPPRESS)
    parser.add_argument("--hub", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--credentials", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="device", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        role_entry(args)
        return
    if args.quick:
        args.rounds, args.calls, args.repeats = 3, 50, 2
        args.batches_1, args.batches_50, args.devices, args.payload_calls = 4, 2, 100, 2
    if min(args.rounds, args.calls, args.repeats, args.batches_1, args.batches_50, args.devices) < 1:
        parser.error("every count must be at least 1")

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if v is not None and k not in ROLE_OPTIONS},
        "code": provenance.code,
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
    }
    figures.update(asyncio.run(bench_all(args)))
    provenance.finish(figures)
    figures["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    print_figures(figures)
    provenance.print(f"; {figures['elapsed_s']} s in all.")
    if args.profile:
        asyncio.run(profile_in_process(args.profile))
        asyncio.run(profile_processes(args.profile))
    print_json(figures)


if __name__ == "__main__":
    main()
