"""The remote path in one breath: hub, device and dispatcher in-process over real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hub_support import TOKEN, running_device, running_hub
from websockets.asyncio.server import ServerConnection, serve

from aip.device import DeviceClient
from aip.messages import Command, ResultStatus
from dispatchers import InMemoryCommandDispatcher, WebSocketCommandDispatcher


async def test_a_batch_reaches_the_device_and_comes_back_in_order() -> None:
    async with (
        running_hub() as hub,
        running_device(hub),
        await WebSocketCommandDispatcher.connect(hub.url, "lab-pc", token=TOKEN) as dispatcher,
    ):
        results = await dispatcher.execute_commands(
            [Command(tool_name="echo", parameters={"n": 0}, call_id="a"), Command(tool_name="fail", call_id="b")],
            timeout=10,
        )
    assert [(r.call_id, r.status) for r in results] == [("a", ResultStatus.SUCCESS), ("b", ResultStatus.FAILURE)]
    assert results[0].result == {"n": 0}
    assert "the tool failed on purpose" in (results[1].error or "")


async def test_our_device_works_against_a_ufo_style_server_written_from_the_wire_spec() -> None:
    """A server built from aip-wire.md alone, with plain dicts: register, ack, command, command_results."""
    frames: list[dict[str, Any]] = []
    answered = asyncio.Event()

    def server_frame(**fields: Any) -> str:
        keys = ["type", "status", "user_request", "agent_name", "process_name", "root_name", "actions", "messages"]
        keys += ["error", "session_id", "task_name", "timestamp", "response_id", "result"]
        return json.dumps({key: fields.get(key) for key in keys})

    async def ufo_server(connection: ServerConnection) -> None:
        assert connection.request is not None and "token=ufo-key-0123456789" in connection.request.path
        frames.append(json.loads(await connection.recv()))
        await connection.send(server_frame(type="heartbeat", status="ok", response_id="ack"))
        action = {"tool_name": "echo", "parameters": {"text": "hi"}, "tool_type": "action", "call_id": "c-1"}
        await connection.send(
            server_frame(type="command", status="continue", actions=[action], response_id="r-1", session_id="s-1")
        )
        async for frame in connection:
            message = json.loads(frame)
            frames.append(message)
            if message["type"] == "command_results":
                answered.set()

    async with serve(ufo_server, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        executor = InMemoryCommandDispatcher({"echo": lambda command: command.parameters})
        client = DeviceClient(
            f"ws://127.0.0.1:{port}/ws", "ufo-style-device", executor, token="ufo-key-0123456789", token_in_query=True
        )
        stop = asyncio.Event()
        running = asyncio.create_task(client.run(stop))
        async with asyncio.timeout(10):
            await answered.wait()
        stop.set()
        async with asyncio.timeout(10):
            await running

    register, results = frames[0], frames[-1]
    assert register["type"] == "register" and register["client_id"] == "ufo-style-device"
    assert register["client_type"] == "device" and register["metadata"]["system_info"]["device_id"]
    assert set(register) >= {"session_id", "task_name", "target_id", "request", "action_results", "prev_response_id"}
    assert results["prev_response_id"] == "r-1" and results["session_id"] == "s-1"
    assert results["action_results"] == [
        {"status": "success", "error": None, "result": {"text": "hi"}, "namespace": "memory", "call_id": "c-1"}
    ]
