"""The task that runs one command: a task run per command in the dashboard.

Retries and the deadline are the dispatcher's (tenacity, our own async
timeouts): Prefect task retries would cost a state round trip each and could
not stop at the batch deadline. A failed command returns a ``Failed`` state
that carries its Result, so the task run shows failed while the flow still
gets the Result.

Resume: the resumable variant persists each Result under a key made of the
batch's namespace (the flow run that first ran it) and the command's call_id.
A retry of the flow run finds the Results of the commands that succeeded and
does not run them again; a failed command leaves nothing to find. A later run
has another namespace, so it never gets an earlier run's Results.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

from prefect import State, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import task_run
from prefect.states import Failed
from prefect.utilities.annotations import quote

from aip.budget import Deadline
from aip.failure import failure_cause
from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    BasicCommandDispatcher,
    error_result,
    observing_attempts,
    short_id,
)
from dispatchers.errors import describe
from dispatchers.interrupt import unless_interrupted

from .events import DispatchEvent, emit_command_event
from .report import CommandReport

__all__ = [
    "BatchContext",
    "execute_as_task",
    "install_run_logging",
    "result_key",
    "run_command",
    "run_resumable_command",
    "task_run_name",
]


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records made inside a flow or task run: the API has nowhere else to put them.

    (What ``PREFECT_LOGGING_EXTRA_LOGGERS=dispatchers`` would do, minus the
    warnings it gives when the dispatchers are used outside any run.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        in_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
        return in_run and bool(super().filter(record))


class _NoStateEcho(logging.Filter):
    """Drops Prefect's "Task run failed with state: Failed(..., result=Result(...))" line, and its traceback.

    A command's failure is one line in the run's logs, "Finished in state
    Failed('<cause>')": the echo repeats it with the whole Result's repr and,
    having no exception to show, a stray "NoneType: None".
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Task run failed with state:")


def install_run_logging() -> None:
    """Shape the logs of the runs this process executes: call it where a flow run starts; once is enough.

    Retries and server restarts (the ``dispatchers`` logger) go to the run's
    logs in the dashboard, and a failed command logs one line, not two. Done
    by whoever owns the run rather than on import, so that importing the tasks
    (the hub does, for events) changes no one's logging; doing it again
    changes nothing.
    """
    dispatchers = logging.getLogger("dispatchers")
    if not any(isinstance(handler, _RunLogHandler) for handler in dispatchers.handlers):
        dispatchers.addHandler(_RunLogHandler())
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(installed, _NoStateEcho) for installed in task_runs.filters):
        task_runs.addFilter(_NoStateEcho())


@dataclass(frozen=True)
class BatchContext:
    """What every command of one batch shares: where its Results are kept, and where it runs."""

    #: The flow run whose Results this batch reuses and keeps (itself, unless it resumes another).
    namespace: str
    #: The flow run executing the batch now.
    flow_run_id: str
    device: str | None = None


@dataclass
class _Observer:
    """Counts attempts and announces retries (log lines come from the dispatcher itself)."""

    command: Command
    batch: BatchContext
    report: CommandReport
    started: float = field(default_factory=time.perf_counter)

    def attempt(self, number: int) -> None:
        self.report.attempts = number

    def retry(self, number: int, error: BaseException, delay: float) -> None:
        payload = {"attempt": number, "error": describe(error), "delay": delay}
        emit_command_event(DispatchEvent.COMMAND_RETRYING, self.command, self.batch, payload)


def task_run_name() -> str:
    """``tool_name[short call_id]``: readable, and unique enough to find in the dashboard."""
    command = task_run.parameters["command"]
    if isinstance(command, quote):
        command = command.unquote()
    return f"{command.tool_name}[{short_id(command.call_id)}]"


def _unquoted(value: Any) -> Any:
    return value.unquote() if isinstance(value, quote) else value


def result_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The storage key of a command's Result: its batch namespace and call_id, hashed to a safe file name."""
    command: Command = _unquoted(parameters["command"])
    batch: BatchContext = _unquoted(parameters["batch"])
    return "dispatch-" + hashlib.sha256(f"{batch.namespace}:{command.call_id}".encode()).hexdigest()


async def _run_command(
    command: Command, dispatcher: BasicCommandDispatcher, deadline: Deadline, batch: BatchContext, report: CommandReport
) -> Result | State:
    observer = _Observer(command, batch, report)
    token = observing_attempts.set(observer)
    try:
        # Interrupted, the task answers (Failed: "Interrupted: ...") rather than being cancelled (Crashed).
        result = await unless_interrupted(command, dispatcher.execute_command(command, deadline))
    finally:
        observing_attempts.reset(token)
        report.seconds = time.perf_counter() - observer.started
    payload = {"attempts": report.attempts, "seconds": round(report.seconds, 3), "status": result.status.value}
    if result.status is ResultStatus.FAILURE:
        cause = failure_cause(command, result)
        emit_command_event(DispatchEvent.COMMAND_FAILED, command, batch, payload | {"error": cause})
        return Failed(message=cause, data=result)
    emit_command_event(DispatchEvent.COMMAND_SUCCEEDED, command, batch, payload)
    return result


run_command = task(name="command", task_run_name=task_run_name, cache_policy=NO_CACHE, persist_result=False)(
    _run_command
)
run_resumable_command = task(name="command", task_run_name=task_run_name, cache_key_fn=result_key, persist_result=True)(
    _run_command
)


async def execute_as_task(
    command: Command,
    dispatcher: BasicCommandDispatcher,
    deadline: Deadline,
    batch: BatchContext,
    *,
    resumable: bool = True,
) -> tuple[Result, CommandReport]:
    """Run one command as a task run; its Result (whatever the run's final state) and its report.

    The arguments are quoted: Prefect would otherwise walk them for upstream
    task results on every call, which none of them can hold. A Result found
    from an earlier run of the batch comes back with ``report.reused`` set.
    """
    install_run_logging()  # a flow of one's own that runs our task gets our run logs too
    report = CommandReport(command.call_id)
    variant = run_resumable_command if resumable else run_command
    call = variant(quote(command), quote(dispatcher), quote(deadline), quote(batch), quote(report), return_state=True)
    # Prefect types an async task's return_state call as a bare State; it is awaitable.
    state = await cast(Awaitable[State[Any]], call)
    result = await state.aresult(raise_on_failure=False)
    report.reused = report.attempts == 0 and isinstance(result, Result)
    return (result if isinstance(result, Result) else error_result(command, result)), report
