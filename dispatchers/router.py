"""Which server runs a command: pure rules over what each server offers.

In order: ``namespace`` (or a ``server.tool`` name) picks the server; else
``tool_type`` names a server, or a category of servers (``data_collection``,
``action``); any other non-empty ``tool_type`` is a permanent ``UnknownTool``
(a typo must not widen the choice to every server). Else the tool name must
be unique across the servers whose tools are known (up now, or listed before
they went down). Servers that have never listed their tools take no part in
routing by name; the errors name them (``CommandError.servers``), so a caller
can wait for their start and ask again. A tool no known server offers while
some have not listed their tools yet (down, starting, or waiting out their
restart delay) is a transient ``ServerUnavailable``, whatever those servers'
history: they may offer it once they are up. Only when every server has
listed its tools is an unknown tool a permanent ``UnknownTool``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

from aip.messages import TOOL_TYPES, Command

if TYPE_CHECKING:
    from mcp.types import Tool  # annotations only: the terminal checks tool_types without importing MCP

from .errors import AmbiguousTool, ServerUnavailable, UnknownTool, candidates_text, did_you_mean

__all__ = ["CommandRouter", "Route", "ToolServer", "tool_type_problem"]


class ToolServer(Protocol):
    """What the router needs to know of a server."""

    @property
    def tools(self) -> Mapping[str, Tool]: ...
    @property
    def available(self) -> bool: ...
    @property
    def categories(self) -> tuple[str, ...]: ...
    @property
    def error(self) -> str | None: ...


class Route(NamedTuple):
    """Where a command goes: a server's name, and its tool (a tuple: built for every call)."""

    server: str
    tool: Tool


class CommandRouter:
    """Resolves commands to (server, tool) over a live view of the servers."""

    def __init__(self, servers: Mapping[str, ToolServer]) -> None:
        self.servers = servers

    def route(self, command: Command) -> Route:
        """The one server and tool for ``command``, or a ``CommandError`` that says why not."""
        if command.tool_type:  # most commands name none: no check to call
            problem = tool_type_problem(command.tool_type, self.servers)
            if problem is not None:
                raise UnknownTool(f"tool_type {problem}", sent=False)
        server, tool_name = self._pinned(command)
        if server is not None:
            return self._on(server, tool_name)
        if command.tool_type in TOOL_TYPES:
            names = [name for name, s in self.servers.items() if not s.categories or command.tool_type in s.categories]
            return self._unique(tool_name, names, f" among {command.tool_type} servers")
        return self._unique(tool_name, self.servers, "")

    def _pinned(self, command: Command) -> tuple[str | None, str]:
        if command.namespace:
            if command.namespace not in self.servers:
                raise UnknownTool(
                    f"no MCP server named {command.namespace!r}; servers: {candidates_text(self.servers)}", sent=False
                )
            return command.namespace, command.tool_name
        prefix, dot, rest = command.tool_name.partition(".")
        if dot and prefix in self.servers:
            return prefix, rest
        if command.tool_type in self.servers:
            return command.tool_type, command.tool_name
        return None, command.tool_name

    def _on(self, name: str, tool_name: str) -> Route:
        server = self.servers[name]
        if not server.available and tool_name not in server.tools:
            raise ServerUnavailable(f"MCP server {name!r} is down: {server.error}", servers=(name,))
        tool = server.tools.get(tool_name)
        if tool is None:
            raise UnknownTool(
                f"MCP server {name!r} has no tool {tool_name!r}{did_you_mean(tool_name, server.tools)}; "
                f"its tools: {candidates_text(server.tools)}",
                sent=False,
            )
        return Route(name, tool)

    def _unique(self, tool_name: str, names: Collection[str], scope: str) -> Route:
        offering: list[str] = []
        tool = None
        for name in names:  # a loop, not a comprehension: no function call of its own (Python 3.11), every call
            found = self.servers[name].tools.get(tool_name)
            if found is not None:
                offering.append(name)
                tool = found
        if len(offering) == 1 and tool is not None:
            return Route(offering[0], tool)
        if offering:
            qualified = (f"{name}.{tool_name}" for name in offering)
            raise AmbiguousTool(
                f"tool {tool_name!r} is offered by several servers{scope}: {candidates_text(qualified)}; "
                "set the command's namespace or write server.tool",
                sent=False,
            )
        unlisted = tuple(name for name in names if not self.servers[name].available and not self.servers[name].tools)
        if unlisted:
            every_tool = {tool for name in names for tool in self.servers[name].tools}
            reasons = "; ".join(f"{name!r}: {self.servers[name].error or 'not up yet'}" for name in unlisted)
            # Transient: their start (under way, or due) may bring the tool; the retry waits for it.
            raise ServerUnavailable(
                f"no MCP server offers {tool_name!r}{scope}{did_you_mean(tool_name, every_tool)}, "
                f"and these have not listed their tools yet: {reasons}",
                servers=unlisted,
            )
        elsewhere = [name for name in self.servers if name not in names and tool_name in self.servers[name].tools]
        if elsewhere:
            raise UnknownTool(
                f"no MCP server offers {tool_name!r}{scope}; it is on {candidates_text(elsewhere)}, "
                "which serve other tool_types",
                sent=False,
            )
        every_tool = {tool for name in names for tool in self.servers[name].tools}
        raise UnknownTool(
            f"no MCP server offers {tool_name!r}{scope}{did_you_mean(tool_name, every_tool)}; "
            f"servers: {candidates_text(names)}",
            sent=False,
        )


def tool_type_problem(tool_type: str, servers: Iterable[str]) -> str | None:
    """Why ``tool_type`` names nothing among ``servers``, or None when it is "", a category or a server.

    The router refuses such a command at run time; ``check_tool_types`` refuses
    the batch file before it runs: one rule, one wording.
    """
    if not tool_type or tool_type in TOOL_TYPES:  # the common cases first: no copy of the names
        return None
    names = list(servers)
    if tool_type in names:
        return None
    categories = ", ".join(sorted(TOOL_TYPES))
    return (
        f"{tool_type!r} is neither {categories} nor a server of the config"
        f"{did_you_mean(tool_type, [*TOOL_TYPES, *names])}; servers: {candidates_text(names)}"
    )
