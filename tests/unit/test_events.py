"""The ``dispatch.*`` events (tasks/events.py) and the run logging a flow run installs (tasks.install_run_logging).

The builders are checked against what automations are documented to match
on (names, resource ids and labels, related flow run, payloads), by catching
what they hand to Prefect: no API. What a real API makes of them is in
``tests/integration/test_events_api.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

import tasks.events
from aip.credentials import Identity, Role
from aip.messages import Command, Result, ResultStatus
from aip.registration import Profile
from aip.switchboard import Device
from cli.hub_events import PrefectHubEvents
from flows.reporting import emit_batch_finished
from tasks import BatchContext, CommandReport, install_run_logging
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


def test_installing_the_run_logging_twice_installs_it_once() -> None:
    install_run_logging()
    install_run_logging()

    handlers = logging.getLogger("dispatchers").handlers
    filters = logging.getLogger("prefect.task_runs").filters
    assert sum(isinstance(handler, _RunLogHandler) for handler in handlers) == 1
    assert sum(isinstance(installed, _NoStateEcho) for installed in filters) == 1
