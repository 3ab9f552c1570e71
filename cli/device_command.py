"""``dispatch device``: this machine executes, on its own MCP servers, the commands a hub sends it, until stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from aip.connect import CredentialRefused

from .hub_client import client_ssl, read_token
from .options import CaFileOption, HubOption, TokenFileOption, checked_config
from .service import log_to_stderr, run_until_signalled
from .terminal import fail_usage, say_error


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
    """Connect this machine to a hub (or to every hub of a fleet) and execute the commands it sends, until stopped."""
    if not hub:
        fail_usage("pass --hub ws://HOST:PORT/ws (or set $DISPATCH_HUB)")
    if not device_id:
        fail_usage("pass --id NAME: the id batches will address this device by")
    from aip.device import device_clients, serve_hubs  # MCP: imported by this command, not by `dispatch --help`
    from dispatchers import ConcurrencyLimits, LocalCommandDispatcher, MCPServerManager

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
                    for name, connection in servers.servers.items()
                    for tool in connection.tools.values()
                ]

            executor = LocalCommandDispatcher(servers, agent=device_id)
            clients = device_clients(
                hub,
                device_id,
                executor,
                token=token,
                tools=tools,
                heartbeat_interval=heartbeat,
                ssl_context=context,
                token_in_query=token_in_query,
            )
            await serve_hubs(clients, stop)

    try:
        run_until_signalled(serve_commands)
    except ValueError as error:
        fail_usage(str(error))
    except CredentialRefused as error:
        say_error(f"{error}: issue this device a credential with `dispatch credentials add-device {device_id}`")
        raise typer.Exit(1) from None
