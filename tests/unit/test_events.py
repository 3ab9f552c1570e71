"""The ``dispatch.*`` events (tasks/events.py) and the run logging a flow run installs (tasks.install_run_logging).

The builders are checked against what automations are documented to match
on (names, resource ids and labels, related flow run, payloads), by catching
what they hand to Prefect; one test reads events back from a real API, for a
tool whose error is larger than any event Prefect accepts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Awaitable
from typing import Any, cast

import pytest
from conftest import ROOT
from prefect import State, flow, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent, ResourceSpecification
from prefect.logging.handlers import APILogHandler

import tasks.events
from aip.budget import Deadline
from aip.credentials import Identity, Role
from aip.messages import Command, Result, ResultStatus
from aip.registration import Profile
from aip.switchboard import Device
from cli.hub_events import PrefectHubEvents
from dispatchers import InMemoryCommandDispatcher
from flows.batch import dispatch_batch
from flows.reporting import emit_batch_finished
from tasks import BatchContext, CommandReport, execute_as_task, install_run_logging
from tasks.command import _NoStateEcho, _Observer, _RunLogHandler
from tasks.events import TEXT_LIMIT, DispatchEvent, clip, emit_command_event

BATCH = BatchContext(namespace="first-run", flow_run_id="this-run", device="pc-1")


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the builders hand to Prefect's ``emit_event``, one dict of its arguments per event."""
    calls: list[dict[str, Any]] = []

    def record(event: str, **arguments: Any) -> None:
        calls.append({"event": event, **arguments})

    monkeypatch.setattr(tasks.events, "emit_event", record)
    return calls


def _device() -> Device:
    profile = Profile.from_metadata(
        {"platform": "linux", "dispatch": {"tools": [{"name": "echo", "server": "demo"}, {"name": "add"}]}}
    )
    identity = Identity(Role.DEVICE, "pc-1", credential="digest")
    return Device("pc-1", object(), identity, profile, "2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00+00:00")


# -- the documented events -----------------------------------------------------------


def test_a_command_event_names_the_command_its_batch_and_its_flow_run(emitted: list[dict[str, Any]]) -> None:
    command = Command(tool_name="echo", parameters={"value": 1}, call_id="c-1")

    emit_command_event(DispatchEvent.COMMAND_SUCCEEDED, command, BATCH, {"attempts": 1, "status": "success"})

    assert emitted == [
        {
            "event": "dispatch.command.succeeded",
            "resource": {
                "prefect.resource.id": "dispatch.command.c-1",
                "prefect.resource.name": "echo",
                "dispatch.call_id": "c-1",
                "dispatch.tool": "echo",
                "dispatch.batch": "first-run",
                "dispatch.flow_run": "this-run",
                "dispatch.device": "pc-1",
            },
            "related": [{"prefect.resource.id": "prefect.flow-run.this-run", "prefect.resource.role": "flow-run"}],
            "payload": {"attempts": 1, "status": "success"},
        }
    ]


def test_a_retry_is_an_event_with_the_attempt_its_error_and_the_delay(emitted: list[dict[str, Any]]) -> None:
    command = Command(tool_name="flaky", call_id="c-2")
    local = BatchContext(namespace="run", flow_run_id="run")  # no device: no device label

    _Observer(command, local, CommandReport("c-2")).retry(2, ConnectionError("reset"), 0.5)

    [event] = emitted
    assert event["event"] == "dispatch.command.retrying"
    assert "dispatch.device" not in event["resource"]
    assert event["payload"] == {"attempt": 2, "error": "ConnectionError: reset", "delay": 0.5}


def test_the_batch_event_counts_results_by_status_and_reuse(emitted: list[dict[str, Any]]) -> None:
    results = [
        Result(status=ResultStatus.SUCCESS, call_id="a"),
        Result(status=ResultStatus.SUCCESS, call_id="b"),
        Result(status=ResultStatus.FAILURE, error="broken", call_id="c"),
    ]
    reports = [CommandReport("a", reused=True), CommandReport("b", attempts=1), None]

    emit_batch_finished(BATCH, results, reports)

    assert emitted == [
        {
            "event": "dispatch.batch.finished",
            "resource": {
                "prefect.resource.id": "dispatch.batch.this-run",
                "dispatch.batch": "first-run",
                "dispatch.flow_run": "this-run",
                "dispatch.device": "pc-1",
            },
            "related": [{"prefect.resource.id": "prefect.flow-run.this-run", "prefect.resource.role": "flow-run"}],
            "payload": {"total": 3, "success": 2, "failure": 1, "skipped": 0, "none": 0, "reused": 1},
        }
    ]


def test_the_hub_reports_a_device_by_id_kind_and_platform(emitted: list[dict[str, Any]]) -> None:
    device = _device()
    resource = {
        "prefect.resource.id": "dispatch.device.pc-1",
        "prefect.resource.name": "pc-1",
        "dispatch.device": "pc-1",
        "dispatch.device.kind": "dispatch",
        "dispatch.device.platform": "linux",
    }

    PrefectHubEvents().device_connected(device)
    PrefectHubEvents().device_lost(device, "connection closed (1000)", 2)

    assert emitted == [
        {
            "event": "dispatch.device.connected",
            "resource": resource,
            "related": None,
            "payload": {"tools": ["echo", "add"]},
        },
        {
            "event": "dispatch.device.lost",
            "resource": resource,
            "related": None,
            "payload": {"reason": "connection closed (1000)", "failed_batches": 2},
        },
    ]


def test_every_string_of_a_payload_is_bounded(emitted: list[dict[str, Any]]) -> None:
    command = Command(tool_name="fail", call_id="c-3")
    huge = "x" * (10 * TEXT_LIMIT)

    emit_command_event(DispatchEvent.COMMAND_FAILED, command, BATCH, {"error": huge, "lines": [huge], "n": 7})

    payload = emitted[0]["payload"]
    assert payload["error"] == clip(huge, TEXT_LIMIT) and len(payload["error"]) == TEXT_LIMIT
    assert payload["error"].endswith("…")
    assert payload["lines"] == [payload["error"]] and payload["n"] == 7


@pytest.mark.usefixtures("prefect_api")
def test_an_event_prefect_refuses_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # The labels come from the batch and are not cut: a 2 MB tool name makes an event over Prefect's limit.
    command = Command(tool_name="t" * 2_000_000, call_id="c-4")
    caplog.set_level(logging.WARNING, logger="dispatchers")

    emit_command_event(DispatchEvent.COMMAND_SUCCEEDED, command, BATCH, {})

    [record] = [record for record in caplog.records if record.name == "dispatchers"]
    assert "dispatch.command.succeeded" in record.getMessage() and "too large" in record.getMessage()


# -- through a real API ----------------------------------------------------------------


async def _events_of(flow_run_id: str, expected: int) -> list[ReceivedEvent]:
    """The flow run's ``dispatch.*`` events, once the API has recorded ``expected`` of them (bounded poll)."""
    event_filter = EventFilter(
        event=EventNameFilter(prefix=["dispatch."]),
        resource=EventResourceFilter(labels=ResourceSpecification({"dispatch.flow_run": flow_run_id})),
    )
    async with get_client() as client, asyncio.timeout(30):
        while True:
            found = (await client.read_events(event_filter, limit=50)).events
            if len(found) >= expected:
                return found
            await asyncio.sleep(0.2)


def _huge_error(command: Command) -> None:
    raise RuntimeError("y" * 2_000_000)  # larger than any event Prefect sends (1.5 MB by default)


@flow(persist_result=False)
async def _one_command(command: Command) -> tuple[Result, str]:
    """Run ``command`` as a task run on in-memory tools; its Result and the flow run's id."""
    from prefect.runtime import flow_run

    batch = BatchContext(namespace=str(flow_run.id), flow_run_id=str(flow_run.id))
    dispatcher = InMemoryCommandDispatcher({"huge_error": _huge_error})
    result, _ = await execute_as_task(command, dispatcher, Deadline.after(30), batch, resumable=False)
    return result, batch.flow_run_id


@pytest.mark.usefixtures("prefect_api")
async def test_a_tool_error_too_large_for_an_event_stays_in_its_result_and_is_cut_in_the_event() -> None:
    command = Command(tool_name="huge_error", call_id=f"huge-{uuid.uuid4().hex[:6]}")

    result, flow_run_id = await _one_command(command)

    # The Result keeps the tool's error (it used to become "EventTooLarge: ...").
    assert result.status is ResultStatus.FAILURE
    assert result.error is not None and result.error.endswith("y" * 1000) and "EventTooLarge" not in result.error
    [event] = await _events_of(flow_run_id, expected=1)
    assert event.event == "dispatch.command.failed"
    assert event.resource.id == f"dispatch.command.{command.call_id}"
    assert len(event.payload["error"]) == TEXT_LIMIT and event.payload["error"].startswith("ToolError: yyy")


# -- run logging -------------------------------------------------------------------------


def test_importing_the_tasks_flows_and_hub_events_installs_no_log_handler_or_filter() -> None:
    code = """
import json, logging
import tasks, flows.batch, cli.hub_events
print(json.dumps([len(logging.getLogger("dispatchers").handlers), len(logging.getLogger("prefect.task_runs").filters)]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, 0]


def test_installing_the_run_logging_twice_installs_it_once() -> None:
    install_run_logging()
    install_run_logging()

    handlers = logging.getLogger("dispatchers").handlers
    filters = logging.getLogger("prefect.task_runs").filters
    assert sum(isinstance(handler, _RunLogHandler) for handler in handlers) == 1
    assert sum(isinstance(installed, _NoStateEcho) for installed in filters) == 1


@pytest.mark.usefixtures("prefect_api")
async def test_a_flow_runs_dispatcher_logs_reach_its_logs_in_the_api(demo_config: dict[str, Any]) -> None:
    # One transient failure: the dispatcher's "retrying" warning, logged inside the task run.
    command = Command(tool_name="flaky", parameters={"key": uuid.uuid4().hex, "failures": 1}, call_id="flaky")

    state = await cast(Awaitable[State[Any]], dispatch_batch([command], config=demo_config, return_state=True))

    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    retries = [log for log in logs if log.name == "dispatchers" and "retrying in" in log.message]
    assert len(retries) == 1, [log.message for log in logs]
    assert retries[0].task_run_id is not None
