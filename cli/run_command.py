"""``dispatch run`` and ``dispatch resume``: a batch as a Prefect flow run in this process, its Results printed.

The options are merged with the batch file's once (``flows.run_settings``)
and checked before anything runs; what contradicts itself is refused, what
would do nothing is warned about. Prefect is imported only once a batch is
about to run, so a usage error costs no Prefect start.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from aip.messages import Command, Result
from dispatchers import ExecutionMode, plural
from flows.batch_file import BatchFile, BatchFileError, check_tool_types, load_batch
from flows.hub_access import HubAccess, hub_access
from flows.run_settings import RunSettings

from .batch_service.place import enabled as service_enabled
from .hub_client import checked_hub, flow_hub_access
from .options import CaFileOption, HubOption, TokenFileOption, checked_config
from .terminal import fail_usage, say_error, say_warning, stderr, stdout
from .up import quiet_prefect_defaults

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="mcp.json naming the MCP servers (default: the batch file's 'config', else ./mcp.json)"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print only the JSON array of Results on stdout")]


def from_batch_file(setting: str) -> str:
    """Where an option of ``run`` comes from when not given, for its help."""
    default = RunSettings.default(setting)
    shown = default.value if isinstance(default, ExecutionMode) else f"{default:g}"
    return f"(default: the batch file's, else {shown})"


def run(
    context: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="Batch file (JSON or YAML): a list of commands or {commands: [...], ...}")
    ],
    config: ConfigOption = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds for the whole batch " + from_batch_file("timeout"), min=0.001),
    ] = None,
    mode: Annotated[
        ExecutionMode | None,
        typer.Option(help="Run commands one by one or concurrently " + from_batch_file("mode")),
    ] = None,
    stop_on_failure: Annotated[
        bool | None,
        typer.Option(
            "--stop-on-failure/--keep-going",
            help="After a failure, skip the commands not started yet (default: the batch file's, else keep going)",
        ),
    ] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            help="Retries of a transient failure after the first try " + from_batch_file("retries"),
            min=0,
        ),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option(
            help="Commands at once in parallel mode " + from_batch_file("max_concurrency"),
            min=1,
        ),
    ] = None,
    hub: HubOption = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Run on this device, connected to --hub, instead of locally")
    ] = None,
    token_file: TokenFileOption = None,
    cafile: CaFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a batch of commands as a Prefect flow and print one Result per command."""
    try:
        batch = load_batch(file)
    except BatchFileError as error:
        fail_usage(str(error))
    options: dict[str, Any] = {}
    access = HubAccess()  # a local run reaches no hub
    if device is not None:
        if not hub:
            fail_usage("--device needs --hub ws://HOST:PORT (or $DISPATCH_HUB)")
        if config is not None:
            fail_usage("--config is for a local run: a device runs commands on the MCP servers of its own config")
        checked_hub(hub)
        access = flow_hub_access(hub, token_file, cafile)
        options |= {"backend": "remote", "device": device, "hub": hub, "agent_context": batch.agent_context}
    else:
        remote_only = [name for name in ("hub", "token_file", "cafile") if given_on_the_command_line(context, name)]
        if remote_only:
            flags = " and ".join("--" + name.replace("_", "-") for name in remote_only)
            fail_usage(
                f"{flags} {'is' if len(remote_only) == 1 else 'are'} for --device: without it the batch runs here"
            )
        options["config"] = str(resolve_config(config, batch).resolve())  # a resume may run from elsewhere
    settings = RunSettings.resolve(
        batch,
        timeout=timeout,
        mode=mode,
        stop_on_failure=stop_on_failure,
        retries=retries,
        max_concurrency=max_concurrency,
    )
    options |= settings.model_dump()
    warn_about_ineffective(settings, len(batch.commands), given_on_the_command_line(context, "max_concurrency"))
    if service_enabled(os.environ):
        fields = {"commands": [command.model_dump(mode="json") for command in batch.commands], "options": options}
        run_batch_in_service("run", fields, access, json_output)
    quiet_prefect_defaults()
    from flows.batch import run_batch_flow

    async def work() -> tuple[list[Command], list[Result]]:
        return batch.commands, await run_batch_flow(batch.commands, **options)

    run_batch_in_terminal(work, access, json_output)


def resume(
    flow_run_id: Annotated[str, typer.Argument(help="The flow run to resume (its id, as `dispatch run` printed it)")],
    token_file: TokenFileOption = None,
    cafile: CaFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a batch again, re-executing only the commands that did not succeed in that flow run."""
    try:
        uuid.UUID(flow_run_id)
    except ValueError:
        fail_usage(f"{flow_run_id!r} is not a flow run id (a UUID, as `dispatch run` prints it)")
    access = flow_hub_access(None, token_file, cafile)  # for a batch that ran on a device
    if service_enabled(os.environ):
        run_batch_in_service("resume", {"flow_run_id": flow_run_id}, access, json_output)
    quiet_prefect_defaults()
    from flows.batch import resume_batch_flow

    run_batch_in_terminal(lambda: resume_batch_flow(flow_run_id), access, json_output)


def run_batch_in_service(kind: str, fields: dict[str, Any], access: HubAccess, json_output: bool) -> None:
    """Run the batch in the batch service (``cli.batch_service``) and exit; return only if it could not start.

    The terminal shows and prints what ``run_batch_in_terminal`` would; a
    service that cannot start costs a warning and the in-process run.
    """
    from cli.batch_outcome import INTERRUPTED, report
    from cli.batch_service.client import ServiceDidNotStart, ServiceFailed, ServiceRefused, run_through_service
    from cli.batch_service.place import ServicePlace, UnsafeDirectory, idle_seconds

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C while it starts, even if started ignored
    try:
        idle_seconds(os.environ)
        place = ServicePlace.here()
    except ValueError as error:
        fail_usage(str(error))
    except UnsafeDirectory as error:
        say_warning(f"{error}; running the batch in this process")
        return
    try:
        outcome = run_through_service(kind, fields, access, stderr, place)
    except KeyboardInterrupt:
        say_error("interrupted before the batch started")
        raise typer.Exit(INTERRUPTED) from None
    except ServiceDidNotStart as error:
        say_warning(f"{error}; running the batch in this process")
        return
    except ServiceRefused as error:
        if error.usage:
            fail_usage(str(error))
        say_error(str(error))
        raise typer.Exit(1) from None
    except ServiceFailed as error:
        say_error(str(error))
        raise typer.Exit(1) from None
    if outcome.lost:
        say_error(outcome.lost)
    report(outcome, stdout, stderr, json_output)
    raise typer.Exit(outcome.exit_code)


def run_batch_in_terminal(
    work: Callable[[], Awaitable[tuple[list[Command], list[Result]]]], access: HubAccess, json_output: bool
) -> NoReturn:
    """Run a batch flow here, print its Results, exit 0 (all succeeded), 1 (some failed) or 130 (interrupted).

    The flow run reaches the hub with ``access``, handed to it in-process.
    """
    from cli.batch_outcome import INTERRUPTED, report
    from cli.batch_run import REFUSED, APIUnreachable, refusal, run_in_terminal

    try:
        with hub_access(access):
            outcome = run_in_terminal(work, stderr)
    except KeyboardInterrupt:
        say_error("interrupted before the batch started")
        raise typer.Exit(INTERRUPTED) from None
    except (*REFUSED, APIUnreachable) as error:
        usage, message = refusal(error)
        if usage:
            fail_usage(message)
        say_error(message)
        raise typer.Exit(1) from None
    report(outcome, stdout, stderr, json_output)
    raise typer.Exit(outcome.exit_code)


def given_on_the_command_line(context: typer.Context, name: str) -> bool:
    """Whether the user typed this option (not a default, nor an environment variable such as $DISPATCH_HUB)."""
    source = context.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def warn_about_ineffective(settings: RunSettings, count: int, concurrency_given: bool) -> None:
    """Settings that would do nothing as combined: said once, before the run, rather than silently ignored."""
    parallel = settings.mode == ExecutionMode.PARALLEL
    if parallel and settings.stop_on_failure:
        if settings.max_concurrency >= count:
            say_warning(
                f"--stop-on-failure does nothing here: in parallel mode every command has started by the time one "
                f"fails (max concurrency {settings.max_concurrency}, {plural(count, 'command')})"
            )
        else:
            say_warning(
                "in parallel mode --stop-on-failure skips only the commands still waiting for a slot "
                f"(at most {settings.max_concurrency} run at once); those running finish"
            )
    if concurrency_given and not parallel:
        say_warning("--max-concurrency does nothing in sequential mode (add --mode parallel)")


def resolve_config(option: Path | None, batch: BatchFile) -> Path:
    """--config, else the batch file's ``config``, else ./mcp.json; checked, with the batch's tool_types, first."""
    path = option or (Path(batch.config) if batch.config else Path("mcp.json"))
    if option is None and batch.config is None and not path.exists():
        fail_usage("no MCP config: pass --config mcp.json, or name one in the batch file's 'config'")
    try:
        check_tool_types(batch, checked_config(path))
    except BatchFileError as error:
        fail_usage(str(error))
    return path
