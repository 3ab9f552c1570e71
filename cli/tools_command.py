"""``dispatch tools``: start the servers of an mcp.json and list each one's state and tools (a table, or JSON)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .inert import inert
from .options import checked_config
from .terminal import stdout


def tools(
    config: Annotated[Path, typer.Option("--config", "-c", help="mcp.json naming the MCP servers")] = Path("mcp.json"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the servers and tools as JSON")] = False,
) -> None:
    """Start the servers of a config and list their tools with input schemas."""
    from dispatchers import MCPServerManager  # MCP: imported by this command, not by `dispatch --help`

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
                for name, connection in manager.servers.items()
            ]

    servers = asyncio.run(inspect())
    if json_output:
        sys.stdout.write(json.dumps(servers) + "\n")
    else:
        for server in servers:
            stdout.print(tools_table(server))
    raise typer.Exit(0 if all(server["up"] for server in servers) else 1)


def tools_table(server: dict[str, Any]) -> Table:
    """One server's state and tools (an optional parameter marked ``?``); every cell ``inert``: a server wrote them."""
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
