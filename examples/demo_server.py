"""An MCP tool server for demos, tests and benchmarks.

Run it as ``python examples/demo_server.py`` (stdio) or
``python examples/demo_server.py --http PORT`` (streamable HTTP on 127.0.0.1).
Its tools cover the cases a dispatcher must handle: plain and structured
output, falsy output, slow tools, tools that report an error, a flaky tool that
fails a set number of times before it succeeds, and a counter that proves how
often a tool really ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from typing import Any

from mcp import MCPError
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import INTERNAL_ERROR, ToolAnnotations

server = MCPServer("demo", log_level="WARNING")
_flaky_attempts: Counter[str] = Counter()
_calls: Counter[str] = Counter()

_READ_ONLY = ToolAnnotations(readOnlyHint=True, idempotentHint=True)


JSON = int | float | str | bool | list[Any] | dict[str, Any] | None


@server.tool(annotations=_READ_ONLY)
def echo(value: JSON) -> JSON:
    """Return ``value`` unchanged (any JSON, falsy values included), as ``{"result": value}``."""
    return value


@server.tool(annotations=_READ_ONLY)
def add(a: float, b: float) -> float:
    """Return ``a + b``."""
    return a + b


@server.tool(annotations=_READ_ONLY, structured_output=False)
def text(message: str) -> str:
    """Return ``message`` as unstructured text content."""
    return message


@server.tool(annotations=_READ_ONLY)
async def sleep(seconds: float) -> float:
    """Sleep for ``seconds`` and return them: a stand-in for a slow tool."""
    await asyncio.sleep(seconds)
    return seconds


@server.tool()
def fail(message: str = "tool failed on purpose") -> str:
    """Always report an error (MCP ``isError``) carrying ``message``."""
    raise ToolError(message)


@server.tool(annotations=ToolAnnotations(idempotentHint=True))
def flaky(key: str, failures: int = 2) -> dict[str, int]:
    """Fail the first ``failures`` calls for ``key``, then succeed.

    The failures are JSON-RPC internal errors, which a dispatcher treats as
    transient, unlike a tool's own ``isError`` answer.
    """
    _flaky_attempts[key] += 1
    attempt = _flaky_attempts[key]
    if attempt <= failures:
        raise MCPError(INTERNAL_ERROR, f"transient failure {attempt} of {failures} for {key!r}")
    return {"attempts": attempt}


@server.tool()
def count(key: str = "default") -> int:
    """Count calls per ``key`` and return the new total: proves how often a tool ran."""
    _calls[key] += 1
    return _calls[key]


@server.tool()
def crash(exit_code: int = 3) -> str:
    """Kill this server process at once, mid-call."""
    os._exit(exit_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT")
    args = parser.parse_args()
    if args.http is None:
        server.run()
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http)


if __name__ == "__main__":
    main()
