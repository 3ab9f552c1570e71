"""The device client against a hub: it stops only when it must; the agent context and retry policy sent reach it.

Real sockets on 127.0.0.1. Where a hub must misbehave on purpose (garble its
answer to ``register``, revoke mid-connection) a plain ``websockets`` server
plays it: the test names say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from hub_support import QUICK_BACKOFF, TOKEN, device_token, echo_tools, running_device, running_hub, serving
from websockets.asyncio.server import ServerConnection, serve

from aip.backoff import Backoff
from aip.connect import CredentialRefused
from aip.controller import HubLink
from aip.device import DeviceClient
from aip.messages import (
    AgentContext,
    CloseCode,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from dispatchers import InMemoryCommandDispatcher, RetryPolicy, WebSocketCommandDispatcher
from dispatchers.errors import ConnectionLost

WAIT = 10.0
ACK = ServerMessage(type=ServerMessageType.HEARTBEAT, status=TaskStatus.OK).model_dump_json()

Answer = Callable[[ServerConnection, int], Any]


@asynccontextmanager
async def fake_hub(answer: Answer) -> AsyncIterator[str]:
    """A hub played by hand: ``answer(connection, n)`` handles the n-th connection after its register frame."""
    count = 0

    async def handler(connection: ServerConnection) -> None:
        nonlocal count
        count += 1
        await connection.recv()
        await answer(connection, count)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def test_a_device_backs_off_from_a_fake_hub_garbling_its_register_reply_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def answer(connection: ServerConnection, n: int) -> None:
        if n <= 3:
            await connection.send('{"type": "not-a-type", "status": "ok"}')
            await connection.wait_closed()
            return
        await connection.send(ACK)
        await connection.wait_closed()

    caplog.set_level(logging.WARNING, logger="aip.device")
    async with fake_hub(answer) as url:
        client = DeviceClient(url, "lab-pc", InMemoryCommandDispatcher(echo_tools()), backoff=QUICK_BACKOFF)
        stop = asyncio.Event()
        running = asyncio.create_task(client.run(stop))
        async with asyncio.timeout(WAIT):
            await client.registered.wait()
        stop.set()
        async with asyncio.timeout(WAIT):
            await running
    garbled = [record for record in caplog.records if "malformed frame" in record.getMessage()]
    assert len(garbled) == 1, [record.getMessage() for record in caplog.records]
    assert client.registrations == 1


async def test_a_device_with_an_unknown_credential_stops_with_credential_refused() -> None:
    async with running_hub() as hub:
        client = DeviceClient(hub.url, "lab-pc", InMemoryCommandDispatcher(echo_tools()), token="not-issued-token-123")
        async with asyncio.timeout(WAIT):
            with pytest.raises(CredentialRefused, match="401"):
                await client.run()


async def test_a_device_whose_credential_a_fake_hub_revokes_stops() -> None:
    async def answer(connection: ServerConnection, n: int) -> None:
        await connection.send(ACK)
        await connection.close(CloseCode.REVOKED, "credential revoked")

    async with fake_hub(answer) as url:
        client = DeviceClient(url, "lab-pc", InMemoryCommandDispatcher(echo_tools()), backoff=QUICK_BACKOFF)
        async with asyncio.timeout(WAIT):
            with pytest.raises(CredentialRefused, match="revoked"):
                await client.run()
        assert client.registrations == 1


def spy_on_batches(device: DeviceClient) -> list[ServerMessage]:
    """Every command frame the device receives, as it arrived."""
    seen: list[ServerMessage] = []
    original = device._receive

    def spy(connection: Any, frame: str | bytes) -> None:
        message = json.loads(frame)
        if message.get("type") == "command":
            seen.append(ServerMessage.model_validate(message))
        original(connection, frame)

    device._receive = spy  # type: ignore[method-assign]
    return seen


async def test_the_agent_context_of_a_batch_reaches_the_device() -> None:
    async with running_hub() as hub, running_device(hub) as device:
        seen = spy_on_batches(device)
        dispatcher = WebSocketCommandDispatcher(
            HubLink(hub.url, TOKEN),
            "lab-pc",
            agent_name="HostAgent",
            process_name="explorer.exe",
            root_name="default",
            session_id="session-1",
            task_name="tidy-desktop",
        )
        async with dispatcher:
            [result] = await dispatcher.execute_commands([Command(tool_name="echo", parameters={"a": 1})], timeout=WAIT)
    assert result.status is ResultStatus.SUCCESS
    [frame] = seen
    assert (frame.agent_name, frame.process_name, frame.root_name) == ("HostAgent", "explorer.exe", "default")
    assert (frame.session_id, frame.task_name) == ("session-1", "tidy-desktop")


async def test_a_batch_file_and_a_flow_parameter_give_the_agent_context(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch import dispatch_batch, run_batch_flow

    monkeypatch.setenv("DISPATCH_TOKEN", TOKEN)
    batch_file = tmp_path / "ufo-batch.yaml"
    batch_file.write_text(
        "agent_context: {agent_name: AppAgent, process_name: notepad.exe}\n"
        "commands:\n  - {tool_name: echo, parameters: {a: 1}, call_id: from-file}\n"
    )
    async with running_hub() as hub, running_device(hub) as device:
        seen = spy_on_batches(device)
        options: dict[str, Any] = {"backend": "remote", "device": "lab-pc", "hub": hub.url, "timeout": 30}
        async with asyncio.timeout(60):
            state = await dispatch_batch(batch_file=str(batch_file), return_state=True, **options)  # as a deployment
            from_file: list[Result] = await cast(Any, state).aresult()
            given = await run_batch_flow(
                [Command(tool_name="echo", call_id="given")],
                agent_context=AgentContext(agent_name="HostAgent", task_name="nightly"),
                **options,
            )
    assert [r.status for r in from_file + given] == [ResultStatus.SUCCESS] * 2
    first, second = seen
    assert (first.agent_name, first.process_name) == ("AppAgent", "notepad.exe")
    assert first.task_name is not None and first.task_name.startswith("ufo-batch-on-lab-pc-")  # the flow run's name
    assert (second.agent_name, second.task_name) == ("HostAgent", "nightly")
    assert first.session_id and second.session_id and first.session_id != second.session_id  # each flow run's id


def flaky_tool(failures: int) -> tuple[Any, list[int]]:
    """A tool that loses its connection ``failures`` times, then answers; and the list of its tries."""
    tries: list[int] = []

    def tool(command: Command) -> str:
        tries.append(len(tries) + 1)
        if len(tries) <= failures:
            raise ConnectionLost("the server went away on purpose")
        return "done"

    return tool, tries


@pytest.mark.parametrize(("attempts", "status"), [(5, ResultStatus.SUCCESS), (2, ResultStatus.FAILURE)])
async def test_the_controllers_retry_policy_is_the_one_the_device_applies(attempts: int, status: ResultStatus) -> None:
    tool, tries = flaky_tool(failures=3)  # the device's own default (3 attempts) would give up on it
    quick = RetryPolicy(attempts=attempts, backoff=Backoff(initial=0.01, maximum=0.02, jitter=0.0))
    async with (
        running_hub() as hub,
        running_device(hub, tools={"flaky": tool}),
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc", retry=quick) as dispatcher,
    ):
        [result] = await dispatcher.execute_commands([Command(tool_name="flaky", call_id="f-1")], timeout=WAIT)
    assert result.status is status, result
    assert len(tries) == min(attempts, 4) and result.attempts == len(tries)


async def test_retries_on_the_device_show_in_the_flows_report(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch import run_batch_flow

    monkeypatch.setenv("DISPATCH_TOKEN", TOKEN)
    tool, tries = flaky_tool(failures=2)
    reported: list[Any] = []
    monkeypatch.setattr("flows.batch.publish_results", _recording(reported))
    async with running_hub() as hub, running_device(hub, tools={"flaky": tool}):
        async with asyncio.timeout(60):
            [result] = await run_batch_flow(
                [Command(tool_name="flaky", call_id="f-2")],
                backend="remote",
                device="lab-pc",
                hub=hub.url,
                retries=4,
                timeout=30,
            )
    assert result.status is ResultStatus.SUCCESS and len(tries) == 3
    [reports] = reported
    assert [report.attempts for report in reports] == [3]


def _recording(into: list[Any]) -> Any:
    async def publish(name: str, batch: Any, results: Any, reports: Any, where: str) -> None:
        into.append(reports)

    return publish


# -- how a batch runs its commands: one at a time, each through the call memory ------------------


class Held:
    """Tools that count every run by call_id: ``echo``, and ``held``, which waits for ``release``."""

    def __init__(self) -> None:
        self.runs: list[str | None] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    def tools(self) -> dict[str, Any]:
        async def held(command: Command) -> str:
            self.runs.append(command.call_id)
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "held"

        def echo(command: Command) -> Any:
            self.runs.append(command.call_id)
            return command.parameters

        return {"held": held, "echo": echo}


def held_batch() -> list[Command]:
    return [
        Command(tool_name="echo", parameters={"n": 0}, call_id="before"),
        Command(tool_name="held", call_id="held"),
        Command(tool_name="echo", parameters={"n": 2}, call_id="after"),
    ]


async def test_a_device_stopped_mid_batch_answers_every_command_and_starts_none_after_the_one_it_stops() -> None:
    tools = Held()
    async with running_hub() as hub:
        executor = InMemoryCommandDispatcher(tools.tools())
        device = DeviceClient(hub.url, "lab-pc", executor, token=device_token(hub, "lab-pc"))
        stop = asyncio.Event()
        serving = asyncio.create_task(device.run(stop))
        async with asyncio.timeout(WAIT):
            await device.registered.wait()
        async with WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher:
            running = asyncio.create_task(dispatcher.execute_commands(held_batch(), timeout=30))
            async with asyncio.timeout(WAIT):
                await tools.started.wait()
            stop.set()  # the device shuts down: its batch is cancelled, and answered while it still can
            async with asyncio.timeout(WAIT):
                before, held, after = await running
                await serving
    assert before.status is ResultStatus.SUCCESS and before.result == {"n": 0}
    for result in (held, after):
        assert result.status is ResultStatus.FAILURE
        assert "Cancelled: the device is shutting down" in (result.error or ""), result.error
    assert tools.cancelled.is_set() and tools.runs == ["before", "held"], tools.runs
    assert len(device.memory) == 1  # what finished is remembered; a cancelled run and one never started are not


async def test_a_batch_sent_again_mid_batch_gets_what_ran_from_memory_joins_the_running_and_runs_the_rest_once() -> (
    None
):
    """A lost connection mid-batch, by hand: the first copy is orphaned; the batch sent again carries on beside it."""
    tools = Held()
    async with (
        running_hub() as hub,
        running_device(hub, tools=tools.tools()) as device,
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher,
    ):
        first = asyncio.create_task(dispatcher.execute_commands(held_batch(), timeout=30))
        async with asyncio.timeout(WAIT):
            await tools.started.wait()
        [orphaned] = device.session.runs
        orphaned_run = device._tasks[orphaned]
        device.session.lost(orphaned.peer)  # as when its connection drops: it starts nothing more
        # The same batch again, as a controller sends it after a lost connection (a new response_id here).
        again = asyncio.create_task(dispatcher.execute_commands(held_batch(), timeout=30))
        async with asyncio.timeout(WAIT):
            while len(device.session.runs) < 2:  # noqa: ASYNC110 - the device's state; no event tells it
                await asyncio.sleep(0.01)
        tools.release.set()
        async with asyncio.timeout(WAIT):
            results = await again
            await orphaned_run
        first.cancel()
    assert [(r.call_id, r.status) for r in results] == [(c.call_id, ResultStatus.SUCCESS) for c in held_batch()]
    assert tools.runs == ["before", "held", "after"], "a command ran twice, or the orphaned copy started one"


class FakeBatchOnlyExecutor:
    """An executor with ``execute_commands`` alone (no ``execute_command``): the device hands it batches of one."""

    def __init__(self, answers: int = 1) -> None:
        self.batches: list[list[str | None]] = []
        self.answers = answers

    async def execute_commands(self, commands: list[Command], timeout: float = 60) -> list[Result]:
        self.batches.append([command.call_id for command in commands])
        ok = [Result(status=ResultStatus.SUCCESS, result=c.parameters, call_id=c.call_id) for c in commands]
        return ok * self.answers


@pytest.mark.parametrize("answers", [1, 2], ids=["one-result-each", "too-many-results"])
async def test_an_executor_without_execute_command_runs_each_command_as_a_batch_of_one_fake_executor(
    answers: int,
) -> None:
    executor = FakeBatchOnlyExecutor(answers)
    commands = [Command(tool_name="echo", parameters={"n": n}, call_id=f"e-{n}") for n in range(3)]
    async with running_hub() as hub:
        device = DeviceClient(hub.url, "lab-pc", executor, token=device_token(hub, "lab-pc"))
        async with serving(device), WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher:
            results = await dispatcher.execute_commands(commands, timeout=WAIT)
    assert [r.call_id for r in results] == ["e-0", "e-1", "e-2"]
    if answers == 1:
        assert executor.batches == [["e-0"], ["e-1"], ["e-2"]]
        assert [r.result for r in results] == [{"n": 0}, {"n": 1}, {"n": 2}]
    else:  # a broken executor: the batch is answered all the same, nothing more is started
        assert executor.batches == [["e-0"]]
        assert all(r.status is ResultStatus.FAILURE and "returned 2 results" in (r.error or "") for r in results)


class FakeShakyExecutor(InMemoryCommandDispatcher):
    """A dispatcher whose ``execute_command`` raises for ``raise``, and answers ``stray`` under another call_id."""

    async def execute_command(self, command: Command, deadline: Any) -> Result:
        if command.tool_name == "raise":
            raise RuntimeError("the executor broke")
        result = await super().execute_command(command, deadline)
        return result.model_copy(update={"call_id": "someone-else"}) if command.tool_name == "stray" else result


async def test_a_command_the_executor_breaks_on_fails_alone_and_the_next_runs_fake_executor() -> None:
    runs: list[str | None] = []
    executor = FakeShakyExecutor({"echo": lambda c: runs.append(c.call_id) or c.parameters, "stray": lambda c: 1})
    commands = [
        Command(tool_name="raise", call_id="r"),
        Command(tool_name="stray", call_id="s"),
        Command(tool_name="echo", parameters={"n": 1}, call_id="e"),
    ]
    async with running_hub() as hub:
        device = DeviceClient(hub.url, "lab-pc", executor, token=device_token(hub, "lab-pc"))
        async with serving(device), WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher:
            broke, stray, echoed = await dispatcher.execute_commands(commands, timeout=WAIT)
    assert broke.status is ResultStatus.FAILURE and "RuntimeError: the executor broke" in (broke.error or "")
    assert stray.call_id == "s" and stray.status is ResultStatus.FAILURE
    assert "came back for call_id 'someone-else'" in (stray.error or ""), stray.error
    assert echoed.status is ResultStatus.SUCCESS and echoed.result == {"n": 1} and runs == ["e"]


async def test_a_tool_that_ignores_being_stopped_costs_the_batch_only_its_own_result_and_no_time() -> None:
    """The device answers by the batch's time whatever a tool does: what finished keeps its Result."""
    release = asyncio.Event()

    async def stubborn(command: Command) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # refuses to stop until the test lets it
            raise

    tools = {"echo": lambda command: command.parameters, "stubborn": stubborn}
    commands = [
        Command(tool_name="echo", parameters={"n": 1}, call_id="e1"),
        Command(tool_name="stubborn", call_id="s"),
        Command(tool_name="echo", parameters={"n": 2}, call_id="e2"),  # never reached: not run, not "did not stop"
    ]
    async with (
        running_hub() as hub,
        running_device(hub, tools=tools),
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher,
    ):
        try:
            async with asyncio.timeout(10):
                results = await dispatcher.execute_commands(commands, timeout=2)
        finally:
            release.set()
    assert [(r.call_id, r.status) for r in results] == [
        ("e1", ResultStatus.SUCCESS),
        ("s", ResultStatus.FAILURE),
        ("e2", ResultStatus.FAILURE),
    ]
    assert results[0].result == {"n": 1}
    assert "did not stop when told" in (results[1].error or ""), results[1].error
    assert "not run: the batch's time was up" in (results[2].error or ""), results[2].error


async def test_a_tool_that_stops_when_told_at_the_batch_deadline_gets_its_own_timeout_and_is_remembered() -> None:
    """At the batch's time the command's own timeout answers, not the watch: its failure is remembered.

    The commands' own time ends ``settle`` before the batch's, when the watch
    gives up: one that stops when its timeout cancels it reports ``no result within``,
    and the call memory keeps that failure for a re-delivery of the batch,
    so an action is not started a second time by the hub sending it again.
    """
    starts: list[str | None] = []

    async def slow(command: Command) -> Any:
        starts.append(command.call_id)
        await asyncio.Event().wait()  # until its timeout cancels it

    async with (
        running_hub() as hub,
        running_device(hub, tools={"slow": slow}) as device,
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher,
    ):
        async with asyncio.timeout(WAIT):
            [result] = await dispatcher.execute_commands(
                [Command(tool_name="slow", call_id="s", tool_type="action")], 1
            )
    assert result.status is ResultStatus.FAILURE
    assert "no result within" in (result.error or ""), result.error
    assert starts == ["s"]
    assert len(device.memory) == 1, "the timed-out action was not remembered for a re-delivery of its batch"


def _slow_and_act(acted: list[str | None]) -> dict[str, Callable[[Command], Any]]:
    """``slow`` waits until its timeout cancels it; ``act`` notes its call_id in ``acted`` and answers "done"."""

    async def slow(command: Command) -> Any:
        await asyncio.Event().wait()

    def act(command: Command) -> Any:
        acted.append(command.call_id)
        return "done"

    return {"slow": slow, "act": act}


async def test_a_command_the_batch_reaches_after_its_time_is_never_started() -> None:
    """As a batch engine does: once a command's timeout has spent the batch's time, the next ones do not start."""
    acted: list[str | None] = []
    commands = [Command(tool_name="slow", call_id="s"), Command(tool_name="act", call_id="a", tool_type="action")]
    async with (
        running_hub() as hub,
        running_device(hub, tools=_slow_and_act(acted)) as device,
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher,
    ):
        async with asyncio.timeout(WAIT):
            results = await dispatcher.execute_commands(commands, 1)
    assert acted == [], "an action started after the batch's time was up"
    assert len(device.memory) == 1, "a command that never started was remembered"
    assert [(r.call_id, r.status) for r in results] == [("s", ResultStatus.FAILURE), ("a", ResultStatus.FAILURE)]
    assert "no result within" in (results[0].error or ""), results[0].error
    assert "not run: the batch's time was up" in (results[1].error or ""), results[1].error


async def test_a_remembered_result_the_batch_reaches_after_its_time_is_still_answered() -> None:
    """Memory answers first: a call already done is answered from it, however late the batch reaches it."""
    runs: list[str | None] = []
    acting = Command(tool_name="act", call_id="a", tool_type="action")
    async with (
        running_hub() as hub,
        running_device(hub, tools=_slow_and_act(runs)),
        WebSocketCommandDispatcher(HubLink(hub.url, TOKEN), "lab-pc") as dispatcher,
    ):
        async with asyncio.timeout(WAIT):
            [first] = await dispatcher.execute_commands([acting], 5)
            # A resumed run, say: the same call_ids, the action reached only once the slow one spent the time.
            results = await dispatcher.execute_commands([Command(tool_name="slow", call_id="s"), acting], 1)
    assert first.status is ResultStatus.SUCCESS
    assert runs == ["a"]
    assert [(r.call_id, r.status) for r in results] == [("s", ResultStatus.FAILURE), ("a", ResultStatus.SUCCESS)]
    assert results[1].result == first.result
