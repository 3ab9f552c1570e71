"""``dispatch up``, the whole local stack: closed by default, its runs' parameters data, and Ctrl-C stops all of it.

One stack for the module (it takes 20-40 s to start), on a copy of this
project with a Prefect home of its own, so nothing is written to the checkout
or the user's ``~/.prefect``. The last test stops it with Ctrl-C and checks
that nothing is left. Every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, _free_port
from prefect._internal.analytics.ci_detection import CI_ENV_VARS
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings
from process_support import CLI, listening, processes_mentioning, start, stop_group, tail, wait_for

from cli.up import (
    DATABASE_URL,
    RESULTS_BLOCK,
    SERVER_TUNING,
    child_environment,
    port_is_free,
    server_environment,
    worker_environment,
)

#: What a copy of the project needs to be deployed and run by the worker.
NOT_COPIED = shutil.ignore_patterns(
    ".venv", ".git", ".dispatch", "__pycache__", "*.egg-info", ".*_cache", "bench", "tests"
)


# -- before any stack: the port probe, and Prefect kept quiet (no stack needed, a second or two) --------


def server_like_listener() -> socket.socket:
    """A listener on a free loopback port, bound as uvicorn and asyncio's ``create_server`` bind (SO_REUSEADDR)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def tcp_states(port: int) -> set[str]:
    """The kernel's TCP states (hex, as /proc/net/tcp shows them) of the sockets whose local port is ``port``."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {row.split()[3] for row in rows if int(row.split()[1].rsplit(":", 1)[1], 16) == port}


def plain_bind_refused(port: int) -> bool:
    """Whether a bind without SO_REUSEADDR (the old probe) is refused on 127.0.0.1:``port``."""
    with socket.socket() as plain:
        try:
            plain.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the socket states from Linux's /proc")
def test_a_port_held_only_by_time_wait_sockets_is_free_and_a_listened_one_is_not() -> None:
    listener = server_like_listener()
    port = listener.getsockname()[1]
    with listener:
        assert not port_is_free(port)  # a live listener: refused
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: the TIME-WAIT lands on the listening port
        client.settimeout(5)
        assert client.recv(1) == b""  # its FIN arrived
        client.close()
    time_wait = "06"
    assert tcp_states(port) == {time_wait}, tcp_states(port)  # nothing but TIME-WAIT holds the port now
    assert plain_bind_refused(port)  # what the old probe met: "in use" for a minute after a stop
    assert port_is_free(port)
    with server_like_listener() as other:
        assert not port_is_free(other.getsockname()[1])


def test_every_child_runs_with_prefect_analytics_and_its_notice_off(tmp_path: Path) -> None:
    """``PREFECT_SERVER_ANALYTICS_ENABLED=false`` alone leaves the client's notice on: ``DO_NOT_TRACK`` is added."""
    for environ in ({"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}, {"DO_NOT_TRACK": ""}, {}):
        env = child_environment(environ, tmp_path, 4200, "dispatch:secret")
        assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", environ
    asked = child_environment({"DO_NOT_TRACK": "0"}, tmp_path, 4200, "dispatch:secret")
    assert asked["DO_NOT_TRACK"] == "0"  # tracking the user asked for is theirs to have


def test_the_databases_settings_reach_the_server_alone_and_the_results_block_the_workers(tmp_path: Path) -> None:
    """Workers, flow runs and the hub talk to the API: none of them gets the database's URL or password."""
    environ = {
        "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://old:pw@db/old",  # the alias, from the user
        "PREFECT_SERVER_DATABASE_PASSWORD": "pw",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": "local-file-system/old",
        "KEPT": "yes",
    }
    children = child_environment(environ, tmp_path, 4200, "dispatch:secret")
    assert not [name for name in children if "DATABASE" in name] and children["KEPT"] == "yes"
    given = "postgresql+asyncpg://dispatch:pw@127.0.0.1:5432/prefect"
    server = server_environment(environ, children, given)
    assert server[DATABASE_URL] == given  # under the setting's own name: Prefect reads it before the alias
    assert server["PREFECT_SERVER_DATABASE_PASSWORD"] == "pw" and server["PREFECT_API_AUTH_STRING"] == "dispatch:secret"
    assert server_environment(environ, children, None).get(DATABASE_URL) is None  # then the user's alias, as set
    worker = worker_environment(children, "local-file-system/shared")
    assert worker[RESULTS_BLOCK] == "local-file-system/shared" and "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK" not in worker
    assert worker_environment(children, None) == children


def test_a_database_or_results_block_dispatch_up_cannot_use_is_refused_at_once_the_password_unsaid(
    tmp_path: Path,
) -> None:
    """Refused before anything starts; were it not, the busy port would stop the stack (exit 1, not 2)."""
    shutil.copy(ROOT / "prefect.yaml", tmp_path)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    refused = {
        "postgresql://dispatch:s3cr3t@127.0.0.1/prefect": "postgresql://dispatch:***@127.0.0.1/prefect",  # sync driver
        "s3cr3t": "--database ***:",  # a password where the URL belongs
    }
    attempts = [["--database", database] for database in refused]
    attempts += [["--results", results] for results in ("../../etc/passwd", "local-file-system", "Local/Shared")]
    with server_like_listener() as busy:
        for options in attempts:
            done = subprocess.run(
                [*CLI, "up", *options, "--port", str(busy.getsockname()[1]), "--project", str(tmp_path)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2, (options, done.stderr)
            if options[0] == "--database":
                assert refused[options[1]] in done.stderr and "postgresql+asyncpg://" in done.stderr, done.stderr
                assert "s3cr3t" not in done.stdout + done.stderr
            else:
                assert "storage block's slug" in done.stderr, done.stderr
    assert not (tmp_path / ".dispatch").exists()  # nothing started


def test_a_database_that_does_not_answer_stops_dispatch_up_saying_which_without_its_password(tmp_path: Path) -> None:
    shutil.copy(ROOT / "prefect.yaml", tmp_path)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_UI_ENABLED": "false"}
    nobody = f"postgresql+asyncpg://dispatch:s3cr3t@127.0.0.1:{_free_port()}/prefect"  # a port nothing listens on
    argv = [*CLI, "up", "--database", nobody, "--port", str(_free_port()), "--no-hub", "--project", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 1, done.stderr
    assert f"its database: {nobody.replace('s3cr3t', '***')}" in done.stderr, done.stderr
    logs = list((tmp_path / ".dispatch" / "logs").iterdir())
    assert logs and not [log for log in logs if "s3cr3t" in log.read_text(errors="replace")]
    assert "s3cr3t" not in done.stdout + done.stderr


def in_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """What ``argv`` prints with a terminal as its stdout and stderr, as ``dispatch up`` run by hand has."""
    main, secondary = os.openpty()
    try:
        with subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary
        ) as process:
            os.close(secondary)
            output = b""
            deadline = time.monotonic() + timeout
            while select.select([main], [], [], max(deadline - time.monotonic(), 0))[0]:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            else:
                process.kill()
                raise AssertionError(f"{argv} still running after {timeout:g} s: {output!r}")
            assert process.wait(timeout=10) == 0, output
    finally:
        os.close(main)
    return output.decode(errors="replace")


#: In a terminal: start ``dispatch up`` (stopped at once by a busy port) unless told ``bare``, then import Prefect.
IMPORT_AFTER_UP = """
import socket, sys
from pathlib import Path
from cli.up import StackError, running_stack
if sys.argv[1] != "bare":
    with socket.create_server(("127.0.0.1", 0)) as busy:
        try:
            with running_stack(Path(sys.argv[1]), busy.getsockname()[1], "pool", None, print):
                pass
        except StackError as error:
            print("refused:", error)
import prefect
"""


def test_dispatch_up_itself_imports_prefect_without_its_analytics_notice(tmp_path: Path) -> None:
    """The one process of the stack with the user's terminal; a bare import beside it shows the notice exists."""
    env = {key: value for key, value in os.environ.items() if key not in CI_ENV_VARS and key != "DO_NOT_TRACK"}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # what the user had set
    notice = "anonymous usage data"
    bare = in_a_terminal([sys.executable, "-c", IMPORT_AFTER_UP, "bare"], env | {"PREFECT_HOME": str(tmp_path / "a")})
    assert notice in bare, bare
    up = in_a_terminal(
        [sys.executable, "-c", IMPORT_AFTER_UP, str(tmp_path)], env | {"PREFECT_HOME": str(tmp_path / "b")}
    )
    assert "refused: port" in up and notice not in up, up


@dataclass
class Stack:
    up: subprocess.Popen[bytes]
    project: Path
    port: int
    hub_port: int
    env: dict[str, str]
    log: Path
    hub_ready_when_announced: bool

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def auth(self) -> str:
        return (self.project / ".dispatch" / "prefect-auth").read_text().strip()

    def request(self, path: str, body: Any = None, *, auth: bool = True, **headers: str) -> tuple[int, Any, Any]:
        """A plain HTTP request to the API: (status, headers, parsed body).

        A 503 (SQLite busy under the worker's and services' writes) is tried
        again, as Prefect's own client does.
        """
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.api}{path}", data=data, method="POST" if data else "GET")
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(self.auth.encode()).decode())
        for name, value in headers.items():
            request.add_header(name, value)
        for attempt in range(6):
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status, answer.headers, json.loads(answer.read() or b"null")
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 5:
                    return error.code, error.headers, error.read()
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def final_states(self, runs: dict[str, str]) -> dict[str, Any]:
        """The state of each flow run (by what it tries), once every one of them has ended."""

        def finished() -> dict[str, Any] | None:
            states = {what: self.request(f"/flow_runs/{run_id}")[2]["state"] for what, run_id in runs.items()}
            done = all(state["type"] in ("FAILED", "CRASHED", "COMPLETED") for state in states.values())
            return states if done else None

        return wait_for("the runs to finish", finished, 120, 1.0)

    def dispatch(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A ``dispatch`` command from the project's folder, as its operator would run it."""
        return subprocess.run([*CLI, *argv], cwd=self.project, env=self.env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("up")
    project = folder / "project"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    port, hub_port = _free_port(), _free_port()
    while hub_port == port:
        hub_port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "DISPATCH_")) or key in ("PREFECT_LOGGING_LEVEL", "DISPATCH_SERVICE")
    }
    env |= {"PREFECT_HOME": str(folder / "home"), "PREFECT_UI_ENABLED": "false", "PYTHONPATH": str(project)}
    env |= {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    env |= SERVER_TUNING
    log = folder / "up.log"
    up = start([*CLI, "up", "--port", str(port), "--hub-port", str(hub_port)], env, log, project)
    try:
        began = time.monotonic()
        ready = "Ctrl-C stops everything"
        wait_for(f"{ready!r}", lambda: ready in tail(log, 100_000) or up.poll() is not None, 120, 0.25)
        assert up.poll() is None, tail(log)
        print(f"dispatch up ready in {time.monotonic() - began:.1f} s")
        stack = Stack(up, project, port, hub_port, env, log, hub_ready_when_announced=listening(hub_port))
        with stack_client(stack) as client:
            # Keep the example schedule from starting batches meanwhile.
            client.pause_deployment(client.read_deployment_by_name("dispatch-batch/example-every-5-min").id)
        yield stack
    finally:
        stop_group(up, grace=30)


def stack_client(stack: Stack) -> Any:
    settings = {
        PREFECT_API_URL: stack.api,
        PREFECT_API_AUTH_STRING: stack.auth,
        PREFECT_HOME: stack.env["PREFECT_HOME"],
    }
    with temporary_settings(updates=settings):
        return get_client(sync_client=True)


# -- closed by default ---------------------------------------------------------------------


def test_dispatch_up_keeps_its_secrets_owner_only(stack: Stack) -> None:
    for name in ("prefect-auth", "worker.token", "credentials.json"):
        assert (stack.project / ".dispatch" / name).stat().st_mode & 0o077 == 0, name


def test_its_prefect_api_refuses_unauthenticated_cross_origin_and_rebound_requests(stack: Stack) -> None:
    assert stack.request("/deployments/filter", {}, auth=False)[0] == 401
    assert stack.request("/deployments/filter", {})[0] == 200
    assert stack.request("/health", Host="evil.example")[0] == 400  # DNS rebinding: a name that is not this machine
    _, headers, _ = stack.request("/health", Origin="http://evil.example")
    assert headers.get("access-control-allow-origin") is None, dict(headers)
    own = stack.api.removesuffix("/api")
    assert stack.request("/health", Origin=own)[1].get("access-control-allow-origin") == own


def test_its_deployments_and_worker_are_up_and_the_hub_takes_an_operators_credential(stack: Stack) -> None:
    with stack_client(stack) as client:
        assert client.read_deployment_by_name("dispatch-batch/on-demand").work_pool_name == "dispatch"
        wait_for("a worker on the pool", lambda: client.read_workers_for_work_pool("dispatch"), 30, 0.25)
    token = stack.project / "operator.token"
    issued = stack.dispatch("credentials", "add-controller", "operator", "--token-file", str(token))
    assert issued.returncode == 0, issued.stderr
    hub = f"ws://127.0.0.1:{stack.hub_port}"
    devices = stack.dispatch("devices", "--hub", hub, "--token-file", str(token), "--json")
    assert devices.returncode == 0 and json.loads(devices.stdout) == [], devices.stderr
    wrong = stack.dispatch("devices", "--hub", hub, "--token-file", str(stack.project / ".dispatch" / "prefect-auth"))
    assert wrong.returncode == 1 and "401" in wrong.stderr, wrong.stderr


# -- a deployment run's parameters are data --------------------------------------------------


def test_a_deployment_run_cannot_start_a_program_or_send_the_workers_credential_elsewhere(stack: Stack) -> None:
    status, _, deployment = stack.request("/deployments/name/dispatch-batch/on-demand")
    assert status == 200, deployment
    planted = stack.project / "pwned"
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        foreign.setblocking(False)
        hostile = {
            "inline servers": {
                "config": {"mcpServers": {"x": {"command": "sh", "args": ["-c", f"id > {planted}"]}}},
                "commands": [{"tool_name": "x"}],
            },
            "a foreign hub": {
                "backend": "remote",
                "device": "lab-pc",
                "hub": f"ws://127.0.0.1:{foreign.getsockname()[1]}",
                "commands": [{"tool_name": "echo"}],
            },
            "a config elsewhere": {"config": "/etc/../tmp/mcp.json", "commands": [{"tool_name": "echo"}]},
            "a batch file elsewhere": {"batch_file": "/etc/passwd"},
            "a config in a hidden folder": {"config": ".dispatch/credentials.json", "commands": [{"tool_name": "x"}]},
            "another run's results": {"resume_from": deployment["id"], "commands": [{"tool_name": "echo"}]},
        }
        runs = {}
        for what, parameters in hostile.items():
            status, _, run = stack.request(
                f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
            )
            assert status == 201, (what, run)
            runs[what] = run["id"]

        states = stack.final_states(runs)
        for what, state in states.items():
            assert state["type"] == "FAILED" and "ParameterRefused" in state["message"], (what, state)
        assert not planted.exists()
        with pytest.raises(BlockingIOError):
            foreign.accept()  # the worker never connected to it


def test_a_run_cannot_override_the_workers_command_environment_or_folder(stack: Stack, tmp_path: Path) -> None:
    """Prefect lets a run's creator set job variables; the pool ``dispatch up`` makes fixes them all."""
    status, _, deployment = stack.request("/deployments/name/dispatch-batch/on-demand")
    planted = tmp_path / "pwned"
    (tmp_path / "mcp.json").write_text(
        json.dumps({"mcpServers": {"x": {"command": "sh", "args": ["-c", f"id > {planted}"]}}})
    )
    echo = {"config": "examples/mcp.json", "commands": [{"tool_name": "echo", "parameters": {"value": 1}}]}
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        foreign.setblocking(False)
        remote = {"backend": "remote", "device": "lab-pc", "timeout": 3, "commands": [{"tool_name": "echo"}]}
        hostile = {
            "a command": (echo, {"command": f"sh -c 'id > {planted}'"}),
            "an environment": (remote, {"env": {"DISPATCH_HUB": f"ws://127.0.0.1:{foreign.getsockname()[1]}"}}),
            "a folder": ({"config": "mcp.json", "commands": [{"tool_name": "x"}]}, {"working_dir": str(tmp_path)}),
        }
        runs = {}
        for what, (parameters, job_variables) in hostile.items():
            body = {"parameters": parameters, "job_variables": job_variables}
            status, _, run = stack.request(f"/deployments/{deployment['id']}/create_flow_run", body)
            assert status in (201, 409, 422), (what, status, run)  # refused outright, or created and ignored
            if status == 201:
                runs[what] = run["id"]

        states = stack.final_states(runs)
        assert not planted.exists(), states
        with pytest.raises(BlockingIOError):
            foreign.accept()  # the worker's credential went to its own hub only
    if "a command" in states:
        assert states["a command"]["type"] == "COMPLETED", states  # it ran as the worker runs every flow


# -- last: Ctrl-C stops everything --------------------------------------------------------------


def test_ctrl_c_stops_all_of_it(stack: Stack) -> None:
    started = time.monotonic()
    stack.up.send_signal(signal.SIGINT)
    try:
        code = stack.up.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"dispatch up still running 30 s after SIGINT:\n{tail(stack.log)}") from None
    print(f"dispatch up stopped in {time.monotonic() - started:.1f} s")
    assert code == 0 and "stopped" in tail(stack.log), tail(stack.log)
    port, hub_port = stack.port, stack.hub_port
    left = processes_mentioning(f"127.0.0.1:{port}", f"--port {port}", f"--port {hub_port}", f"127.0.0.1:{hub_port}")
    assert left == [], left
    # Checked last, so that the rest is tested either way: once up says it is up, so is the hub.
    assert stack.hub_ready_when_announced, "'Ctrl-C stops everything' came before the hub listened"
