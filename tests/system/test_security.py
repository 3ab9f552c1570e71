"""The security model, tried as an attacker would: each finding of issue 8 reproduced, and refused.

Against real processes on 127.0.0.1: a ``dispatch serve`` hub with a
credentials file, a ``dispatch device`` running our demo MCP server, and the
``dispatch`` command line. What ``dispatch up`` exposes (finding 3) is tried in
``test_dispatch_up.py``, on the one stack that module starts. Where a
test plays the attacker it uses plain ``websockets`` or raw sockets, so what is
checked is the wire. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO_SERVER, ROOT, _free_port
from hub_support import TOKEN, credentials_with, token_for_device
from process_support import CLI, listening, rss_bytes, start, stop_group, tail, wait_for
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from aip.controller import list_devices
from aip.credential_file import write_store
from aip.credentials import Role
from aip.messages import Command, ResultStatus
from aip.registration import MAX_REGISTRATION_BYTES, MAX_TOOLS
from cli.main import app
from cli.serve_command import listens_in_clear
from dispatchers import WebSocketCommandDispatcher

WAIT = 10.0
#: A second controller with every device, and one that may use ``other-*`` only.
OTHER_TEAM, LIMITED = "other-team-token-0123456789abcdef", "limited-controller-token-0123456789"
#: The device that runs for real; ``intruder`` and ``victim`` are played by hand.
DEVICE, INTRUDER, VICTIM = "lab-pc", "intruder", "victim"
HOSTILE = "[/][bold red]x[/] \x1b[2J\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"


# -- a real hub and a real device ----------------------------------------------------


@dataclass
class Site:
    hub: subprocess.Popen[bytes]
    hub_log: Path
    device: subprocess.Popen[bytes]
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def cli_env(token: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("DISPATCH_") or key == "DISPATCH_SERVICE"
    }
    return env | ({"DISPATCH_TOKEN": token} if token else {}) | extra


def run_cli(
    *args: str, token: str | None = None, timeout: float = 90, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = cli_env(token, **extra)
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("security")
    store = credentials_with([DEVICE, INTRUDER, VICTIM])
    store.issue(Role.CONTROLLER, "other-team", token=OTHER_TEAM)
    store.issue(Role.CONTROLLER, "limited", devices=("other-*",), token=LIMITED)
    write_store(folder / "credentials.json", store)
    config = folder / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}))
    port = _free_port()
    hub_log, device_log = folder / "hub.log", folder / "device.log"
    hub = start(
        [*CLI, "serve", "--port", str(port), "--credentials", str(folder / "credentials.json")],
        cli_env(),
        hub_log,
        ROOT,
    )
    device = None
    try:
        wait_for("the hub listening", lambda: listening(port) or hub.poll() is not None, 30, 0.05)
        assert hub.poll() is None, tail(hub_log)
        device_args = ["device", "--hub", f"ws://127.0.0.1:{port}", "--id", DEVICE, "--config", str(config)]
        device = start([*CLI, *device_args], cli_env(token_for_device(DEVICE)), device_log, ROOT)

        def registered() -> bool:
            assert device is not None and device.poll() is None, tail(device_log)
            return "registered with" in tail(device_log, 100_000)

        wait_for("the device registered", registered, 60, 0.1)
        yield Site(hub, hub_log, device, port, folder)
    finally:
        if device is not None:
            stop_group(device)
        stop_group(hub)


async def raw(site: Site, path: str, token: str | None, **options: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with asyncio.timeout(WAIT):
        return await connect(f"{site.url}{path}", additional_headers=headers, open_timeout=WAIT, **options)


@contextlib.asynccontextmanager
async def hand_peer(site: Site, path: str, token: str | None, **options: Any) -> AsyncIterator[ClientConnection]:
    connection = await raw(site, path, token, **options)
    try:
        yield connection
    finally:
        await connection.close()


async def recv_json(connection: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        frame = await connection.recv()
    message: dict[str, Any] = json.loads(frame)
    return message


async def close_code(connection: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(WAIT):
            while True:
                await connection.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


def register(device_id: str, metadata: dict[str, Any] | None = None) -> str:
    return json.dumps({"type": "register", "status": "ok", "client_id": device_id, "metadata": metadata or {}})


async def run_on_device(site: Site, commands: list[Command], token: str = TOKEN) -> list[Any]:
    async with await WebSocketCommandDispatcher.connect(site.url, DEVICE, token=token) as dispatcher:
        return await dispatcher.execute_commands(commands, timeout=20)


async def assert_device_still_serves(site: Site) -> None:
    echo = Command(tool_name="echo", parameters={"value": "still mine"}, call_id=f"check-{uuid.uuid4().hex[:8]}")
    [result] = await run_on_device(site, [echo])
    assert result.status is ResultStatus.SUCCESS and result.result == {"result": "still mine"}, result


# -- 1. device hijack ------------------------------------------------------------------


async def test_another_devices_credential_cannot_register_as_a_live_device(site: Site) -> None:
    async with hand_peer(site, "/ws", token_for_device(INTRUDER)) as impostor:
        await impostor.send(register(DEVICE))
        refusal = await recv_json(impostor)
        assert refusal["type"] == "error" and f"for device {INTRUDER!r}" in refusal["error"], refusal
        assert await close_code(impostor) == 1008
    await assert_device_still_serves(site)


async def test_the_same_credential_cannot_take_a_live_id_while_it_answers_pings(site: Site) -> None:
    async with hand_peer(site, "/ws", token_for_device(DEVICE)) as second:
        await second.send(register(DEVICE))
        refusal = await recv_json(second)
        assert refusal["type"] == "error" and "already connected and answering" in refusal["error"], refusal
        assert await close_code(second) == 4004
    await assert_device_still_serves(site)


async def test_a_result_forged_from_another_connection_is_refused_and_the_real_one_arrives(site: Site) -> None:
    async with (
        hand_peer(site, "/ws", token_for_device(VICTIM)) as victim,
        hand_peer(site, "/ws", token_for_device(INTRUDER)) as intruder,
        hand_peer(site, "/controller", TOKEN) as controller,
    ):
        for peer, name in ((victim, VICTIM), (intruder, INTRUDER)):
            await peer.send(register(name))
            assert (await recv_json(peer))["status"] == "ok"
        action = {"tool_name": "echo", "parameters": {"value": 1}, "tool_type": "action", "call_id": "c-1"}
        batch = {"type": "command", "status": "continue", "response_id": "r-forged", "target_id": VICTIM}
        await controller.send(json.dumps(batch | {"actions": [action]}))
        assert (await recv_json(victim))["response_id"] == "r-forged"
        forged = {"status": "success", "result": "forged", "call_id": "c-1"}
        answer = {"type": "command_results", "status": "continue", "prev_response_id": "r-forged"}
        await intruder.send(json.dumps(answer | {"client_id": VICTIM, "action_results": [forged]}))
        assert "unknown prev_response_id" in (await recv_json(intruder))["error"]
        real = {"status": "success", "result": "real", "call_id": "c-1"}
        await victim.send(json.dumps(answer | {"client_id": VICTIM, "action_results": [real]}))
        reply = await recv_json(controller)
        assert reply["prev_response_id"] == "r-forged" and reply["action_results"][0]["result"] == "real", reply


# -- 2. roles and authority -------------------------------------------------------------


async def test_each_credential_opens_only_its_own_endpoint(site: Site) -> None:
    for path, token in (("/controller", token_for_device(DEVICE)), ("/ws", TOKEN), ("/ws", None), ("/ws", "x" * 40)):
        with pytest.raises(InvalidStatus) as refused:
            await (await raw(site, path, token)).close()
        assert refused.value.response.status_code in (401, 403), (path, refused.value.response)
    listing = run_cli("devices", "--hub", site.url, "--json", token=token_for_device(DEVICE))
    assert listing.returncode == 1 and "403" in listing.stderr and "does not open /controller" in listing.stderr


async def test_a_controller_neither_sees_nor_reaches_a_device_its_credential_does_not_cover(site: Site) -> None:
    assert [entry["id"] for entry in await list_devices(site.url, TOKEN)] == [DEVICE]
    assert await list_devices(site.url, LIMITED) == []
    errors = []
    for target in (DEVICE, "no-such-device"):  # the same answer: nothing said about whether it exists
        command = Command(tool_name="echo", parameters={"value": 1}, call_id="limited-1")
        async with await WebSocketCommandDispatcher.connect(site.url, target, token=LIMITED) as dispatcher:
            [result] = await dispatcher.execute_commands([command], timeout=20)
        assert result.status is ResultStatus.FAILURE and "AccessDenied" in (result.error or ""), result
        errors.append((result.error or "").replace(target, "<device>"))
    assert errors[0] == errors[1]


# -- 3. and 4. parameters are data (the dispatch up part is at the end) -------------------


def test_a_hub_url_carrying_a_token_is_refused_before_anything_runs_or_is_stored(site: Site) -> None:
    batch = site.folder / "one-echo.json"
    batch.write_text(json.dumps([{"tool_name": "echo", "parameters": {"value": 1}}]))
    secret = "s3cret-in-the-url-0123456789"
    for hub in (f"{site.url}/?token={secret}", f"ws://user:{secret}@127.0.0.1:{site.port}"):
        done = run_cli("run", str(batch), "--hub", hub, "--device", DEVICE, token=TOKEN, timeout=30)
        assert done.returncode == 2 and "carries a credential" in done.stderr, done.stderr
        assert secret not in done.stdout + done.stderr


async def test_run_batch_flow_refuses_a_hub_url_with_a_token_without_creating_a_flow_run(prefect_api: str) -> None:
    from prefect import get_client

    from flows.batch import run_batch_flow

    secret = f"never-stored-{uuid.uuid4().hex}"
    command = Command(tool_name="echo", parameters={"value": 1}, call_id="stored-1")
    options = {"backend": "remote", "device": DEVICE, "hub": f"ws://127.0.0.1:1/?token={secret}"}
    [result] = await run_batch_flow([command], **options)
    assert result.status is ResultStatus.FAILURE and "carries a credential" in (result.error or "")
    assert secret not in (result.error or "")
    async with get_client() as client:
        runs = await client.read_flow_runs(limit=200)
    assert all(secret not in json.dumps(run.parameters, default=str) for run in runs)


def test_a_batch_file_names_a_config_only_beside_it(site: Site, tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    batch = tmp_path / "inner" / "batch.json"
    batch.write_text(json.dumps({"config": "../mcp.json", "commands": [{"tool_name": "echo"}]}))
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"x": {"command": "sh", "args": ["-c", "exit 0"]}}}))
    done = run_cli("run", str(batch), timeout=30)
    assert done.returncode == 2 and "outside the batch file's folder" in done.stderr, done.stderr


# -- 5. call memory per controller, per command --------------------------------------------


async def test_call_memory_is_per_controller_and_refuses_a_reused_call_id_for_another_command(site: Site) -> None:
    key = f"memory-{uuid.uuid4().hex[:8]}"
    call_id = f"shared-{uuid.uuid4().hex[:8]}"

    def count(call: str = call_id, counter: str = key) -> Command:
        return Command(tool_name="count", parameters={"key": counter}, call_id=call)

    [first] = await run_on_device(site, [count()])
    [replayed] = await run_on_device(site, [count()])
    assert first.status is ResultStatus.SUCCESS and replayed.result == first.result  # answered from memory
    [other_team] = await run_on_device(site, [count()], token=OTHER_TEAM)
    assert other_team.status is ResultStatus.SUCCESS
    assert other_team.result != first.result, "another controller read this controller's memory"
    [changed] = await run_on_device(site, [count(counter=f"{key}-other")])
    assert changed.status is ResultStatus.FAILURE and "CallIdConflict" in (changed.error or ""), changed
    [fresh] = await run_on_device(site, [count(call=f"fresh-{uuid.uuid4().hex[:8]}", counter=f"{key}-other")])
    assert fresh.result == {"result": 1}, "the refused command ran anyway"


# -- 6. output is inert, registrations are bounded -------------------------------------------


def test_a_device_id_with_markup_or_escapes_cannot_be_issued(tmp_path: Path) -> None:
    for device_id in ("[/]", "lab\x1b[2J", "a b", "x" * 200, ""):
        done = CliRunner().invoke(
            app, ["credentials", "add-device", device_id, "--credentials", str(tmp_path / "c.json")]
        )
        assert done.exit_code == 2 and "must be 1-128 characters" in done.stderr, (device_id, done.stderr)
        assert "\x1b" not in done.stderr
    assert not (tmp_path / "c.json").exists()


def test_a_tool_result_with_markup_and_escapes_is_printed_as_text(prefect_api: str, tmp_path: Path) -> None:
    (tmp_path / "mcp.json").write_text(
        json.dumps({"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}})
    )
    batch = tmp_path / "batch.json"
    commands = [
        {"tool_name": "echo", "parameters": {"value": HOSTILE}},
        {"tool_name": "text", "parameters": {"message": HOSTILE}},
    ]
    batch.write_text(json.dumps({"config": "mcp.json", "commands": commands}))
    done = run_cli("run", str(batch), timeout=120, PREFECT_API_URL=prefect_api, COLUMNS="200")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\x1b" not in done.stdout and "[/]" in done.stdout and "\\x1b]8;;" in done.stdout, done.stdout


async def test_devices_prints_any_listing_a_hub_sends_as_text(tmp_path: Path) -> None:
    """A hostile (or merely old) hub: markup and escapes in ids, numbers as tool names, entries of any shape."""
    listing = [
        {"id": HOSTILE, "kind": 7, "platform": None, "tools": [{"name": 42}, "not a tool", {"name": HOSTILE}]},
        {"id": 12345, "tools": "none"},
        "just a string",
    ]

    async def hostile_hub(connection: ServerConnection) -> None:
        async for frame in connection:
            request = json.loads(frame)
            answer = {"type": "device_info_response", "status": "ok", "prev_response_id": request["response_id"]}
            await connection.send(json.dumps(answer | {"metadata": {"devices": listing}}))

    async with serve(hostile_hub, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        done = await asyncio.to_thread(run_cli, "devices", "--hub", f"ws://127.0.0.1:{port}", token=TOKEN, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "[/][bold" in done.stdout and "red]x[/]" in done.stdout, done.stdout
    assert "42" in done.stdout and "12345" in done.stdout and "3 devices connected" in done.stdout


async def test_oversized_registrations_are_refused_with_a_reason_and_do_not_grow_the_hub(site: Site) -> None:
    before = rss_bytes(site.hub.pid)
    huge = {"system_info": {"hostname": "h" * (24 * 2**20)}}
    for _ in range(5):  # cut off by the frame limit of a device that has not registered yet: never buffered whole
        peer = await raw(site, "/ws", token_for_device(INTRUDER))
        with contextlib.suppress(ConnectionClosed):
            await peer.send(register(INTRUDER, huge))
        async with asyncio.timeout(WAIT):
            await peer.wait_closed()
        assert peer.close_code == 1009, peer.close_reason  # message too big
        assert f"exceeds limit of {MAX_REGISTRATION_BYTES} bytes" in (peer.close_reason or "")  # and says so
    assert rss_bytes(site.hub.pid) - before < 16 * 2**20, "the hub kept what it refused"
    tools = [{"name": f"tool-{n}", "server": "s", "description": "d" * 10} for n in range(MAX_TOOLS * 3)]
    async with hand_peer(site, "/ws", token_for_device(INTRUDER)) as peer:
        await peer.send(register(INTRUDER, {"dispatch": {"tools": tools[: MAX_TOOLS + 50]}}))
        assert (await recv_json(peer))["status"] == "ok"
        [entry] = [entry for entry in await list_devices(site.url, TOKEN) if entry["id"] == INTRUDER]
        assert len(entry["tools"]) == MAX_TOOLS


# -- 7. the smaller ones -----------------------------------------------------------------------


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(request)
        return connection.recv(4096)


def upgrade(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", *headers, "Upgrade: websocket", "Connection: Upgrade"]
    lines += ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", "", ""]
    return "\r\n".join(lines).encode()


def test_a_bare_tcp_connect_is_one_info_line_without_a_traceback(site: Site) -> None:
    before = len(tail(site.hub_log, 10**9))
    with socket.create_connection(("127.0.0.1", site.port), timeout=WAIT):
        pass
    wait_for(
        "the hub's line about it",
        lambda: "did not complete a WebSocket handshake" in tail(site.hub_log, 10**9)[before:],
        10,
    )
    written = tail(site.hub_log, 10**9)[before:]
    assert "Traceback" not in written and "ERROR" not in written and len(written) < 300, written


def test_malformed_handshakes_get_a_400_not_a_500(site: Site) -> None:
    bearer = f"Authorization: Bearer {TOKEN}"
    for request in (
        upgrade("/controller", "Host: 127.0.0.1", "Host: 127.0.0.1", bearer),
        upgrade("/controller", "Host: 127.0.0.1", bearer, bearer),
        upgrade("//[::1", "Host: 127.0.0.1", bearer),
    ):
        status = raw_http(site.port, request).split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 400"), (request, status)
    assert "Traceback" not in tail(site.hub_log, 10**9)


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [
        *[("0.0.0.0", False, True), ("192.168.1.5", False, True), ("hub.example", False, True)],
        *[("0.0.0.0", True, False), ("127.0.0.1", False, False), ("127.0.0.2", False, False)],
        *[("::1", False, False), ("localhost", False, False)],
    ],
)
def test_listening_beyond_loopback_without_tls_is_called_out(host: str, tls: bool, warned: bool) -> None:
    assert listens_in_clear(host, tls) is warned


async def test_the_device_answers_a_frame_nested_thousands_deep_and_stays_connected(tmp_path: Path) -> None:
    """A hub (played by hand) sends our real device process a frame nested 5,000 deep, then a real batch."""
    answers: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def hub(connection: ServerConnection) -> None:
        await connection.recv()  # register
        await connection.send(json.dumps({"type": "heartbeat", "status": "ok"}))
        deep = "[" * 5000 + "]" * 5000
        action = '{"tool_name": "echo", "tool_type": "action", "parameters": {"value": ' + deep + "}}"
        await connection.send(
            '{"type": "command", "status": "continue", "response_id": "deep-1", "actions": [' + action + "]}"
        )
        echo = {"tool_name": "echo", "tool_type": "action", "parameters": {"value": 2}, "call_id": "after"}
        await connection.send(
            json.dumps({"type": "command", "status": "continue", "response_id": "r-2", "actions": [echo]})
        )
        async for frame in connection:
            message = json.loads(frame)
            if message["type"] in ("error", "command_results"):
                answers.append(message)
            if len(answers) == 2:
                done.set()

    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}))
    log = tmp_path / "device.log"
    async with serve(hub, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        args = ["device", "--hub", f"ws://127.0.0.1:{port}", "--id", "deep", "--config", str(config)]
        device = start([*CLI, *args], cli_env(token_for_device("deep")), log, ROOT)
        try:
            async with asyncio.timeout(60):
                await done.wait()
            assert device.poll() is None, tail(log)
        finally:
            await asyncio.to_thread(stop_group, device)  # the loop must go on serving its close
    error, results = sorted(answers, key=lambda message: message["type"] != "error")
    assert error["type"] == "error" and error["prev_response_id"] == "deep-1" and "malformed" in error["error"]
    assert results["prev_response_id"] == "r-2" and results["action_results"][0]["status"] == "success", results
    assert "RecursionError" not in tail(log, 10**6) and "reconnecting" not in tail(log, 10**6)
