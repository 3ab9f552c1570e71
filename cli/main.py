"""``dispatch``: run batches of commands, list the tools of MCP servers, run the hub and devices.

Exit codes: 0 every command succeeded, 1 some command failed (or, for
``tools``, some server is down; for ``devices``, the hub is unreachable),
2 bad usage, a bad batch file or a bad config, 130 interrupted (``run``,
``resume``). With ``--json`` stdout carries exactly the JSON document; logs go
to stderr. Only ``run``, ``resume`` and ``up`` import Prefect: ``device`` and
``serve`` start without it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aip.access import CONTROLLER_PATH, AccessPolicy
from aip.connect import CredentialRefused, HubUnavailable, endpoint
from aip.controller import list_devices
from aip.credential_file import DEFAULT_PATH, CredentialFile, editing, read_store
from aip.credentials import CredentialError, CredentialStore, Role, check_token
from aip.device import DeviceClient
from aip.hub import Hub, HubSettings
from aip.messages import Command, Result
from dispatchers import (
    ConcurrencyLimits,
    ConfigError,
    ExecutionMode,
    LocalCommandDispatcher,
    MCPServerManager,
    load_config,
    plural,
)
from flows.batch_file import BatchFile, BatchFileError, check_tool_types, load_batch
from flows.run_settings import RunSettings

from .inert import inert

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no "<bool>" beside flags, nothing read as markup
    help="Run agent commands on MCP servers, here or on remote devices, as Prefect flows.",
)
stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width of a pipe
credentials_app = typer.Typer(
    no_args_is_help=True,
    help="Issue, list and revoke the credentials a hub accepts (one per device, one per controller).",
)
app.add_typer(credentials_app, name="credentials")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="mcp.json naming the MCP servers (default: the batch file's 'config', else ./mcp.json)"
    ),
]


TokenFileOption = Annotated[
    Path | None,
    typer.Option("--token-file", help="File holding this machine's credential for the hub (default: $DISPATCH_TOKEN)"),
]
CredentialsOption = Annotated[
    Path,
    typer.Option(
        "--credentials", help="The hub's credentials file (hashes only; mode 0600)", envvar="DISPATCH_CREDENTIALS"
    ),
]
HubOption = Annotated[
    str | None, typer.Option("--hub", help="Hub URL, ws://HOST:PORT (default: $DISPATCH_HUB)", envvar="DISPATCH_HUB")
]
CaFileOption = Annotated[
    Path | None, typer.Option("--cafile", help="CA certificate to trust for a wss:// hub with its own certificate")
]


def main() -> None:
    """The ``dispatch`` command: usage errors read like every other error, one ``error:`` line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C before a command took over the signal
        code = 130
    except typer.TyperException as error:  # click's errors, as typer vendors them
        message, context = error.format_message(), getattr(error, "ctx", None)
        if context is not None and message == context.get_help():  # a bare `dispatch`: the help, as asked
            sys.stderr.write(message + "\n")
        else:
            say_error(message + (f" (see `{context.command_path} --help`)" if context is not None else ""))
        code = getattr(error, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"dispatch {importlib.metadata.version('command-dispatcher')}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Run agent commands on MCP servers, here or on remote devices, as Prefect flows."""


def say_error(message: str) -> None:
    """One line on stderr; ``message`` may quote a batch file or a device, so it is printed inert."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", inert(message)), highlight=False, soft_wrap=True)


def say_warning(message: str) -> None:
    stderr.print(Text.assemble(("warning:", "bold yellow"), " ", inert(message)), highlight=False)


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


def fail_usage(message: str) -> NoReturn:
    say_error(message)
    raise typer.Exit(2)


def from_batch_file(setting: str) -> str:
    """Where an option of ``run`` comes from when not given, for its help."""
    default = RunSettings.default(setting)
    shown = default.value if isinstance(default, ExecutionMode) else f"{default:g}"
    return f"(default: the batch file's, else {shown})"


@app.command()
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
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON array of Results on stdout")] = False,
) -> None:
    """Run a batch of commands as a Prefect flow and print one Result per command."""
    try:
        batch = load_batch(file)
    except BatchFileError as error:
        fail_usage(str(error))
    options: dict[str, Any] = {}
    if device is not None:
        if not hub:
            fail_usage("--device needs --hub ws://HOST:PORT (or $DISPATCH_HUB)")
        if config is not None:
            fail_usage("--config is for a local run: a device runs commands on the MCP servers of its own config")
        checked_hub(hub)
        hub_credentials_for_the_flow(token_file, cafile)
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
    quiet_prefect_defaults()
    from flows.batch import run_batch_flow

    async def work() -> tuple[list[Command], list[Result]]:
        return batch.commands, await run_batch_flow(batch.commands, **options)

    run_batch_in_terminal(work, json_output)


@app.command()
def resume(
    flow_run_id: Annotated[str, typer.Argument(help="The flow run to resume (its id, as `dispatch run` printed it)")],
    token_file: TokenFileOption = None,
    cafile: CaFileOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON array of Results on stdout")] = False,
) -> None:
    """Run a batch again, re-executing only the commands that did not succeed in that flow run."""
    try:
        uuid.UUID(flow_run_id)
    except ValueError:
        fail_usage(f"{flow_run_id!r} is not a flow run id (a UUID, as `dispatch run` prints it)")
    hub_credentials_for_the_flow(token_file, cafile)  # for a batch that ran on a device
    quiet_prefect_defaults()
    from flows.batch import resume_batch_flow

    run_batch_in_terminal(lambda: resume_batch_flow(flow_run_id), json_output)


def run_batch_in_terminal(
    work: Callable[[], Awaitable[tuple[list[Command], list[Result]]]], json_output: bool
) -> NoReturn:
    """Run a batch flow here, print its Results, exit 0 (all succeeded), 1 (some failed) or 130 (interrupted)."""
    from cli.batch_run import INTERRUPTED, APIUnreachable, report, run_in_terminal, where_runs_are_kept
    from flows.batch import FlowRunNotFound

    try:
        outcome = run_in_terminal(work, stderr)
    except KeyboardInterrupt:
        say_error("interrupted before the batch started")
        raise typer.Exit(INTERRUPTED) from None
    except FlowRunNotFound as error:  # dispatch resume
        fail_usage(str(error) if error.where_known else f"{error} {where_runs_are_kept()}")
    except BatchFileError as error:
        fail_usage(str(error))
    except APIUnreachable as error:
        say_error(str(error))
        raise typer.Exit(1) from None
    report(outcome, stdout, stderr, json_output)
    raise typer.Exit(outcome.exit_code)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Port of the Prefect server", min=1, max=65535)] = 4200,
    pool: Annotated[str, typer.Option(help="Name of the process work pool")] = "dispatch",
    hub_port: Annotated[int, typer.Option(help="Port of the hub", min=1, max=65535)] = 8765,
    no_hub: Annotated[bool, typer.Option("--no-hub", help="Don't start the hub")] = False,
    project: Annotated[Path, typer.Option(help="Folder holding prefect.yaml")] = Path("."),
) -> None:
    """Prefect server, process work pool and worker, our deployments, and the hub; Ctrl-C stops all."""
    from cli.up import StackError, running_stack

    project = project.resolve()
    if not (project / "prefect.yaml").is_file():
        fail_usage(f"no prefect.yaml in {project}: run this from the repository root, or pass --project")

    def say(message: str) -> None:
        stderr.print(Text.assemble(("\u2713", "green"), " ", inert(message)), highlight=False)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us with it ignored
        signal.signal(signum, interrupt)
    code = 0
    try:
        with running_stack(project, port, pool, None if no_hub else hub_port, say) as stack:
            stderr.print(
                f"up: open http://127.0.0.1:{port} (it asks for the contents of .dispatch/prefect-auth); "
                "Ctrl-C stops everything. For prefect and dispatch commands in another shell:\n"
                f"  export PREFECT_API_URL=http://127.0.0.1:{port}/api "
                'PREFECT_API_AUTH_STRING="$(cat .dispatch/prefect-auth)"',
                highlight=False,
                soft_wrap=True,
            )
            while (dead := stack.died()) is None:
                time.sleep(0.5)
            say_error(f"{dead} exited on its own (see .dispatch/logs/{dead}.log)")
            code = 1
    except StackError as error:
        say_error(str(error))
        code = 1
    except KeyboardInterrupt:
        stderr.print("stopped", highlight=False)
    raise typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from outside")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port)", min=0, max=65535)] = 8765,
    credentials: CredentialsOption = DEFAULT_PATH,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Another host name clients may use (repeatable)")
    ] = None,
    allow_origin: Annotated[
        list[str] | None, typer.Option("--allow-origin", help="A browser Origin to accept (repeatable)")
    ] = None,
    max_message_mib: Annotated[float, typer.Option(help="Largest frame accepted, in MiB", min=0.001)] = 100.0,
    ping_interval: Annotated[
        float, typer.Option(help="Seconds between the WebSocket pings that tell live connections from dead", min=0.1)
    ] = 20.0,
    ping_timeout: Annotated[
        float,
        typer.Option(help="Seconds a connection has to answer a ping before it counts as gone", min=0.1),
    ] = 20.0,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve wss://")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM) for --certfile")] = None,
) -> None:
    """Run the hub: devices connect at /ws, flow runs (controllers) at /controller, each with its own credential."""
    if not credentials.is_file():
        fail_usage(
            f"no credentials file at {credentials}: issue some with `dispatch credentials add-device ID` "
            "and `dispatch credentials add-controller NAME` (or pass --credentials)"
        )
    try:
        credential_file = CredentialFile(credentials)
    except CredentialError as error:
        fail_usage(str(error))
    if (certfile is None) != (keyfile is None):
        fail_usage("--certfile and --keyfile go together")
    context = None
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as error:
            fail_usage(f"can't load the certificate: {error}")
    access = AccessPolicy.for_host(credential_file.store, host, allow_host or (), allow_origin or ())
    settings = HubSettings(
        host=host,
        port=port,
        max_message_bytes=int(max_message_mib * 2**20),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    log_to_stderr()
    if listens_in_clear(host, tls=context is not None):
        logging.getLogger("aip.hub").warning(
            "listening on %s WITHOUT TLS: every credential and batch crosses the network in clear text; "
            "serve wss:// with --certfile/--keyfile unless this network is yours alone",
            host,
        )
    observer = None
    if os.environ.get("PREFECT_API_URL"):  # a Prefect server to tell: devices coming and going become events
        from cli.hub_events import PrefectHubEvents

        observer = PrefectHubEvents()

    async def serve_until(stop: asyncio.Event) -> None:
        async with Hub(access, settings, context, observer, credential_file):
            await stop.wait()

    try:
        run_until_signalled(serve_until)
    except OSError as error:
        fail_usage(f"can't listen on {host}:{port}: {error}")


@app.command()
def device(
    hub: HubOption = None,
    device_id: Annotated[str, typer.Option("--id", help="This device's id, as batches will address it")] = "",
    config: Annotated[Path, typer.Option("--config", "-c", help="mcp.json naming this machine's MCP servers")] = Path(
        "mcp.json"
    ),
    token_file: TokenFileOption = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats", min=0.1)] = 10.0,
    cafile: CaFileOption = None,
    token_in_query: Annotated[
        bool, typer.Option("--token-in-query", help="Send the token as ?token= too, as a UFO server wants it")
    ] = False,
    max_actions: Annotated[int, typer.Option(help="Action commands at once on this device", min=1)] = 1,
    max_data_collection: Annotated[
        int | None, typer.Option(help="data_collection commands at once on this device (default: no limit)", min=1)
    ] = None,
) -> None:
    """Connect this machine to a hub and execute the commands it sends, until stopped."""
    if not hub:
        fail_usage("pass --hub ws://HOST:PORT/ws (or set $DISPATCH_HUB)")
    if not device_id:
        fail_usage("pass --id NAME: the id batches will address this device by")
    specs = checked_config(config)
    token = read_token(token_file)
    context = client_ssl(cafile)
    log_to_stderr()

    async def serve_commands(stop: asyncio.Event) -> None:
        limits = ConcurrencyLimits(action=max_actions, data_collection=max_data_collection)
        async with MCPServerManager(specs, limits=limits, per_manager=True) as servers:  # limits per device

            def tools() -> list[dict[str, Any]]:
                return [
                    {"name": tool.name, "server": name, "description": (tool.description or "").strip().split("\n")[0]}
                    for name, connection in servers.connections.items()
                    for tool in connection.tools.values()
                ]

            executor = LocalCommandDispatcher(servers, session=device_id)
            client = DeviceClient(
                hub,
                device_id,
                executor,
                token=token,
                tools=tools,
                heartbeat_interval=heartbeat,
                ssl_context=context,
                token_in_query=token_in_query,
            )
            await client.run(stop)

    try:
        run_until_signalled(serve_commands)
    except ValueError as error:
        fail_usage(str(error))
    except CredentialRefused as error:
        say_error(f"{error}: issue this device a credential with `dispatch credentials add-device {device_id}`")
        raise typer.Exit(1) from None


@app.command()
def devices(
    hub: HubOption = None,
    token_file: TokenFileOption = None,
    cafile: CaFileOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the devices as JSON")] = False,
) -> None:
    """List the devices connected to a hub: id, platform, tools, when connected and last seen."""
    if not hub:
        fail_usage("pass --hub ws://HOST:PORT (or set $DISPATCH_HUB)")
    try:
        connected = asyncio.run(list_devices(hub, read_token(token_file), ssl_context=client_ssl(cafile)))
    except ValueError as error:
        fail_usage(str(error))
    except (HubUnavailable, TimeoutError) as error:
        say_error(str(error) or "the hub did not answer in time")
        raise typer.Exit(1) from None
    if json_output:
        sys.stdout.write(json.dumps(connected) + "\n")
    else:
        stdout.print(devices_table(connected))


@app.command()
def tools(
    config: Annotated[Path, typer.Option("--config", "-c", help="mcp.json naming the MCP servers")] = Path("mcp.json"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the servers and tools as JSON")] = False,
) -> None:
    """Start the servers of a config and list their tools with input schemas."""
    specs = checked_config(config)

    async def inspect() -> list[dict[str, Any]]:
        async with MCPServerManager(specs) as manager:
            return [
                {
                    "server": name,
                    "up": connection.available,
                    "error": connection.error,
                    "tools": [
                        {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema}
                        for tool in connection.tools.values()
                    ],
                }
                for name, connection in manager.connections.items()
            ]

    servers = asyncio.run(inspect())
    if json_output:
        sys.stdout.write(json.dumps(servers) + "\n")
    else:
        for server in servers:
            stdout.print(tools_table(server))
    raise typer.Exit(0 if all(server["up"] for server in servers) else 1)


ReplaceOption = Annotated[
    bool, typer.Option("--replace", help="Issue a new credential in place of the existing one (which stops working)")
]
TokenOutOption = Annotated[
    Path | None, typer.Option("--token-file", help="Write the token to this file (mode 0600) instead of stdout")
]


@credentials_app.command("add-device")
def add_device(
    device_id: Annotated[str, typer.Argument(help="The device's id (dispatch device --id, or a UFO client_id)")],
    credentials: CredentialsOption = DEFAULT_PATH,
    replace: ReplaceOption = False,
    token_file: TokenOutOption = None,
) -> None:
    """Issue a device's credential: it opens /ws and registers as this id only."""
    issue_credential(credentials, Role.DEVICE, device_id, ("*",), replace, token_file)


@credentials_app.command("add-controller")
def add_controller(
    name: Annotated[str, typer.Argument(help="A name for who holds it (a worker, an operator, an agent)")],
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="A device id or pattern (lab-*) it may use and list; repeatable (default: all)"),
    ] = None,
    credentials: CredentialsOption = DEFAULT_PATH,
    replace: ReplaceOption = False,
    token_file: TokenOutOption = None,
) -> None:
    """Issue a controller's credential: it opens /controller, for the devices it names only."""
    issue_credential(credentials, Role.CONTROLLER, name, tuple(device or ("*",)), replace, token_file)


@credentials_app.command("list")
def list_credentials(
    credentials: CredentialsOption = DEFAULT_PATH,
    json_output: Annotated[bool, typer.Option("--json", help="Print the credentials as JSON (no secrets)")] = False,
) -> None:
    """The credentials a hub with this file accepts: role, name, the devices a controller may use."""
    entries = [entry.to_json() for entry in checked_store(credentials).entries()]
    for entry in entries:
        entry["sha256"] = entry["sha256"][:12]  # enough to tell two apart; no use to anyone else
    if json_output:
        sys.stdout.write(json.dumps(entries) + "\n")
        return
    table = Table(title=f"{plural(len(entries), 'credential')} in {credentials}", title_justify="left")
    for column in ("role", "name", "may use", "issued", "sha256"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        may_use = ", ".join(entry.get("devices", [])) if entry["role"] == Role.CONTROLLER else "itself"
        table.add_row(
            *(inert(value) for value in (entry["role"], entry["name"], may_use, entry["created"], entry["sha256"]))
        )
    stdout.print(table)


@credentials_app.command("revoke-device")
def revoke_device(
    device_id: Annotated[str, typer.Argument(help="The device whose credential stops working")],
    credentials: CredentialsOption = DEFAULT_PATH,
) -> None:
    """Revoke a device's credential; a running hub closes its connection within a second."""
    revoke_credential(credentials, Role.DEVICE, device_id)


@credentials_app.command("revoke-controller")
def revoke_controller(
    name: Annotated[str, typer.Argument(help="The controller whose credential stops working")],
    credentials: CredentialsOption = DEFAULT_PATH,
) -> None:
    """Revoke a controller's credential; a running hub closes its connections within a second."""
    revoke_credential(credentials, Role.CONTROLLER, name)


def checked_store(path: Path) -> CredentialStore:
    try:
        return read_store(path)
    except CredentialError as error:
        fail_usage(str(error))


def issue_credential(
    path: Path, role: Role, name: str, devices: tuple[str, ...], replace: bool, token_file: Path | None
) -> None:
    """Add the credential to the file; the token goes to stdout (or ``token_file``), once, and is kept nowhere."""
    try:
        with editing(path) as store:
            token = store.issue(role, name, devices=devices, replace_old=replace)
            if token_file is not None:
                write_secret(token_file, token)
    except CredentialError as error:
        fail_usage(str(error))
    where = str(token_file) if token_file is not None else "stdout"
    stderr.print(
        Text.assemble(f"issued a {role.value} credential for ", inert(repr(name)), f" in {path}; its token: {where}"),
        highlight=False,
    )
    if token_file is None:
        sys.stdout.write(token + "\n")


def revoke_credential(path: Path, role: Role, name: str) -> None:
    try:
        with editing(path) as store:
            store.revoke(role, name)
    except CredentialError as error:
        fail_usage(str(error))
    stderr.print(Text.assemble(f"revoked the {role.value} credential of ", inert(repr(name))), highlight=False)


def write_secret(path: Path, secret: str) -> None:
    """``secret`` into a new file only its owner can read (an existing file is refused, never overwritten)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        fail_usage(f"can't create {path}: {error.strerror}")
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(secret + "\n")


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


def checked_config(path: Path) -> Any:
    try:
        return load_config(path)
    except ConfigError as error:
        fail_usage(str(error))


def listens_in_clear(host: str, tls: bool) -> bool:
    """Whether a server on ``host`` is reachable beyond this machine without TLS (a name may resolve anywhere)."""
    if tls or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def checked_hub(hub: str) -> None:
    """A usable hub URL, with no credential in it (it would be stored with the flow run's parameters)."""
    try:
        endpoint(hub, CONTROLLER_PATH)
    except ValueError as error:
        fail_usage(f"--hub: {error}")


def hub_credentials_for_the_flow(token_file: Path | None, cafile: Path | None) -> None:
    """The flow run (in this process) reads the hub's token and CA from the environment."""
    token = read_token(token_file)
    if token is not None:
        os.environ["DISPATCH_TOKEN"] = token
    if cafile is not None:
        client_ssl(cafile)  # checked now, used by the flow run
        os.environ["DISPATCH_CAFILE"] = str(cafile.resolve())


def read_token(token_file: Path | None) -> str | None:
    """--token-file, else $DISPATCH_TOKEN; never echoed anywhere."""
    if token_file is None:
        token = os.environ.get("DISPATCH_TOKEN")
        return checked_token(token) if token else None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        fail_usage(f"can't read the token file: {error}")
    if not token:
        fail_usage(f"{token_file} is empty")
    return checked_token(token)


def checked_token(token: str) -> str:
    try:
        check_token(token)
    except ValueError as error:
        fail_usage(f"unusable token: {error}")
    return token


def client_ssl(cafile: Path | None) -> ssl.SSLContext | None:
    if cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as error:
        fail_usage(f"can't load {cafile}: {error}")


def log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until it returns; SIGINT or SIGTERM sets ``stop`` for a clean ending, and says so."""
    logger = logging.getLogger("dispatch")

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stop_on(signum: signal.Signals) -> None:
            if not stop.is_set():
                logger.info("%s: stopping", signum.name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_on, signum)
        # Long-running: what was imported stays for good, so full collections need not scan it again.
        gc.collect()
        gc.freeze()
        await main(stop)
        if stop.is_set():
            logger.info("stopped")

    asyncio.run(supervised())


def quiet_prefect_defaults() -> None:
    """No telemetry from a CLI run, nor the notice about it, unless the user asked for it."""
    from cli.up import analytics_off

    os.environ.update(analytics_off(os.environ))


# Every cell below is ``inert``: ids, tool names, results and errors come from devices, tools and batch files.


def devices_table(connected: list[Any]) -> Table:
    """The hub's listing, whatever a hub (ours, an older one, anyone's) put in it."""
    table = Table(title=plural(len(connected), "device") + " connected", title_justify="left")
    for column in ("device", "kind", "platform", "tools", "connected", "last seen", "batches"):
        table.add_column(column, overflow="fold")
    for entry in connected:
        entry = entry if isinstance(entry, dict) else {"id": entry}
        tools = entry.get("tools")
        names = (
            [str(tool.get("name", "?")) for tool in tools if isinstance(tool, dict)] if isinstance(tools, list) else []
        )
        table.add_row(
            *(
                inert(value if value is not None else "")
                for value in (
                    entry.get("id"),
                    entry.get("kind"),
                    entry.get("platform"),
                    ", ".join(names) or "-",
                    entry.get("connected_at"),
                    entry.get("last_seen"),
                    entry.get("pending_batches", 0),
                )
            )
        )
    return table


def tools_table(server: dict[str, Any]) -> Table:
    state = Text("up", "green") if server["up"] else Text.assemble(("down", "red"), ": ", inert(server["error"] or ""))
    table = Table(title=Text.assemble(inert(server["server"]), " (", state, ")"), title_justify="left")
    for column in ("tool", "parameters", "description"):
        table.add_column(column, overflow="fold")
    for tool in server["tools"]:
        schema = tool["input_schema"] if isinstance(tool["input_schema"], dict) else {}
        listed, properties = schema.get("required"), schema.get("properties")
        required = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
        parameters = ", ".join(
            f"{name}{'' if name in required else '?'}: {spec.get('type', 'any') if isinstance(spec, dict) else 'any'}"
            for name, spec in (properties.items() if isinstance(properties, dict) else ())
        )
        description = (tool["description"] or "").strip().split("\n")[0]
        table.add_row(inert(tool["name"]), inert(parameters), inert(description))
    return table


if __name__ == "__main__":
    main()
