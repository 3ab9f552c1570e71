"""Real hubs and devices for tests: in-process, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aip.access import AccessPolicy
from aip.device import Backoff, DeviceClient
from aip.hub import Hub, HubSettings
from dispatchers import InMemoryCommandDispatcher
from dispatchers.memory import Tool

TOKEN = "test-token-0123456789abcdef"
#: Fast reconnects, so tests that break connections wait milliseconds, not seconds.
QUICK_BACKOFF = Backoff(initial=0.05, maximum=0.2)


@contextlib.asynccontextmanager
async def running_hub(token: str = TOKEN, **settings: Any) -> AsyncIterator[Hub]:
    """A hub on a free loopback port; ``settings`` override ``HubSettings`` fields."""
    async with Hub(AccessPolicy(token), HubSettings(port=0, **settings)) as hub:
        yield hub


def echo_tools() -> dict[str, Tool]:
    """``echo`` returns its parameters; ``sleep`` waits ``seconds``; ``fail`` raises."""

    async def sleep(command: Any) -> float:
        seconds = float((command.parameters or {}).get("seconds", 1))
        await asyncio.sleep(seconds)
        return seconds

    def fail(command: Any) -> None:
        raise RuntimeError("the tool failed on purpose")

    return {"echo": lambda command: command.parameters, "sleep": sleep, "fail": fail}


@contextlib.asynccontextmanager
async def running_device(
    hub: Hub,
    device_id: str = "lab-pc",
    tools: Mapping[str, Tool] | None = None,
    *,
    token: str = TOKEN,
    **options: Any,
) -> AsyncIterator[DeviceClient]:
    """A registered in-process device whose tools are Python functions; stopped cleanly on exit."""
    executor = InMemoryCommandDispatcher(tools if tools is not None else echo_tools())
    options.setdefault("backoff", QUICK_BACKOFF)
    client = DeviceClient(hub.url, device_id, executor, token=token, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        async with asyncio.timeout(10):
            await client.registered.wait()
        yield client
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
