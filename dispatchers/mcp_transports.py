"""How the MCP client reaches a server: a subprocess over stdio, or streamable HTTP.

Each is an async context manager of the streams ``mcp.Client`` takes, entered
and left by the task that owns the server's run (anyio wants that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from .mcp_config import HttpServer, StdioServer
from .stderr_tail import StderrTail

__all__ = ["http_transport", "stdio_transport"]


@asynccontextmanager
async def stdio_transport(spec: StdioServer, stderr: StderrTail) -> AsyncIterator[Any]:
    """The server as a child process; its stderr goes to ``stderr``, whose end says the process exited."""
    params = StdioServerParameters(command=spec.command, args=list(spec.args), env=spec.env or None, cwd=spec.cwd)
    async with stdio_client(params, errlog=stderr.writer) as streams:
        stderr.release_writer()
        yield streams


@asynccontextmanager
async def http_transport(spec: HttpServer) -> AsyncIterator[Any]:
    """A streamable HTTP server: connect quickly, but let a tool take minutes to answer."""
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(headers=spec.headers, timeout=timeout) as http,
        streamable_http_client(spec.url, http_client=http) as streams,
    ):
        yield streams
