"""A dispatcher whose tools are Python functions, for tests and fault injection.

Like httpx's ``MockTransport``: the same retries, deadlines and batch modes as
the real dispatchers, with no process or socket behind them.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aip.messages import Command, Result, ResultStatus

from .errors import CommandError, ToolReportedError, UnknownTool, candidates_text
from .tool_call import ToolCallDispatcher

__all__ = ["InMemoryCommandDispatcher", "Tool"]

#: A tool: takes the whole command (so it can see the call_id), returns the result.
Tool = Callable[[Command], Awaitable[Any] | Any]


class InMemoryCommandDispatcher(ToolCallDispatcher):
    """Runs each command with the function registered under its tool name.

    A function that raises a ``CommandError`` fails the way a real transport
    would (a ``ConnectionLost`` is retried, say); any other exception is the
    tool reporting an error. ``repeatable`` says whether sent calls may be retried.
    """

    def __init__(
        self, tools: Mapping[str, Tool], *, repeatable: bool = True, namespace: str = "memory", **policies: Any
    ):
        super().__init__(**policies)
        self.tools = dict(tools)
        self.repeatable = repeatable
        self.namespace = namespace

    def is_repeatable(self, command: Command) -> bool:
        return self.repeatable

    async def call(self, command: Command) -> Result:
        tool = self.tools.get(command.tool_name)
        if tool is None:
            raise UnknownTool(f"no tool named {command.tool_name!r}; tools: {candidates_text(self.tools)}", sent=False)
        try:
            value = tool(command)
            if inspect.isawaitable(value):
                value = await value
        except CommandError:
            raise
        except Exception as error:
            raise ToolReportedError(str(error) or type(error).__name__) from error
        return Result(status=ResultStatus.SUCCESS, result=value, namespace=self.namespace, call_id=command.call_id)
