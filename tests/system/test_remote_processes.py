"""The remote path as an operator runs it: ``dispatch serve`` and ``dispatch device`` as real processes.

Hubs and devices are subprocesses on 127.0.0.1, talking over real sockets;
devices run the demo MCP server. Each hub reads a credentials file written
for the devices it will see; each device presents its own credential, the
controllers (``dispatch run``, ``dispatch devices``, flows) the controller's
``TOKEN``. Every wait is bounded, every process is stopped in a ``finally``,
and readiness is polled through the hub's own device list, never slept for.

At the end, the commands alone as processes (``dispatch run --cafile``,
``serve``, ``device``, ``devices``) against a hub in this process or a server
played by hand, each scaled down so it takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, _free_port, demo_server_spec
from hub_support import (
    TOKEN,
    credentials_with,
    device_token,
    running_device,
    running_hub,
    self_signed_certificate,
    token_for_device,
    write_credentials,
)
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from aip.access import AccessPolicy
from aip.connect import HubUnavailable
from aip.controller import list_devices
from aip.hub import Hub, HubSettings
from aip.messages import Command, Result, ResultStatus, ServerMessage, ServerMessageType, TaskStatus
from dispatchers import WebSocketCommandDispatcher

CLI = (sys.executable, "-m", "cli.main")
#: How long a process may take to come up (Python start, imports, the demo server's start).
STARTUP = 20.0
#: How long a process may take to stop once asked.
SHUTDOWN = 15.0


# -- processes ----------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of a process from /proc, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has exited: only its exit status is left)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def demo_servers_of(parent: int) -> set[int]:
    """The running processes started by ``parent`` whose command line runs demo_server.py."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != parent or stat[0] in ("Z", "X"):
            continue
        with contextlib.suppress(OSError):
            if b"demo_server.py" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


def cli_env(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """This environment without any hub settings, plus ``token`` (None: no token at all) and ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in ("DISPATCH_TOKEN", "DISPATCH_HUB")}
    if token is not None:
        env["DISPATCH_TOKEN"] = token
    return env | extra


def dispatch(
    *args: str | Path, env: dict[str, str], timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


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


class Proc:
    """A ``dispatch`` subprocess whose output goes to a log file (a pipe nobody reads could fill up)."""

    def __init__(self, name: str, args: list[str], log_dir: Path, token: str | None) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [*CLI, *args],
                cwd=ROOT,
                env=cli_env(token),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        #: The MCP servers this process started (known once it is ready), killed at the end if still running.
        self.children: set[int] = set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid}, exit code {self.popen.poll()}); its log:\n{self.output()[-3000:]}"

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = SHUTDOWN) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} did not exit within {timeout}s") from None

    def stop(self) -> None:
        """Terminate (kill if it lingers), then kill any MCP server it left behind."""
        if self.popen.poll() is None:
            self.children |= demo_servers_of(self.pid)
            self.popen.terminate()
            try:
                self.popen.wait(timeout=SHUTDOWN)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=SHUTDOWN)
        for child in self.children:
            if running(child):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)


class Launcher:
    """Starts hubs and devices, and stops every one of them when its fixture ends."""

    def __init__(self, log_dir: Path, config: Path) -> None:
        self.log_dir = log_dir
        self.config = config
        self.processes: list[Proc] = []

    def hub(self, port: int, devices: Iterable[str]) -> Proc:
        """A hub whose credentials file holds the controller ``TOKEN`` and one credential per device in ``devices``."""
        credentials = write_credentials(self.log_dir / f"credentials-{port}.json", devices)
        return self._start("hub", ["serve", "--port", str(port), "--credentials", str(credentials)], token=None)

    def device(self, port: int, device_id: str, *more_ports: int) -> Proc:
        """A device presenting its own credential (``token_for_device``) to the hub at ``port`` (and ``more_ports``)."""
        hubs = ",".join(f"ws://127.0.0.1:{each}/ws" for each in (port, *more_ports))
        args = ["device", "--hub", hubs, "--id", device_id, "--config", str(self.config)]
        return self._start(f"device-{device_id}", args, token=token_for_device(device_id))

    def _start(self, name: str, args: list[str], token: str | None) -> Proc:
        process = Proc(name, args, self.log_dir, token)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@contextlib.contextmanager
def launcher(log_dir: Path, config: Path) -> Iterator[Launcher]:
    processes = Launcher(log_dir, config)
    try:
        yield processes
    finally:
        processes.stop_all()


def hub_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}"


async def connected_devices(port: int) -> list[dict[str, Any]] | None:
    """The hub's device list, or None while the hub cannot be reached."""
    try:
        return await list_devices(hub_url(port), TOKEN, timeout=2)
    except (HubUnavailable, TimeoutError):
        return None


async def wait_for_device(port: int, device_id: str, *watched: Proc, timeout: float = STARTUP) -> dict[str, Any]:
    """Poll the hub until ``device_id`` is registered; fail early if a watched process exits."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                for process in watched:
                    if process.popen.poll() is not None:
                        raise AssertionError(f"{process} exited while waiting for device {device_id!r}")
                for entry in await connected_devices(port) or []:
                    if entry["id"] == device_id:
                        return entry
                await asyncio.sleep(0.05)
    except TimeoutError:
        logs = "\n".join(str(process) for process in watched)
        raise AssertionError(f"device {device_id!r} not registered within {timeout}s\n{logs}") from None


async def wait_until_gone(port: int, device_id: str, timeout: float = 10) -> None:
    """Poll the hub until ``device_id`` is no longer registered."""
    async with asyncio.timeout(timeout):
        while True:
            entries = await connected_devices(port)
            if entries is not None and all(entry["id"] != device_id for entry in entries):
                return
            await asyncio.sleep(0.05)


async def slow_batch_in_flight(
    dispatcher: WebSocketCommandDispatcher,
    port: int,
    device_id: str,
    slow: Command,
    *later: Command,
    timeout: float = 60,
) -> asyncio.Task[list[Result]]:
    """Start a batch of ``slow`` (then ``later``) and return once the slow call is surely running on the device.

    The hub shows the batch pending on the device; then a quick batch sent
    after it comes back: the device took the frames in order and made its
    MCP calls in order over one session, so the slow call went out first.
    """
    batch = asyncio.create_task(dispatcher.execute_commands([slow, *later], timeout=timeout))
    async with asyncio.timeout(10):
        while True:
            entries = await connected_devices(port) or []
            if any(entry["id"] == device_id and entry["pending_batches"] >= 1 for entry in entries):
                break
            await asyncio.sleep(0.05)
    [probe] = await dispatcher.execute_commands([Command(tool_name="echo", parameters={"value": "probe"})], timeout=10)
    assert probe.status is ResultStatus.SUCCESS, probe
    assert not batch.done(), batch
    return batch


async def start_device(processes: Launcher, port: int, device_id: str, *watched: Proc) -> Proc:
    device = processes.device(port, device_id)
    await wait_for_device(port, device_id, device, *watched)
    device.children = demo_servers_of(device.pid)
    return device


def assert_failure_format(command: Command, result: Result, *causes: str) -> str:
    """Invariant 3: a failure Result in the documented format, whose cause (returned) contains each of ``causes``."""
    prefix = f"Error occurred while executing command {command}: "
    assert result.status is ResultStatus.FAILURE, result
    assert result.call_id == command.call_id
    assert result.error is not None and result.error.startswith(prefix), result.error
    cause = result.error.removeprefix(prefix)
    assert all(part in cause for part in causes), result.error
    assert result.result == f"{result.error}, please retry or execute a different command."
    return cause


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote-processes")


@pytest.fixture(scope="module")
def mcp_config(log_dir: Path) -> Path:
    path = log_dir / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    return path


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {}}))
    return path


class Site:
    """A hub process and one device process connected to it."""

    def __init__(
        self, processes: Launcher, port: int, hub: Proc, device: Proc, device_id: str, devices: tuple[str, ...]
    ) -> None:
        self.processes = processes
        self.port = port
        self.hub = hub
        self.device = device
        self.device_id = device_id
        #: Every device id the hub has a credential for (a restarted hub gets the same).
        self.devices = devices

    @property
    def url(self) -> str:
        return hub_url(self.port)


async def start_site(processes: Launcher, device_id: str, *guests: str) -> Site:
    """A hub and the device ``device_id``; the hub also has credentials for the ``guests`` tests start later."""
    port = _free_port()
    devices = (device_id, *guests)
    hub = processes.hub(port, devices)
    device = await start_device(processes, port, device_id, hub)
    return Site(processes, port, hub, device, device_id, devices)


#: The devices tests start on the shared hub, besides its own.
SHARED_GUESTS = ("leaving-sigterm", "leaving-sigint", "leaving-mid-batch")


@pytest.fixture(scope="module")
async def shared_site(log_dir: Path, mcp_config: Path) -> AsyncIterator[Site]:
    """One hub and one device for the tests that leave them as they found them."""
    with launcher(log_dir, mcp_config) as processes:
        yield await start_site(processes, "lab-shared", *SHARED_GUESTS)


@pytest.fixture
async def own_site(log_dir: Path, mcp_config: Path) -> AsyncIterator[Site]:
    """A hub and a device of this test's own, for tests that kill or stop them."""
    with launcher(log_dir, mcp_config) as processes:
        yield await start_site(processes, f"lab-{uuid.uuid4().hex[:6]}")


# -- a batch end to end -------------------------------------------------------


def test_the_cli_runs_a_batch_on_a_device(shared_site: Site, prefect_api: str, tmp_path: Path) -> None:
    batch = tmp_path / "batch.json"
    batch.write_text(
        json.dumps(
            [
                {"tool_name": "echo", "parameters": {"value": 0}, "call_id": "first"},
                {"tool_name": "add", "parameters": {"a": 1, "b": 2}, "call_id": "second"},
                {"tool_name": "text", "parameters": {"message": "over the wire"}},
            ]
        )
    )

    done = dispatch(
        "run",
        batch,
        "--hub",
        shared_site.url,
        "--device",
        shared_site.device_id,
        "--timeout",
        "30",
        "--json",
        env=cli_env(PREFECT_API_URL=prefect_api),
        timeout=90,
    )

    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["status"] for r in results] == ["success"] * 3, results
    assert [r["call_id"] for r in results[:2]] == ["first", "second"]
    assert results[2]["call_id"], "an empty call_id is filled"
    assert [r["namespace"] for r in results] == ["demo"] * 3
    assert [r["result"] for r in results] == [{"result": 0}, {"result": 3.0}, "over the wire"]
    assert TOKEN not in done.stdout + done.stderr


async def test_the_flow_runs_a_batch_on_a_device(
    shared_site: Site, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch import run_batch_flow

    monkeypatch.setenv("DISPATCH_TOKEN", TOKEN)
    commands = [
        Command(tool_name="add", parameters={"a": 2, "b": 5}, call_id="sum"),
        Command(tool_name="fail", parameters={"message": "refused on purpose"}, call_id="broken"),
        Command(tool_name="echo", parameters={"value": ""}),
    ]

    async with asyncio.timeout(60):
        results = await run_batch_flow(
            commands, backend="remote", device=shared_site.device_id, hub=shared_site.url, timeout=30
        )

    assert len(results) == 3
    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.FAILURE, ResultStatus.SUCCESS]
    assert results[0].call_id == "sum" and results[0].result == {"result": 7.0} and results[0].namespace == "demo"
    cause = assert_failure_format(commands[1], results[1], "refused on purpose")
    assert cause.startswith("ToolError: "), cause
    assert results[2].call_id and results[2].result == {"result": ""}


async def test_a_repeated_call_id_is_answered_from_the_devices_memory(shared_site: Site) -> None:
    key = f"once-{uuid.uuid4().hex}"
    repeated = Command(tool_name="count", parameters={"key": key}, call_id=f"count-{key}")

    async with (
        asyncio.timeout(30),
        await WebSocketCommandDispatcher.connect(shared_site.url, shared_site.device_id, token=TOKEN) as dispatcher,
    ):
        [first] = await dispatcher.execute_commands([repeated], timeout=10)
        [again] = await dispatcher.execute_commands([repeated], timeout=10)
        [probe] = await dispatcher.execute_commands([Command(tool_name="count", parameters={"key": key})], timeout=10)

    assert first.status is ResultStatus.SUCCESS, first
    assert first.result == {"result": 1}
    assert again == first
    assert probe.result == {"result": 2}, "the repeated call_id must not have run the tool a second time"


# -- the device list and the token ----------------------------------------------


def test_devices_lists_the_device_with_its_tools(shared_site: Site) -> None:
    done = dispatch("devices", "--hub", shared_site.url, "--json", env=cli_env())

    assert done.returncode == 0, done.stderr
    [entry] = [entry for entry in json.loads(done.stdout) if entry["id"] == shared_site.device_id]
    assert entry["kind"] == "dispatch"
    tools = {tool["name"]: tool["server"] for tool in entry["tools"]}
    assert {"echo", "add", "sleep", "fail", "flaky", "count", "crash"} <= set(tools)
    assert set(tools.values()) == {"demo"}
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, "401"), ("wrong-token-9876543210", "401"), (token_for_device("lab-shared"), "403")],
    ids=["no-token", "wrong-token", "a-devices-token"],
)
def test_devices_without_the_right_token_is_refused(shared_site: Site, token: str | None, status: str) -> None:
    # A device's own credential opens only /ws: it does not make its holder a controller.
    done = dispatch("devices", "--hub", shared_site.url, "--json", env=cli_env(token))

    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert "refused" in done.stderr and status in done.stderr, done.stderr
    assert TOKEN not in done.stderr
    if token is not None:
        assert token not in done.stderr


def test_no_token_reaches_the_hub_or_device_logs(shared_site: Site) -> None:
    refused = dispatch("devices", "--hub", shared_site.url, env=cli_env("wrong-token-in-a-log-0000"))
    assert refused.returncode == 1

    hub_log, device_log = shared_site.hub.output(), shared_site.device.output()
    assert "refused a connection" in hub_log, hub_log  # the refusal is logged, the tokens are not
    for log in (hub_log, device_log):
        assert TOKEN not in log
        assert token_for_device(shared_site.device_id) not in log
        assert "wrong-token-in-a-log-0000" not in log


def test_a_device_whose_credential_the_hub_does_not_know_exits_1_saying_how_to_issue_one(shared_site: Site) -> None:
    args = ["device", "--hub", shared_site.url, "--id", "unknown-pc", "--config", str(shared_site.processes.config)]
    refused = dispatch(*args, env=cli_env("not-a-credential-of-this-hub-0000"), timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "401" in refused.stderr and "dispatch credentials add-device unknown-pc" in refused.stderr, refused.stderr
    assert "not-a-credential-of-this-hub-0000" not in refused.stderr + refused.stdout


# -- losing the device or the hub -------------------------------------------------


async def test_a_killed_device_fails_its_batch_at_once(own_site: Site) -> None:
    slow = Command(tool_name="sleep", parameters={"seconds": 30}, call_id="slow-on-a-dying-device")

    async with (
        asyncio.timeout(30),
        await WebSocketCommandDispatcher.connect(own_site.url, own_site.device_id, token=TOKEN) as dispatcher,
    ):
        batch = await slow_batch_in_flight(dispatcher, own_site.port, own_site.device_id, slow)
        own_site.device.signal(signal.SIGKILL)
        killed = time.monotonic()
        [result] = await batch
        waited = time.monotonic() - killed

    assert waited < 15, f"the batch came back {waited:.1f}s after the device died"
    assert_failure_format(slow, result, "ConnectionLost")
    assert own_site.device_id in (result.error or "")
    assert own_site.device.wait() == -signal.SIGKILL
    await wait_until_gone(own_site.port, own_site.device_id)


async def test_a_hub_killed_mid_batch_and_restarted_loses_no_result_and_runs_each_action_once(own_site: Site) -> None:
    key = uuid.uuid4().hex
    nap = Command(tool_name="sleep", parameters={"seconds": 2}, tool_type="action", call_id=f"nap-{key}")
    tally = Command(tool_name="count", parameters={"key": key}, tool_type="action", call_id=f"count-{key}")
    before = await wait_for_device(own_site.port, own_site.device_id)

    async with (
        asyncio.timeout(60),
        await WebSocketCommandDispatcher.connect(own_site.url, own_site.device_id, token=TOKEN) as dispatcher,
    ):
        batch = await slow_batch_in_flight(dispatcher, own_site.port, own_site.device_id, nap, tally, timeout=40)
        own_site.hub.signal(signal.SIGKILL)
        own_site.hub.wait()
        restarted = own_site.processes.hub(own_site.port, own_site.devices)
        results = await batch  # the controller sent the same batch again once the hub and the device were back
        after = await wait_for_device(own_site.port, own_site.device_id, restarted, own_site.device)
        [probe] = await dispatcher.execute_commands([Command(tool_name="count", parameters={"key": key})], timeout=20)

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 2, results
    assert [r.call_id for r in results] == [nap.call_id, tally.call_id]
    assert results[1].result == {"result": 1}
    assert probe.result == {"result": 2}, "an action of the batch ran twice"
    assert after["connected_at"] != before["connected_at"]
    assert own_site.device.popen.poll() is None, "the same device process reconnected"


@pytest.mark.parametrize(
    "failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed (connections reset)", "hung (nothing answers)"]
)
async def test_a_hub_lost_for_good_mid_batch_the_batch_carries_on_through_the_other_hub_each_action_once(
    log_dir: Path, mcp_config: Path, failure: signal.Signals
) -> None:
    """Two hubs serve one fleet: the device dials both, the controller reaches it through either.

    A hung hub (SIGSTOP: its sockets stay open, nothing answers) is what a
    machine that vanished looks like: the controller's pings notice it.
    """
    device_id = f"fleet-{uuid.uuid4().hex[:6]}"
    key = uuid.uuid4().hex
    nap = Command(tool_name="sleep", parameters={"seconds": 2}, tool_type="action", call_id=f"nap-{key}")
    tally = Command(tool_name="count", parameters={"key": key}, tool_type="action", call_id=f"count-{key}")
    with launcher(log_dir, mcp_config) as processes:
        ports = [_free_port(), _free_port()]
        hubs = [processes.hub(port, [device_id]) for port in ports]
        device = processes.device(ports[0], device_id, ports[1])
        for port in ports:
            await wait_for_device(port, device_id, device, *hubs)
        fleet = ",".join(hub_url(port) for port in ports)
        async with (
            asyncio.timeout(60),
            await WebSocketCommandDispatcher.connect(fleet, device_id, token=TOKEN) as dispatcher,
        ):
            batch = await slow_batch_in_flight(dispatcher, ports[0], device_id, nap, tally, timeout=40)
            hubs[0].signal(failure)  # the hub carrying the batch, for good
            results = await batch  # sent again through the other hub; the device answers from its memory
            [probe] = await dispatcher.execute_commands(
                [Command(tool_name="count", parameters={"key": key})], timeout=20
            )
        hubs[0].signal(signal.SIGKILL)
        hubs[0].wait()
        code, out, err = await run_cli("devices", "--hub", fleet, "--json", env=cli_env())

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 2, results
    assert results[1].result == {"result": 1}
    assert probe.result == {"result": 2}, "an action of the batch ran twice"
    assert code == 0, err
    [entry] = [entry for entry in json.loads(out) if entry["id"] == device_id]
    assert entry["hubs"] == [f"{hub_url(ports[1])}/controller"]
    assert f"hub {hub_url(ports[0])}/controller did not answer" in " ".join(err.split()), err


async def test_a_hub_gone_for_good_ends_the_batch_at_its_deadline_and_nothing_new_starts(own_site: Site) -> None:
    key = uuid.uuid4().hex
    nap = Command(tool_name="sleep", parameters={"seconds": 2}, tool_type="action", call_id=f"nap-{key}")
    tally = Command(tool_name="count", parameters={"key": key}, tool_type="action", call_id=f"count-{key}")

    async with (
        asyncio.timeout(60),
        await WebSocketCommandDispatcher.connect(own_site.url, own_site.device_id, token=TOKEN) as dispatcher,
    ):
        batch = await slow_batch_in_flight(dispatcher, own_site.port, own_site.device_id, nap, tally, timeout=6)
        own_site.hub.signal(signal.SIGKILL)
        own_site.hub.wait()
        results = await batch
        # Back later, to ask the device: did the command after the drop ever run?
        restarted = own_site.processes.hub(own_site.port, own_site.devices)
        await wait_for_device(own_site.port, own_site.device_id, restarted, own_site.device)
        [probe] = await dispatcher.execute_commands([Command(tool_name="count", parameters={"key": key})], timeout=20)

    for command, result in zip([nap, tally], results, strict=True):
        cause = assert_failure_format(command, result, "outcome unknown: the batch reached the hub")
        assert "hub" in cause.partition(";")[0], cause  # the last reason it could not be sent again
    assert probe.result == {"result": 1}, "a command of the batch started after its connection was gone"


# -- the device process itself ----------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_the_device_exits_cleanly_on_a_signal_and_stops_its_servers(
    shared_site: Site, signum: signal.Signals
) -> None:
    device_id = f"leaving-{signum.name.lower()}"
    device = await start_device(shared_site.processes, shared_site.port, device_id, shared_site.hub)
    servers = device.children
    assert servers, f"the device should run the demo server as its child\n{device}"

    device.signal(signum)
    code = device.wait()

    assert code == 0, device
    assert not [pid for pid in servers if running(pid)], "the device left its MCP servers running"
    assert not demo_servers_of(device.pid)
    await wait_until_gone(shared_site.port, device_id)


async def test_a_device_stopped_mid_batch_answers_it_before_leaving(shared_site: Site) -> None:
    device_id = "leaving-mid-batch"
    device = await start_device(shared_site.processes, shared_site.port, device_id, shared_site.hub)
    slow = Command(tool_name="sleep", parameters={"seconds": 30}, call_id="slow-on-a-leaving-device")

    async with (
        asyncio.timeout(30),
        await WebSocketCommandDispatcher.connect(shared_site.url, device_id, token=TOKEN) as dispatcher,
    ):
        batch = await slow_batch_in_flight(dispatcher, shared_site.port, device_id, slow)
        device.signal(signal.SIGTERM)
        stopped = time.monotonic()
        [result] = await batch
        waited = time.monotonic() - stopped

    assert waited < 10, f"the batch came back {waited:.1f}s after the device was asked to stop"
    assert_failure_format(slow, result, "Cancelled: the device is shutting down")
    assert device.wait() == 0, device
    assert not [pid for pid in device.children if running(pid)], "the device left its MCP servers running"


def test_the_device_command_starts_without_prefect() -> None:
    check = "import sys, cli.main; assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules)"

    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, cwd=ROOT, env=cli_env()
    )

    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("given", ["option", "environment", "default"])
def test_serve_without_a_credentials_file_exits_2(given: str, tmp_path: Path) -> None:
    # A shared DISPATCH_TOKEN, as the hub used to take, no longer stands in for the credentials file.
    missing = tmp_path / "nowhere" / "credentials.json"
    args = ["serve", "--port", str(_free_port())]
    env = cli_env(TOKEN)
    if given == "option":
        args += ["--credentials", str(missing)]
    elif given == "environment":
        env["DISPATCH_CREDENTIALS"] = str(missing)
    else:  # .dispatch/credentials.json in the working directory, which has none
        env.pop("DISPATCH_CREDENTIALS", None)

    done = dispatch(*args, env=env, timeout=30, cwd=tmp_path)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "no credentials file" in done.stderr and "dispatch credentials add-device" in done.stderr, done.stderr
    expected = missing if given != "default" else Path(".dispatch") / "credentials.json"
    assert str(expected) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and TOKEN not in done.stdout + done.stderr
    assert not missing.exists() and not (tmp_path / ".dispatch").exists(), "serve must not create a credentials file"


async def test_serve_raises_its_descriptor_limit_to_the_hard_one_and_holds_more_connections_than_the_soft_one(
    tmp_path: Path,
) -> None:
    """A shell's soft limit (1,024 on most machines) would cap a hub at that many devices; the hard one is the cap."""
    import resource

    soft, hard = 64, 2048

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    port = _free_port()
    credentials = write_credentials(tmp_path / "credentials.json", [])
    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        hub = await asyncio.create_subprocess_exec(
            *CLI,
            *("serve", "--port", str(port), "--credentials", str(credentials)),
            cwd=ROOT,
            env=cli_env(None),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=low_soft_limit,
        )
    connections = []
    try:
        await wait_until_gone(port, "nobody", timeout=STARTUP)  # returns once the hub answers
        async with asyncio.timeout(STARTUP):
            for _ in range(2 * soft):  # controllers: each one a descriptor on the hub, as a device is
                headers = {"Authorization": f"Bearer {TOKEN}"}
                connections.append(await connect(f"{hub_url(port)}/controller", additional_headers=headers))
            assert await connected_devices(port) == [], log.read_text()
    finally:
        for connection in connections:
            await connection.close()
        hub.terminate()
        async with asyncio.timeout(SHUTDOWN):
            await hub.wait()
    assert f"may open {hard} descriptors" in log.read_text(), log.read_text()


# -- dispatch run --cafile, against a wss:// hub with a private CA --------------------------


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


# -- a credential the hub can never use is bad usage, said plainly -------------------------------


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


# -- --token-in-query for a server that wants ?token=, with no token on the command line ------


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


# -- dispatch devices lists a device whose announced tools are plain strings ---------------------


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
