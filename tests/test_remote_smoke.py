"""The remote path in one breath: hub, device and dispatcher in-process over real sockets."""

from __future__ import annotations

from hub_support import TOKEN, running_device, running_hub

from aip.messages import Command, ResultStatus
from dispatchers import WebSocketCommandDispatcher


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
