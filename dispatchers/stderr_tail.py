"""The end of what a stdio MCP server writes to stderr, read through a pipe of our own.

Its last lines explain a failure (a traceback, a missing module), and the
pipe's end tells us that the process exited even while no call was in
flight, so the next command starts a fresh process instead of failing on a
dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

__all__ = ["StderrTail"]


class StderrTail:
    """The end of what a stdio server writes to stderr, read through a pipe.

    Read in chunks, so no line is too long to read; only the last few KiB
    are kept. The pipe's end means the process exited (servers don't close
    stderr while they serve).
    """

    KEEP = 8192

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "w")
        self.closed = asyncio.Event()
        self._tail = bytearray()
        self._reader = asyncio.create_task(self._read(os.fdopen(read_fd, "rb")))

    async def _read(self, pipe: Any) -> None:
        try:
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
            try:
                while chunk := await reader.read(65536):
                    self._tail += chunk
                    del self._tail[: -self.KEEP]
            finally:
                transport.close()
        finally:
            self.closed.set()

    def release_writer(self) -> None:
        """Close our copy of the pipe's write end, once the child has its own."""
        with contextlib.suppress(OSError):
            self.writer.close()

    def text(self, lines: int = 3, limit: int = 400) -> str:
        """The last few non-blank lines, joined; at most ``limit`` characters from the end."""
        kept = [line.strip() for line in self._tail.decode(errors="replace").splitlines() if line.strip()]
        text = " | ".join(kept[-lines:])
        return text if len(text) <= limit else "..." + text[-limit:]

    async def aclose(self) -> None:
        """Stop reading, once the server's last words are in (or a second has passed)."""
        self.release_writer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), timeout=1.0)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
