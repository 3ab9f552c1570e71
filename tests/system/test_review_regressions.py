"""One regression test per problem the review of the remote path found (hub, device, remote dispatcher, CLI).

Each test plays the reviewer's scenario in-process over real sockets on
127.0.0.1 (or runs the CLI as a subprocess), scaled down so it takes seconds,
and fails on the behaviour before the fix. Slow or distant links are played
by small TCP proxies that throttle or delay what passes through them. Every
wait is bounded with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from hub_support import (
    QUICK_BACKOFF,
    TOKEN,
    credentials_with,
    device_token,
    echo_tools,
    running_device,
    running_hub,
    self_signed_certificate,
    serving,
)
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import aip.device
from aip.access import AccessPolicy
from aip.backoff import Backoff
from aip.call_memory import CallMemory, MemoryLimits
from aip.controller import HubLink
from aip.device import DeviceClient
from aip.hub import Hub, HubSettings
from aip.messages import Command, Result, ResultStatus, ServerMessage, ServerMessageType, TaskStatus
from dispatchers import InMemoryCommandDispatcher, WebSocketCommandDispatcher
from dispatchers.base import error_result
from dispatchers.errors import ServerUnavailable
from dispatchers.memory import Tool

WAIT = 5.0  # seconds any single expected event may take
#: The hub's close code for a peer that does not read what it is sent.
TOO_SLOW = 4002
CLI = [sys.executable, "-m", "cli.main"]


# -- helpers -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dispatcher_for(hub: Hub, device: str, **options: Any) -> AsyncIterator[WebSocketCommandDispatcher]:
    link = HubLink(hub.url, TOKEN, open_timeout=WAIT, ssl_context=options.pop("ssl_context", None))
    async with WebSocketCommandDispatcher(link, device, **options) as dispatcher:
        yield dispatcher


def command(tool: str, call_id: str | None = None, **parameters: Any) -> Command:
    return Command(
        tool_name=tool, parameters=parameters, tool_type="data_collection", call_id=call_id or uuid.uuid4().hex
    )


def device_client(hub: Hub, url: str, device_id: str, tools: dict[str, Tool], **options: Any) -> DeviceClient:
    """A device reaching ``hub`` at ``url`` (the hub's, or a proxy's) with its own credential on that hub."""
    options.setdefault("backoff", QUICK_BACKOFF)
    token = device_token(hub, device_id)
    return DeviceClient(url, device_id, InMemoryCommandDispatcher(tools), token=token, **options)


Pipe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def plain_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def throttled_pipe(bytes_per_second: float) -> Pipe:
    """Passes bytes on at about ``bytes_per_second``: a slow uplink."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(16384):
            await asyncio.sleep(len(data) / bytes_per_second)
            writer.write(data)
            await writer.drain()

    return pipe


def delayed_pipe(seconds: float) -> Pipe:
    """Passes every byte on ``seconds`` after it came, in order: a distant link."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def later() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(later())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + seconds, data))
            queue.put_nowait((time.monotonic() + seconds, b""))
            await sender
        finally:
            sender.cancel()

    return pipe


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int, up: Pipe = plain_pipe, down: Pipe = plain_pipe) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:``target_port``; ``up`` carries client-to-target bytes, ``down`` the rest.

    Yields the proxy's port; on exit every connection through it is cut.
    """
    tasks: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def carry(pipe: Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await pipe(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend((client_writer, target_writer))
        both = asyncio.gather(
            carry(up, client_reader, target_writer), carry(down, target_reader, client_writer), return_exceptions=True
        )
        task = asyncio.ensure_future(both)
        tasks.add(task)
        await task

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        for writer in writers:
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)


def cli_env(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """This environment without any hub settings, plus ``token`` (None: none at all) and ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in ("DISPATCH_TOKEN", "DISPATCH_HUB")}
    if token is not None:
        env["DISPATCH_TOKEN"] = token
    return env | extra


async def run_cli(*args: str | Path, env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """``dispatch ARGS`` as a subprocess, the event loop running meanwhile: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *CLI, *map(str, args), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {}}))
    return path


# -- p1: a controller that does not read is closed; the hub does not buffer for it -----


async def test_a_controller_that_never_reads_is_closed_and_others_keep_working() -> None:
    # A device announcing many tools makes each device listing ~50 KB: what the hub must queue per request.
    tools = [{"name": f"tool_{i}", "server": "s", "description": "x" * 80} for i in range(400)]
    register = json.dumps(
        {"type": "register", "status": "ok", "client_id": "many-tools", "metadata": {"dispatch": {"tools": tools}}}
    )
    request = json.dumps({"type": "device_info_request", "status": "ok", "response_id": "r"})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        asyncio.timeout(30),
        running_hub(max_message_bytes=2**20) as hub,
        connect(
            f"ws://127.0.0.1:{hub.port}/ws",
            additional_headers={"Authorization": f"Bearer {device_token(hub, 'many-tools')}"},
            proxy=None,
        ) as big,
        running_device(hub, "worker"),
        dispatcher_for(hub, "worker") as dispatcher,
    ):
        await big.send(register)
        await big.recv()

        async def work(tag: str) -> None:
            batch = [command("echo", tag=tag, n=n) for n in range(3)]
            results = await dispatcher.execute_commands(batch, timeout=10)
            assert [r.status for r in results] == [ResultStatus.SUCCESS] * 3, [r.error for r in results]
            assert [r.result for r in results] == [c.parameters for c in batch]

        # The controller that never reads: a tiny receive window, and it stops pulling frames at once.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", hub.port))
        raw.setblocking(False)
        deaf = await connect(
            f"ws://127.0.0.1:{hub.port}/controller", sock=raw, additional_headers=headers, max_queue=1, proxy=None
        )
        try:
            await until(lambda: any(o.connection.remote_address == deaf.local_address for o in hub._outboxes.values()))
            [outbox] = [o for o in hub._outboxes.values() if o.connection.remote_address == deaf.local_address]

            def abandoned() -> bool:
                return bool(getattr(outbox, "abandoned", False))

            during = asyncio.create_task(work("during"))
            for _ in range(1000):  # ~50 MB of listings, if the hub kept them all
                if abandoned():
                    break
                await deaf.send(request)
            await until(abandoned)
            assert outbox.queue.qsize() == 0, "the frames queued for the closed controller are still held"
            assert outbox.queued == 0
            await during
            await work("after")  # the other controller and its device are unaffected
            # Read at last: what was already on the wire, then the hub's close.
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await deaf.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == TOO_SLOW, closed.value
        finally:
            await deaf.close()


# -- p9: a device sending a large result over a slow link is alive -------------------------


async def test_a_large_result_over_a_slow_link_is_not_taken_for_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aip.device, "FRAGMENT_CHARS", 2**16)
    shot = "A" * 2**20  # 1 MiB at 512 KiB/s: two seconds on the wire, ten of the hub's ping intervals
    async with (
        asyncio.timeout(30),
        running_hub(ping_interval=0.2, ping_timeout=5.0) as hub,
        tcp_proxy(hub.port, up=throttled_pipe(2**19)) as port,
    ):
        client = device_client(hub, f"ws://127.0.0.1:{port}", "slow-link", {"screenshot": lambda c: shot})
        client.heartbeat_interval = 0.3
        async with serving(client), dispatcher_for(hub, "slow-link") as dispatcher:
            started = time.monotonic()
            [result] = await dispatcher.execute_commands([command("screenshot")], timeout=20)
            elapsed = time.monotonic() - started
        assert result.status is ResultStatus.SUCCESS, result.error
        assert result.result == shot
        assert elapsed > 1.0, "the link was not slow: this test proves nothing"
        assert client.registrations == 1, "the device was dropped and came back"


# -- p5: with a distant device, the finished commands of a timed-out batch keep their results --


async def test_a_timed_out_batch_over_a_distant_link_keeps_the_finished_results() -> None:
    async with (
        asyncio.timeout(30),
        running_hub() as hub,
        tcp_proxy(hub.port, up=delayed_pipe(0.3), down=delayed_pipe(0.3)) as port,
    ):
        client = device_client(hub, f"ws://127.0.0.1:{port}", "far-pc", echo_tools())
        async with serving(client), dispatcher_for(hub, "far-pc") as dispatcher:
            batch = [command("echo", "fast", x=1), command("sleep", "slow", seconds=30)]
            started = time.monotonic()
            fast, slow = await dispatcher.execute_commands(batch, timeout=2)
            elapsed = time.monotonic() - started
    assert fast.status is ResultStatus.SUCCESS, fast.error
    assert fast.result == {"x": 1} and fast.call_id == "fast"
    assert slow.status is ResultStatus.FAILURE and slow.call_id == "slow"
    assert "TimeoutError" in (slow.error or ""), slow.error
    assert elapsed < 2.5 + 0.5, elapsed


# -- p11: a result that cannot be serialised is still answered ------------------------------


async def test_an_unserialisable_result_is_answered_and_leaves_nothing_running() -> None:
    tools: dict[str, Tool] = {"screenshot": lambda c: b"\xff\xd8\xff\xe0JFIF", "echo": lambda c: c.parameters}
    async with (
        asyncio.timeout(30),
        running_hub() as hub,
        running_device(hub, "jpeg-pc", tools) as device,
        dispatcher_for(hub, "jpeg-pc") as dispatcher,
    ):
        shot, echo = command("screenshot", "shot-1"), command("echo", "echo-1", x=1)
        started = time.monotonic()
        first_shot, first_echo = await dispatcher.execute_commands([shot, echo], timeout=10)
        assert time.monotonic() - started < 2.0, "answered only at the deadline"
        assert first_shot.status is ResultStatus.FAILURE and first_shot.call_id == "shot-1"
        assert "utf-8" in (first_shot.error or ""), f"the cause is not named: {first_shot.error}"
        # The sibling keeps its real result: only the command whose result can't travel fails.
        assert (first_echo.call_id, first_echo.status, first_echo.result) == ("echo-1", ResultStatus.SUCCESS, {"x": 1})
        assert not device.memory._running, f"call_ids left running: {list(device.memory._running)}"
        # Repeats are answered at once: the echo (it ran, so from memory), the screenshot (run again).
        started = time.monotonic()
        [again] = await dispatcher.execute_commands([echo], timeout=3)
        assert time.monotonic() - started < 1.0
        assert (again.status, again.result, again.call_id) == (ResultStatus.SUCCESS, {"x": 1}, "echo-1"), again
        started = time.monotonic()
        [shot_again] = await dispatcher.execute_commands([shot], timeout=3)
        assert time.monotonic() - started < 1.0
        assert shot_again.status is ResultStatus.FAILURE and "utf-8" in (shot_again.error or ""), shot_again
        assert not device.memory._running


# -- p10: two devices with the same id do not evict each other forever ---------------------


class Refusals(logging.Handler):
    """Counts the devices' reports that the hub refused them because their id is live elsewhere."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "already connected and answering" in record.getMessage():
            self.count += 1
            self.seen.set()


async def test_two_devices_with_the_same_id_do_not_flap() -> None:
    # Both hold the id's credential. The live one keeps the id; the newcomer is refused instead of
    # evicting it, and waits backoff.maximum before it asks again: nobody is evicted, nothing flaps.
    backoff = Backoff(initial=0.05, maximum=3.0, jitter=0.0)  # the refused one waits 3 s, past this test's window
    refusals = Refusals()
    device_log = logging.getLogger("aip.device")
    device_log.addHandler(refusals)
    try:
        async with asyncio.timeout(30), running_hub() as hub:
            first = device_client(hub, hub.url, "twin", echo_tools(), backoff=backoff)
            second = device_client(hub, hub.url, "twin", echo_tools(), backoff=backoff)
            stop_second = asyncio.Event()
            contender: asyncio.Task[None] | None = None
            try:
                async with serving(first), dispatcher_for(hub, "twin") as dispatcher:
                    contender = asyncio.create_task(second.run(stop_second))  # once the first holds the id
                    async with asyncio.timeout(WAIT):
                        await refusals.seen.wait()
                    results: list[Result] = []
                    window = time.monotonic() + 2.0
                    while time.monotonic() < window:
                        results += await dispatcher.execute_commands(
                            [command("sleep", seconds=0.2), command("echo", n=len(results))], timeout=5
                        )
                    during = (first.registrations, second.registrations, refusals.count)
                # The live twin left: the refused one gets the id on its next try.
                async with asyncio.timeout(backoff.maximum + WAIT):
                    await second.registered.wait()
            finally:
                stop_second.set()
                if contender is not None:
                    async with asyncio.timeout(WAIT):
                        await contender
    finally:
        device_log.removeHandler(refusals)
    assert during[:2] == (1, 0), f"(first, second) registrations in 2 s: {during[:2]}: the live one was evicted"
    assert during[2] in (1, 2), f"the refused twin asked {during[2]} times in 2 s: it did not back off"
    assert len(results) >= 10
    assert all(r.status is ResultStatus.SUCCESS for r in results), [r.error for r in results if r.error]
    assert second.registrations == 1


# -- p2: a failure is not remembered: a retry with the same call_id runs the tool ----------------


async def test_a_failure_that_never_reached_the_tool_is_not_replayed_from_memory() -> None:
    calls = 0
    server_up = False

    def click(command: Command) -> str:
        nonlocal calls
        calls += 1
        if not server_up:
            raise ServerUnavailable("server 'desktop' is restarting")
        return "clicked"

    async with (
        asyncio.timeout(30),
        running_hub() as hub,
        running_device(hub, "retry-pc", {"click": click}),
        dispatcher_for(hub, "retry-pc") as dispatcher,
    ):
        click_once = Command(tool_name="click", tool_type="action", call_id="call-1")
        [first] = await dispatcher.execute_commands([click_once], timeout=5)
        assert first.status is ResultStatus.FAILURE and "ServerUnavailable" in (first.error or ""), first
        server_up = True
        before = calls
        [retry] = await dispatcher.execute_commands([click_once], timeout=5)
    assert (retry.status, retry.result, retry.call_id) == (ResultStatus.SUCCESS, "clicked", "call-1"), retry
    assert calls == before + 1, "the retry did not run the tool"


# -- p6: the call memory is bounded in bytes ------------------------------------------------


async def test_the_call_memory_is_bounded_in_bytes() -> None:
    limit = 64 * 1024
    memory = CallMemory(MemoryLimits(bytes=limit))
    size = {"value": 10_000}

    async def run(commands: list[Command]) -> list[Result]:
        return [
            Result(status=ResultStatus.SUCCESS, result="A" * size["value"], call_id=c.call_id, namespace="m")
            for c in commands
        ]

    def fail(commands: list[Command], error: BaseException) -> list[Result]:
        return [error_result(c, error) for c in commands]

    async with asyncio.timeout(10):
        for n in range(50):  # ~500 KB of results through a 64 KiB memory
            await memory.execute([Command(tool_name="shot", call_id=f"shot-{n}")], run, fail)
        held = sum(len(text) for _, _, text, _ in memory._done.values())  # (stamp, fingerprint, text, failed_in)
        assert 0 < held <= limit, held
        assert memory._bytes == held
        assert memory.recall("shot-49") is not None, "the newest result was not kept"
        assert memory.recall("shot-0") is None, "the oldest result was kept past the byte limit"
        kept = len(memory)
        # A result larger than the whole memory is not kept, and pushes nothing out.
        size["value"] = 2 * limit
        await memory.execute([Command(tool_name="shot", call_id="huge")], run, fail)
        assert memory.recall("huge") is None
        assert len(memory) == kept and memory.recall("shot-49") is not None
    assert MemoryLimits().bytes <= 64 * 2**20


# -- p12: a batch sent before its device connects is delivered when it does -------------------


async def test_a_batch_sent_before_the_device_connects_is_delivered_when_it_comes() -> None:
    async with asyncio.timeout(30), running_hub() as hub, dispatcher_for(hub, "late-pc") as dispatcher:

        async def late_device(ready: asyncio.Event) -> None:
            await asyncio.sleep(1.5)  # the scenario: the device starts after the batch was sent
            async with running_device(hub, "late-pc"):
                await ready.wait()

        done = asyncio.Event()
        device = asyncio.create_task(late_device(done))
        try:
            started = time.monotonic()
            [result] = await dispatcher.execute_commands([command("echo", x=1)], timeout=20)
            elapsed = time.monotonic() - started
        finally:
            done.set()
            await device
    assert (result.status, result.result) == (ResultStatus.SUCCESS, {"x": 1}), result.error
    assert 1.5 <= elapsed < 8.0, elapsed


# -- p8: dispatch run --cafile, against a wss:// hub with a private CA --------------------------


async def test_run_cafile_reaches_a_wss_hub_with_a_private_ca(tmp_path: Path, prefect_api: str) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"tool_name": "echo", "parameters": {"over": "tls"}, "call_id": "tls-1"}]))
    async with (
        asyncio.timeout(90),
        Hub(AccessPolicy(credentials_with(["secure-pc"])), HubSettings(port=0), ssl_context=server_context) as hub,
        running_device(hub, "secure-pc", ssl_context=trusting),
    ):
        assert hub.url.startswith("wss://")
        code, out, err = await run_cli(
            "run",
            batch,
            "--hub",
            hub.url,
            "--device",
            "secure-pc",
            "--cafile",
            cert,
            "--timeout",
            "20",
            "--json",
            env=cli_env(PREFECT_API_URL=prefect_api),
            timeout=80,
        )
    assert code == 0, err[-2000:]
    [result] = json.loads(out)
    assert (result["status"], result["call_id"], result["result"]) == ("success", "tls-1", {"over": "tls"}), result


# -- p3: a credential the hub can never use is bad usage, said plainly -------------------------------


async def test_a_token_with_a_space_is_bad_usage_for_serve_and_device(empty_config: Path, tmp_path: Path) -> None:
    # The device reads its token; the hub reads a credentials file (digests only): here one where a
    # token was pasted in place of its sha256.
    secret = "secret with space"
    credentials = tmp_path / "credentials.json"
    entry = {"role": "device", "name": "x", "sha256": secret, "created": ""}
    credentials.write_text(json.dumps({"version": 1, "credentials": [entry]}))
    env = cli_env(token=secret)
    async with asyncio.timeout(40):
        (serve_code, _, serve_err), (device_code, _, device_err) = await asyncio.gather(
            run_cli("serve", "--port", "0", "--credentials", credentials, env=env, timeout=15),
            run_cli(
                "device", "--hub", "ws://127.0.0.1:1/ws", "--id", "x", "--config", empty_config, env=env, timeout=30
            ),
        )
    assert "token" in device_err and "space" in device_err, f"device: {device_err}"
    assert str(credentials) in serve_err and "sha256" in serve_err, f"serve: {serve_err}"
    for name, code, err in (("serve", serve_code, serve_err), ("device", device_code, device_err)):
        assert code == 2, f"{name} exited {code}: {err[-1500:]}"
        assert "Traceback" not in err and "ValueError" not in err, f"{name} printed a traceback: {err}"
        assert secret not in err, f"{name} echoed the token"


# -- p7: --token-in-query for a server that wants ?token=, with no token on the command line ------


async def test_device_token_in_query_reaches_a_query_only_server_and_stays_off_the_command_line(
    empty_config: Path,
) -> None:
    paths: list[str] = []
    registered = asyncio.Event()

    def only_query_tokens(connection: ServerConnection, request: Request) -> Response | None:
        paths.append(request.path)
        if f"token={TOKEN}" not in request.path:
            return connection.respond(401, "token missing from the query\n")
        return None

    async def ufo_server(connection: ServerConnection) -> None:
        await connection.recv()  # the register
        ack = ServerMessage(type=ServerMessageType.HEARTBEAT, status=TaskStatus.OK, response_id="ack")
        await connection.send(ack.model_dump_json())
        registered.set()
        with contextlib.suppress(ConnectionClosed):
            async for _ in connection:
                pass

    async with asyncio.timeout(40), serve(ufo_server, "127.0.0.1", 0, process_request=only_query_tokens) as server:
        port = server.sockets[0].getsockname()[1] if server.sockets else 0
        process = await asyncio.create_subprocess_exec(
            *CLI,
            "device",
            "--hub",
            f"ws://127.0.0.1:{port}/ws",
            "--id",
            "ufo-side",
            "--config",
            str(empty_config),
            "--token-in-query",
            cwd=ROOT,
            env=cli_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            exited = asyncio.ensure_future(process.wait())
            registering = asyncio.ensure_future(registered.wait())
            await asyncio.wait({exited, registering}, timeout=25, return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
            registering.cancel()
            if not registered.is_set():
                _, err = await process.communicate()
                pytest.fail(f"the device never registered (exit code {process.returncode}): {err.decode()[-1500:]}")
            command_line = await asyncio.to_thread(Path(f"/proc/{process.pid}/cmdline").read_bytes)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                _, err = await process.communicate()
    assert paths and all(f"token={TOKEN}" in path for path in paths), paths
    assert paths[0].startswith("/ws?"), paths
    assert TOKEN.encode() not in command_line
    assert TOKEN not in err.decode(), "the device logged the token"


# -- p4: dispatch devices lists a device whose announced tools are plain strings ---------------------


async def test_devices_table_lists_a_device_that_announced_tools_as_plain_strings() -> None:
    register = json.dumps(
        {
            "type": "register",
            "status": "ok",
            "client_id": "odd",
            "metadata": {"dispatch": {"tools": ["click", "type", {"name": "scroll", "server": "s"}]}},
        }
    )
    async with (
        asyncio.timeout(40),
        running_hub() as hub,
        connect(
            f"ws://127.0.0.1:{hub.port}/ws",
            additional_headers={"Authorization": f"Bearer {device_token(hub, 'odd')}"},
            proxy=None,
        ) as device,
    ):
        await device.send(register)
        await device.recv()
        code, out, err = await run_cli("devices", "--hub", hub.url, env=cli_env(), timeout=30)
    assert code == 0, err[-1500:]
    assert "odd" in out and "scroll" in out, out
    assert "Traceback" not in err
