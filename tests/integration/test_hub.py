"""The hub and the device client over real sockets on 127.0.0.1.

Where a test plays a peer by hand it uses plain ``websockets`` and the JSON of
``shared/aip-wire.md``, so what is checked is the wire, not our own client.
Each peer presents its own credential: a controller the ``TOKEN`` of
``hub_support``, a device the ``device_token`` bound to its id. Slow or
distant links are played by small TCP proxies (``tcp_proxy``) that throttle
or delay what passes through them. Every wait is bounded with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.typing import Origin

import aip.device
from aip.access import AccessPolicy
from aip.backoff import Backoff
from aip.connect import HubRefused, HubUnavailable, open_connection
from aip.controller import HubLink, list_devices
from aip.credential_file import CredentialFile, editing, read_store, write_store
from aip.credentials import CredentialStore, Role
from aip.device import DeviceClient
from aip.hub import Hub, HubSettings
from aip.messages import (
    ClientMessage,
    ClientMessageType,
    CloseCode,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from dispatchers import InMemoryCommandDispatcher, WebSocketCommandDispatcher
from dispatchers.errors import ServerUnavailable
from dispatchers.memory import Tool

#: Our hand-made peers log through this logger, kept quiet: what the tests
#: check for tokens is what the product logs, not what a test harness would.
_QUIET = logging.getLogger("test_hub.hand_peer")
_QUIET.setLevel(logging.WARNING)

WAIT = 5.0  # seconds any single expected event may take before the test fails


# -- hand-made peers ---------------------------------------------------------------


def hub_address(hub: Hub, path: str = "/ws", query: str = "") -> str:
    return f"ws://127.0.0.1:{hub.port}{path}{query}"


async def raw_connect(
    hub: Hub, path: str = "/ws", *, token: str | None = TOKEN, query: str = "", url: str | None = None, **options: Any
) -> ClientConnection:
    """A plain websockets connection, the token (if any) as a bearer header.

    ``TOKEN`` by default, the controller's credential (it opens ``/controller`` only);
    a device at ``/ws`` presents its own, ``device_token(hub, device_id)``.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with asyncio.timeout(WAIT):
        return await connect(
            url or hub_address(hub, path, query),
            additional_headers=headers,
            proxy=None,
            logger=_QUIET,
            open_timeout=WAIT,
            **options,
        )


@contextlib.asynccontextmanager
async def peer(hub: Hub, path: str = "/ws", **options: Any) -> AsyncIterator[ClientConnection]:
    connection = await raw_connect(hub, path, **options)
    try:
        yield connection
    finally:
        await connection.close()


async def refusal(hub: Hub, path: str = "/ws", **options: Any) -> tuple[int, str]:
    """The HTTP status and body the hub answers this connection attempt with (it must refuse it)."""
    with pytest.raises(InvalidStatus) as refused:
        connection = await raw_connect(hub, path, **options)
        await connection.close()
    response = refused.value.response
    return response.status_code, response.body.decode(errors="replace").strip() if response.body else ""


async def refusal_status(hub: Hub, path: str = "/ws", **options: Any) -> int:
    """The HTTP status the hub answers this connection attempt with (it must refuse it)."""
    status, _ = await refusal(hub, path, **options)
    return status


async def recv_json(connection: ClientConnection, seconds: float = WAIT) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        frame = await connection.recv()
    assert isinstance(frame, str), "AIP frames are text frames"
    message: dict[str, Any] = json.loads(frame)
    return message


async def close_frame(connection: ClientConnection, seconds: float = WAIT) -> Close:
    """The close frame the hub sends next; fails if any other frame comes first."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(seconds):
            frame = await connection.recv()
            pytest.fail(f"expected the connection to close, got a frame: {frame!r}")
    assert closed.value.rcvd is not None, "the hub closed without a close frame"
    return closed.value.rcvd


async def close_code(connection: ClientConnection, seconds: float = WAIT) -> int:
    """The close code the hub sends next; fails if any other frame comes first."""
    return (await close_frame(connection, seconds)).code


def register_frame(device_id: str | None, **overrides: Any) -> str:
    """A ``register`` as a UFO device sends it: every field, unset ones as null."""
    metadata = {
        "system_info": {
            "device_id": device_id,
            "platform": "linux",
            "os_version": "test",
            "cpu_count": 2,
            "hostname": "vm",
            "supported_features": ["gui", "cli"],
            "platform_type": "computer",
            "schema_version": "1.0",
            "custom_metadata": {},
        },
        "registration_time": datetime.datetime.now(datetime.UTC).isoformat(),
        "platform": "linux",
    }
    return client_frame("register", device_id, **{"metadata": metadata, **overrides})


def client_frame(kind: str, device_id: str | None = None, **fields: Any) -> str:
    """A device's frame in UFO's shape (every field present)."""
    frame: dict[str, Any] = {
        "type": kind,
        "status": "ok",
        "client_type": "device",
        "session_id": None,
        "task_name": None,
        "client_id": device_id,
        "target_id": None,
        "request": None,
        "action_results": None,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "request_id": None,
        "prev_response_id": None,
        "error": None,
        "metadata": None,
    }
    frame.update(fields)
    return json.dumps(frame)


@contextlib.asynccontextmanager
async def hand_device(hub: Hub, device_id: str, **options: Any) -> AsyncIterator[ClientConnection]:
    """A device played by hand, with its own credential: connected, registered, acknowledged; nothing more."""
    options.setdefault("token", device_token(hub, device_id))
    async with peer(hub, "/ws", **options) as connection:
        await connection.send(register_frame(device_id))
        ack = await recv_json(connection)
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
        yield connection


def controller_frame(kind: ServerMessageType, **fields: Any) -> str:
    status = fields.pop("status", TaskStatus.CONTINUE)
    return ServerMessage(type=kind, status=status, **fields).model_dump_json()


@contextlib.asynccontextmanager
async def dispatcher_for(hub: Hub, device: str, **options: Any) -> AsyncIterator[WebSocketCommandDispatcher]:
    link = HubLink(hub.url, TOKEN, open_timeout=WAIT, ssl_context=options.pop("ssl_context", None))
    async with WebSocketCommandDispatcher(link, device, **options) as dispatcher:
        yield dispatcher


class Gate:
    """A tool that starts, then waits for ``release``; it records being cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.runs = 0

    async def tool(self, command: Command) -> Any:
        self.runs += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return command.parameters


def tools_with(**extra: Tool) -> dict[str, Tool]:
    return {**echo_tools(), **extra}


def echo_batch(tag: str, count: int = 3) -> list[Command]:
    return [
        Command(tool_name="echo", parameters={"tag": tag, "n": n}, call_id=f"{tag}-{n}-{uuid.uuid4().hex[:8]}")
        for n in range(count)
    ]


def assert_echoed(commands: list[Command], results: list[Any]) -> None:
    assert [r.call_id for r in results] == [c.call_id for c in commands]
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * len(commands), [r.error for r in results]
    assert [r.result for r in results] == [c.parameters for c in commands]


#: The hub's close code for a peer that does not read what it is sent.
TOO_SLOW = 4002


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


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` holds; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


# -- who may connect ---------------------------------------------------------------


async def test_a_connection_without_a_token_is_refused_with_401() -> None:
    async with running_hub() as hub:
        assert await refusal_status(hub, "/ws", token=None) == 401
        assert await refusal_status(hub, "/controller", token=None) == 401


async def test_a_wrong_token_is_refused_with_401() -> None:
    async with running_hub() as hub:
        assert await refusal_status(hub, "/ws", token="not-the-token") == 401
        assert await refusal_status(hub, "/ws", token=None, query="?token=not-the-token") == 401
        assert await refusal_status(hub, "/controller", token=TOKEN + "x") == 401


async def test_a_token_in_the_query_is_accepted_as_a_ufo_client_sends_it() -> None:
    async with (
        running_hub() as hub,
        hand_device(hub, "ufo-query", token=None, query=f"?token={device_token(hub, 'ufo-query')}") as device,
    ):
        await device.send(client_frame("heartbeat", "ufo-query"))
        assert (await recv_json(device))["type"] == "heartbeat"
        devices = await list_devices(hub.url, TOKEN, timeout=WAIT)
        assert [d["id"] for d in devices] == ["ufo-query"]


async def test_an_origin_not_allowed_is_refused_with_403_and_an_allowed_one_admitted() -> None:
    policy = AccessPolicy(credentials_with(["from-console"]), origins=("https://console.example",))
    async with Hub(policy, HubSettings(port=0)) as hub:
        # Valid credentials each time: what is refused is the Origin, by the AccessPolicy.
        device = device_token(hub, "from-console")
        evil = await refusal(hub, "/ws", token=device, origin=Origin("https://evil.example"))
        assert evil == (403, "Origin not allowed")
        assert await refusal(hub, "/controller", origin=Origin("null")) == (403, "Origin not allowed")
        async with hand_device(hub, "from-console", origin=Origin("https://console.example")):
            pass
        async with peer(hub, "/controller", origin=Origin("https://console.example")) as controller:
            await controller.send(controller_frame(ServerMessageType.HEARTBEAT, status=TaskStatus.OK))
            assert (await recv_json(controller))["type"] == "heartbeat"


async def test_a_host_header_the_hub_does_not_answer_to_is_refused_with_403() -> None:
    async with running_hub() as hub:
        evil = f"ws://evil.example:{hub.port}/ws"
        token = device_token(hub, "via-localhost")
        # The TCP connection goes to 127.0.0.1; only the Host header says evil.example (DNS rebinding).
        refused = await refusal(hub, url=evil, token=token, host="127.0.0.1", port=hub.port)
        assert refused == (403, "Host not allowed")
        # ... while the loopback names are fine.
        localhost = f"ws://localhost:{hub.port}/ws"
        async with peer(hub, url=localhost, token=token, host="127.0.0.1", port=hub.port) as ok:
            await ok.send(register_frame("via-localhost"))
            assert (await recv_json(ok))["type"] == "heartbeat"


async def test_an_unknown_path_is_404() -> None:
    async with running_hub() as hub:
        assert await refusal_status(hub, "/nope") == 404
        assert await refusal_status(hub, "/ws/extra") == 404
        assert await refusal_status(hub, "/") == 404


async def test_the_token_never_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-9f8e7d6c5b4a"
    async with running_hub() as hub:
        device_secret, ufo_secret = device_token(hub, "logged"), device_token(hub, "logged-ufo")
        # Refused: a wrong bearer token, and a right token (header and query) on a wrong path.
        with pytest.raises(HubRefused) as wrong_token:
            await open_connection(hub_address(hub, "/ws"), wrong, open_timeout=WAIT)
        with pytest.raises(HubRefused) as wrong_path:
            await open_connection(hub_address(hub, "/nope", f"?token={TOKEN}"), TOKEN, open_timeout=WAIT)
        # Accepted: a device (bearer), a raw UFO-style connection (query) and a batch (the controller's token).
        async with running_device(hub, "logged"), dispatcher_for(hub, "logged") as dispatcher:
            ufo = hub_address(hub, "/ws", f"?token={ufo_secret}")
            connection = await open_connection(ufo, None, open_timeout=WAIT)
            await connection.send(register_frame("logged-ufo"))
            assert json.loads(await connection.recv())["type"] == "heartbeat"
            await connection.close()
            commands = echo_batch("log")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
    assert "401" in str(wrong_token.value) and "404" in str(wrong_path.value)
    secrets = {"the controller token": TOKEN, "the offered token": wrong}
    secrets |= {"a device token": device_secret, "a UFO device token": ufo_secret}
    for error in (wrong_token.value, wrong_path.value):
        assert not [what for what, secret in secrets.items() if secret in str(error)], str(error)
    assert caplog.records, "nothing was logged at all: the capture is not working"
    assert any("refused" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage()
        for what, secret in secrets.items():
            assert secret not in text, f"{record.name} logged {what}: {text}"
    assert not [what for what, secret in secrets.items() if secret in caplog.text]


async def test_a_device_told_to_send_its_token_in_the_query_never_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    """``token_in_query`` (the ``?token=`` a UFO server wants) works for our device client too, and the token
    stays out of the logs; a hub URL that carries ``?token=`` itself is refused before anything connects."""
    caplog.set_level(logging.DEBUG)
    async with running_hub() as hub:
        secret = device_token(hub, "query-token")
        with pytest.raises(ValueError, match="carries a credential") as in_device_url:
            DeviceClient(f"{hub.url}?token={secret}", "query-token", InMemoryCommandDispatcher(echo_tools()))
        with pytest.raises(ValueError, match="carries a credential") as in_controller_url:
            HubLink(f"{hub.url}?token={TOKEN}", open_timeout=WAIT)
        client = DeviceClient(
            hub.url,
            "query-token",
            InMemoryCommandDispatcher(echo_tools()),
            token=secret,
            token_in_query=True,
            backoff=QUICK_BACKOFF,
        )
        link = HubLink(hub.url, TOKEN, open_timeout=WAIT)
        async with serving(client), WebSocketCommandDispatcher(link, "query-token") as dispatcher:
            commands = echo_batch("q")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
            shown = {
                "repr(HubLink)": repr(link),
                "repr(WebSocketCommandDispatcher)": repr(dispatcher),
                "DeviceClient.url": client.url,
                "the refused device URL": str(in_device_url.value),
                "the refused controller URL": str(in_controller_url.value),
            }
    leaks = [f"log {r.name}: {r.getMessage()}" for r in caplog.records if TOKEN in r.getMessage()]
    leaks += [f"log {r.name}: {r.getMessage()}" for r in caplog.records if secret in r.getMessage()]
    leaks += [f"{where}: {text}" for where, text in shown.items() if TOKEN in text or secret in text]
    assert not leaks, leaks


# -- the first frame -------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        "garbage, not json",
        b"\x00\x01binary",
        client_frame("heartbeat", "early-beat"),
        register_frame(None),
        register_frame("bad-status", status="nonsense"),
    ],
    ids=["garbage", "binary", "heartbeat-first", "no-client-id", "bad-enum"],
)
async def test_a_first_frame_that_is_not_a_valid_register_gets_an_error_then_1008(first: str | bytes) -> None:
    async with (
        running_hub(register_timeout=2.0) as hub,
        peer(hub, token=device_token(hub, "newcomer")) as connection,
    ):
        await connection.send(first)
        refusal = await recv_json(connection)
        assert (refusal["type"], refusal["status"]) == ("error", "error")
        assert "register" in refusal["error"]
        assert await close_code(connection) == 1008
        assert await list_devices(hub.url, TOKEN, timeout=WAIT) == []


async def test_a_device_that_says_nothing_is_dropped_after_the_register_timeout() -> None:
    async with (
        running_hub(register_timeout=0.3) as hub,
        peer(hub, token=device_token(hub, "taciturn")) as connection,
    ):
        started = time.monotonic()
        refusal = await recv_json(connection)
        assert (refusal["type"], refusal["status"]) == ("error", "error")
        assert "register" in refusal["error"] and "0.3s" in refusal["error"]
        assert await close_code(connection) == 1008
        assert time.monotonic() - started < 3.0


# -- bad input never takes the hub down ----------------------------------------------


BAD_DEVICE_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("malformed json", "{not json", "malformed"),
    ("json array", "[1, 2, 3]", "malformed"),
    ("wrong type for type", '{"type": 5, "status": "ok"}', "type"),
    ("unknown message type", '{"type": "bogus", "status": "ok"}', "type"),
    ("missing status", '{"type": "heartbeat"}', "status"),
    ("wrong type for results", '{"type": "command_results", "status": "continue", "action_results": "no"}', "action"),
    ("a type the hub does not take", client_frame("task", "noisy", request="open notepad"), "task"),
    ("binary frame", b"\x00\xff\x10binary", "binary"),
    ("unknown prev_response_id", client_frame("command_results", "noisy", prev_response_id="no-such-batch"), "no-such"),
    ("results for no batch", client_frame("command_results", "noisy", action_results=[]), "prev_response_id"),
]


async def test_bad_input_gets_error_frames_and_never_takes_the_hub_down() -> None:
    limit = 64 * 1024
    gate = Gate()
    async with (
        running_hub(max_message_bytes=limit) as hub,
        running_device(hub, "steady", tools_with(gate=gate.tool)),
        dispatcher_for(hub, "steady") as dispatcher,
    ):
        # A batch is in flight on the steady device the whole time.
        commands = [Command(tool_name="gate", parameters={"held": True}, call_id="held-1"), *echo_batch("steady")]
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=20))
        async with asyncio.timeout(WAIT):
            await gate.started.wait()

        async with hand_device(hub, "noisy") as noisy:
            for name, frame, hint in BAD_DEVICE_FRAMES:
                await noisy.send(frame)
                reply = await recv_json(noisy)
                assert (reply["type"], reply["status"]) == ("error", "error"), (name, reply)
                assert hint in reply["error"], (name, reply["error"])
            # The connection was kept through all of it.
            await noisy.send(client_frame("heartbeat", "noisy"))
            assert (await recv_json(noisy))["type"] == "heartbeat"

            async with peer(hub, "/controller") as controller:
                bad_controller_frames: list[tuple[str | bytes, str]] = [
                    ("{nope", "rejected"),
                    (b"\x01\x02", "rejected"),
                    ('{"type": "command"}', "rejected"),
                    ('{"type": "launch", "status": "ok"}', "rejected"),
                    (controller_frame(ServerMessageType.COMMAND, target_id="steady", actions=[]), "rejected"),
                    (controller_frame(ServerMessageType.TASK, response_id="t-1"), "rejected"),
                    (
                        controller_frame(ServerMessageType.COMMAND, response_id="r-1", target_id="nobody"),
                        "device_unavailable",
                    ),
                ]
                for frame, reason in bad_controller_frames:
                    await controller.send(frame)
                    reply = await recv_json(controller)
                    assert reply["type"] == "error" and reply["error"], (frame, reply)
                    assert reply["metadata"]["reason"] == reason, (frame, reply)
                # A cancel for a batch that does not exist is ignored, silently: the next answer is the heartbeat's.
                await controller.send(controller_frame(ServerMessageType.TASK_END, response_id="never-sent"))
                await controller.send(controller_frame(ServerMessageType.HEARTBEAT, status=TaskStatus.OK))
                assert (await recv_json(controller))["type"] == "heartbeat"

                # Frames over the limit end that connection with 1009, and only that one.
                await controller.send("x" * (limit + 1))
                assert await close_code(controller) == 1009
            await noisy.send(client_frame("heartbeat", "noisy", request="y" * (limit + 1)))
            assert await close_code(noisy) == 1009

        assert not batch.done(), "the held batch finished before its tool was released"
        gate.release.set()
        async with asyncio.timeout(WAIT * 2):
            results = await batch
        assert_echoed(commands, results)
        after = echo_batch("after")
        assert_echoed(after, await dispatcher.execute_commands(after, timeout=10))
        assert [d["id"] for d in await list_devices(hub.url, TOKEN, timeout=WAIT)] == ["steady"]


# -- a property: nothing a peer sends disturbs another peer's batch ---------------------------

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_json = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_statuses = st.sampled_from([s.value for s in TaskStatus]) | _json
_ids = st.sampled_from(["noisy-prop", "steady-prop", "nobody"]) | st.text(max_size=10) | _json


def _frame_objects(types: list[str]) -> st.SearchStrategy[str]:
    commands = st.fixed_dictionaries(
        {"tool_name": st.sampled_from(["echo", "nope"]) | _json},
        optional={
            "parameters": _json,
            "tool_type": st.sampled_from(["", "action", "data_collection"]) | _json,
            "call_id": st.text(max_size=8) | _json,
            "timeout": st.floats() | _json,
        },
    )
    results = st.fixed_dictionaries(
        {"status": st.sampled_from([s.value for s in ResultStatus]) | _json},
        optional={"call_id": st.text(max_size=8) | _json, "result": _json},
    )
    return st.fixed_dictionaries(
        {"type": st.sampled_from(types) | _json},
        optional={
            "status": _statuses,
            "client_id": _ids,
            "target_id": _ids,
            "response_id": st.text(max_size=10) | _json,
            "prev_response_id": st.text(max_size=10) | _json,
            "actions": st.lists(commands, max_size=3) | _json,
            "action_results": st.lists(results, max_size=3) | _json,
            "metadata": _json,
            "timeout": st.floats() | _json,
        },
    ).map(json.dumps)


_short = st.text(max_size=10)
_small_objects = st.none() | st.dictionaries(st.text(max_size=5), _json_leaf, max_size=2)
# Frames our own models accept, of every message type: whatever a peer may legally send.
_well_formed_device_frames = st.builds(
    ClientMessage,
    type=st.sampled_from(ClientMessageType),
    status=st.sampled_from(TaskStatus),
    client_id=st.none() | st.sampled_from(["noisy-prop", "steady-prop"]) | _short,
    request_id=st.none() | _short,
    prev_response_id=st.none() | _short,
    action_results=st.none()
    | st.lists(
        st.builds(Result, status=st.sampled_from(ResultStatus), call_id=st.none() | _short, result=_json_leaf),
        max_size=2,
    ),
    metadata=_small_objects,
).map(lambda message: message.model_dump_json())
_well_formed_controller_frames = st.builds(
    ServerMessage,
    type=st.sampled_from(ServerMessageType),
    status=st.sampled_from(TaskStatus),
    response_id=st.none() | _short,
    target_id=st.none() | st.sampled_from(["noisy-prop", "steady-prop", "nobody"]) | _short,
    actions=st.none()
    | st.lists(
        st.builds(
            Command,
            tool_name=st.sampled_from(["echo", "nope"]),
            parameters=_small_objects,
            tool_type=st.sampled_from(["", "action", "data_collection", "demo"]),
            call_id=st.none() | _short,
        ),
        max_size=2,
    ),
    timeout=st.none() | st.floats(min_value=0.01, max_value=5),
).map(lambda message: message.model_dump_json())


def _frames(types: list[str], well_formed: st.SearchStrategy[str]) -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        st.text(max_size=60), st.binary(max_size=60), _json.map(json.dumps), _frame_objects(types), well_formed
    )


_device_frames = _frames([t.value for t in ClientMessageType], _well_formed_device_frames)
_controller_frames = _frames([t.value for t in ServerMessageType], _well_formed_controller_frames)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    device_frames=st.lists(_device_frames, min_size=1, max_size=8),
    controller_frames=st.lists(_controller_frames, min_size=1, max_size=8),
)
async def test_no_malformed_traffic_disturbs_a_real_batch(
    device_frames: list[str | bytes], controller_frames: list[str | bytes]
) -> None:
    gate = Gate()
    async with (
        running_hub() as hub,
        running_device(hub, "steady-prop", tools_with(gate=gate.tool)),
        dispatcher_for(hub, "steady-prop") as dispatcher,
        hand_device(hub, "noisy-prop") as noisy,
        peer(hub, "/controller") as controller,
    ):
        commands = [
            Command(tool_name="gate", parameters={"held": 1}, call_id=f"g-{uuid.uuid4()}"),
            *echo_batch("prop", 2),
        ]
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=20))
        async with asyncio.timeout(WAIT):
            await gate.started.wait()
        for device_frame, controller_frame_ in zip(device_frames, controller_frames, strict=False):
            await noisy.send(device_frame)
            await controller.send(controller_frame_)
        for frame in device_frames[len(controller_frames) :]:
            await noisy.send(frame)
        for frame in controller_frames[len(device_frames) :]:
            await controller.send(frame)

        # Both connections are still served: a marked probe on each comes back.
        marker = f"probe-{uuid.uuid4()}"
        await noisy.send(client_frame("command_results", "noisy-prop", prev_response_id=marker))
        await controller.send(
            controller_frame(ServerMessageType.DEVICE_INFO_REQUEST, status=TaskStatus.OK, response_id=marker)
        )
        async with asyncio.timeout(WAIT):
            while marker not in ((await recv_json(noisy)).get("error") or ""):
                pass
            while (reply := await recv_json(controller)).get("prev_response_id") != marker:
                pass
        assert reply["type"] == "device_info_response"
        assert {d["id"] for d in reply["metadata"]["devices"]} == {"steady-prop", "noisy-prop"}

        assert not batch.done()
        gate.release.set()
        async with asyncio.timeout(WAIT * 2):
            assert_echoed(commands, await batch)


# -- a UFO device, written from the wire spec alone --------------------------------


async def test_a_ufo_style_device_runs_a_batch_from_the_dispatcher() -> None:
    seen: list[dict[str, Any]] = []
    acks: list[dict[str, Any]] = []

    async def ufo_device(connection: ClientConnection, answer_after: float) -> None:
        async def beat() -> None:
            while True:
                await connection.send(client_frame("heartbeat", "ufo-pc"))
                await asyncio.sleep(0.1)

        heartbeats = asyncio.create_task(beat())
        try:
            async for frame in connection:
                message = json.loads(frame)
                if message["type"] == "heartbeat":
                    acks.append(message)
                elif message["type"] == "command":
                    seen.append(message)
                    await asyncio.sleep(answer_after)  # the tools take a while; heartbeats go on meanwhile
                    results = [
                        {
                            "status": "success",
                            "error": None,
                            "result": {"tool_name": action["tool_name"], "parameters": action["parameters"]},
                            "namespace": "peer_echo",
                            "call_id": action["call_id"],
                        }
                        for action in message["actions"]
                    ]
                    await connection.send(
                        client_frame(
                            "command_results",
                            "ufo-pc",
                            status="continue",
                            session_id=message["session_id"],
                            prev_response_id=message["response_id"],
                            request_id=str(uuid.uuid4()),
                            action_results=results,
                        )
                    )
        finally:
            heartbeats.cancel()

    # The hub pings every 0.1 s; the device answers the batch after 0.8 s, kept alive by its pongs meanwhile.
    async with (
        running_hub(ping_interval=0.1, ping_timeout=2.0) as hub,
        peer(hub, "/ws", token=None, query=f"?token={device_token(hub, 'ufo-pc')}") as connection,
    ):
        await connection.send(register_frame("ufo-pc"))
        ack = await recv_json(connection)
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
        device = asyncio.create_task(ufo_device(connection, answer_after=0.8))
        try:
            commands = [
                Command(tool_name="click_input", parameters={"id": "12"}, tool_type="action", call_id="c-1"),
                Command(tool_name="get_desktop_app_info", tool_type="data_collection", call_id="c-2"),
                Command(tool_name="type_text", parameters={"text": "hello"}, call_id="c-3"),
            ]
            async with dispatcher_for(
                hub,
                "ufo-pc",
                session_id="s-1",
                agent_name="HostAgent",
                process_name="notepad.exe",
                root_name="NOTEPAD.EXE",
            ) as dispatcher:
                results = await dispatcher.execute_commands(commands, timeout=10)
            listed = await list_devices(hub.url, TOKEN, timeout=WAIT)
        finally:
            device.cancel()
            await asyncio.gather(device, return_exceptions=True)

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 3, [r.error for r in results]
    assert [r.call_id for r in results] == ["c-1", "c-2", "c-3"]
    assert [r.result["tool_name"] for r in results] == ["click_input", "get_desktop_app_info", "type_text"]
    assert results[2].result["parameters"] == {"text": "hello"}
    assert results[0].namespace == "peer_echo"

    [command] = seen
    assert [a["tool_type"] for a in command["actions"]] == ["action", "data_collection", "action"]
    assert [a["call_id"] for a in command["actions"]] == ["c-1", "c-2", "c-3"]
    assert (command["status"], command["session_id"], command["agent_name"]) == ("continue", "s-1", "HostAgent")
    assert (command["process_name"], command["root_name"]) == ("notepad.exe", "NOTEPAD.EXE")
    assert command["response_id"]
    assert "target_id" not in command, "the routing field must not reach a UFO device"
    assert acks and all((a["type"], a["status"]) == ("heartbeat", "ok") for a in acks)
    [entry] = listed
    assert (entry["id"], entry["kind"], entry["platform"]) == ("ufo-pc", "ufo", "linux")
    assert entry["system_info"]["hostname"] == "vm"


# -- reconnects, silence, drops --------------------------------------------------------


async def test_a_reconnecting_device_replaces_its_stale_connection_once_it_is_found_dead() -> None:
    async with (
        running_hub(probe_timeout=0.5) as hub,
        hand_device(hub, "twin") as stale,
        dispatcher_for(hub, "twin") as dispatcher,
    ):
        stranded = echo_batch("stranded", 1)
        started = time.monotonic()
        pending = asyncio.create_task(dispatcher.execute_commands(stranded, timeout=30))
        assert (await recv_json(stale))["type"] == "command"
        # The old connection hangs (a machine asleep, a dead NAT entry): it reads nothing, so it answers no ping.
        stale.transport.pause_reading()
        async with running_device(hub, "twin"):
            # The batch the stale connection held fails now, not at its deadline.
            async with asyncio.timeout(WAIT):
                [lost] = await pending
            elapsed = time.monotonic() - started
            # Reading again, the stale connection finds the hub closed it as replaced, for not answering.
            stale.transport.resume_reading()
            replaced = await close_frame(stale)
            assert replaced.code == CloseCode.REPLACED and "ping" in replaced.reason, replaced
            commands = echo_batch("twin")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
            devices = await list_devices(hub.url, TOKEN, timeout=WAIT)
    assert [(d["id"], d["kind"]) for d in devices] == [("twin", "dispatch")]
    assert lost.status is ResultStatus.FAILURE and lost.call_id == stranded[0].call_id
    assert "twin" in (lost.error or "") and "ConnectionLost" in (lost.error or ""), lost.error
    assert elapsed < 10


async def test_a_live_connection_keeps_its_id_and_a_newcomer_with_the_same_credential_gets_4004() -> None:
    async with (
        running_hub() as hub,
        hand_device(hub, "twin") as original,
        dispatcher_for(hub, "twin") as dispatcher,
    ):
        # The original answers the hub's ping (websockets does, even while nobody calls recv): it is not replaced.
        async with peer(hub, "/ws", token=device_token(hub, "twin")) as newcomer:
            await newcomer.send(register_frame("twin"))
            refusal = await recv_json(newcomer)
            assert (refusal["type"], refusal["status"]) == ("error", "error"), refusal
            assert "already connected" in refusal["error"], refusal
            assert await close_code(newcomer) == CloseCode.DUPLICATE
        # The original heard nothing of it: the next frame it gets is its own heartbeat's answer...
        await original.send(client_frame("heartbeat", "twin"))
        assert (await recv_json(original))["type"] == "heartbeat"
        # ... and it still serves: a batch reaches it and its answer comes back.
        commands = echo_batch("kept", 1)
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=20))
        command = await recv_json(original)
        assert command["type"] == "command", command
        [action] = command["actions"]
        result = {
            "status": "success",
            "error": None,
            "result": action["parameters"],
            "namespace": None,
            "call_id": action["call_id"],
        }
        await original.send(
            client_frame(
                "command_results",
                "twin",
                status="continue",
                prev_response_id=command["response_id"],
                action_results=[result],
            )
        )
        async with asyncio.timeout(WAIT):
            assert_echoed(commands, await batch)
        devices = await list_devices(hub.url, TOKEN, timeout=WAIT)
    assert [(d["id"], d["kind"]) for d in devices] == [("twin", "ufo")]


async def test_a_device_client_whose_connection_is_taken_comes_back_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's connection hangs and another with its credential takes the id; once it is free, it is back."""
    opened: asyncio.Queue[ClientConnection] = asyncio.Queue()

    async def recording(*args: Any, **kwargs: Any) -> ClientConnection:
        connection = await open_connection(*args, **kwargs)
        opened.put_nowait(connection)
        return connection

    monkeypatch.setattr("aip.device.open_connection", recording)
    async with running_hub(probe_timeout=0.5) as hub, running_device(hub, "phoenix") as client:
        assert client.registrations == 1
        first = opened.get_nowait()
        first.transport.pause_reading()  # the client's connection hangs: it answers no ping
        async with hand_device(hub, "phoenix") as usurper:  # registered: the hung connection was replaced
            first.transport.resume_reading()
            async with asyncio.timeout(WAIT):
                await first.wait_closed()
            assert first.close_code == CloseCode.REPLACED
            # The client dials in again by itself; while the usurper holds the id and answers, it is refused.
            async with asyncio.timeout(WAIT):
                retry = await opened.get()
                await retry.wait_closed()
            assert retry.close_code == CloseCode.DUPLICATE
            assert client.registrations == 1 and not client.registered.is_set()
            await usurper.send(client_frame("heartbeat", "phoenix"))
            assert (await recv_json(usurper))["type"] == "heartbeat"
            [held] = await list_devices(hub.url, TOKEN, timeout=WAIT)
            assert (held["id"], held["kind"]) == ("phoenix", "ufo")
        # The usurper left: the client's next try takes its id back.
        async with asyncio.timeout(WAIT):
            await client.registered.wait()
        assert client.registrations == 2
        async with dispatcher_for(hub, "phoenix") as dispatcher:
            commands = echo_batch("phoenix")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
        [back] = await list_devices(hub.url, TOKEN, timeout=WAIT)
        assert (back["id"], back["kind"]) == ("phoenix", "dispatch")


async def test_a_device_cannot_answer_a_batch_sent_to_another_device() -> None:
    async with (
        running_hub() as hub,
        hand_device(hub, "right-pc") as right,
        hand_device(hub, "wrong-pc") as wrong,
        dispatcher_for(hub, "right-pc") as dispatcher,
    ):
        commands = echo_batch("whose", 1)
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=20))
        command = await recv_json(right)
        response_id = command["response_id"]

        def answer(device_id: str, value: str) -> str:
            result = {"status": "success", "error": None, "result": value, "namespace": None, "call_id": None}
            result["call_id"] = command["actions"][0]["call_id"]
            return client_frame(
                "command_results", device_id, status="continue", prev_response_id=response_id, action_results=[result]
            )

        await wrong.send(answer("wrong-pc", "forged"))
        refusal = await recv_json(wrong)
        assert refusal["type"] == "error" and response_id in refusal["error"], refusal
        await right.send(answer("right-pc", "genuine"))
        async with asyncio.timeout(WAIT):
            [result] = await batch
    assert (result.status, result.result) == (ResultStatus.SUCCESS, "genuine")


async def test_a_controller_cannot_cancel_or_take_over_another_controllers_batch() -> None:
    gate = Gate()
    async with (
        running_hub() as hub,
        running_device(hub, "shared", tools_with(gate=gate.tool)),
        peer(hub, "/controller") as owner,
        peer(hub, "/controller") as other,
    ):
        batch = controller_frame(
            ServerMessageType.COMMAND,
            response_id="batch-1",
            target_id="shared",
            actions=[Command(tool_name="gate", parameters={"v": 1}, call_id="g-1")],
            timeout=30,
        )
        await owner.send(batch)
        async with asyncio.timeout(WAIT):
            await gate.started.wait()
        await other.send(controller_frame(ServerMessageType.TASK_END, status=TaskStatus.FAILED, response_id="batch-1"))
        await other.send(batch)  # the same response_id, from someone else
        taken = await recv_json(other)
        assert taken["type"] == "error" and taken["metadata"]["reason"] == "rejected", taken
        assert "already in use" in taken["error"]
        # A round trip through the device: whatever the hub queued for it before has reached it.
        probe = controller_frame(
            ServerMessageType.COMMAND,
            response_id="probe-1",
            target_id="shared",
            actions=[Command(tool_name="echo", parameters={"probe": True}, call_id="p-1")],
            timeout=30,
        )
        await owner.send(probe)
        assert (await recv_json(owner))["prev_response_id"] == "probe-1"
        assert not gate.cancelled.is_set(), "another controller's task_end stopped the batch"
        gate.release.set()
        answer = await recv_json(owner)
        assert answer["prev_response_id"] == "batch-1" and answer["action_results"][0]["result"] == {"v": 1}
        # The other controller heard nothing of it: its next frame is its heartbeat's answer.
        await other.send(controller_frame(ServerMessageType.HEARTBEAT, status=TaskStatus.OK))
        assert (await recv_json(other))["type"] == "heartbeat"


async def test_a_ufo_device_gets_no_cancel_and_its_late_answer_is_dropped_quietly() -> None:
    async with running_hub() as hub, hand_device(hub, "ufo-late") as device:
        async with peer(hub, "/controller") as controller:
            await controller.send(
                controller_frame(
                    ServerMessageType.COMMAND,
                    response_id="late-1",
                    target_id="ufo-late",
                    actions=[Command(tool_name="click_input", call_id="c-1")],
                )
            )
            command = await recv_json(device)
            assert command["response_id"] == "late-1"
        # The controller left; once the hub has let go of the batch, the device answers it anyway.
        async with asyncio.timeout(WAIT):
            while (await list_devices(hub.url, TOKEN, timeout=WAIT))[0]["pending_batches"]:
                pass
        late = {"status": "success", "error": None, "result": "done", "namespace": None, "call_id": "c-1"}
        answer = client_frame(
            "command_results", "ufo-late", status="continue", prev_response_id="late-1", action_results=[late]
        )
        await device.send(answer)
        await device.send(client_frame("heartbeat", "ufo-late"))
        # Nothing in between: no task_end (a UFO device cannot stop a batch), no error for the late answer.
        reply = await recv_json(device)
        assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply


async def test_a_device_that_stops_answering_pings_fails_its_pending_batch_soon_after_the_ping_timeout() -> None:
    """A fake: a plain websockets peer whose reading is paused once the batch reaches it, so no pong comes back."""
    batch_timeout = 30.0
    async with (
        running_hub(ping_interval=0.2, ping_timeout=0.5) as hub,
        hand_device(hub, "mute-pc", ping_interval=None) as mute,
        dispatcher_for(hub, "mute-pc") as dispatcher,
    ):
        started = time.monotonic()
        commands = echo_batch("mute", 2)
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=batch_timeout))
        delivered = await recv_json(mute)  # the batch did reach the device, which then reads nothing more
        assert delivered["type"] == "command"
        mute.transport.pause_reading()
        async with asyncio.timeout(WAIT * 2):
            results = await batch
        elapsed = time.monotonic() - started
        assert not await list_devices(hub.url, TOKEN, timeout=WAIT), "the hub still holds the mute device"
        mute.transport.resume_reading()
        with pytest.raises(ConnectionClosed):  # the hub dropped the connection: no closing handshake with the dead
            async with asyncio.timeout(WAIT):
                while True:
                    await mute.recv()
    assert elapsed < batch_timeout / 3, f"the failure took {elapsed:.1f}s: it waited for the batch deadline"
    assert [r.call_id for r in results] == [c.call_id for c in commands]
    for result in results:
        assert result.status is ResultStatus.FAILURE
        assert "mute-pc" in (result.error or ""), result.error
        assert "TimeoutError" not in (result.error or ""), result.error


async def test_a_device_connection_closed_mid_batch_fails_the_batch_at_once() -> None:
    batch_timeout = 30.0
    async with (
        running_hub() as hub,
        hand_device(hub, "fragile-pc") as fragile,
        dispatcher_for(hub, "fragile-pc") as dispatcher,
    ):
        commands = echo_batch("fragile", 2)
        started = time.monotonic()
        batch = asyncio.create_task(dispatcher.execute_commands(commands, timeout=batch_timeout))
        assert (await recv_json(fragile))["type"] == "command"
        await fragile.close()
        async with asyncio.timeout(WAIT):
            results = await batch
        elapsed = time.monotonic() - started
    assert elapsed < batch_timeout / 3
    assert [r.call_id for r in results] == [c.call_id for c in commands]
    for result in results:
        assert result.status is ResultStatus.FAILURE
        assert "ConnectionLost" in (result.error or "") and "fragile-pc" in (result.error or ""), result.error


async def test_a_controller_that_disconnects_mid_batch_lets_the_running_command_finish_and_starts_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aip.device")
    gate, later = Gate(), []
    tools = tools_with(gate=gate.tool, later=lambda command: later.append(command.call_id))
    async with running_hub() as hub, running_device(hub, "worker", tools) as device:
        async with peer(hub, "/controller") as controller:
            await controller.send(
                controller_frame(
                    ServerMessageType.COMMAND,
                    response_id="leaving-1",
                    target_id="worker",
                    actions=[Command(tool_name="gate", call_id="gated-1"), Command(tool_name="later", call_id="l-1")],
                    timeout=60,
                )
            )
            async with asyncio.timeout(WAIT):
                await gate.started.wait()
        # The controller is gone: the hub tells the device to start nothing more of the batch (it may come back).
        # A round trip to the device after that: the hub's notice reached it first (one connection, in order).
        async with dispatcher_for(hub, "worker") as dispatcher:
            commands = echo_batch("behind-the-notice")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
        batch = device.session.batches["leaving-1"]
        assert batch.orphaned is not None
        gate.release.set()
        async with asyncio.timeout(WAIT):
            await device._tasks[batch]
        assert not gate.cancelled.is_set() and gate.runs == 1
        assert later == [], "a command of an orphaned batch was started"
        assert "gated-1" in [call_id for _, call_id in device.memory._done], "the command that ran is not remembered"
        # The device is still in service afterwards.
        async with dispatcher_for(hub, "worker") as dispatcher:
            for tag in ("after-leave", "after-leave-2"):
                commands = echo_batch(tag)
                assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
    complaints = [r.getMessage() for r in caplog.records if r.name == "aip.device" and "hub reported" in r.getMessage()]
    assert not complaints, "the answer to an abandoned batch was refused instead of dropped quietly"


async def test_the_deadline_travels_and_the_device_stops_the_tool() -> None:
    cancelled = asyncio.Event()

    async def slow(command: Command) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished"

    async with (
        running_hub() as hub,
        running_device(hub, "slowpoke", tools_with(slow=slow)),
        dispatcher_for(hub, "slowpoke") as dispatcher,
    ):
        command = Command(tool_name="slow", call_id="slow-1")
        started = time.monotonic()
        [result] = await dispatcher.execute_commands([command], timeout=1)
        elapsed = time.monotonic() - started
        # Stopped by the device's own deadline, before the dispatcher gave up and sent a cancel.
        stopped_by_the_device = cancelled.is_set()
        async with asyncio.timeout(WAIT):
            await cancelled.wait()
    assert stopped_by_the_device, "the tool ran on after the batch's deadline: the deadline did not travel"
    assert elapsed < 5, f"a 1 s batch took {elapsed:.1f}s"
    assert result.status is ResultStatus.FAILURE
    assert result.call_id == "slow-1"
    assert "TimeoutError" in (result.error or ""), result.error


async def test_a_repeated_call_id_is_answered_from_the_device_memory() -> None:
    runs: list[str | None] = []

    def count(command: Command) -> int:
        runs.append(command.call_id)
        return len(runs)

    async with (
        running_hub() as hub,
        running_device(hub, "counter", tools_with(count=count)),
        dispatcher_for(hub, "counter") as dispatcher,
    ):
        first = await dispatcher.execute_commands([Command(tool_name="count", call_id="once")], timeout=10)
        again = await dispatcher.execute_commands([Command(tool_name="count", call_id="once")], timeout=10)
        fresh = await dispatcher.execute_commands([Command(tool_name="count", call_id="twice")], timeout=10)
    assert runs == ["once", "twice"]
    assert first[0].status is ResultStatus.SUCCESS and first[0].result == 1
    assert again[0].model_dump() == first[0].model_dump()
    assert fresh[0].result == 2


# -- the device list -----------------------------------------------------------------


async def test_the_device_list_shows_connected_devices_with_their_tools() -> None:
    def announce(*names: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: [{"name": name, "server": "memory", "description": f"the {name} tool"} for name in names]

    async with running_hub() as hub:
        assert await list_devices(hub.url, TOKEN, timeout=WAIT) == []
        alpha = DeviceClient(
            hub.url,
            "alpha",
            InMemoryCommandDispatcher(echo_tools()),
            token=device_token(hub, "alpha"),
            tools=announce("echo", "sleep"),
        )
        beta = DeviceClient(
            hub.url, "beta", InMemoryCommandDispatcher(echo_tools()), token=device_token(hub, "beta"), tools=announce()
        )
        async with serving(alpha), hand_device(hub, "gamma-ufo"):
            async with serving(beta):
                devices = await list_devices(hub.url, TOKEN, timeout=WAIT)
            after_beta_left = await list_devices(hub.url, TOKEN, timeout=WAIT)

    assert [d["id"] for d in devices] == ["alpha", "beta", "gamma-ufo"]
    by_id = {d["id"]: d for d in devices}
    assert [t["name"] for t in by_id["alpha"]["tools"]] == ["echo", "sleep"]
    assert by_id["alpha"]["tools"][0]["description"] == "the echo tool"
    assert by_id["beta"]["tools"] == []
    assert (by_id["alpha"]["kind"], by_id["gamma-ufo"]["kind"]) == ("dispatch", "ufo")
    assert by_id["gamma-ufo"]["tools"] == [] and by_id["gamma-ufo"]["platform"] == "linux"
    assert by_id["alpha"]["system_info"]["device_id"] == "alpha"
    assert all(d["pending_batches"] == 0 and d["connected_at"] and d["last_seen"] for d in devices)
    assert [d["id"] for d in after_beta_left] == ["alpha", "gamma-ufo"]


# -- scale -----------------------------------------------------------------------------


async def test_a_hundred_devices_each_run_their_own_batch_at_once() -> None:
    count = 100
    async with running_hub() as hub:
        clients = [
            DeviceClient(
                hub.url,
                device_id,
                InMemoryCommandDispatcher(echo_tools()),
                token=device_token(hub, device_id),
                backoff=QUICK_BACKOFF,
            )
            for device_id in (f"dev-{i:03d}" for i in range(count))
        ]
        stop = asyncio.Event()
        runs = [asyncio.create_task(client.run(stop)) for client in clients]
        dispatchers: list[WebSocketCommandDispatcher] = []
        try:
            async with asyncio.timeout(15):
                await asyncio.gather(*(client.registered.wait() for client in clients))
            listed = await list_devices(hub.url, TOKEN, timeout=WAIT)
            dispatchers = [WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), c.device_id) for c in clients]
            batches = {
                d.device: [
                    Command(tool_name="echo", parameters={"device": d.device, "n": n}, call_id=f"{d.device}-{n}")
                    for n in range(3)
                ]
                for d in dispatchers
            }
            async with asyncio.timeout(20):
                answers = await asyncio.gather(
                    *(d.execute_commands(batches[d.device], timeout=15) for d in dispatchers)
                )
        finally:
            await asyncio.gather(*(d.close() for d in dispatchers))
            stop.set()
            async with asyncio.timeout(15):
                await asyncio.gather(*runs)
    assert len(listed) == count
    for dispatcher, results in zip(dispatchers, answers, strict=True):
        assert_echoed(batches[dispatcher.device], results)
        assert {r.result["device"] for r in results} == {dispatcher.device}


# -- TLS -------------------------------------------------------------------------------


async def test_wss_carries_devices_and_batches(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with Hub(AccessPolicy(credentials_with()), HubSettings(port=0), ssl_context=server_context) as hub:
        assert hub.url.startswith("wss://127.0.0.1:")
        async with (
            running_device(hub, "secure-pc", ssl_context=trusting),
            dispatcher_for(hub, "secure-pc", ssl_context=trusting) as dispatcher,
        ):
            commands = echo_batch("tls")
            assert_echoed(commands, await dispatcher.execute_commands(commands, timeout=10))
            devices = await list_devices(hub.url, TOKEN, timeout=WAIT, ssl_context=trusting)
            assert [d["id"] for d in devices] == ["secure-pc"]
            # A client that does not trust the certificate gets no connection.
            with pytest.raises(HubUnavailable, match=r"(?i)certificate"):
                untrusting = ssl.create_default_context()
                await open_connection(f"{hub.url}/controller", TOKEN, open_timeout=WAIT, ssl_context=untrusting)


async def test_a_wss_client_without_an_ssl_context_verifies_with_the_default_trust_store(tmp_path: Path) -> None:
    """No ssl_context on a wss:// URL means the system's CAs, as for any TLS client, not an error about None."""
    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    async with Hub(AccessPolicy(credentials_with()), HubSettings(port=0), ssl_context=server_context) as hub:
        with pytest.raises(HubUnavailable, match=r"(?i)certificate"):
            await open_connection(f"{hub.url}/controller", TOKEN, open_timeout=WAIT)


# -- a controller that reads nothing is closed once it stalls; the hub does not buffer for it --


async def test_a_controller_that_never_reads_is_closed_after_the_stall_timeout_and_others_keep_working() -> None:
    # A device announcing many tools makes each device listing ~50 KB: what the hub must queue per request.
    stall = 1.0
    tools = [{"name": f"tool_{i}", "server": "s", "description": "x" * 80} for i in range(400)]
    register = json.dumps(
        {"type": "register", "status": "ok", "client_id": "many-tools", "metadata": {"dispatch": {"tools": tools}}}
    )
    request = json.dumps({"type": "device_info_request", "status": "ok", "response_id": "r"})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        asyncio.timeout(30),
        running_hub(max_message_bytes=2**20, stall_timeout=stall) as hub,
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
        asking: asyncio.Task[None] | None = None
        try:
            await until(lambda: any(o.connection.remote_address == deaf.local_address for o in hub._outboxes.values()))
            [outbox] = [o for o in hub._outboxes.values() if o.connection.remote_address == deaf.local_address]

            async def ask() -> None:
                for _ in range(1000):  # ~50 MB of listings, if the hub kept them all
                    await deaf.send(request)  # waits once the hub, its outbox full, stops reading it

            during = asyncio.create_task(work("during"))
            started = time.monotonic()
            asking = asyncio.create_task(ask())
            await until(lambda: outbox.abandoned, within=stall + WAIT)
            closed_after = time.monotonic() - started
            assert outbox.frames is None, "the frames queued for the closed controller are still held"
            assert outbox.queued == 0
            assert closed_after >= stall, f"closed {closed_after:.2f}s after it stopped reading, before it stalled"
            await during
            await work("after")  # the other controller and its device are unaffected
            # Read at last: what was already on the wire, then the hub's close.
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await deaf.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == TOO_SLOW, closed.value
        finally:
            if asking is not None:
                asking.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await asking
            await deaf.close()


async def test_answers_to_a_controller_that_reads_slowly_arrive_complete_and_in_order() -> None:
    # A small receive window: the hub's socket fills part way, so some answers go out at once and the
    # rest wait in its outbox; the controller must get every one, in the order it asked.
    # Each answer ~50 KB (a device announcing many tools): 150 of them are more than the sockets hold.
    tools = [{"name": f"tool_{i}", "server": "s", "description": "x" * 80} for i in range(400)]
    register = json.dumps(
        {"type": "register", "status": "ok", "client_id": "some-tools", "metadata": {"dispatch": {"tools": tools}}}
    )
    asked = [f"r-{n}" for n in range(150)]  # ~7.5 MB: the hub may stop reading it a while, never close it
    async with (
        asyncio.timeout(30),
        running_hub() as hub,
        connect(
            f"ws://127.0.0.1:{hub.port}/ws",
            additional_headers={"Authorization": f"Bearer {device_token(hub, 'some-tools')}"},
            proxy=None,
        ) as device,
    ):
        await device.send(register)
        await device.recv()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", hub.port))
        raw.setblocking(False)
        async with connect(
            f"ws://127.0.0.1:{hub.port}/controller",
            sock=raw,
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
            max_queue=1,
            proxy=None,
        ) as controller:
            for response_id in asked:
                await controller.send(
                    json.dumps({"type": "device_info_request", "status": "ok", "response_id": response_id})
                )
            answers = [json.loads(await controller.recv()) for _ in asked]
    assert [answer["prev_response_id"] for answer in answers] == asked
    assert all(answer["type"] == "device_info_response" for answer in answers)
    assert all(answer["metadata"]["devices"][0]["id"] == "some-tools" for answer in answers)


# -- a device sending a large result over a slow link is alive -------------------------


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


# -- with a distant device, the finished commands of a timed-out batch keep their results --


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


# -- a result that cannot be serialised is still answered ------------------------------


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


# -- two devices with the same id do not evict each other forever ---------------------


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


# -- a failure is not remembered: a retry with the same call_id runs the tool ----------------


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


# -- a batch sent before its device connects is delivered when it does -------------------


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


async def test_a_credential_issued_a_moment_ago_opens_the_hub_before_the_next_periodic_check(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    write_store(path, CredentialStore())
    access = AccessPolicy(read_store(path))
    settings = HubSettings(port=0, credentials_check_interval=3600)  # the watcher would not look for an hour
    async with Hub(access, settings, credential_file=CredentialFile(path)) as hub:
        with editing(path) as store:
            token = store.issue(Role.CONTROLLER, "ops")
        assert await list_devices(hub.url, token, timeout=10) == []
        with pytest.raises(HubRefused, match="401"):  # and an unknown one is still refused
            await list_devices(hub.url, "dsp_ctl_" + "x" * 43, timeout=10)
