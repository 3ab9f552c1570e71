"""The batch flow: one flow run per batch, one task run per command.

``dispatch_batch`` takes only JSON-serialisable parameters, so a deployment
can run it; ``run_batch_flow`` is the in-process entry that always returns
one Result per command, whatever happens to the flow run itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import Any

from prefect import State, flow
from prefect.artifacts import acreate_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from aip.controller import HubLink
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    DEFAULT_TIMEOUT,
    BasicCommandDispatcher,
    BatchPolicy,
    Deadline,
    ExecutionMode,
    LocalCommandDispatcher,
    RetryPolicy,
    WebSocketCommandDispatcher,
    error_result,
    run_batch,
    shared_manager,
    with_call_id,
)
from tasks import execute_as_task

#: How long task runs in flight at the batch deadline get to report their own
#: timeout (Failed) before they are cancelled (and show as Crashed).
TASK_REPORT_GRACE = 1.0
#: Characters of a result or error shown per cell of the results table.
CELL_LIMIT = 200


class Backend(StrEnum):
    LOCAL = "local"  # MCP servers on the machine that runs the flow
    REMOTE = "remote"  # a device connected to a hub


def flow_run_name() -> str:
    parameters = flow_run.parameters
    name = f"batch-{len(parameters['commands'])}-commands"
    return f"{name}-on-{parameters['device']}" if parameters.get("backend") == Backend.REMOTE else name


@flow(name="dispatch-batch", flow_run_name=flow_run_name, persist_result=False, log_prints=False)
async def dispatch_batch(
    commands: list[Command],
    config: str | dict[str, Any] = "mcp.json",
    timeout: float = DEFAULT_TIMEOUT,
    mode: ExecutionMode = ExecutionMode.SEQUENTIAL,
    stop_on_failure: bool = False,
    retries: int = 2,
    max_concurrency: int = 8,
    backend: Backend = Backend.LOCAL,
    device: str | None = None,
    hub: str | None = None,
) -> list[Result] | State:
    """Run ``commands`` locally on the MCP servers of ``config`` (a path to mcp.json, or its content),
    or with ``backend="remote"`` on ``device`` through the hub at ``hub`` (default ``$DISPATCH_HUB``).

    Fails (with every Result still attached) when any command failed. Local
    servers are started once per process and event loop and shared by the
    batches that follow (see ``dispatchers.shared_manager``). The hub's token
    comes from ``$DISPATCH_TOKEN`` on the machine that runs the flow, never
    from a parameter: parameters are shown in the dashboard.
    """
    deadline = Deadline.after(timeout)
    policy = BatchPolicy(mode=mode, stop_on_failure=stop_on_failure, max_concurrency=max_concurrency)
    retry = RetryPolicy(attempts=retries + 1)
    async with _dispatcher(backend, config, retry, device, hub) as dispatcher:

        async def run_one(command: Command, command_deadline: Deadline) -> Result:
            return await execute_as_task(command, dispatcher, command_deadline)

        # Task runs that end at the deadline report Failed (a state round trip each) before they are cancelled.
        results = await run_batch(commands, run_one, deadline, policy, settle=TASK_REPORT_GRACE)
    await _publish(results, commands)
    failed = sum(result.status is ResultStatus.FAILURE for result in results)
    if failed:
        return Failed(message=f"{failed} of {len(results)} commands failed", data=results)
    return Completed(message=f"{len(results)} commands succeeded", data=results)


@asynccontextmanager
async def _dispatcher(
    backend: Backend, config: str | dict[str, Any], retry: RetryPolicy, device: str | None, hub: str | None
) -> AsyncIterator[BasicCommandDispatcher]:
    if backend is Backend.LOCAL:
        yield LocalCommandDispatcher(shared_manager(config), retry=retry)
        return
    hub = hub or os.environ.get("DISPATCH_HUB")
    if not hub or not device:
        raise ValueError("the remote backend needs a device and a hub (the hub parameter or $DISPATCH_HUB)")
    link = HubLink(hub, os.environ.get("DISPATCH_TOKEN"))
    dispatcher = WebSocketCommandDispatcher(link, device, session_id=str(flow_run.id), retry=retry)
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


async def _publish(results: Sequence[Result], commands: Sequence[Command]) -> None:
    rows = [
        {
            "call_id": result.call_id,
            "tool": command.tool_name,
            "server": result.namespace,
            "status": result.status.value,
            "result": _cell(result.result) if result.status is ResultStatus.SUCCESS else "",
            "error": _cell(result.error),
        }
        for command, result in zip(commands, results, strict=True)
    ]
    await acreate_table_artifact(table=rows, key="batch-results", description="One row per command, in batch order.")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= CELL_LIMIT else text[: CELL_LIMIT - 1] + "…"


async def run_batch_flow(commands: Sequence[Command], **options: Any) -> list[Result]:
    """Run the batch flow in this process and return one Result per command, always.

    A flow run that crashes or cannot reach the Prefect API still answers:
    every command gets a failure Result naming the cause.
    """
    batch = [with_call_id(command) for command in commands]
    try:
        state = await dispatch_batch(batch, return_state=True, **options)
        data = await state.aresult(raise_on_failure=False)
    except Exception as error:  # the API or the flow machinery failed: answer anyway
        data = error
    if isinstance(data, list) and len(data) == len(batch) and all(isinstance(r, Result) for r in data):
        return data
    cause = data if isinstance(data, BaseException) else "the flow run ended without results"
    return [error_result(command, cause) for command in batch]
