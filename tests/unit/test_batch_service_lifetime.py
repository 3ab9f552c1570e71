"""When a batch service stops by itself: idle, its code replaced, its lifetime served; never with a client on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cli.batch_service import server
from cli.batch_service.server import Service

BOUND = 10.0  # seconds any one wait here may take before the test fails


def service(tmp_path: Path, idle: float) -> Service:
    return Service(tmp_path / "s.sock", idle, embedded=False)


def test_an_idle_service_stops_after_its_idle_period(tmp_path: Path) -> None:
    async def scenario() -> None:
        await asyncio.wait_for(service(tmp_path, idle=0.05).until_idle_or_stopped(), BOUND)

    asyncio.run(scenario())


def test_a_connection_keeps_it_until_it_closes(tmp_path: Path) -> None:
    async def scenario() -> None:
        subject = service(tmp_path, idle=0.05)
        client: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        holder = asyncio.ensure_future(client)
        subject.connections[holder] = None  # type: ignore[assignment]  # the writer is not looked at here
        subject.changed.set()
        waiting = asyncio.create_task(subject.until_idle_or_stopped())
        await asyncio.sleep(0.3)  # six idle periods: the connection must hold it
        assert not waiting.done()
        del subject.connections[holder]
        subject.changed.set()
        client.set_result(None)
        await asyncio.wait_for(waiting, BOUND)

    asyncio.run(scenario())


def test_stop_ends_it_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        subject = service(tmp_path, idle=3600)
        waiting = asyncio.create_task(subject.until_idle_or_stopped())
        await asyncio.sleep(0)
        subject.stop()
        await asyncio.wait_for(waiting, BOUND)

    asyncio.run(scenario())


@pytest.mark.parametrize("reason", ["code replaced", "lifetime served"])
def test_an_idle_service_whose_code_was_replaced_or_whose_life_is_over_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    monkeypatch.setattr(server, "SUPERSEDED_CHECK", 0.01)
    subject = service(tmp_path, idle=3600)
    if reason == "code replaced":
        monkeypatch.setattr(server, "code_fingerprint", lambda: ["another version"])
    else:
        subject.started -= server.LIFETIME + 1

    async def scenario() -> Any:
        await asyncio.wait_for(subject.until_idle_or_stopped(), BOUND)

    asyncio.run(scenario())
