"""The task that runs one command: a task run per command in the dashboard.

Retries and the deadline are the dispatcher's (tenacity, our own async
timeouts): Prefect task retries would cost a state round trip each and could
not stop at the batch deadline. A failed command returns a ``Failed`` state
that carries its Result, so the task run shows failed while the flow still
gets the Result.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, cast

from prefect import State, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import task_run
from prefect.states import Failed
from prefect.utilities.annotations import quote

from aip.messages import Command, Result, ResultStatus
from dispatchers import BasicCommandDispatcher, Deadline, error_result, failure_cause, short_id


class _InRun(logging.Filter):
    """Only records made inside a flow or task run: the API has nowhere else to put them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _send_dispatcher_logs_to_prefect() -> None:
    """Retries and server restarts appear in the run's logs in the dashboard.

    (What ``PREFECT_LOGGING_EXTRA_LOGGERS=dispatchers`` would do, minus the
    warnings it gives when the dispatchers are used outside any run.)
    """
    handler = APILogHandler()
    handler.addFilter(_InRun())
    logging.getLogger("dispatchers").addHandler(handler)


_send_dispatcher_logs_to_prefect()


def task_run_name() -> str:
    """``tool_name[short call_id]``: readable, and unique enough to find in the dashboard."""
    command = task_run.parameters["command"]
    if isinstance(command, quote):
        command = command.unquote()
    return f"{command.tool_name}[{short_id(command.call_id)}]"


@task(name="command", task_run_name=task_run_name, cache_policy=NO_CACHE, persist_result=False)
async def run_command(command: Command, dispatcher: BasicCommandDispatcher, deadline: Deadline) -> Result | State:
    result = await dispatcher.execute_command(command, deadline)
    if result.status is ResultStatus.FAILURE:
        return Failed(message=failure_cause(command, result), data=result)
    return result


async def execute_as_task(command: Command, dispatcher: BasicCommandDispatcher, deadline: Deadline) -> Result:
    """Run one command as a task run and return its Result, whatever the run's final state.

    The arguments are quoted: Prefect would otherwise walk them for upstream
    task results on every call, which none of them can hold.
    """
    call = run_command(quote(command), quote(dispatcher), quote(deadline), return_state=True)
    # Prefect types an async task's return_state call as a bare State; it is awaitable.
    state = await cast(Awaitable[State[Any]], call)
    result = await state.aresult(raise_on_failure=False)
    return result if isinstance(result, Result) else error_result(command, result)
