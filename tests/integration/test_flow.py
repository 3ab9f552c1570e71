"""The batch flow against a real Prefect API and real MCP servers.

Prefect is exercised for what users see: one flow run per batch, one task run
per command with a readable name, failed commands as failed task runs, a
Failed flow run that says how many failed, and the results table artifact;
and a flow run that reaches an in-process hub with only what ``hub_access`` gave it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, cast
from uuid import UUID

import pytest
from hub_support import TOKEN, credentials_with, running_device, running_hub
from prefect import State, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler

from aip.messages import Command, Result, ResultStatus
from dispatchers import ServerPool
from flows.batch import dispatch_batch, run_batch_flow
from flows.hub_access import HubAccess, hub_access

pytestmark = pytest.mark.usefixtures("prefect_api")


async def run_flow(commands: list[Any], **options: Any) -> State[Any]:
    return await cast(Awaitable[State[Any]], dispatch_batch(commands, return_state=True, **options))


async def task_runs_of(flow_run_id: UUID, expected: int) -> dict[str, str]:
    """The flow run's task runs as {name: state type}, once the API has recorded them all.

    The server records task runs from events, after the flow returns: there
    is no event to await on this side, so poll (bounded) until the records are
    final (named, and in a final state).
    """
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    async with get_client() as client, asyncio.timeout(30):
        while True:
            runs = await client.read_task_runs(flow_run_filter=flow_runs)
            settled = {run.name: run.state.type.value for run in runs if run.state and run.state.is_final()}
            if len(settled) == expected and not any(name.startswith("command-") for name in settled):
                return settled
            await asyncio.sleep(0.1)


async def test_a_batch_is_one_flow_run_with_a_named_task_run_per_command(demo_config: dict[str, Any]) -> None:
    commands = [
        Command(tool_name="add", parameters={"a": 1, "b": 2}, call_id="first"),
        Command(tool_name="echo", parameters={"value": 0}),
        Command(
            tool_name="get_current_time", parameters={"timezone": "UTC"}, call_id="third-call-id-is-long-enough-to-cut"
        ),
    ]

    state = await run_flow(commands, config=demo_config, timeout=60)

    assert state.is_completed(), state.message
    results = await state.aresult()
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 3
    assert results[0].call_id == "first" and results[2].call_id == "third-call-id-is-long-enough-to-cut"
    assert results[1].call_id  # an empty call_id is filled
    assert results[0].result == {"result": 3.0} and results[1].result == {"result": 0}
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
    assert flow_run.name == f"batch-3-commands-{str(flow_run_id)[:8]}"  # two runs of one batch are told apart
    names = sorted(await task_runs_of(flow_run_id, expected=3))
    assert names == sorted(["add[first]", f"echo[{results[1].call_id[:8]}]", "get_current_time[third-ca]"])


async def test_failed_commands_fail_their_task_runs_and_the_flow_run_with_a_results_table(
    demo_config: dict[str, Any],
) -> None:
    commands = [
        {"tool_name": "echo", "parameters": {"value": "ok"}, "call_id": "good"},  # as a deployment passes them
        {"tool_name": "fail", "parameters": {"message": "out of paper"}, "call_id": "bad"},
        {"tool_name": "no_such_tool", "call_id": "unknown"},
    ]

    state = await run_flow(commands, config=demo_config, timeout=60)

    assert state.is_failed()
    assert state.message == "2 of 3 commands failed"
    results = await state.aresult(raise_on_failure=False)
    assert [r.call_id for r in results] == ["good", "bad", "unknown"]
    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.FAILURE, ResultStatus.FAILURE]
    assert "out of paper" in results[1].error
    assert "UnknownTool" in results[2].error
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    task_states = await task_runs_of(flow_run_id, expected=3)
    assert task_states == {"echo[good]": "COMPLETED", "fail[bad]": "FAILED", "no_such_tool[unknown]": "FAILED"}
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    [table] = [artifact for artifact in artifacts if artifact.type == "table"]
    assert table.key == "batch-results"
    rows = json.loads(cast(str, table.data))
    assert [row["call_id"] for row in rows] == ["good", "bad", "unknown"]
    assert [row["status"] for row in rows] == ["success", "failure", "failure"]
    assert "out of paper" in rows[1]["error"]
    # The run's logs: one line per failure, its cause; no Result repr, no stray "NoneType: None".
    await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    errors = [log.message for log in logs if log.level >= logging.ERROR and log.task_run_id is not None]
    assert len(errors) == 2, errors
    assert any("out of paper" in message for message in errors), errors
    assert not [log.message for log in logs if "Result(" in log.message or "NoneType: None" in log.message]


async def test_batch_deadline_keeps_finished_results_and_times_out_the_rest(demo_config: dict[str, Any]) -> None:
    commands = [
        Command(tool_name="echo", parameters={"value": []}, call_id="quick"),
        Command(tool_name="sleep", parameters={"seconds": 30}, call_id="slow"),
        Command(tool_name="echo", parameters={"value": False}, call_id="never-started"),
    ]
    started = time.monotonic()

    state = await run_flow(commands, config=demo_config, timeout=3)

    elapsed = time.monotonic() - started
    results = await state.aresult(raise_on_failure=False)
    assert results[0].status is ResultStatus.SUCCESS and results[0].result == {"result": []}
    for result in results[1:]:
        assert result.status is ResultStatus.FAILURE
        assert result.error.endswith("TimeoutError: no result within 3.0s")
    assert state.message == "2 of 3 commands failed"
    assert elapsed < 3 + 5  # the flow's own start and stop, not the 30 s sleep


async def test_parallel_mode_and_retries_through_the_flow(demo_config: dict[str, Any]) -> None:
    commands = [
        Command(tool_name="sleep", parameters={"seconds": 0.5}, tool_type="data_collection", call_id=f"s{i}")
        for i in range(4)
    ] + [Command(tool_name="flaky", parameters={"key": "flow", "failures": 2}, tool_type="data_collection")]

    state = await run_flow(commands, config=demo_config, timeout=60, mode="parallel", retries=2)

    results = await state.aresult()
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 5
    assert results[4].result == {"attempts": 3}


async def test_the_helper_always_answers_even_when_the_flow_cannot_start_servers() -> None:
    commands = [Command(tool_name="echo", call_id="a"), Command(tool_name="echo")]

    results = await run_batch_flow(commands, config="/nonexistent/mcp.json", timeout=30)

    assert len(results) == 2
    assert results[0].call_id == "a" and results[1].call_id
    for result in results:
        assert isinstance(result, Result) and result.status is ResultStatus.FAILURE
        assert "/nonexistent/mcp.json: no such file" in result.error


async def test_a_server_killed_mid_call_fails_only_that_command_promptly(demo_config: dict[str, Any]) -> None:
    commands = [
        Command(tool_name="sleep", parameters={"seconds": 60}, tool_type="action", call_id="in-flight"),
        Command(tool_name="crash", call_id="killer"),
        Command(tool_name="echo", parameters={"value": "after"}, call_id="after-restart"),
    ]
    demo_config["mcpServers"]["demo"]["max_actions"] = 2  # both actions in flight when the server dies
    started = time.monotonic()

    state = await run_flow(commands, config=demo_config, timeout=60, mode="parallel", max_concurrency=2)

    elapsed = time.monotonic() - started
    results = await state.aresult(raise_on_failure=False)
    assert [r.call_id for r in results] == ["in-flight", "killer", "after-restart"]
    assert "ConnectionLost" in results[0].error and "ConnectionLost" in results[1].error
    assert results[2].status is ResultStatus.SUCCESS and results[2].result == {"result": "after"}
    assert elapsed < 30  # detected at the crash, not at the 60 s deadline nor after the 60 s sleep


async def test_batches_run_in_one_server_pool_share_their_servers(demo_config: dict[str, Any]) -> None:
    key = f"shared-{time.monotonic_ns()}"
    count = [Command(tool_name="count", parameters={"key": key})]

    async with ServerPool():  # its owner: the servers live as long as the pool (as in `dispatch run`)
        first = await run_batch_flow(count, config=demo_config, timeout=60)
        second = await run_batch_flow(count, config=demo_config, timeout=60)

    # The same server process counted both calls: it was started once, not per flow run.
    assert (first[0].result, second[0].result) == ({"result": 1}, {"result": 2})


async def test_a_prefect_api_failure_after_the_commands_ran_keeps_their_results(
    demo_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected fault: the results table cannot be written (a 503, a locked database)."""
    import flows.reporting

    async def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(flows.reporting, "acreate_table_artifact", unavailable)
    state = await run_flow([Command(tool_name="add", parameters={"a": 1, "b": 2}, call_id="ran")], config=demo_config)

    [result] = await state.aresult(raise_on_failure=False)
    assert (result.call_id, result.status, result.result) == ("ran", ResultStatus.SUCCESS, {"result": 3.0})


async def test_two_commands_with_one_call_id_are_refused_before_anything_runs(demo_config: dict[str, Any]) -> None:
    twins = [Command(tool_name="count", parameters={"key": "twins"}, call_id="same")] * 2
    results = await run_batch_flow(twins, config=demo_config)
    assert [r.status for r in results] == [ResultStatus.FAILURE, ResultStatus.FAILURE]
    assert all("call_ids must be unique within a batch; repeated: same" in (r.error or "") for r in results)


@pytest.mark.usefixtures("clean_environment")
async def test_a_flow_run_reaches_the_hub_with_what_it_was_given(prefect_api: str) -> None:
    """Through Prefect's flow engine: no hub parameter, no environment, only what ``hub_access`` set."""
    from flows.batch import run_batch_flow

    command = Command(tool_name="echo", parameters={"via": "context"}, call_id="given-1")
    async with asyncio.timeout(60), running_hub(credentials_with(["given-pc"])) as hub, running_device(hub, "given-pc"):
        with hub_access(HubAccess(hub.url, TOKEN)):
            [result] = await run_batch_flow([command], backend="remote", device="given-pc", timeout=20)
    assert (result.status, result.result) == (ResultStatus.SUCCESS, {"via": "context"}), result
