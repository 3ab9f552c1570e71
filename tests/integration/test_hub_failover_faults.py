"""A fleet's hubs failing in the ways a network fails: hung, slow, lagging, odd.

Real hubs and devices in-process on 127.0.0.1. Faults a real hub can't be
made to show on demand are injected: a TCP proxy that freezes (a hub whose
process stopped, or whose machine vanished, mid-write), one that throttles
(a slow link), a listener that never answers a handshake (a hung hub), a
link whose send is held on its way (a frame stuck in a send buffer when the
connection ends), a hub of a stranger's making that answers the device list
with something else. Each test's name says which.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import websockets
from hub_support import QUICK_BACKOFF, TOKEN, credentials_with, running_device, running_hub, token_for_device
from test_hub_failover import QUICK_DELIVERY, CountingTools, fleet_url, two_hubs
from websockets.asyncio.server import ServerConnection

from aip.connect import CredentialRefused
from aip.controller import HubLink
from aip.device import device_clients, serve_hubs
from aip.device_session import InHand
from aip.failover import FailoverLink, controller_link, list_fleet
from aip.messages import Command, ResultStatus, ServerMessage, ServerMessageType
from dispatchers import InMemoryCommandDispatcher, WebSocketCommandDispatcher

#: The silence after which a link here leaves its hub (SILENCE_LIMIT, 6 s, in use): the same rule, sooner.
QUICK_SILENCE = 1.5

Pipe = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


class Proxy:
    """A TCP proxy on loopback; ``close`` cuts every connection through it (a frozen one holds up a hub's close)."""

    def __init__(self, server: asyncio.Server, writers: list[asyncio.StreamWriter]) -> None:
        self.server, self.writers = server, writers

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


async def proxy_to(port: int, upstream: Pipe, downstream: Pipe) -> Proxy:
    """A proxy to ``port``: client-to-hub bytes through ``upstream``, the others through ``downstream``."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        hub_reader, hub_writer = await asyncio.open_connection("127.0.0.1", port)
        writers.extend((client_writer, hub_writer))
        try:
            await asyncio.gather(upstream(client_reader, hub_writer), downstream(hub_reader, client_writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            hub_writer.close()

    return Proxy(await asyncio.start_server(handle, "127.0.0.1", 0), writers)


def pipe(frozen: asyncio.Event | None = None, rate: float = 0.0) -> Pipe:
    """Copy bytes; nothing at all once ``frozen`` is set (a stopped process); at most ``rate`` bytes/s if given."""

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64 * 1024):
            if frozen is not None and frozen.is_set():
                await asyncio.Event().wait()  # never again: the test's end cancels it
            writer.write(data)
            await writer.drain()
            if rate:
                await asyncio.sleep(len(data) / rate)  # the link's pace, not a wait for an event

    return copy


def listening_url(server: asyncio.Server) -> str:
    return f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_hub_that_hangs_while_a_large_batch_is_written_to_it_is_left_proxy_frozen() -> None:
    """The write stalls in the send buffer, so no ping could leave: silence in both directions is what counts."""
    frozen = asyncio.Event()
    async with two_hubs({"size": lambda command: len(str(command.parameters))}) as (first, second, _):
        proxy = await proxy_to(first.port, pipe(frozen), pipe(frozen))
        link = FailoverLink([HubLink(proxy.url, TOKEN, silence_limit=QUICK_SILENCE), HubLink(second.url, TOKEN)])
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            [warm] = await dispatcher.execute_commands([Command(tool_name="size", call_id="warm")], timeout=10)
            frozen.set()
            # 8 MiB: more than the kernel's buffers on both sides hold (about 4 MiB here), so some waits in ours.
            large = Command(tool_name="size", parameters={"blob": "x" * 2**23}, call_id="large")
            [result] = await dispatcher.execute_commands([large], timeout=20)
        proxy.close()
    assert warm.status is ResultStatus.SUCCESS, warm
    assert result.status is ResultStatus.SUCCESS, (result.error or "")[:300]


async def test_a_large_result_arriving_slowly_is_not_taken_for_a_dead_hub_proxy_throttled() -> None:
    """Longer than the silence limit on the way, yet bytes keep coming: no ping waits behind them and times out."""
    blob = os.urandom(2**21).hex()[: int(2**20 * (QUICK_SILENCE + 1.5))]  # at 1 MiB/s: 1.5 s past the limit
    async with (
        running_hub(credentials_with(["lab-pc"])) as hub,
        running_device(hub, "lab-pc", {"shot": lambda _: blob}),
    ):
        proxy = await proxy_to(hub.port, pipe(), pipe(rate=2**20))
        link = HubLink(proxy.url, TOKEN, silence_limit=QUICK_SILENCE)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            [result] = await dispatcher.execute_commands([Command(tool_name="shot", call_id="shot")], timeout=30)
        proxy.close()
    assert result.status is ResultStatus.SUCCESS, (result.error or "")[:300]
    assert result.result == blob


async def test_a_new_link_reaches_the_device_in_seconds_when_the_first_hub_listed_never_answers_fake_hub() -> None:
    """One link per flow run: each must not wait a whole open_timeout on a hung first hub."""
    held: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    hung = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    async with running_hub(credentials_with(["lab-pc"])) as hub, running_device(hub, "lab-pc"):
        link = controller_link(f"{listening_url(hung)},{hub.url}", TOKEN)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            [result] = await dispatcher.execute_commands([Command(tool_name="echo", call_id="e")], timeout=6)
    hung.close()
    assert result.status is ResultStatus.SUCCESS, result.error


class HeldSend(HubLink):
    """A link whose first batch frame is held on its way (stuck in a send buffer) until ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: ServerMessage) -> None:
        if message.type is ServerMessageType.COMMAND and not self.release.is_set():
            self.holding.set()
            await self.release.wait()
        await super().send(message)


async def test_a_hub_lost_while_a_batch_is_on_its_way_to_it_sends_it_once_through_the_next_fake_held_send() -> None:
    """The loss is the send's to handle: it tries the next hub; the batch is not also failed for a re-send."""
    counting = CountingTools()
    counting.release.set()
    sent_second: list[str] = []
    async with two_hubs(counting.tools()) as (first, second, _):
        held, other = HeldSend(first.url, TOKEN), HubLink(second.url, TOKEN)
        original = other.send

        async def counted(message: ServerMessage) -> None:
            sent_second.append(message.type.value)
            await original(message)

        other.send = counted  # type: ignore[method-assign]
        link = FailoverLink([held, other])
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            await link.open()
            running = asyncio.create_task(
                dispatcher.execute_commands([Command(tool_name="echo", call_id="on-its-way")], timeout=20)
            )
            async with asyncio.timeout(10):
                await held.holding.wait()
            reader = held._reader
            await first.close()
            assert reader is not None
            async with asyncio.timeout(10):
                await reader  # the link has heard of the loss, with the frame still on its way
            held.release.set()
            async with asyncio.timeout(15):
                [result] = await running
    assert result.status is ResultStatus.SUCCESS, result.error
    assert counting.runs == {"on-its-way": 1}
    assert sent_second == ["command"], sent_second


async def test_cancelling_a_batch_after_a_failover_stops_the_command_still_running_from_before() -> None:
    counting = CountingTools()
    tools = counting.tools()
    hold, stopped = tools["held"], asyncio.Event()

    async def held(command: Command) -> Any:
        try:
            return await hold(command)
        except asyncio.CancelledError:
            stopped.set()
            raise

    tools["held"] = held
    async with two_hubs(tools) as (first, second, clients):
        link = controller_link(fleet_url(first, second), TOKEN)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            running = asyncio.create_task(dispatcher.execute_commands([Command(tool_name="held", call_id="h")], 60))
            async with asyncio.timeout(10):
                await counting.started.wait()
            await first.close()  # sent again through the second hub; the device joins the call still running
            async with asyncio.timeout(10):
                while not clients[1].session.runs:  # noqa: ASYNC110 - the device's state; no event tells it
                    await asyncio.sleep(0.02)
            running.cancel()  # the flow run is cancelled: the cancel goes through the second hub
            await asyncio.gather(running, return_exceptions=True)
            async with asyncio.timeout(10):
                await stopped.wait()
            counting.release.set()
    assert counting.runs == {"h": 1}


async def test_a_hub_that_refuses_the_device_leaves_it_serving_the_hubs_that_accept_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """That hub's copy of the credentials file lags: the others go on serving the device meanwhile."""
    caplog.set_level(logging.ERROR, "aip.device")
    async with running_hub(credentials_with(["lab-pc"])) as knows, running_hub(credentials_with([])) as lags:
        clients = device_clients(
            fleet_url(knows, lags), "lab-pc", InMemoryCommandDispatcher({}), token=token_for_device("lab-pc")
        )
        stop = asyncio.Event()
        serving = asyncio.create_task(serve_hubs(clients, stop))
        async with asyncio.timeout(10):
            await clients[0].registered.wait()
            while "serving the other hubs" not in caplog.text and not serving.done():  # noqa: ASYNC110 - a log line
                await asyncio.sleep(0.05)
        still_serving = not serving.done() and "lab-pc" in knows.switchboard.devices
        stop.set()
        async with asyncio.timeout(10):
            await serving  # stopped in order: no error, no connection left behind
    assert still_serving
    assert not [task for task in asyncio.all_tasks() if "_connect_and_serve" in repr(task.get_coro())]


async def test_a_device_refused_by_every_hub_of_its_fleet_says_so() -> None:
    async with running_hub(credentials_with([])) as first, running_hub(credentials_with([])) as second:
        clients = device_clients(
            fleet_url(first, second),
            "lab-pc",
            InMemoryCommandDispatcher({}),
            token=token_for_device("lab-pc"),
            backoff=QUICK_BACKOFF,
        )
        with pytest.raises(CredentialRefused):
            async with asyncio.timeout(20):
                await serve_hubs(clients, asyncio.Event())


@pytest.mark.parametrize("listing", [5, None, {"id": "x"}, "lab-pc", [{"no": "id"}, {"no": "id"}, 7]])
async def test_a_hub_answering_the_device_list_oddly_costs_only_its_own_entry_fake_hub(listing: Any) -> None:
    async def odd_hub(connection: ServerConnection) -> None:
        async for text in connection:
            request = json.loads(text)
            answer = {"devices": listing}
            reply = {"type": "device_info_response", "status": "ok", "prev_response_id": request["response_id"]}
            await connection.send(json.dumps({**reply, "metadata": answer}))

    async with (
        running_hub(credentials_with(["lab-pc"])) as hub,
        running_device(hub, "lab-pc"),
        websockets.serve(odd_hub, "127.0.0.1", 0) as odd,
    ):
        ours, odd_hub_url = hub.url, f"ws://127.0.0.1:{odd.sockets[0].getsockname()[1]}"
        fleet = await list_fleet(f"{ours},{odd_hub_url}", TOKEN, timeout=5)
    odd_url = f"{odd_hub_url}/controller"
    assert fleet.devices[0]["id"] == "lab-pc" and fleet.devices[0]["hubs"] == [f"{ours}/controller"]
    if isinstance(listing, list):  # entries with no id to merge by: each listed once, as it came
        assert fleet.devices[1:] == [{"no": "id", "hubs": [odd_url]}] * 2 + [{"id": 7, "hubs": [odd_url]}]
        assert fleet.unreachable == {}
    else:
        assert len(fleet.devices) == 1 and list(fleet.unreachable) == [odd_url], fleet


async def test_a_device_with_its_hands_full_answers_busy_and_the_batch_comes_again_until_it_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No memory grows on a device for a flood of batches: the sender is told to wait, and does."""
    caplog.set_level(logging.WARNING, "dispatchers.remote")
    counting = CountingTools()
    async with (
        running_hub(credentials_with(["lab-pc"])) as hub,
        running_device(hub, "lab-pc", counting.tools(), in_hand=InHand(batches=1)),
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc", retry=QUICK_DELIVERY) as holder,
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc", retry=QUICK_DELIVERY) as waiter,
    ):
        holding = asyncio.create_task(holder.execute_commands([Command(tool_name="held", call_id="held")], 20))
        async with asyncio.timeout(10):
            await counting.started.wait()
        waiting = asyncio.create_task(waiter.execute_commands([Command(tool_name="echo", call_id="echo")], 20))
        async with asyncio.timeout(10):
            while "is busy" not in caplog.text:  # noqa: ASYNC110 - the sender's log says it was turned away
                await asyncio.sleep(0.02)
        assert "echo" not in counting.runs  # turned away while the device's hands are full
        counting.release.set()
        async with asyncio.timeout(15):
            [[held], [echo]] = await asyncio.gather(holding, waiting)
    assert (held.status, echo.status) == (ResultStatus.SUCCESS, ResultStatus.SUCCESS), (held, echo)
    assert counting.runs == {"held": 1, "echo": 1}
