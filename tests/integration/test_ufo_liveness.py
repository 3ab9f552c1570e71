"""A UFO device stays connected while it answers WebSocket pings, whatever data it sends (issue 9, item 1).

UFO's device client heartbeats every 120 s and sends nothing while a command
runs; the hub must take its pongs as the sign of life, and show them in
``last_seen``. A peer that stops answering pings is dropped within
``ping_interval + ping_timeout`` and its pending batch fails at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from typing import Any

import pytest
from hub_support import TOKEN, device_token, running_hub, serving
from ufo_style_device import UFO_HEARTBEAT_INTERVAL, UfoStyleDevice
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from aip.controller import HubLink, list_devices
from aip.hub import Hub, HubSettings
from aip.messages import Command, ResultStatus
from dispatchers import WebSocketCommandDispatcher

WAIT = 5.0  # seconds any single expected event may take


async def the_device(hub: Hub, device_id: str) -> dict[str, Any]:
    [entry] = [d for d in await list_devices(hub.url, TOKEN, timeout=WAIT) if d["id"] == device_id]
    return entry


def stamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def long_batch(seconds: float) -> list[Command]:
    return [
        Command(tool_name="sleep", parameters={"seconds": seconds}, tool_type="action", call_id="sleep-1"),
        Command(tool_name="echo", parameters={"text": "after"}, tool_type="data_collection", call_id="echo-1"),
    ]


def dispatcher_for(hub: Hub, device_id: str, **options: Any) -> WebSocketCommandDispatcher:
    return WebSocketCommandDispatcher(HubLink(hub.url, TOKEN, open_timeout=WAIT), device_id, **options)


async def test_a_ufo_style_device_stays_connected_through_a_long_command_and_idle_time_on_pongs_alone() -> None:
    ping_interval = 0.2
    async with asyncio.timeout(30), running_hub(ping_interval=ping_interval, ping_timeout=1.0) as hub:
        ufo = UfoStyleDevice(hub.url, "ufo-pc", device_token(hub, "ufo-pc"), heartbeat_interval=3600)
        async with serving(ufo):
            registered = await the_device(hub, "ufo-pc")
            await asyncio.sleep(ping_interval * 8)  # idle: the device sends nothing at all
            idle = await the_device(hub, "ufo-pc")
            assert stamp(idle["last_seen"]) > stamp(registered["last_seen"]), "pongs did not refresh last_seen"
            assert [frame["type"] for frame in ufo.sent] == ["register"]

            async with dispatcher_for(hub, "ufo-pc", agent_name="HostAgent", session_id="s-1") as dispatcher:
                started = time.monotonic()
                batch = asyncio.create_task(dispatcher.execute_commands(long_batch(3.0), timeout=20))
                async with asyncio.timeout(WAIT):
                    await ufo.command_received.wait()
                await asyncio.sleep(ping_interval * 8)  # the command runs; the device is silent meanwhile
                busy = await the_device(hub, "ufo-pc")
                assert stamp(busy["last_seen"]) > stamp(idle["last_seen"]), "pongs did not refresh last_seen"
                assert busy["pending_batches"] == 1
                assert [frame["type"] for frame in ufo.sent] == ["register"]
                async with asyncio.timeout(WAIT * 2):
                    results = await batch
                elapsed = time.monotonic() - started
            after = await the_device(hub, "ufo-pc")

    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 2, [r.error for r in results]
    assert [r.call_id for r in results] == ["sleep-1", "echo-1"]
    assert results[1].result == {"text": "after"}
    assert elapsed >= 3.0, elapsed
    assert ufo.connections == 1, "the device was dropped and came back"
    assert after["connected_at"] == registered["connected_at"]
    [command] = ufo.commands
    assert (command["agent_name"], command["session_id"]) == ("HostAgent", "s-1")
    assert [frame["type"] for frame in ufo.sent] == ["register", "command_results"]
    assert ufo.errors == []


async def test_a_ufo_style_device_sends_no_answer_without_an_agent_name_and_stays_connected() -> None:
    async with asyncio.timeout(30), running_hub(ping_interval=0.2, ping_timeout=1.0) as hub:
        ufo = UfoStyleDevice(hub.url, "ufo-noagent", device_token(hub, "ufo-noagent"), heartbeat_interval=3600)
        async with serving(ufo), dispatcher_for(hub, "ufo-noagent") as dispatcher:
            [result] = await dispatcher.execute_commands(long_batch(0)[1:], timeout=1.5)
            assert (await the_device(hub, "ufo-noagent"))["id"] == "ufo-noagent"
    assert result.status is ResultStatus.FAILURE and "TimeoutError" in (result.error or ""), result.error
    [command] = ufo.commands
    assert command["agent_name"] is None
    assert len(ufo.errors) == 1 and "agent_name" in ufo.errors[0]
    assert [frame["type"] for frame in ufo.sent] == ["register"]
    assert ufo.connections == 1


async def test_a_fake_device_that_stops_reading_its_socket_is_dropped_within_a_ping_interval_and_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fake: a plain websockets client (no keepalive of its own) that registers, then pauses reading, so no pong."""
    ping_interval, ping_timeout = 0.3, 0.5
    caplog.set_level(logging.WARNING, logger="aip.hub")
    async with asyncio.timeout(30), running_hub(ping_interval=ping_interval, ping_timeout=ping_timeout) as hub:
        ufo = UfoStyleDevice(hub.url, "deaf-pc", device_token(hub, "deaf-pc"))
        headers = {"Authorization": f"Bearer {ufo.token}"}
        async with connect(ufo.url, additional_headers=headers, ping_interval=None, proxy=None) as deaf:
            await deaf.send(json.dumps(ufo._register_frame()))
            async with asyncio.timeout(WAIT):
                ack = json.loads(await deaf.recv())
            assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
            async with dispatcher_for(hub, "deaf-pc", agent_name="HostAgent") as dispatcher:
                batch = asyncio.create_task(dispatcher.execute_commands(long_batch(1), timeout=30))
                async with asyncio.timeout(WAIT):
                    delivered = json.loads(await deaf.recv())
                assert delivered["type"] == "command"
                deaf.transport.pause_reading()  # the process hangs: the kernel still takes bytes, nobody answers
                paused = time.monotonic()
                async with asyncio.timeout(WAIT * 2):
                    results = await batch
                elapsed = time.monotonic() - paused
            assert await list_devices(hub.url, TOKEN, timeout=WAIT) == []
            deaf.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    while True:
                        await deaf.recv()

    assert elapsed < ping_interval + ping_timeout + 0.5, f"dropped after {elapsed:.2f}s"
    assert [r.call_id for r in results] == ["sleep-1", "echo-1"]
    for result in results:
        assert result.status is ResultStatus.FAILURE
        assert "deaf-pc" in (result.error or "") and "TimeoutError" not in (result.error or ""), result.error
    assert any("no answer to a ping" in record.getMessage() for record in caplog.records), caplog.text


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_at_the_real_defaults_a_ufo_style_device_stays_through_two_ping_rounds_of_one_silent_command() -> None:
    """Real time at ``HubSettings()``'s pings: a command spanning two rounds, each sent and judged, and then some.

    The hub pings on its own clock from its start; the command starts within
    a second of it, so one of ``2 * ping_interval + ping_timeout`` (60 s at the
    defaults) plus a margin sees the pings at 20 and 40 s sent and judged (at 40
    and 60 s) while the device says nothing. That is also longer than any
    silence limit the hub ever had (the 60 s heartbeat timeout pings replaced).
    """
    defaults = HubSettings()
    seconds = 2 * defaults.ping_interval + defaults.ping_timeout + 5
    async with running_hub() as hub:  # HubSettings() but port=0: pings every 20 s, 20 s to answer
        assert hub.settings == dataclasses.replace(defaults, port=0)
        ufo = UfoStyleDevice(
            hub.url, "ufo-real", device_token(hub, "ufo-real"), heartbeat_interval=UFO_HEARTBEAT_INTERVAL
        )
        async with serving(ufo):
            registered = await the_device(hub, "ufo-real")
            async with dispatcher_for(hub, "ufo-real", agent_name="HostAgent") as dispatcher:
                started = time.monotonic()
                batch = asyncio.create_task(dispatcher.execute_commands(long_batch(seconds), timeout=seconds + 60))
                async with asyncio.timeout(WAIT):
                    await ufo.command_received.wait()
                async with asyncio.timeout(defaults.ping_interval + WAIT):  # the first ping's pong, mid-command
                    busy = await the_device(hub, "ufo-real")
                    while stamp(busy["last_seen"]) <= stamp(registered["last_seen"]):
                        await asyncio.sleep(0.5)
                        busy = await the_device(hub, "ufo-real")
                assert busy["pending_batches"] == 1
                assert [frame["type"] for frame in ufo.sent] == ["register"]
                async with asyncio.timeout(seconds + WAIT):
                    results = await batch
                elapsed = time.monotonic() - started
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 2, [r.error for r in results]
    assert results[0].result == seconds
    assert elapsed >= seconds, elapsed
    assert ufo.connections == 1, "the device was dropped and came back"
