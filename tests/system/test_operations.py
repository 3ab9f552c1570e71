"""Operations against a real Prefect server: deploy, run on a worker, retry, resume, device events; many workers.

(``dispatch up`` has a module of its own: ``test_dispatch_up.py``.)

The last section runs ``dispatch up`` on a real PostgreSQL server
(``postgres_support``) with two workers and a results storage block: more
runs queued at once than the workers have slots, and a retry on a third worker
with a home of its own.

One ``prefect server start`` on a free loopback port serves the whole module,
with its own temporary ``PREFECT_HOME`` (database, stored Results, profiles):
the user's ``~/.prefect`` is never used. Every child process runs in its own
process group and is stopped in a ``finally`` (SIGTERM, then SIGKILL); every
wait is a bounded poll.

A deployment run's parameters are data (``flows.trust``): its ``config`` is
``examples/mcp.json``, a file in the project the worker runs from, never
servers given inline.

Resume is proved with two demo tools whose effects outlive the MCP server
(each flow run starts its own): ``count_to_file`` appends a line per call, so a
file's line count is how often the command really ran, across runs;
``file_gate`` fails until its file exists, a failure the test can fix between
two runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO_SERVER, ROOT, _free_port
from hub_support import token_for_device, write_credentials
from postgres_support import Postgres, running_postgres
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import Artifact, FlowRun, StateType, TaskRun
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import Event, ResourceSpecification
from prefect.filesystems import LocalFileSystem
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect.types._datetime import now
from process_support import CLI, start, stop_group, tail, wait_for
from test_dispatch_up import NOT_COPIED

from cli.up import SERVER_TUNING

PREFECT = str(Path(sys.executable).parent / "prefect")
#: The MCP servers of a deployment run: a file in the project (the worker's working directory), as the trust rules want.
PROJECT_CONFIG = "examples/mcp.json"
#: How long a fresh Prefect server may take to answer /health.
SERVER_STARTUP = 60.0
#: How long a deployment run may take from trigger to a final state (worker poll, flow subprocess, MCP server).
RUN_TIMEOUT = 60.0
#: How long the API may take to show what a run recorded (task runs and events are written in batches).
RECORDED = 20.0


# -- processes and waits ---------------------------------------------------------


def lines(path: Path) -> int:
    """How often ``count_to_file`` ran for ``path``."""
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- the Prefect server ----------------------------------------------------------


@dataclass
class Server:
    api_url: str
    home: Path
    env: dict[str, str]
    logs: Path
    #: The basic-auth string the server requires (``dispatch up``'s ``.dispatch/prefect-auth``); None: no auth.
    auth: str | None = None

    @contextlib.contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A client of this server, from this process, with this module's PREFECT_HOME (never the user's)."""
        settings: dict[Any, Any] = {PREFECT_API_URL: self.api_url, PREFECT_HOME: str(self.home)}
        if self.auth is not None:
            settings[PREFECT_API_AUTH_STRING] = self.auth
        with temporary_settings(updates=settings), get_client(sync_client=True) as client:
            yield client

    def run(self, *argv: str, timeout: float = 90, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """A CLI command against this server, from the repository root."""
        return subprocess.run(
            list(argv), cwd=ROOT, env=self.env | extra_env, capture_output=True, text=True, timeout=timeout
        )


def operator_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without Prefect or hub settings, plus a PREFECT_HOME of its own and quiet, quick defaults.

    Every ``PREFECT_*`` variable of the caller goes (a database URL, a storage
    path or a profile could point at the user's own), except the log level.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if (not key.startswith("PREFECT_") or key == "PREFECT_LOGGING_LEVEL")
        and key not in ("DISPATCH_TOKEN", "DISPATCH_HUB")
    }
    return env | {
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        **SERVER_TUNING,
        **extra,
    }


def wait_healthy(api_url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the Prefect server exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    wait_for("healthy Prefect server", healthy, timeout, interval=0.25)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("ops")
    home, logs = base / "prefect-home", base / "logs"
    home.mkdir()
    logs.mkdir()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # No dashboard: this server only answers the API (the UI build is copied on first start otherwise).
    env = operator_env(home, PREFECT_API_URL=api_url, PREFECT_UI_ENABLED="false")
    log = logs / "server.log"
    process = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        wait_healthy(api_url, process, log, SERVER_STARTUP)
        yield Server(api_url, home, env, logs)
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def deployed(server: Server) -> dict[str, subprocess.CompletedProcess[str]]:
    """The work pool and prefect.yaml's deployments, created as the README says."""
    pool = server.run(PREFECT, "work-pool", "create", "dispatch", "--type", "process", "--overwrite")
    deploy = server.run(PREFECT, "--no-prompt", "deploy", "--all")
    if deploy.returncode == 0:
        # Its schedule is due at once (the anchor is now): pause it, so that no example batch runs
        # alongside this module's own (and drop the runs the scheduler may have put on it already).
        with server.client() as client:
            scheduled = client.read_deployment_by_name("dispatch-batch/example-every-5-min")
            client.pause_deployment(scheduled.id)
            for run in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[scheduled.id]))
            ):
                if run.state_type is StateType.SCHEDULED:
                    client.delete_flow_run(run.id)
    return {"pool": pool, "deploy": deploy}


@pytest.fixture(scope="module")
def worker(server: Server, deployed: dict[str, subprocess.CompletedProcess[str]]) -> Iterator[subprocess.Popen[bytes]]:
    assert all(done.returncode == 0 for done in deployed.values()), deployed
    log = server.logs / "worker.log"
    process = start([PREFECT, "worker", "start", "--pool", "dispatch"], server.env, log)
    try:
        yield process
    finally:
        stop_group(process)
        # The worker's log is where a flow run's crash is explained.
        print(f"worker log:\n{tail(log, 6000)}")


def demo_config() -> dict[str, Any]:
    """An mcp.json with the demo server by absolute path (in-process runs and devices; not a deployment run's)."""
    return {"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}


# -- reading back through the API -----------------------------------------------


def trigger(server: Server, parameters: dict[str, Any], deployment: str = "dispatch-batch/on-demand") -> str:
    with server.client() as client:
        found = client.read_deployment_by_name(deployment)
        return str(client.create_flow_run_from_deployment(found.id, parameters=parameters).id)


def finished(server: Server, flow_run_id: str, timeout: float = RUN_TIMEOUT) -> FlowRun:
    """The flow run once it is in a final state."""

    def final() -> FlowRun | None:
        with server.client() as client:
            run = client.read_flow_run(uuid.UUID(flow_run_id))
        return run if run.state is not None and run.state.is_final() else None

    try:
        return wait_for(f"final state of flow run {flow_run_id}", final, timeout, interval=0.3)
    except AssertionError as error:
        raise AssertionError(f"{error}\nworker log:\n{tail(server.logs / 'worker.log')}") from None


def all_finished(server: Server, flow_run_ids: list[str], timeout: float) -> list[FlowRun]:
    """The flow runs, in the order given, once all of them are in a final state (one query a second for all)."""
    wanted = [uuid.UUID(flow_run_id) for flow_run_id in flow_run_ids]

    def final() -> list[FlowRun] | None:
        with server.client() as client:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=wanted)))
        ended = {run.id: run for run in found if run.state is not None and run.state.is_final()}
        return [ended[run_id] for run_id in wanted] if len(ended) == len(wanted) else None

    return wait_for(f"final states of {len(wanted)} flow runs", final, timeout, interval=1.0)


def task_runs(server: Server, flow_run_id: str, count: int) -> list[TaskRun]:
    """The flow run's task runs, once ``count`` of them are recorded in a final state."""

    def recorded() -> list[TaskRun] | None:
        with server.client() as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
            )
        done = [run for run in runs if run.state is not None and run.state.is_final()]
        return runs if len(done) >= count else None

    return wait_for(f"{count} final task runs of {flow_run_id}", recorded, RECORDED)


def artifacts(server: Server, flow_run_id: str) -> list[Artifact]:
    with server.client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
        )


def latest(found: list[Artifact], key: str) -> Artifact:
    keyed = sorted((artifact for artifact in found if artifact.key == key), key=lambda artifact: str(artifact.created))
    assert keyed, f"no {key!r} artifact among {[artifact.key for artifact in found]}"
    return keyed[-1]


def table_rows(artifact: Artifact) -> list[dict[str, Any]]:
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(data, list), data
    return data


def events(
    server: Server, labels: dict[str, str], expected: Callable[[list[Event]], bool], prefix: str = "dispatch."
) -> list[Event]:
    """The events named ``prefix...`` whose resource has ``labels``, once ``expected`` holds for them."""

    def read() -> list[Event] | None:
        event_filter = EventFilter(  # occurred: the last 180 days, until now
            event=EventNameFilter(prefix=[prefix]),
            resource=EventResourceFilter(labels=ResourceSpecification(labels)),
        )
        with server.client() as client:
            found = client.read_events(event_filter, limit=50).events
        return found if expected(found) else None

    return wait_for(f"{prefix} events for {labels}", read, RECORDED, interval=0.3)


def names(found: list[Event]) -> list[str]:
    return sorted(event.event for event in found)


# -- 1. deployments from prefect.yaml ---------------------------------------------


def test_prefect_yaml_deploys_both_deployments_on_the_process_pool(
    server: Server, deployed: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    for step, done in deployed.items():
        assert done.returncode == 0, f"{step}: {done.stdout}\n{done.stderr}"
    with server.client() as client:
        pool = client.read_work_pool("dispatch")
        on_demand = client.read_deployment_by_name("dispatch-batch/on-demand")
        scheduled = client.read_deployment_by_name("dispatch-batch/example-every-5-min")
        assert pool.type == "process"
        for deployment in (on_demand, scheduled):
            assert deployment.work_pool_name == "dispatch"
            assert deployment.entrypoint == "flows/batch.py:dispatch_batch"
            # The pull step runs flows from this checkout.
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ]
            # The worker starts the engine with the deploying interpreter (the build step), no supervisor first.
            interpreter, *engine = shlex.split(deployment.job_variables["command"])
            assert engine == ["-m", "prefect.engine"]
            assert Path(interpreter).resolve() == Path(sys.executable).resolve()
        assert on_demand.schedules == [] and on_demand.parameters == {}  # a batch comes with each run
        assert scheduled.parameters == {"batch_file": "examples/batch.yaml"}
        assert [getattr(schedule.schedule, "interval", None) for schedule in scheduled.schedules] == [
            timedelta(seconds=300)
        ]
        assert all(schedule.active for schedule in scheduled.schedules)
        assert scheduled.global_concurrency_limit is not None
        assert scheduled.global_concurrency_limit.limit == 1
        assert set(scheduled.tags) == {"dispatch", "scheduled"}


# -- 2. a deployment run, read back through the API --------------------------------


def test_a_deployment_run_shows_commands_as_task_runs_with_artifacts_and_events(
    server: Server, worker: subprocess.Popen[bytes]
) -> None:
    tag = uuid.uuid4().hex[:6]
    call_ids = [f"ok-{tag}", f"zero-{tag}", f"bad-{tag}"]
    commands = [
        {"tool_name": "count", "parameters": {"key": tag}, "call_id": call_ids[0]},
        {"tool_name": "echo", "parameters": {"value": 0}, "call_id": call_ids[1]},
        {"tool_name": "fail", "parameters": {"message": "broken on purpose"}, "call_id": call_ids[2]},
    ]
    flow_run_id = trigger(server, {"commands": commands, "config": PROJECT_CONFIG, "timeout": 60})
    run = finished(server, flow_run_id)

    assert run.state is not None
    assert run.state.type is StateType.FAILED, run.state
    assert run.state.message == "1 of 3 commands failed"
    assert {"backend:local", "dispatch"} <= set(run.tags)

    tasks = {task.name: task for task in task_runs(server, flow_run_id, 3)}
    assert set(tasks) == {f"count[{call_ids[0]}]", f"echo[{call_ids[1]}]", f"fail[{call_ids[2]}]"}
    assert tasks[f"fail[{call_ids[2]}]"].state_type is StateType.FAILED
    assert tasks[f"count[{call_ids[0]}]"].state_type is StateType.COMPLETED
    assert tasks[f"echo[{call_ids[1]}]"].state_type is StateType.COMPLETED

    found = artifacts(server, flow_run_id)
    rows = {row["call_id"]: row for row in table_rows(latest(found, "batch-results"))}
    assert [rows[call_id]["status"] for call_id in call_ids] == ["success", "success", "failure"]
    assert "broken on purpose" in rows[call_ids[2]]["error"]
    assert "**2 of 3 commands succeeded**" in str(latest(found, "batch-summary").data)
    progress = [artifact for artifact in found if artifact.type == "progress"]
    assert [artifact.data for artifact in progress] == [100.0]

    def complete(found: list[Event]) -> bool:
        return names(found) == [
            "dispatch.batch.finished",
            "dispatch.command.failed",
            "dispatch.command.succeeded",
            "dispatch.command.succeeded",
        ]

    found_events = events(server, {"dispatch.flow_run": flow_run_id}, complete)
    by_call = {
        event.resource.get("dispatch.call_id"): event
        for event in found_events
        if event.event.startswith("dispatch.command.")
    }
    assert by_call[call_ids[2]].event == "dispatch.command.failed"
    assert by_call[call_ids[2]].resource.id == f"dispatch.command.{call_ids[2]}"
    assert "broken on purpose" in by_call[call_ids[2]].payload["error"]
    assert {by_call[call_ids[0]].event, by_call[call_ids[1]].event} == {"dispatch.command.succeeded"}
    assert by_call[call_ids[0]].resource["dispatch.tool"] == "count"
    batch_event = next(event for event in found_events if event.event == "dispatch.batch.finished")
    assert batch_event.payload["total"] == 3
    assert batch_event.payload["success"] == 2
    assert batch_event.payload["failure"] == 1
    # Named after what it runs: the commands given.
    assert run.name == f"batch-3-commands-{str(run.id)[:8]}"


# -- 3 and 4. retrying a failed deployment run; a later run ------------------------


@dataclass
class RetriedRun:
    flow_run_id: str
    parameters: dict[str, Any]
    counters: tuple[Path, Path]
    gate: Path
    first: FlowRun
    counts_after_first: tuple[int, int]
    retry: subprocess.CompletedProcess[str]
    second: FlowRun | None


@pytest.fixture(scope="module")
def retried_run(
    server: Server, worker: subprocess.Popen[bytes], tmp_path_factory: pytest.TempPathFactory
) -> RetriedRun:
    """A deployment run of 3 commands that fails on its gate; the gate is opened; ``prefect flow-run retry``."""
    work = tmp_path_factory.mktemp("retry")
    counters, gate = (work / "a.count", work / "b.count"), work / "gate"
    parameters = {
        # No call_ids: each run derives its own, the same again on a retry of that run.
        "commands": [
            {"tool_name": "count_to_file", "parameters": {"path": str(counters[0])}},
            {"tool_name": "count_to_file", "parameters": {"path": str(counters[1])}},
            {"tool_name": "file_gate", "parameters": {"path": str(gate)}},
        ],
        "config": PROJECT_CONFIG,
        "timeout": 60,
    }
    flow_run_id = trigger(server, parameters)
    first = finished(server, flow_run_id)
    counts = (lines(counters[0]), lines(counters[1]))
    gate.write_text("open")
    retry = server.run(PREFECT, "flow-run", "retry", flow_run_id, timeout=60)
    second = finished(server, flow_run_id) if retry.returncode == 0 else None
    return RetriedRun(flow_run_id, parameters, counters, gate, first, counts, retry, second)


def test_retrying_a_failed_deployment_run_reruns_only_the_failed_command(
    server: Server, retried_run: RetriedRun
) -> None:
    run = retried_run
    assert run.first.state is not None
    assert run.first.state.type is StateType.FAILED, run.first.state
    assert run.first.state.message == "1 of 3 commands failed"
    assert run.counts_after_first == (1, 1)

    assert run.retry.returncode == 0, run.retry.stdout + run.retry.stderr
    assert run.second is not None
    assert run.second.state is not None
    assert run.second.state.type is StateType.COMPLETED, run.second.state
    assert run.second.state.message == "3 commands succeeded"
    assert run.second.run_count >= 2
    # The commands that had succeeded ran exactly once in all; the fixed one ran again and succeeded.
    assert (lines(run.counters[0]), lines(run.counters[1])) == (1, 1)

    # In the dashboard: each counter ran once and was then served from its stored Result; the gate ran twice.
    states: dict[str, list[str]] = {}
    for task in task_runs(server, run.flow_run_id, 6):
        states.setdefault(task.name.split("[")[0], []).append(task.state_name or "")
    assert sorted(states["count_to_file"]) == ["Cached", "Cached", "Completed", "Completed"], states
    assert sorted(states["file_gate"]) == ["Completed", "Failed"], states

    # The retried run's Results hold all three: two reused from the first attempt, the gate's new one.
    rows = table_rows(latest(artifacts(server, run.flow_run_id), "batch-results"))
    assert [row["tool"] for row in rows] == ["count_to_file", "count_to_file", "file_gate"]
    assert [row["status"] for row in rows] == ["success"] * 3
    assert [row["attempts"] for row in rows] == ["reused", "reused", 1]
    assert [json.loads(row["result"]) for row in rows] == [
        {"result": 1},
        {"result": 1},
        {"result": "open"},
    ]

    def both_attempts(found: list[Event]) -> bool:
        return names(found).count("dispatch.batch.finished") == 2

    batches = events(server, {"dispatch.flow_run": run.flow_run_id}, both_attempts)
    payloads = sorted(
        (event.payload for event in batches if event.event == "dispatch.batch.finished"), key=lambda p: p["success"]
    )
    assert payloads[0] == {"total": 3, "success": 2, "failure": 1, "skipped": 0, "none": 0, "reused": 0}
    assert payloads[1] == {"total": 3, "success": 3, "failure": 0, "skipped": 0, "none": 0, "reused": 2}
    # The gate's call_id failed once and succeeded once; the counters' succeeded once each, never again.
    commands = [event for event in batches if event.event.startswith("dispatch.command.")]
    per_call: dict[str, list[str]] = {}
    for event in sorted(commands, key=lambda event: event.occurred):
        per_call.setdefault(event.resource["dispatch.call_id"], []).append(event.event.rsplit(".", 1)[1])
    assert sorted(per_call.values()) == [["failed", "succeeded"], ["succeeded"], ["succeeded"]]


def test_a_later_deployment_run_never_reuses_an_earlier_runs_results(server: Server, retried_run: RetriedRun) -> None:
    assert retried_run.second is not None  # the retry itself is checked above
    later = finished(server, trigger(server, retried_run.parameters))
    assert later.id != retried_run.first.id
    assert later.state is not None
    assert later.state.type is StateType.COMPLETED, later.state
    # Same parameters, a new run: every command ran again.
    assert (lines(retried_run.counters[0]), lines(retried_run.counters[1])) == (2, 2)
    rows = table_rows(latest(artifacts(server, str(later.id)), "batch-results"))
    assert [row["attempts"] for row in rows] == [1, 1, 1]


# -- 5. dispatch resume of an in-process run ------------------------------------------


def test_dispatch_resume_reruns_only_the_failed_command_of_an_in_process_run(server: Server, tmp_path: Path) -> None:
    counters, gate = (tmp_path / "a.count", tmp_path / "b.count"), tmp_path / "gate"
    (tmp_path / "mcp.json").write_text(json.dumps(demo_config()))
    batch = {
        "config": "mcp.json",
        "timeout": 60,
        "commands": [
            {"tool_name": "count_to_file", "parameters": {"path": str(counters[0])}},
            {"tool_name": "count_to_file", "parameters": {"path": str(counters[1])}},
            {"tool_name": "file_gate", "parameters": {"path": str(gate)}},
        ],
    }
    (tmp_path / "batch.json").write_text(json.dumps(batch))

    def in_process_runs(since: Any) -> list[FlowRun]:
        with server.client() as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(is_null_=True),
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=since),
                )
            )

    before = now("UTC")
    done = server.run(*CLI, "run", str(tmp_path / "batch.json"), "--json", timeout=90)
    assert done.returncode == 1, done.stdout + done.stderr
    results = json.loads(done.stdout)
    assert [result["status"] for result in results] == ["success", "success", "failure"]
    assert (lines(counters[0]), lines(counters[1])) == (1, 1)
    [first] = in_process_runs(before)
    assert first.state is not None
    assert first.state.message == "1 of 3 commands failed"

    gate.write_text("open")
    before_resume = now("UTC")
    done = server.run(*CLI, "resume", str(first.id), "--json", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed_results = json.loads(done.stdout)
    assert [result["status"] for result in resumed_results] == ["success"] * 3
    assert [result["call_id"] for result in resumed_results] == [result["call_id"] for result in results]
    # The counters' Results are the first run's (1 each), and they did not run again.
    assert [result["result"] for result in resumed_results] == [{"result": 1}, {"result": 1}, {"result": "open"}]
    assert (lines(counters[0]), lines(counters[1])) == (1, 1)
    [resumed] = in_process_runs(before_resume)
    assert resumed.id != first.id
    assert resumed.name == f"{first.name.rsplit('-', 1)[0]}-resumed-{str(resumed.id)[:8]}", resumed.name
    assert resumed.state is not None
    assert resumed.state.type is StateType.COMPLETED, resumed.state


# -- 7. device events from the hub -------------------------------------------------


def test_the_hub_reports_devices_connecting_and_lost_as_prefect_events(server: Server, tmp_path: Path) -> None:
    hub_port = _free_port()
    device_id = f"ops-{uuid.uuid4().hex[:6]}"
    (tmp_path / "mcp.json").write_text(json.dumps(demo_config()))
    # The hub knows the device by its own credential; the device presents it.
    credentials = write_credentials(tmp_path / "credentials.json", [device_id])
    hub = start(
        [*CLI, "serve", "--port", str(hub_port), "--credentials", str(credentials)], server.env, tmp_path / "hub.log"
    )
    device = None
    try:
        device = start(
            [
                *CLI,
                "device",
                "--hub",
                f"ws://127.0.0.1:{hub_port}/ws",
                "--id",
                device_id,
                "--config",
                str(tmp_path / "mcp.json"),
            ],
            server.env | {"DISPATCH_TOKEN": token_for_device(device_id)},
            tmp_path / "device.log",
        )
        labels = {"dispatch.device": device_id}
        try:
            connected = events(server, labels, lambda found: "dispatch.device.connected" in names(found))
        except AssertionError as error:
            raise AssertionError(
                f"{error}\nhub:\n{tail(tmp_path / 'hub.log')}\ndevice:\n{tail(tmp_path / 'device.log')}"
            ) from None
        [event] = [event for event in connected if event.event == "dispatch.device.connected"]
        assert event.resource.id == f"dispatch.device.{device_id}"
        assert "count_to_file" in event.payload["tools"]

        device.send_signal(signal.SIGTERM)
        assert device.wait(timeout=20) == 0, tail(tmp_path / "device.log")
        gone = events(server, labels, lambda found: "dispatch.device.lost" in names(found))
        [lost] = [event for event in gone if event.event == "dispatch.device.lost"]
        assert lost.resource.id == f"dispatch.device.{device_id}"
        assert lost.payload["failed_batches"] == 0
    finally:
        if device is not None:
            stop_group(device)
        stop_group(hub)


# -- 8. on PostgreSQL, with many workers: dispatch up --database --workers --results -------

#: The results storage block of the PostgreSQL stack: a folder every worker reads, as a shared disk would be.
RESULTS_BLOCK = "local-file-system/shared-results"
#: The stack's workers, as ``dispatch up --workers 2`` names them (``--pool dispatch``).
UP_WORKERS = {"dispatch-worker-1", "dispatch-worker-2"}
#: Runs queued at once: more than the stack's 4 slots (``--workers 2 --limit 2``), so some wait for a slot and
#: both workers must take some; each costs about 5 s of CPU, so no more than that proof needs.
QUEUED = 6
#: The MCP servers of its runs, in the project: the demo server alone (a second one is a second process per run).
DEMO_ONLY = "examples/demo-only.json"


@dataclass
class Shared:
    """``dispatch up`` on PostgreSQL with two workers and a results block, and what the tests read of it."""

    server: Server
    postgres: Postgres
    up: subprocess.Popen[bytes]
    log: Path
    project: Path
    #: The block's folder: where every worker stores Results.
    results: Path


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as database:
        yield database


@pytest.fixture(scope="module")
def shared(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """The stack, up; the results block made once it is (as an operator would on a new database); no schedule."""
    folder = tmp_path_factory.mktemp("up-postgres")
    project, home, results = folder / "project", folder / "home", folder / "results"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    examples = json.loads((project / PROJECT_CONFIG).read_text())["mcpServers"]
    (project / DEMO_ONLY).write_text(json.dumps({"mcpServers": {"demo": examples["demo"]}}))
    port = _free_port()
    env = operator_env(home, PREFECT_UI_ENABLED="false", PYTHONPATH=str(project))
    log = folder / "up.log"
    options = ["--database", postgres.url, "--workers", "2", "--limit", "2", "--results", RESULTS_BLOCK]
    up = start([*CLI, "up", "--port", str(port), "--no-hub", *options], env, log, project)
    try:
        ready = "Ctrl-C stops everything"
        wait_for(f"{ready!r}", lambda: ready in tail(log, 100_000) or up.poll() is not None, 100, 0.25)
        assert up.poll() is None, tail(log)
        auth = (project / ".dispatch" / "prefect-auth").read_text().strip()
        api_url = f"http://127.0.0.1:{port}/api"
        server = Server(
            api_url, home, env | {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": auth}, folder, auth
        )
        with server.client() as client:
            LocalFileSystem(basepath=str(results)).save(RESULTS_BLOCK.split("/")[1])  # on this server: its settings
            client.pause_deployment(client.read_deployment_by_name("dispatch-batch/example-every-5-min").id)
            # Up is said once the workers are started; both polling is what lets a batch of runs spread over them.
            wait_for(
                "both workers polling",
                lambda: {worker.name for worker in client.read_workers_for_work_pool("dispatch")} >= UP_WORKERS,
                60,
                0.5,
            )
        yield Shared(server, postgres, up, log, project, results)
    finally:
        stop_group(up, grace=30)
        print(f"dispatch up:\n{tail(log)}")


def submitted_by(shared: Shared, count: int) -> dict[str, list[str]]:
    """The workers that submitted each flow run (by run id, in order), once ``count`` submissions are recorded."""
    found = events(
        shared.server,
        {"prefect.worker-type": "process"},
        lambda found: len(found) >= count,
        prefix="prefect.worker.submitted-flow-run",
    )
    by_run: dict[str, list[str]] = {}
    for event in sorted(found, key=lambda event: event.occurred):
        [run] = [related.id for related in event.related if related.role == "flow-run"]
        by_run.setdefault(run.removeprefix("prefect.flow-run."), []).append(event.resource.name or "")
    return by_run


def stack_children(up: subprocess.Popen[bytes], *needles: str) -> list[int]:
    """The pids of ``dispatch up``'s own children whose command line holds every one of ``needles``."""
    found = []
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == up.pid:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if all(needle in cmdline for needle in needles):
                    found.append(int(pid))
    return found


def test_dispatch_up_runs_its_server_on_the_postgresql_database_given_and_shows_no_password(shared: Shared) -> None:
    # Prefect's tables are in that database, and the deployments in them.
    rows = shared.postgres.fetch("SELECT name FROM deployment ORDER BY name")
    assert [row[0] for row in rows] == ["example-every-5-min", "on-demand"], rows
    password = shared.postgres.password
    said = tail(shared.log, 100_000)
    assert "postgresql+asyncpg://dispatch:***@127.0.0.1" in said, said
    # The block was made after the workers started: said so.
    assert f"no results storage block '{RESULTS_BLOCK}'" in said, said
    logs = shared.project / ".dispatch" / "logs"
    for path in [shared.log, *logs.iterdir()]:
        assert password not in path.read_text(errors="replace"), path
    # The database's URL reaches the server alone: the workers have none, and the results block instead.
    workers = stack_children(shared.up, "worker", "start")
    assert len(workers) == 2, workers
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        assert not [item for item in environ if "DATABASE" in item or password in item], pid
        assert f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={RESULTS_BLOCK}" in environ


@dataclass
class Queued:
    """``QUEUED`` runs queued at once on the stack, and each one's end: every third fails on a gate left closed."""

    runs: list[str]
    counters: list[Path]
    gates: list[Path]
    failing: set[int]
    ended: list[FlowRun]


@pytest.fixture(scope="module")
def queued(shared: Shared, tmp_path_factory: pytest.TempPathFactory) -> Queued:
    work = tmp_path_factory.mktemp("queued")
    counters = [work / f"{number}.count" for number in range(QUEUED)]
    gates = [work / f"{number}.gate" for number in range(QUEUED)]
    failing = set(range(0, QUEUED, 3))
    runs = []
    for number, (counter, gate) in enumerate(zip(counters, gates, strict=True)):
        last = {"tool_name": "file_gate", "parameters": {"path": str(gate)}}
        if number not in failing:
            last = {"tool_name": "echo", "parameters": {"value": number}}
        commands = [{"tool_name": "count_to_file", "parameters": {"path": str(counter)}}, last]
        runs.append(trigger(shared.server, {"commands": commands, "config": DEMO_ONLY, "timeout": 60}))
    ended = all_finished(shared.server, runs, timeout=150)
    return Queued(runs, counters, gates, failing, ended)


@pytest.mark.timeout(180)  # about 5 s of CPU per run (bench/README.md): 15-20 s on 2 cores, a minute when loaded
def test_more_runs_queued_at_once_than_two_workers_take_each_run_once_with_a_result_per_command(
    shared: Shared, queued: Queued
) -> None:
    for number, run in enumerate(queued.ended):
        assert run.state is not None
        expected = StateType.FAILED if number in queued.failing else StateType.COMPLETED
        assert run.state.type is expected, (number, run.state)
        rows = table_rows(latest(artifacts(shared.server, str(run.id)), "batch-results"))
        assert [row["status"] for row in rows] == ["success", "failure" if number in queued.failing else "success"]
    # Each batch ran once: its counter was called once, never by a second worker.
    assert [lines(counter) for counter in queued.counters] == [1] * QUEUED
    submitted = submitted_by(shared, QUEUED)
    assert {run: len(workers) for run, workers in submitted.items()} == dict.fromkeys(queued.runs, 1)
    by_worker = {name: sum(workers == [name] for workers in submitted.values()) for name in UP_WORKERS}
    print(f"runs per worker: {by_worker}")
    assert all(by_worker.values()), by_worker  # both took runs (each holds two at a time)
    # Their Results are in the block's folder, none in the workers' PREFECT_HOME.
    assert len(list(shared.results.iterdir())) >= QUEUED
    assert not (shared.server.home / "storage").exists()


def test_a_failed_run_retried_on_another_machines_worker_reruns_only_the_failed_command(
    shared: Shared, queued: Queued, tmp_path: Path
) -> None:
    """A queued run that failed on a stack's worker, retried on a worker with a home of its own, the stack's frozen.

    That worker shares nothing with the first but the server and the results
    block (named to it as an operator would: Prefect's setting, not dispatch
    up), as a worker on another machine would.
    """
    run_id, counter = queued.runs[0], queued.counters[0]
    queued.gates[0].write_text("open")
    other_home = tmp_path / "other-machine"
    env = shared.server.env | {"PREFECT_HOME": str(other_home), "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": RESULTS_BLOCK}
    frozen = stack_children(shared.up, "worker", "start")
    assert len(frozen) == 2, frozen
    other = None
    try:
        for pid in frozen:
            os.killpg(pid, signal.SIGSTOP)
        other = start(
            [PREFECT, "worker", "start", "--pool", "dispatch", "--name", "other-machine"],
            env,
            tmp_path / "other.log",
            shared.project,
        )
        retry = shared.server.run(PREFECT, "flow-run", "retry", run_id, timeout=60)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        second = finished(shared.server, run_id)
    finally:
        for pid in frozen:
            os.killpg(pid, signal.SIGCONT)
        if other is not None:
            stop_group(other)
    assert second.state is not None, tail(tmp_path / "other.log")
    assert second.state.type is StateType.COMPLETED, (second.state, tail(tmp_path / "other.log"))
    # The counter ran once, on the first worker; the other found its Result in the block and opened the gate.
    assert lines(counter) == 1
    rows = table_rows(latest(artifacts(shared.server, run_id), "batch-results"))
    assert [(row["tool"], row["status"], row["attempts"]) for row in rows] == [
        ("count_to_file", "success", "reused"),
        ("file_gate", "success", 1),
    ], rows
    [workers] = [workers for run, workers in submitted_by(shared, QUEUED + 1).items() if run == run_id]
    assert workers[0] in UP_WORKERS and workers[1:] == ["other-machine"], workers
    assert not other_home.joinpath("storage").exists()
