"""No single hub: devices dial every hub of a fleet, a controller uses whichever answers.

Real hubs in-process on 127.0.0.1, our own device clients and dispatchers
over real sockets. A hub "dies" by closing (its connections end, as in a
restart); what must hold is that the batch carries on through the other hub
and that no command runs twice (the device's one call memory, shared by its
connections to every hub, answers the batch sent again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from hub_support import QUICK_BACKOFF, TOKEN, credentials_with, running_hub, token_for_device

from aip.backoff import Backoff
from aip.connect import HubUnavailable
from aip.device import DeviceClient, device_clients, serve_hubs
from aip.failover import FailoverLink, controller_link, list_fleet
from aip.hub import Hub
from aip.messages import Command, ResultStatus, ServerMessage
from dispatchers import InMemoryCommandDispatcher, RetryPolicy, WebSocketCommandDispatcher
from dispatchers.memory import Tool

#: Reconnects to a dead hub spaced as a real fleet's are (not a storm of a thousand clients every 0.2 s).
FLEET_BACKOFF = Backoff(initial=2, maximum=10)
#: A retry policy whose re-deliveries come quickly, so a failover takes tenths of a second here.
QUICK_DELIVERY = RetryPolicy(attempts=1)


class CountingTools:
    """``echo`` and ``held`` (waits for ``release``), counting every run by call_id: nothing may run twice."""

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def tools(self) -> dict[str, Tool]:
        async def held(command: Command) -> str:
            self.runs[command.call_id or ""] += 1
            self.started.set()
            await self.release.wait()
            return "held"

        def echo(command: Command) -> Any:
            self.runs[command.call_id or ""] += 1
            return command.parameters

        return {"held": held, "echo": echo}


def fleet_url(*hubs: Hub) -> str:
    return ",".join(hub.url for hub in hubs)


@contextlib.asynccontextmanager
async def device_on(
    hubs: Sequence[Hub],
    device_id: str,
    tools: dict[str, Tool],
    backoff: Backoff = QUICK_BACKOFF,
    patience: float = 10,
) -> AsyncIterator[list[DeviceClient]]:
    """One device dialling every hub of ``hubs``, registered with each before the block starts."""
    executor = InMemoryCommandDispatcher(tools)
    clients = device_clients(fleet_url(*hubs), device_id, executor, token=token_for_device(device_id), backoff=backoff)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_hubs(clients, stop))
    try:
        async with asyncio.timeout(patience):
            for client in clients:
                await client.registered.wait()
        yield clients
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await serving


@contextlib.asynccontextmanager
async def two_hubs(
    tools: dict[str, Tool], device_id: str = "lab-pc", on: str = "both"
) -> AsyncIterator[tuple[Hub, Hub, list[DeviceClient]]]:
    """Two hubs of one fleet (one credentials store, as one file copied to both) and a device on ``on``.

    ``on``: "both", or "second" (a device the first hub does not have). Yields the hubs and the device's clients.
    """
    store = credentials_with([device_id])
    async with (
        running_hub(store) as first,
        running_hub(store) as second,
        device_on([first, second] if on == "both" else [second], device_id, tools) as clients,
    ):
        yield first, second, clients


async def test_a_batch_carries_on_through_another_hub_when_its_hub_dies_and_nothing_runs_twice() -> None:
    counting = CountingTools()
    async with two_hubs(counting.tools()) as (first, second, _):
        link = controller_link(fleet_url(first, second), TOKEN)
        assert isinstance(link, FailoverLink)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            batch = [Command(tool_name="held", call_id="held-1"), Command(tool_name="echo", call_id="echo-1")]
            running = asyncio.create_task(dispatcher.execute_commands(batch, timeout=20))
            async with asyncio.timeout(10):
                await counting.started.wait()
            await first.close()  # the hub carrying the batch goes away mid-command
            counting.release.set()
            async with asyncio.timeout(15):
                results = await running
    assert [(result.call_id, result.status) for result in results] == [
        ("held-1", ResultStatus.SUCCESS),
        ("echo-1", ResultStatus.SUCCESS),
    ], results
    assert counting.runs == {"held-1": 1, "echo-1": 1}


async def test_a_device_that_one_hub_does_not_have_is_reached_through_the_next() -> None:
    counting = CountingTools()
    async with two_hubs(counting.tools(), on="second") as (without, with_device, _):
        link = controller_link(fleet_url(without, with_device), TOKEN)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            first = await dispatcher.execute_commands([Command(tool_name="echo", call_id="a")], timeout=10)
            second = await dispatcher.execute_commands([Command(tool_name="echo", call_id="b")], timeout=10)
    assert [result.status for result in first + second] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS]
    assert counting.runs == {"a": 1, "b": 1}


async def test_batches_waiting_on_the_hub_that_stays_are_not_sent_again_when_another_hub_goes() -> None:
    """Only what the lost hub carried is lost: a batch out through the other hub waits for its own answer."""
    counting = CountingTools()
    async with two_hubs(counting.tools(), "only-second", on="second") as (first, second, _):
        link = controller_link(fleet_url(first, second), TOKEN)
        assert isinstance(link, FailoverLink)
        through_second: list[str] = []
        send = link.links[1].send

        async def counted(message: ServerMessage) -> None:
            through_second.append(message.type.value)
            await send(message)

        link.links[1].send = counted  # type: ignore[method-assign]
        async with WebSocketCommandDispatcher(link, "only-second", retry=QUICK_DELIVERY) as dispatcher:
            await link.open()  # the link holds a connection to the first hub too (which answers: no such device)
            running = asyncio.create_task(
                dispatcher.execute_commands([Command(tool_name="held", call_id="h")], timeout=20)
            )
            async with asyncio.timeout(10):
                await counting.started.wait()
            reader = link.links[0]._reader
            await first.close()
            assert reader is not None
            async with asyncio.timeout(10):
                await reader  # the loss has reached the dispatcher, and the batch is still out
            counting.release.set()
            async with asyncio.timeout(10):
                results = await running
    assert [result.status for result in results] == [ResultStatus.SUCCESS]
    assert counting.runs == {"h": 1}
    assert through_second == ["command"], "the batch carried by the hub that stayed was sent again"


async def test_the_link_forgets_each_batch_once_answered_or_given_up_on() -> None:
    """What the link remembers per batch (which hub carried it) goes with the batch: nothing grows with traffic."""
    counting = CountingTools()
    async with two_hubs(counting.tools()) as (first, second, _):
        link = controller_link(fleet_url(first, second), TOKEN)
        assert isinstance(link, FailoverLink)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            answered = await dispatcher.execute_commands([Command(tool_name="echo", call_id=f"e{n}") for n in range(5)])
            assert link.carrying == 0
            [timed_out] = await dispatcher.execute_commands([Command(tool_name="held", call_id="held")], timeout=1)
            counting.release.set()
            # The cancel for the batch given up on is on its way (a task made before the dispatcher returned):
            # once a later batch has been answered it has been sent, and has taken the batch's route with it.
            [after] = await dispatcher.execute_commands([Command(tool_name="echo", call_id="after")])
            assert link.carrying == 0
    assert [result.status for result in [*answered, after]] == [ResultStatus.SUCCESS] * 6
    assert timed_out.status is ResultStatus.FAILURE and "Timeout" in (timed_out.error or ""), timed_out


async def test_no_hub_answering_is_a_hub_unavailable_naming_each() -> None:
    async with running_hub() as first, running_hub() as second:
        url = fleet_url(first, second)
    link = controller_link(url, TOKEN, open_timeout=2)
    try:
        await link.open()
    except HubUnavailable as error:
        assert str(error).count("ws://127.0.0.1:") == 2, error
    else:
        raise AssertionError("opened a link with no hub running")
    finally:
        await link.close()


async def test_the_fleet_lists_each_device_once_with_its_hubs_and_names_a_hub_that_did_not_answer() -> None:
    store = credentials_with(["both", "second-only"])
    async with running_hub(store) as gone:
        gone_url = gone.url
    async with (
        running_hub(store) as first,
        running_hub(store) as second,
        device_on([first, second], "both", CountingTools().tools()),
        device_on([second], "second-only", CountingTools().tools()),
    ):
        fleet = await list_fleet(f"{first.url},{second.url},{gone_url}", TOKEN, timeout=5)
    hubs = {entry["id"]: len(entry["hubs"]) for entry in fleet.devices}
    assert hubs == {"both": 2, "second-only": 1}
    assert list(fleet.unreachable) == [f"{gone_url}/controller"]


async def test_a_thousand_devices_over_two_hubs_all_answer_after_one_hub_dies() -> None:
    devices = [f"fleet-{number:04d}" for number in range(1000)]
    store = credentials_with(devices)
    counting = CountingTools()
    counting.release.set()
    tools = counting.tools()
    async with running_hub(store) as first, running_hub(store) as second, contextlib.AsyncExitStack() as stack:
        for start in range(0, len(devices), 250):  # 250 at a time: a fleet comes up over minutes, not at once
            await asyncio.gather(
                *(
                    stack.enter_async_context(device_on([first, second], device, tools, FLEET_BACKOFF, patience=60))
                    for device in devices[start : start + 250]
                )
            )
        assert len(first.switchboard.devices) == len(second.switchboard.devices) == len(devices)
        url = fleet_url(first, second)
        await first.close()

        async def one_batch(device: str) -> ResultStatus:
            async with WebSocketCommandDispatcher(controller_link(url, TOKEN), device, retry=QUICK_DELIVERY) as sender:
                [result] = await sender.execute_commands([Command(tool_name="echo", call_id=device)], timeout=30)
                return result.status

        statuses: list[ResultStatus] = []
        for start in range(0, len(devices), 100):  # 100 controllers at a time
            statuses += await asyncio.gather(*(one_batch(device) for device in devices[start : start + 100]))
    assert statuses == [ResultStatus.SUCCESS] * len(devices)
    assert counting.runs == {device: 1 for device in devices}


async def test_a_batch_whose_hub_dies_mid_batch_gets_what_finished_from_memory_and_runs_the_rest_once() -> None:
    counting = CountingTools()
    async with two_hubs(counting.tools()) as (first, second, clients):
        link = controller_link(fleet_url(first, second), TOKEN)
        async with WebSocketCommandDispatcher(link, "lab-pc", retry=QUICK_DELIVERY) as dispatcher:
            batch = [
                Command(tool_name="echo", call_id="finished-before"),
                Command(tool_name="held", call_id="running"),
                Command(tool_name="echo", call_id="not-started"),
            ]
            running = asyncio.create_task(dispatcher.execute_commands(batch, timeout=20))
            async with asyncio.timeout(10):
                await counting.started.wait()
            [first_copy] = clients[0].session.runs
            await first.close()  # the copy on the first hub's connection is orphaned mid-batch
            async with asyncio.timeout(10):
                # The device's state; no event tells it: the first copy orphaned, the second one running beside it.
                while first_copy.orphaned is None or not clients[1].session.runs:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            counting.release.set()  # the second copy joined the call still running; it runs what never started
            async with asyncio.timeout(15):
                results = await running
    assert [(result.call_id, result.status) for result in results] == [
        (command.call_id, ResultStatus.SUCCESS) for command in batch
    ], results
    assert counting.runs == {"finished-before": 1, "running": 1, "not-started": 1}
