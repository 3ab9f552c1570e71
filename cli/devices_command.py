"""``dispatch devices``: the devices connected to a hub, or to every hub of a fleet, as a controller sees them."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from aip.connect import HubUnavailable
from aip.failover import list_fleet
from dispatchers import plural

from .hub_client import client_ssl, read_token
from .inert import inert
from .options import CaFileOption, HubOption, TokenFileOption
from .terminal import fail_usage, say_error, say_warning, stdout


def devices(
    hub: HubOption = None,
    token_file: TokenFileOption = None,
    cafile: CaFileOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the devices as JSON")] = False,
) -> None:
    """List the devices connected to a hub (or to the hubs of a fleet): id, platform, tools, connected, last seen.

    With several hubs (``--hub ws://a,ws://b``) each device is listed once,
    with the hubs it is connected to; a hub that does not answer is named on
    stderr, and the exit code is 1 only when none answers.
    """
    if not hub:
        fail_usage("pass --hub ws://HOST:PORT (or set $DISPATCH_HUB)")
    try:
        fleet = asyncio.run(list_fleet(hub, read_token(token_file), ssl_context=client_ssl(cafile)))
    except ValueError as error:
        fail_usage(str(error))
    except (HubUnavailable, TimeoutError) as error:
        say_error(str(error) or "the hub did not answer in time")
        raise typer.Exit(1) from None
    for url, why in fleet.unreachable.items():
        say_warning(f"hub {url} did not answer: {why}")
    if json_output:
        sys.stdout.write(json.dumps(fleet.devices) + "\n")
    else:
        stdout.print(devices_table(fleet.devices, several_hubs="," in hub))


def devices_table(connected: list[Any], several_hubs: bool = False) -> Table:
    """The hubs' listing, whatever a hub (ours, an older one, anyone's) put in it; every cell ``inert``."""
    table = Table(title=plural(len(connected), "device") + " connected", title_justify="left")
    columns = ("device", "kind", "platform", "tools", "connected", "last seen", "batches")
    for column in (*columns, "hubs") if several_hubs else columns:
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
                    *([", ".join(str(url) for url in entry.get("hubs", []))] if several_hubs else []),
                )
            )
        )
    return table
