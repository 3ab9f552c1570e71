"""The batch flow: one flow run per batch, one task run per command.

``dispatch_batch`` takes only JSON-serialisable parameters, so a deployment
can run it (commands inline or a batch file, locally or on a device);
``run_batch_flow`` is the in-process entry that always returns one Result per
command, whatever happens to the flow run itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from prefect import State, flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed

from aip.access import CONTROLLER_PATH
from aip.budget import Budget, Deadline
from aip.connect import hub_urls
from aip.messages import AgentContext, Command, Result, ResultStatus
from dispatchers.base import BasicCommandDispatcher, assign_call_ids, check_unique_call_ids, error_result, plural
from dispatchers.batch import ExecutionMode, run_batch
from dispatchers.interrupt import was_interrupted
from dispatchers.policy import RetryPolicy
from tasks.command import BatchContext, execute_as_task, install_run_logging
from tasks.report import CommandReport

from .batch_file import load_batch
from .garbage import freeze_the_furniture
from .hub_access import current_hub_access
from .reporting import Progress, emit_batch_finished, publish_results
from .run_settings import RunSettings
from .trust import check_deployment_parameters
from .watching import Watch

__all__ = [
    "FLOW_BUDGET",
    "Backend",
    "FlowRunNotFound",
    "dispatch_batch",
    "final_state",
    "flow_run_name",
    "resume_batch_flow",
    "run_batch_flow",
]

#: The engine's margins in a flow run: task runs in flight at the batch deadline
#: get a second to report their own timeout (Failed) before they are cancelled
#: (and would show as Crashed).
FLOW_BUDGET = Budget(settle=1.0)


class Backend(StrEnum):
    LOCAL = "local"  # MCP servers on the machine that runs the flow
    REMOTE = "remote"  # a device connected to a hub


def flow_run_name() -> str:
    """``batch-<n>-commands`` or the batch file's name, ``-on-<device>`` when remote, ``-resumed`` for a resume.

    Then the start of the flow run's id, so that two runs of one batch can be
    told apart in the dashboard, and matched with what ``dispatch run`` printed.
    The flow sets it itself, with its tags (``_label``): as the flow's
    ``flow_run_name``, Prefect would build a result store with a client of
    its own and make a round trip of its own to set it, 40-60 ms before the
    flow's first line.
    """
    parameters = flow_run.parameters
    if parameters.get("commands") or not parameters.get("batch_file"):
        name = f"batch-{len(parameters.get('commands') or [])}-commands"
    else:
        name = Path(parameters["batch_file"]).stem
    if parameters.get("backend") == Backend.REMOTE and parameters.get("device"):
        name += f"-on-{parameters['device']}"
    return name + ("-resumed" if parameters.get("resume_from") else "") + f"-{str(flow_run.id)[:8]}"


@flow(name="dispatch-batch", persist_result=False, log_prints=False)
async def dispatch_batch(
    commands: list[Command] | None = None,
    batch_file: str | None = None,
    config: str | dict[str, Any] | None = None,
    timeout: float | None = None,
    mode: ExecutionMode | None = None,
    stop_on_failure: bool | None = None,
    retries: int | None = None,
    max_concurrency: int | None = None,
    backend: Backend = Backend.LOCAL,
    device: str | None = None,
    hub: str | None = None,
    persist_results: bool = True,
    resume_from: str | None = None,
    agent_context: AgentContext | None = None,
) -> list[Result] | State:
    """Run a batch: ``commands``, else those of ``batch_file`` (whose settings apply unless given here).

    Locally on the MCP servers of ``config`` (a path to mcp.json, or its
    content; default the batch file's, else ./mcp.json), or with
    ``backend="remote"`` on ``device`` through the hub at ``hub`` (default the
    ``HubAccess`` of this run: what ``dispatch run`` was given, else
    ``$DISPATCH_HUB``). The token and CA come from that ``HubAccess`` too
    (``flows.hub_access``), never from a parameter, since parameters are shown
    in the dashboard.

    With ``persist_results`` each command's Result is stored, so a retry of
    this flow run re-executes only the commands that did not succeed;
    ``resume_from`` names an earlier flow run whose stored Results to reuse
    (``dispatch resume``). Fails, with every Result still attached, when any
    command failed.

    In a deployment run the parameters are data (``flows.trust``): ``config``
    and ``batch_file`` name files inside the project, ``hub`` is the worker's own.
    """
    install_run_logging()
    freeze_the_furniture()
    run_id, name = str(flow_run.id), flow_run_name()
    # The name and tags: one round trip, beside the rest of the run (a refused one included).
    labelling = asyncio.ensure_future(_best_effort(_label(name, backend, device), "naming and tagging the flow run"))
    try:
        if _deployment_run():
            check_deployment_parameters(
                config=config,
                batch_file=batch_file,
                hub=hub,
                resume_from=resume_from,
                project=Path.cwd(),
                worker_hub=current_hub_access().hub,
            )
        spec = load_batch(batch_file) if batch_file else None
        if not commands and spec is None:
            raise ValueError("no commands: give commands, or a batch_file that has them")
        settings = RunSettings.resolve(
            spec,
            timeout=timeout,
            mode=mode,
            stop_on_failure=stop_on_failure,
            retries=retries,
            max_concurrency=max_concurrency,
        )
        context = BatchContext(namespace=resume_from or run_id, flow_run_id=run_id, device=device)
        batch = assign_call_ids(commands or (spec.commands if spec else []), context.namespace)
        check_unique_call_ids(batch)
        deadline = Deadline.after(settings.timeout)
        retry = settings.retry_policy
        servers = config or (spec.config if spec else None) or "mcp.json"
        watch = Watch()
        watch.batch_started(run_id, name, batch)
        reports: list[CommandReport | None] = [None] * len(batch)

        agent = agent_context or (spec.agent_context if spec else None) or AgentContext()
        agent = agent.model_copy(
            update={"session_id": agent.session_id or run_id, "task_name": agent.task_name or name}
        )
        async with _dispatcher(backend, servers, retry, device, hub, agent) as dispatcher:
            async with Progress(len(batch)) as progress:
                index = {command.call_id: i for i, command in enumerate(batch)}

                async def run_one(command: Command, command_deadline: Deadline) -> Result:
                    at = index[command.call_id]
                    watch.command_started(at)
                    result, reports[at] = await execute_as_task(
                        command, dispatcher, command_deadline, context, resumable=persist_results
                    )
                    return result

                def finished(at: int, result: Result) -> None:
                    progress.advance(at, result)
                    watch.command_finished(at, result, reports[at])

                # Task runs that end at the deadline (or are interrupted) report Failed before they are cancelled.
                results = await run_batch(batch, run_one, deadline, settings.batch_policy, finished, FLOW_BUDGET)
                # Every failure names its server when it is known: interrupted, skipped and timed-out ones too.
                results = [
                    dispatcher.naming_the_server(command, result)
                    for command, result in zip(batch, results, strict=True)
                ]

            watch.batch_finished(results, reports)
            where = f"device {device}" if backend is Backend.REMOTE else "local MCP servers"
            published = publish_results(name, batch, results, reports, where)
            # Written while this run's own MCP servers (a deployment run's) stop: neither waits for the other.
            publishing = asyncio.ensure_future(
                asyncio.gather(progress.finish(), _best_effort(published, "publishing the results"))
            )
        await publishing
        emit_batch_finished(context, results, reports)
        return final_state(batch, results)
    finally:
        await labelling


def final_state(commands: list[Command], results: list[Result]) -> State:
    """Cancelled when the user interrupted the batch, else Failed when a command failed, else Completed."""
    failed = sum(result.status is ResultStatus.FAILURE for result in results)
    outcome = f"{failed} of {plural(len(results), 'command')} failed"
    interrupted = (
        result.status is ResultStatus.FAILURE and was_interrupted(command, result)  # only a failure can be one
        for command, result in zip(commands, results, strict=True)
    )
    if any(interrupted):
        return Cancelled(message=f"interrupted (Ctrl-C): {outcome}", data=results)
    if failed:
        return Failed(message=outcome, data=results)
    return Completed(message=f"{plural(len(results), 'command')} succeeded", data=results)


def _deployment_run() -> bool:
    """Whether this run came from a deployment (its parameters chosen by whoever could create it)."""
    context = FlowRunContext.get()
    return context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None


async def _best_effort(work: Awaitable[None], what: str) -> None:
    """The dashboard's extras must never cost a batch its Results: the commands have run by now."""
    try:
        await work
    except Exception as error:  # an API hiccup (a 503, a locked SQLite database)
        get_run_logger().warning("%s failed: %s", what, error)


async def _label(name: str, backend: Backend, device: str | None) -> None:
    """The run's name (``flow_run_name``) and tags to filter runs by: the backend, and the device when remote.

    One update, the run's own tags kept (a deployment's); none when a retry
    of the run finds both in place already.
    """
    tags = set(flow_run.tags) | {f"backend:{backend.value}"} | ({f"device:{device}"} if device else set())
    if name == flow_run.name and tags == set(flow_run.tags):
        return
    async with get_client() as client:
        await client.update_flow_run(flow_run.id, name=name, tags=sorted(tags))


@asynccontextmanager
async def _dispatcher(
    backend: Backend,
    config: str | dict[str, Any],
    retry: RetryPolicy,
    device: str | None,
    hub: str | None,
    context: AgentContext,
) -> AsyncIterator[BasicCommandDispatcher]:
    # Each backend imports what it needs only: MCP for local servers, websockets for a hub.
    if backend is Backend.LOCAL:
        from dispatchers.local import LocalCommandDispatcher
        from dispatchers.server_pool import ensure_server_pool, shared_manager

        # The caller's pool (dispatch run's, for all its batches), else one whose servers stop with this run.
        async with ensure_server_pool():
            yield LocalCommandDispatcher(shared_manager(config), retry=retry)
        return
    access = current_hub_access()  # the token and CA: never parameters, which the dashboard shows
    hub = hub or access.hub
    if not hub or not device:
        raise ValueError("the remote backend needs a device and a hub (the hub parameter or $DISPATCH_HUB)")
    from aip.failover import controller_link
    from dispatchers.remote import WebSocketCommandDispatcher

    link = controller_link(hub, access.token, ssl_context=access.ssl_context())
    dispatcher = WebSocketCommandDispatcher(link, device, retry=retry, **context.model_dump())
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


class FlowRunNotFound(LookupError):
    """No run to resume: none by that id where we looked (``where_known``: it exists, but is no batch)."""

    def __init__(self, message: str, *, where_known: bool = False) -> None:
        super().__init__(message)
        self.where_known = where_known


async def resume_batch_flow(flow_run_id: str) -> tuple[list[Command], list[Result]]:
    """Run the batch of an earlier flow run again, reusing the Results of the commands that succeeded.

    Its commands and their settings; call_ids the same as the first time.
    Raises ``FlowRunNotFound`` when there is no such flow run of this flow.
    """
    async with get_client() as client:
        try:
            run = await client.read_flow_run(uuid.UUID(flow_run_id))
        except (ValueError, ObjectNotFound):
            raise FlowRunNotFound(f"no flow run {flow_run_id}") from None
    parameters = dict(run.parameters)
    if "commands" not in parameters and "batch_file" not in parameters:
        raise FlowRunNotFound(f"flow run {flow_run_id} is not a run of dispatch-batch", where_known=True)
    namespace = parameters["resume_from"] = parameters.get("resume_from") or str(run.id)
    listed = [Command.model_validate(command) for command in parameters.pop("commands", None) or []]
    if not listed and parameters.get("batch_file"):
        listed = load_batch(parameters["batch_file"]).commands
    commands = assign_call_ids(listed, namespace)
    return commands, await run_batch_flow(commands, **parameters)


async def run_batch_flow(commands: Sequence[Command], **options: Any) -> list[Result]:
    """Run the batch flow in this process and return one Result per command, always.

    A flow run that crashes or cannot reach the Prefect API still answers:
    every command gets a failure Result naming the cause.
    """
    batch = assign_call_ids(commands)
    try:
        if options.get("hub"):  # refused before it could be stored with the flow run's parameters
            hub_urls(options["hub"], CONTROLLER_PATH)
    except ValueError as error:
        return [error_result(command, error) for command in batch]
    try:
        state = await dispatch_batch(batch, return_state=True, **options)
        data = await state.aresult(raise_on_failure=False)
    except Exception as error:  # the API or the flow machinery failed: answer anyway
        data = error
    if isinstance(data, list) and len(data) == len(batch) and all(isinstance(r, Result) for r in data):
        return data
    cause = data if isinstance(data, BaseException) else "the flow run ended without results"
    return [error_result(command, cause) for command in batch]
