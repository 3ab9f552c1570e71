"""``dispatch``: run batches of commands, list the tools of MCP servers.

Exit codes: 0 every command succeeded, 1 some command failed (or, for
``tools``, some server is down), 2 bad usage, a bad batch file or a bad config.
With ``--json`` stdout carries exactly the JSON document; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    DEFAULT_TIMEOUT,
    ConfigError,
    ExecutionMode,
    MCPServerManager,
    close_shared_managers,
    load_config,
    short_id,
)
from dispatchers.batch_file import BatchFile, BatchFileError, load_batch

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Run agent commands on MCP servers as Prefect flows."
)
stdout = Console()
stderr = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="mcp.json naming the MCP servers (default: the batch file's 'config', else ./mcp.json)"
    ),
]


def fail_usage(message: str) -> NoReturn:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    file: Annotated[
        Path, typer.Argument(help="Batch file (JSON or YAML): a list of commands or {commands: [...], ...}")
    ],
    config: ConfigOption = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds for the whole batch", min=0.001)] = None,
    mode: Annotated[ExecutionMode | None, typer.Option(help="Run commands one by one or concurrently")] = None,
    stop_on_failure: Annotated[
        bool | None, typer.Option("--stop-on-failure", help="Skip the rest after a failure (sequential mode)")
    ] = None,
    retries: Annotated[
        int | None, typer.Option(help="Retries of a transient failure after the first try", min=0)
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Commands at once in parallel mode (default 8)", min=1)
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON array of Results on stdout")] = False,
) -> None:
    """Run a batch of commands as a Prefect flow and print one Result per command."""
    try:
        batch = load_batch(file)
    except BatchFileError as error:
        fail_usage(str(error))
    servers = resolve_config(config, batch)
    options: dict[str, Any] = {
        "config": str(servers),
        "timeout": first_set(timeout, batch.timeout, DEFAULT_TIMEOUT),
        "mode": first_set(mode, batch.mode, ExecutionMode.SEQUENTIAL),
        "stop_on_failure": first_set(stop_on_failure, batch.stop_on_failure, False),
        "retries": first_set(retries, batch.retries, 2),
        "max_concurrency": first_set(max_concurrency, batch.max_concurrency, 8),
    }
    quiet_prefect_defaults()
    from flows.batch import run_batch_flow

    async def run_and_stop_servers() -> list[Result]:
        try:
            return await run_batch_flow(batch.commands, **options)
        finally:
            await close_shared_managers()

    try:
        results = asyncio.run(run_and_stop_servers())
    except KeyboardInterrupt:
        stderr.print("interrupted: the MCP servers were stopped", highlight=False)
        raise typer.Exit(130) from None
    if json_output:
        sys.stdout.write(json.dumps([result.model_dump(mode="json") for result in results]) + "\n")
    else:
        stdout.print(results_table(batch.commands, results))
    raise typer.Exit(0 if all(result.status is ResultStatus.SUCCESS for result in results) else 1)


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


def resolve_config(option: Path | None, batch: BatchFile) -> Path:
    """--config, else the batch file's ``config``, else ./mcp.json; checked before any flow starts."""
    path = option or (Path(batch.config) if batch.config else Path("mcp.json"))
    if option is None and batch.config is None and not path.exists():
        fail_usage("no MCP config: pass --config mcp.json, or name one in the batch file's 'config'")
    checked_config(path)
    return path


def checked_config(path: Path) -> Any:
    try:
        return load_config(path)
    except ConfigError as error:
        fail_usage(str(error))


def first_set(*values: Any) -> Any:
    return next(value for value in values if value is not None)


def quiet_prefect_defaults() -> None:
    """No telemetry from a CLI run, unless the user asked for it."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def results_table(commands: list[Command], results: list[Result]) -> Table:
    table = Table(title=f"{len(results)} results", show_lines=False)
    for column in ("#", "call_id", "tool", "server", "status", "result / error"):
        table.add_column(column, overflow="fold")
    styles = {ResultStatus.SUCCESS: "green", ResultStatus.FAILURE: "red", ResultStatus.SKIPPED: "yellow"}
    for index, (command, result) in enumerate(zip(commands, results, strict=True), start=1):
        shown = result.result if result.status is ResultStatus.SUCCESS else result.error
        table.add_row(
            str(index),
            short_id(result.call_id),
            command.tool_name,
            result.namespace or "",
            f"[{styles.get(result.status, 'white')}]{result.status.value}[/]",
            shown if isinstance(shown, str) else json.dumps(shown),
        )
    return table


def tools_table(server: dict[str, Any]) -> Table:
    state = "[green]up[/]" if server["up"] else f"[red]down[/]: {server['error']}"
    table = Table(title=f"{server['server']} ({state})", title_justify="left")
    for column in ("tool", "parameters", "description"):
        table.add_column(column, overflow="fold")
    for tool in server["tools"]:
        schema = tool["input_schema"] or {}
        required = set(schema.get("required", []))
        parameters = ", ".join(
            f"{name}{'' if name in required else '?'}: {spec.get('type', 'any')}"
            for name, spec in schema.get("properties", {}).items()
        )
        table.add_row(tool["name"], parameters, (tool["description"] or "").strip().split("\n")[0])
    return table


if __name__ == "__main__":
    app()
