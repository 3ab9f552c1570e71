"""Backpressure, not eviction: a burst waits, and only a peer that reads nothing is closed (issue 11).

A real hub, real websockets peers on 127.0.0.1. A peer that should fall
behind gets a tiny receive window (``SO_RCVBUF``) so the kernel cannot hide
the burst, and reads nothing until the hub has stopped reading its sender:
the point where the old hub closed it (4002) for the number of frames queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from hub_support import TOKEN, device_token, running_hub
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from aip.controller import HubLink
from aip.hub import MAX_QUEUED_FRAMES, Hub
from aip.messages import Command, ResultStatus, ServerMessage, ServerMessageType, TaskStatus
from dispatchers import WebSocketCommandDispatcher

WAIT = 10.0  # seconds any single expected event may take before the test fails
#: The hub's close code for a peer that does not read what it is sent.
TOO_SLOW = 4002
#: How many batches one controller writes back to back: the field report's burst.
BURST = 1000
#: Characters of padding in each: together far more than the kernel's socket buffers hold on loopback.
PAD = 12_000


async def until(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Wait (polling the hub's state, which has no event to await) until ``condition()`` holds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def narrow_socket(port: int) -> socket.socket:
    """A connected socket with a 4 KiB receive window: what is sent to it piles up at the sender."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.setblocking(False)
    return raw


@contextlib.asynccontextmanager
async def raw_peer(hub: Hub, path: str, token: str, *, narrow: bool = False) -> AsyncIterator[ClientConnection]:
    """A plain websockets client; ``narrow``: a tiny receive window, and websockets buffers one frame unread."""
    options: dict[str, Any] = {"sock": narrow_socket(hub.port), "max_queue": 1} if narrow else {}
    async with connect(
        f"ws://127.0.0.1:{hub.port}{path}",
        additional_headers={"Authorization": f"Bearer {token}"},
        ping_interval=None,
        proxy=None,
        max_size=2**24,
        open_timeout=WAIT,
        **options,
    ) as connection:
        yield connection


@contextlib.asynccontextmanager
async def registered_device(hub: Hub, device_id: str) -> AsyncIterator[ClientConnection]:
    """A UFO-style device played by hand over a narrow socket: registered and acknowledged, nothing more read."""
    async with raw_peer(hub, "/ws", device_token(hub, device_id), narrow=True) as device:
        await device.send(json.dumps({"type": "register", "status": "ok", "client_id": device_id}))
        async with asyncio.timeout(WAIT):
            ack = json.loads(await device.recv())
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
        yield device


def server_side(hub: Hub, client: ClientConnection) -> ServerConnection:
    """The hub's end of ``client``'s connection."""
    [connection] = [
        outbox.connection
        for outbox in hub._outboxes.values()
        if outbox.connection.remote_address == client.local_address
    ]
    return connection


def batch_frame(response_id: str, device_id: str, n: int) -> str:
    """One batch of one padded echo, as a controller sends it."""
    echo = Command(tool_name="echo", parameters={"n": n, "pad": "x" * PAD}, call_id=f"call-{n}")
    return ServerMessage(
        type=ServerMessageType.COMMAND,
        status=TaskStatus.CONTINUE,
        response_id=response_id,
        target_id=device_id,
        agent_name="HostAgent",
        actions=[echo],
    ).model_dump_json()


async def answer_everything(device: ClientConnection, work: float, on_frame: Callable[[], None]) -> None:
    """Read and answer every command as a UFO device does: one at a time, each after ``work`` seconds."""
    async for raw in device:
        on_frame()
        message = json.loads(raw)
        if message.get("type") != "command":
            continue
        await asyncio.sleep(work)  # a slow reader, not a stopped one
        results = [
            {"status": "success", "result": action["parameters"], "call_id": action["call_id"], "error": None}
            for action in message["actions"]
        ]
        await device.send(
            json.dumps(
                {
                    "type": "command_results",
                    "status": "continue",
                    "prev_response_id": message["response_id"],
                    "action_results": results,
                }
            )
        )


async def collect(
    controller: ClientConnection, count: int, into: list[dict[str, Any]], held: Callable[[], bool]
) -> int:
    """Read ``count`` frames into ``into``; how many came while ``held()`` (the hub not reading this controller)."""
    while_held = 0
    while len(into) < count:
        into.append(json.loads(await controller.recv()))
        while_held += held()
    return while_held


async def test_a_burst_of_a_thousand_batches_to_a_device_that_reads_is_all_answered_and_nothing_is_closed() -> None:
    """The device takes 3 ms a command: the burst drains over seconds, the controller held most of that time.

    The pings are quick (every 0.1 s, answered within 2 s): a held
    controller's pong waits behind seconds of its own unread batches, so the
    hub must not judge it by them (nor the other controller, held too); the
    device's pong waits behind what it is reading, which its socket shows.
    """
    asked = [f"burst-{n}" for n in range(BURST)]
    answers: list[dict[str, Any]] = []
    async with (
        asyncio.timeout(60),
        running_hub(stall_timeout=15.0, ping_interval=0.1, ping_timeout=2.0) as hub,
        registered_device(hub, "busy-pc") as device,
        raw_peer(hub, "/controller", TOKEN) as burster,
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN, open_timeout=WAIT), "busy-pc") as other,
    ):
        hub_device, hub_burster = server_side(hub, device), server_side(hub, burster)
        reader = asyncio.create_task(collect(burster, BURST, answers, lambda: hub_burster in hub._held))

        async def burst() -> None:
            for n, response_id in enumerate(asked):
                await burster.send(batch_frame(response_id, "busy-pc", n))

        sending = asyncio.create_task(burst())
        # The device reads nothing yet: its outbox fills, and the hub stops reading the controller.
        await until(lambda: hub_burster in hub._held)
        [outbox] = [o for o in hub._outboxes.values() if o.connection is hub_device]
        assert outbox.full and not outbox.abandoned
        # Another controller's batch meanwhile waits its turn behind the burst: it is not refused.
        theirs = [
            Command(tool_name="echo", parameters={"who": "other", "n": n}, call_id=f"other-{n}") for n in range(3)
        ]
        other_batch = asyncio.create_task(other.execute_commands(theirs, timeout=45))
        peak = len(outbox.frames or ())

        def watch() -> None:
            nonlocal peak
            peak = max(peak, len(outbox.frames or ()))

        answering = asyncio.create_task(answer_everything(device, 0.003, watch))
        try:
            async with asyncio.timeout(45):
                await sending
                answered_while_held = await reader
                other_results = await other_batch
        finally:
            answering.cancel()
        assert not hub._held
        served = [o.connection for o in hub._outboxes.values()]
        assert hub_device in served and hub_burster in served, "a connection that reads was dropped"
    assert [a["prev_response_id"] for a in answers] == asked, "answers missing or out of order"
    # No deadlock: a controller the hub does not read still gets its answers (its outbox has its own writer).
    assert answered_while_held > 0, "no answer reached the controller while the hub held it"
    # Bounded: past the mark, each of the two controllers adds one frame at most before the hub stops reading it.
    assert MAX_QUEUED_FRAMES <= peak <= MAX_QUEUED_FRAMES + 2, peak
    assert all(a["type"] == "command_results" for a in answers), {a["type"] for a in answers}
    assert [a["action_results"][0]["result"]["n"] for a in answers] == list(range(BURST))
    assert [r.status for r in other_results] == [ResultStatus.SUCCESS] * 3, [r.error for r in other_results]
    assert [r.result for r in other_results] == [c.parameters for c in theirs]
    assert BURST > MAX_QUEUED_FRAMES, "the burst must be larger than what the hub queues before it holds"


async def test_a_device_that_reads_nothing_is_closed_after_the_stall_timeout_and_its_batches_fail() -> None:
    stall = 1.0
    async with (
        asyncio.timeout(60),
        running_hub(stall_timeout=stall) as hub,
        registered_device(hub, "deaf-pc") as deaf,
        raw_peer(hub, "/controller", TOKEN) as controller,
    ):
        deaf.transport.pause_reading()  # the process hangs: it takes no byte more
        hub_controller = server_side(hub, controller)
        [outbox] = [o for o in hub._outboxes.values() if o.connection is server_side(hub, deaf)]
        sent: list[str] = []

        async def burst() -> None:
            for n in range(BURST):
                sent.append(f"lost-{n}")
                await controller.send(batch_frame(sent[-1], "deaf-pc", n))

        started = time.monotonic()
        sending = asyncio.create_task(burst())
        await until(lambda: hub_controller in hub._held)  # a burst it does not read: held, not refused
        await until(lambda: outbox.abandoned, within=stall + WAIT)
        closed_after = time.monotonic() - started
        assert outbox.frames is None and outbox.queued == 0, "the frames for the closed device are still held"
        # The device reads at last: what was already on the wire, then the hub's close.
        deaf.transport.resume_reading()
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    await deaf.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == TOO_SLOW, closed
        async with asyncio.timeout(WAIT):
            await sending  # the controller is read again: the rest of its burst goes in
        # Every batch it sent gets the hub's error frame: those routed as the device was lost, the rest as refused.
        errors: dict[str, dict[str, Any]] = {}
        async with asyncio.timeout(WAIT):
            while len(errors) < len(sent):
                frame = json.loads(await controller.recv())
                errors[frame["prev_response_id"]] = frame
    assert closed_after >= stall, f"closed {closed_after:.2f}s after it stopped reading, before the stall timeout"
    assert sorted(errors) == sorted(sent)
    assert all(frame["type"] == "error" for frame in errors.values())
    # Those read before the device's connection ended failed with it; any read after found no device.
    reasons = [errors[response_id]["metadata"]["reason"] for response_id in sent]
    assert set(reasons) <= {"device_lost", "device_unavailable"}, set(reasons)
    assert reasons[0] == "device_lost", "the batches the device was sent did not fail as lost"
    assert all("deaf-pc" in frame["error"] for frame in errors.values()), errors[sent[0]]["error"]


async def test_a_device_dropped_for_pings_while_a_controller_is_held_behind_it_releases_the_controller() -> None:
    """The device hangs (no pong); it is dropped, the batches sent to it fail, and the held controller goes on."""
    ping_interval, ping_timeout = 0.2, 0.5
    async with (
        asyncio.timeout(60),
        running_hub(ping_interval=ping_interval, ping_timeout=ping_timeout, stall_timeout=30.0) as hub,
        registered_device(hub, "dead-pc") as dead,
        raw_peer(hub, "/controller", TOKEN) as controller,
    ):
        dead.transport.pause_reading()  # no byte more read, no pong sent
        hub_controller, hub_dead = server_side(hub, controller), server_side(hub, dead)
        sent: list[str] = []

        async def burst() -> None:
            for n in range(BURST):
                sent.append(f"held-{n}")
                await controller.send(batch_frame(sent[-1], "dead-pc", n))

        sending = asyncio.create_task(burst())
        await until(lambda: hub_controller in hub._held)
        async with asyncio.timeout(WAIT):
            await sending  # the device was dropped (no pong): the controller is read again
        errors: dict[str, dict[str, Any]] = {}
        async with asyncio.timeout(WAIT):
            while len(errors) < len(sent):
                frame = json.loads(await controller.recv())
                errors[frame["prev_response_id"]] = frame
        assert hub_dead not in [o.connection for o in hub._outboxes.values()], "the dead device is still served"
        dead.transport.abort()  # the hung process is killed: no closing handshake to wait for
        # A few ping rounds more (the pinger has no event to await): the controller, read again, answers them.
        await asyncio.sleep(3 * ping_interval + ping_timeout)
        assert hub_controller in [o.connection for o in hub._outboxes.values()], "the held controller was dropped"
        await controller.send(json.dumps({"type": "device_info_request", "status": "ok", "response_id": "after"}))
        after = json.loads(await controller.recv())
    assert sorted(errors) == sorted(sent)
    assert {frame["metadata"]["reason"] for frame in errors.values()} <= {"device_lost", "device_unavailable"}
    assert all("dead-pc" in frame["error"] for frame in errors.values())
    assert (after["type"], after["prev_response_id"]) == ("device_info_response", "after")


# -- a hub at its capacity refuses politely, before its descriptors run out ------------------------


async def test_a_full_hub_answers_503_which_is_worth_trying_again_and_takes_the_next_once_one_leaves() -> None:
    from aip.connect import HubRefused, HubUnavailable, open_connection

    async with running_hub(max_connections=3) as hub:
        url = f"{hub.url}/controller"
        held = [await open_connection(url, TOKEN) for _ in range(3)]
        try:
            await open_connection(url, TOKEN)
        except HubRefused as refused:
            raise AssertionError(f"a full hub is not a refusal to give up on: {refused}") from None
        except HubUnavailable as full:
            assert "503" in str(full) and "full" in str(full), full
        else:
            raise AssertionError("a fourth connection was taken by a hub of three")
        await held.pop().close()
        held.append(await open_connection(url, TOKEN))  # room again
        for connection in held:
            await connection.close()


def test_asyncio_s_accept_failures_at_the_descriptor_limit_are_one_line_per_period_not_a_traceback_each(
    caplog: Any,
) -> None:
    import logging

    import aip.hub  # noqa: F401 - installs the filter on asyncio's logger

    caplog.set_level(logging.ERROR, "asyncio")
    failure = OSError(24, "Too many open files")
    for _ in range(1000):
        logging.getLogger("asyncio").error("socket.accept() out of system resource", exc_info=failure)
    logging.getLogger("asyncio").error("something else")
    lines = [record for record in caplog.records if record.name == "asyncio"]
    assert [record.exc_info for record in lines] == [None, None], [record.getMessage() for record in lines]
    assert "out of system resource" in lines[0].getMessage() and lines[1].getMessage() == "something else"
