"""Running commands on this machine, through local MCP servers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aip.messages import Command, Result, ResultStatus, ToolType

from .concurrency import command_category
from .errors import CommandError, ToolReportedError
from .mcp_manager import MCPServerManager
from .mcp_results import tool_error, tool_output
from .parameters import check_parameters
from .router import CommandRouter, Route
from .tool_call import ToolCallDispatcher

__all__ = ["LocalCommandDispatcher"]

logger = logging.getLogger("dispatchers.local")


#: A constant for every success Result: an enum member looked up on its class costs a descriptor call (Python 3.11).
_SUCCESS = ResultStatus.SUCCESS


class LocalCommandDispatcher(ToolCallDispatcher):
    """Routes each command to one of the manager's MCP servers and calls the tool.

    ``agent`` names whom this dispatcher serves (a device's id, an agent), for the logs.
    Retry, batch and timeout policies are keyword arguments (see
    ``ToolCallDispatcher``). Each call holds a slot of its server's
    concurrency limits (``ManagedServer.slots``, shared by every dispatcher
    on the same manager) while the tool runs; waiting for it counts against
    the attempt's time like the call itself.
    """

    #: Routing, slots and MCP requests all end when cancelled; the courtesy cancel MCP then sends the
    #: server shields itself from that first cancel, and ends at the second.
    calls_end_when_cancelled = True

    def __init__(self, mcp_server_manager: MCPServerManager, agent: str | None = None, **policies: Any) -> None:
        super().__init__(**policies)
        self.manager = mcp_server_manager
        self.agent = agent
        self.router = CommandRouter(mcp_server_manager.servers)

    def is_repeatable(self, command: Command) -> bool:
        """Only a read-only or idempotent tool, not called as an ``action``, is safe to run twice."""
        if command.tool_type == ToolType.ACTION:
            return False
        try:
            hints = self.router.route(command).tool.annotations
        except CommandError:
            return False
        return hints is not None and bool(hints.read_only_hint or hints.idempotent_hint)

    def server_for(self, command: Command) -> str | None:
        try:
            return self.router.route(command).server
        except CommandError:
            return command.namespace

    async def _route(self, command: Command) -> Route:
        """Route ``command``, waiting (within the attempt's time) for servers whose start could decide it.

        Servers named by the routing error that are starting are waited for;
        those whose restart is due are launched first. When none is (each is
        still waiting out its restart delay), the error is raised as it is: a
        server that has not listed its tools yet makes it a transient
        ``ServerUnavailable``, so the retry policy tries again later, and that
        attempt launches the servers that have become due.
        """
        while True:
            try:
                return self.router.route(command)
            except CommandError as error:
                starting = self.manager.launch(error.servers) if error.servers else []
                if not starting:
                    raise
                await asyncio.wait(starting, return_when=asyncio.FIRST_COMPLETED)

    async def call(self, command: Command) -> Result:
        try:
            route = self.router.route(command)  # the common case, with no coroutine of its own
        except CommandError:
            route = await self._route(command)
        parameters = command.parameters or {}
        check_parameters(route.tool.input_schema, parameters)
        connection = self.manager.servers[route.server]
        category = command_category(command, route.tool)
        if logger.isEnabledFor(logging.DEBUG):  # no arguments gathered for a line nobody logs: this runs per call
            logger.debug(
                "%s: %s[%s] -> %s (%s, %r)",
                self.agent or "-",
                command.tool_name,
                command.call_id,
                route.server,
                category,
                connection.slots,
            )
        # Only the call holds a slot: a command that can't be routed or has bad parameters never waits for one.
        if category in connection.slots.unlimited:
            answer = await connection.call_tool(route.tool.name, parameters)
        else:
            async with connection.slots.slot(category):
                answer = await connection.call_tool(route.tool.name, parameters)
        if answer.is_error:
            raise ToolReportedError(tool_error(answer))
        return Result(status=_SUCCESS, result=tool_output(answer), namespace=route.server, call_id=command.call_id)
