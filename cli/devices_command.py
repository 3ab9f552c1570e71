"""``dispatch devices``: the devices connected to a hub, as a controller sees them (a table, or JSON)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from aip.connect import HubUnavailable
from aip.controller import list_devices
from dispatchers import plural

from .hub_client import client_ssl, read_token
from .inert import inert
from .options import CaFileOption, HubOption, TokenFileOption
from .terminal import fail_usage, say_error, stdout


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


def devices_table(connected: list[Any]) -> Table:
    """The hub's listing, whatever a hub (ours, an older one, anyone's) put in it; every cell ``inert``."""
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
