"""The ``dispatch.*`` events and the run logging, through the session's real Prefect API.

What Prefect does with what the builders hand it (``tests/unit/test_events.py``
checks the builders): an event too large is logged, not raised; a tool error
too large for an event stays whole in its Result; the dispatcher's logs reach
the flow run's logs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import Any, cast

import pytest
from prefect import State, flow, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent, ResourceSpecification
from prefect.logging.handlers import APILogHandler

from aip.budget import Deadline
from aip.messages import Command, Result, ResultStatus
from dispatchers import InMemoryCommandDispatcher
from flows.batch import dispatch_batch
from tasks import BatchContext, execute_as_task
from tasks.events import TEXT_LIMIT, DispatchEvent, emit_command_event

BATCH = BatchContext(namespace="first-run", flow_run_id="this-run", device="pc-1")


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
