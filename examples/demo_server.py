"""An MCP tool server for demos, tests and benchmarks.

Run it as ``python examples/demo_server.py`` (stdio) or
``python examples/demo_server.py --http PORT`` (streamable HTTP on 127.0.0.1).
Its tools cover the cases a dispatcher must handle: plain and structured
output, falsy output, slow tools, tools that report an error, a flaky tool that
fails a set number of times before it succeeds, a counter that proves how
often a tool really ran, and slow tools that report when they ran and what ran
alongside them, to measure concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from typing import Any

from mcp import MCPError
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import INTERNAL_ERROR, ToolAnnotations

server = MCPServer("demo", log_level="WARNING")
_flaky_attempts: Counter[str] = Counter()
_calls: Counter[str] = Counter()
_running: Counter[str] = Counter()

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


async def _timed(seconds: float, key: str) -> dict[str, float | int]:
    _running[key] += 1
    started, alongside = time.time(), _running[key] - 1
    try:
        await asyncio.sleep(seconds)
    finally:
        _running[key] -= 1
    return {"started": started, "ended": time.time(), "alongside": alongside}


@server.tool()
async def timed_action(seconds: float, key: str = "default") -> dict[str, float | int]:
    """Take ``seconds``, like a slow tool with side effects (it declares no hints).

    Returns when it ``started`` and ``ended`` (wall clock, comparable across
    servers on one machine) and how many other timed calls for ``key`` were
    running in this server when it started (``alongside``).
    """
    return await _timed(seconds, key)


@server.tool(annotations=_READ_ONLY)
async def timed_read(seconds: float, key: str = "default") -> dict[str, float | int]:
    """Like ``timed_action``, but declared read-only (``readOnlyHint``)."""
    return await _timed(seconds, key)


@server.tool()
def crash(exit_code: int = 3) -> str:
    """Kill this server process at once, mid-call."""
    os._exit(exit_code)


@server.tool()
def count_to_file(path: str) -> int:
    """Append a line to the file at ``path`` and return how many lines it holds.

    A counter that outlives the server process: proves how often a tool ran
    across flow runs, each of which starts its own server.
    """
    with open(path, "a", encoding="utf-8") as file:
        file.write("ran\n")
    with open(path, encoding="utf-8") as file:
        return sum(1 for _ in file)


@server.tool()
def file_gate(path: str) -> str:
    """Report an error unless the file at ``path`` exists; else return its text.

    A command that fails until someone fixes its condition (creates the file).
    """
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        raise ToolError(f"{path} does not exist") from None


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
