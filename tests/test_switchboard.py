"""The pure parts of the remote path, without a single socket.

``Switchboard`` (the hub's routing rules), ``AccessPolicy`` (who may connect),
``CallMemory`` (a device's memory of call_ids) and ``Backoff`` (reconnect
delays) are plain values and functions: every rule is checked here with plain
calls, frames in and actions out.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aip.device
from aip.access import AccessPolicy, host_name
from aip.call_memory import CallMemory, MemoryLimits
from aip.device import Backoff
from aip.messages import (
    ClientMessage,
    ClientMessageType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from aip.switchboard import Action, Close, CloseCode, Send, Switchboard

VECTORS = Path(__file__).parent / "fixtures" / "ufo-aip-frames.jsonl"
FRAMES: list[dict[str, Any]] = [
    json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()
]
FRAME_IDS = [f"{i}-{f['dir']}-{json.loads(f['raw'])['type']}" for i, f in enumerate(FRAMES)]

# Peers are any hashable value; plain strings keep the tests readable.
DEV_A, DEV_B, DEV_A2 = "peer-device-a", "peer-device-b", "peer-device-a-again"
CTL_1, CTL_2 = "peer-controller-1", "peer-controller-2"
OUR_TOOLS = [{"name": "echo", "server": "demo", "description": "echoes"}]


# -- helpers -------------------------------------------------------------------


def register_frame(client_id: str | None, *, ours: bool = False, metadata: dict[str, Any] | None = None) -> str:
    """A device's register frame; ``ours`` adds the ``dispatch`` key our own device client sends."""
    meta: dict[str, Any] = {"system_info": {"platform": "linux", "hostname": "vm"}}
    if ours:
        meta["dispatch"] = {"tools": OUR_TOOLS}
    if metadata is not None:
        meta = metadata
    return json.dumps({"type": "register", "status": "ok", "client_id": client_id, "metadata": meta})


def command_frame(response_id: str | None, target: str | None, actions: list[dict[str, Any]] | None = None) -> str:
    """A controller's batch for ``target``."""
    if actions is None:
        actions = [{"tool_name": "echo", "parameters": {"x": 1}, "tool_type": "action", "call_id": "c1"}]
    return json.dumps(
        {
            "type": "command",
            "status": "continue",
            "response_id": response_id,
            "target_id": target,
            "session_id": "s1",
            "agent_name": "agent",
            "timeout": 30.0,
            "actions": actions,
        }
    )


def results_frame(prev_response_id: str | None, call_id: str = "c1", value: Any = "done") -> str:
    """A device's answer to a batch."""
    return json.dumps(
        {
            "type": "command_results",
            "status": "continue",
            "prev_response_id": prev_response_id,
            "action_results": [{"status": "success", "result": value, "call_id": call_id}],
        }
    )


def sends(actions: Sequence[Action], peer: Hashable | None = None) -> list[dict[str, Any]]:
    """The JSON of every Send (to ``peer`` if given), in order."""
    return [json.loads(a.text) for a in actions if isinstance(a, Send) and (peer is None or a.peer == peer)]


def closes(actions: Sequence[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def registered(*devices: tuple[Hashable, str, bool]) -> Switchboard:
    """A switchboard with ``(peer, client_id, ours)`` devices registered."""
    board = Switchboard()
    for peer, client_id, ours in devices:
        device, actions = board.device_registers(peer, register_frame(client_id, ours=ours))
        assert device is not None, actions
    return board


def is_error_frame(frame: dict[str, Any]) -> bool:
    return frame["type"] == "error" and frame["status"] == "error" and bool(frame["error"])


# -- Switchboard: registration -----------------------------------------------------


def test_register_is_acknowledged_with_a_heartbeat_first_and_only() -> None:
    board = Switchboard(clock=lambda: "T0")
    device, actions = board.device_registers(DEV_A, register_frame("alpha"))
    assert device is not None
    assert device.id == "alpha" and device.peer == DEV_A and device.connected_at == "T0"
    assert len(actions) == 1
    assert isinstance(actions[0], Send) and actions[0].peer == DEV_A
    ack = ServerMessage.model_validate_json(actions[0].text)
    assert ack.type is ServerMessageType.HEARTBEAT and ack.status is TaskStatus.OK
    assert board.devices == {"alpha": device}


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (json.dumps({"type": "heartbeat", "status": "ok", "client_id": "alpha"}), "'heartbeat'"),
        (json.dumps({"type": "task", "status": "continue", "client_id": "alpha"}), "'task'"),
        (register_frame(None), "client_id"),
        (register_frame(""), "client_id"),
        ("not json at all", "register"),
        ("", "register"),
        (json.dumps({"type": "register"}), "status"),
        (json.dumps({"type": "bogus", "status": "ok", "client_id": "alpha"}), "type"),
        (json.dumps({"type": "register", "status": "ok", "client_id": 5}), "client_id"),
        (json.dumps([1, 2]), "register"),
    ],
    ids=[
        "heartbeat-first",
        "task-first",
        "no-client-id",
        "empty-client-id",
        "not-json",
        "empty",
        "no-status",
        "bad-type",
        "int-client-id",
        "json-array",
    ],
)
def test_a_bad_first_frame_is_refused_with_an_error_then_close_1008(frame: str, needle: str) -> None:
    board = Switchboard()
    device, actions = board.device_registers(DEV_A, frame)
    assert device is None
    assert len(actions) == 2
    first, second = actions
    assert isinstance(first, Send) and first.peer == DEV_A
    refusal = ServerMessage.model_validate_json(first.text)
    assert refusal.type is ServerMessageType.ERROR and refusal.status is TaskStatus.ERROR
    assert refusal.error is not None and needle in refusal.error
    assert isinstance(second, Close) and second.peer == DEV_A and second.code == CloseCode.POLICY == 1008
    assert len(second.reason.encode()) <= 123  # a close reason must fit in a control frame
    assert board.devices == {} and board.device_by_peer == {}


def test_a_binary_first_frame_is_refused_like_any_other_binary_frame() -> None:
    """AIP is JSON in text frames; after registration a binary frame is refused, so before it too."""
    board = Switchboard()
    device, actions = board.device_registers(DEV_A, register_frame("alpha").encode())
    assert device is None
    assert [type(a) for a in actions] == [Send, Close]
    assert closes(actions)[0].code == CloseCode.POLICY


def test_a_frame_from_an_unregistered_peer_is_closed() -> None:
    board = Switchboard()
    actions = board.device_text(DEV_A, json.dumps({"type": "heartbeat", "status": "ok"}))
    assert actions == [Close(DEV_A, CloseCode.POLICY, "not registered")]


def test_reconnect_with_the_same_id_replaces_the_stale_connection() -> None:
    board = registered((DEV_A, "alpha", False), (DEV_B, "beta", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    board.controller_text(CTL_2, command_frame("r2", "alpha"))
    board.controller_text(CTL_1, command_frame("r3", "beta"))

    device, actions = board.device_registers(DEV_A2, register_frame("alpha"))

    assert device is not None and device.peer == DEV_A2
    assert board.devices["alpha"] is device and board.device_by_peer.get(DEV_A) is None
    # the old batches fail to their controllers, naming the device and the reason
    for controller, response_id in ((CTL_1, "r1"), (CTL_2, "r2")):
        (failure,) = sends(actions, controller)
        assert failure["type"] == "error" and failure["status"] == "error"
        assert failure["prev_response_id"] == response_id
        assert failure["metadata"] == {"reason": "device_lost", "device": "alpha"}
        assert "reconnected" in failure["error"]
    # the stale peer is closed with 4000, the new one gets exactly the ack
    assert closes(actions) == [Close(DEV_A, CloseCode.REPLACED, closes(actions)[0].reason)]
    assert closes(actions)[0].code == 4000
    (ack,) = sends(actions, DEV_A2)
    assert ack["type"] == "heartbeat" and ack["status"] == "ok"
    assert sends(actions, DEV_A) == []
    # beta's batch is untouched and still routes back
    assert set(board.routes) == {"r3"}
    assert board.device_text(DEV_B, results_frame("r3")) == [Send(CTL_1, results_frame("r3"))]
    # the old connection ending later changes nothing
    assert board.device_gone(DEV_A, "closed") == []
    assert board.devices["alpha"] is device
    # and its late frames are not accepted as the device's
    assert closes(board.device_text(DEV_A, results_frame("r1")))[0].code == CloseCode.POLICY


def test_after_a_reconnect_new_batches_reach_the_new_connection() -> None:
    board = registered((DEV_A, "alpha", False))
    board.device_registers(DEV_A2, register_frame("alpha"))
    actions = board.controller_text(CTL_1, command_frame("r1", "alpha"))
    assert [a.peer for a in actions] == [DEV_A2]
    assert board.device_text(DEV_A2, results_frame("r1")) == [Send(CTL_1, results_frame("r1"))]


# -- Switchboard: batches out ----------------------------------------------------------


def test_a_command_reaches_the_device_without_target_id_and_otherwise_unchanged() -> None:
    board = registered((DEV_A, "alpha", True))
    frame = command_frame("r1", "alpha")
    actions = board.controller_text(CTL_1, frame)
    assert len(actions) == 1 and isinstance(actions[0], Send) and actions[0].peer == DEV_A
    sent = json.loads(actions[0].text)
    assert "target_id" not in sent
    original = json.loads(frame)
    del original["target_id"]
    for key, value in original.items():
        if key == "actions":
            assert [{k: a[k] for k in value[0]} for a in sent["actions"]] == value
        else:
            assert sent[key] == value, key
    assert board.devices["alpha"].pending == {"r1"}


MIXED_ACTIONS = [
    {"tool_name": "a", "tool_type": "action", "call_id": "1"},
    {"tool_name": "b", "tool_type": "data_collection", "call_id": "2"},
    {"tool_name": "c", "tool_type": "demo", "call_id": "3"},
    {"tool_name": "d", "tool_type": "", "call_id": "4"},
    {"tool_name": "e", "call_id": "5"},
]


def test_a_ufo_device_gets_only_tool_types_it_accepts() -> None:
    board = registered((DEV_A, "alpha", False))
    (action,) = board.controller_text(CTL_1, command_frame("r1", "alpha", MIXED_ACTIONS))
    assert isinstance(action, Send)
    sent = ServerMessage.model_validate_json(action.text)
    assert sent.actions is not None
    assert [a.tool_type for a in sent.actions] == ["action", "data_collection", "action", "action", "action"]
    assert [a.call_id for a in sent.actions] == ["1", "2", "3", "4", "5"]
    assert [a.tool_name for a in sent.actions] == ["a", "b", "c", "d", "e"]


def test_our_own_device_gets_tool_types_unchanged() -> None:
    board = registered((DEV_A, "alpha", True))
    (action,) = board.controller_text(CTL_1, command_frame("r1", "alpha", MIXED_ACTIONS))
    assert isinstance(action, Send)
    sent = ServerMessage.model_validate_json(action.text)
    assert sent.actions is not None
    assert [a.tool_type for a in sent.actions] == ["action", "data_collection", "demo", "", ""]


def test_a_dispatch_key_that_is_not_an_object_does_not_make_a_device_ours() -> None:
    board = Switchboard()
    board.device_registers(DEV_A, register_frame("alpha", metadata={"dispatch": "yes"}))
    (action,) = board.controller_text(CTL_1, command_frame("r1", "alpha", MIXED_ACTIONS))
    assert isinstance(action, Send)
    assert [a["tool_type"] for a in json.loads(action.text)["actions"]][2:] == ["action", "action", "action"]


@pytest.mark.parametrize("target", ["gamma", "", None])
def test_a_command_for_an_unknown_device_fails_with_the_connected_list(target: str | None) -> None:
    board = registered((DEV_B, "beta", False), (DEV_A, "alpha", False))
    actions = board.controller_text(CTL_1, command_frame("r1", target))
    assert len(actions) == 1 and actions[0].peer == CTL_1
    (failure,) = sends(actions)
    assert failure["type"] == "error" and failure["status"] == "error"
    assert failure["prev_response_id"] == "r1"
    assert failure["metadata"]["reason"] == "device_unavailable"
    assert "connected: alpha, beta" in failure["error"]
    assert board.routes == {}


def test_with_no_device_connected_the_list_says_none() -> None:
    (failure,) = sends(Switchboard().controller_text(CTL_1, command_frame("r1", "alpha")))
    assert failure["metadata"]["reason"] == "device_unavailable"
    assert "connected: none" in failure["error"]


def test_a_duplicate_response_id_is_rejected() -> None:
    board = registered((DEV_A, "alpha", False), (DEV_B, "beta", False))
    assert len(board.controller_text(CTL_1, command_frame("r1", "alpha"))) == 1
    for controller, target in ((CTL_1, "alpha"), (CTL_2, "beta")):
        actions = board.controller_text(controller, command_frame("r1", target))
        assert [a.peer for a in actions] == [controller]  # nothing reaches a device
        (failure,) = sends(actions)
        assert failure["metadata"]["reason"] == "rejected" and "already in use" in failure["error"]
    assert board.routes["r1"].controller == CTL_1 and board.routes["r1"].device.id == "alpha"


def test_a_response_id_of_an_abandoned_batch_is_not_reused() -> None:
    board = registered((DEV_A, "alpha", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    board.controller_gone(CTL_1)
    (failure,) = sends(board.controller_text(CTL_2, command_frame("r1", "alpha")))
    assert failure["metadata"]["reason"] == "rejected"


@pytest.mark.parametrize("response_id", [None, ""])
def test_a_command_without_response_id_is_rejected(response_id: str | None) -> None:
    board = registered((DEV_A, "alpha", False))
    actions = board.controller_text(CTL_1, command_frame(response_id, "alpha"))
    assert [a.peer for a in actions] == [CTL_1]
    (failure,) = sends(actions)
    assert failure["metadata"]["reason"] == "rejected" and "response_id" in failure["error"]


# -- Switchboard: answers back ------------------------------------------------------


def test_results_go_back_to_the_controller_unchanged_and_only_once() -> None:
    board = registered((DEV_A, "alpha", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    board.controller_text(CTL_2, command_frame("r2", "alpha"))
    answer = results_frame("r2", value={"n": 0})
    assert board.device_text(DEV_A, answer) == [Send(CTL_2, answer)]
    assert set(board.routes) == {"r1"} and board.devices["alpha"].pending == {"r1"}
    # a second answer to the same batch is refused: nobody waits for it any more
    (error,) = sends(board.device_text(DEV_A, answer), DEV_A)
    assert is_error_frame(error) and "'r2'" in error["error"]


def test_a_device_error_about_a_batch_goes_to_its_controller() -> None:
    board = registered((DEV_A, "alpha", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    frame = json.dumps({"type": "error", "status": "error", "error": "cannot", "prev_response_id": "r1"})
    assert board.device_text(DEV_A, frame) == [Send(CTL_1, frame)]
    assert board.routes == {}


def test_a_device_error_about_nothing_in_particular_is_dropped() -> None:
    board = registered((DEV_A, "alpha", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    assert board.device_text(DEV_A, json.dumps({"type": "error", "status": "error", "error": "meh"})) == []
    assert set(board.routes) == {"r1"}


def test_only_the_device_the_batch_went_to_may_answer_it() -> None:
    board = registered((DEV_A, "alpha", False), (DEV_B, "beta", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    actions = board.device_text(DEV_B, results_frame("r1"))
    assert [a.peer for a in actions] == [DEV_B]  # the controller gets nothing
    (error,) = sends(actions)
    assert is_error_frame(error) and "unknown prev_response_id 'r1'" in error["error"]
    # the real device can still answer
    assert board.device_text(DEV_A, results_frame("r1")) == [Send(CTL_1, results_frame("r1"))]


@pytest.mark.parametrize("prev", ["nope", None, ""])
def test_results_for_an_unknown_batch_get_an_error_frame(prev: str | None) -> None:
    board = registered((DEV_A, "alpha", False))
    actions = board.device_text(DEV_A, results_frame(prev))
    assert [a.peer for a in actions] == [DEV_A]
    (error,) = sends(actions)
    assert is_error_frame(error) and "unknown prev_response_id" in error["error"]
    ServerMessage.model_validate_json(json.dumps(error))  # the device can parse it


def test_when_a_device_goes_every_pending_batch_fails_at_once() -> None:
    board = registered((DEV_A, "alpha", False), (DEV_B, "beta", False))
    board.controller_text(CTL_1, command_frame("r2", "alpha"))
    board.controller_text(CTL_2, command_frame("r1", "alpha"))
    board.controller_text(CTL_1, command_frame("r3", "alpha"))
    board.controller_text(CTL_1, command_frame("rb", "beta"))

    actions = board.device_gone(DEV_A, "connection closed (1006)")

    assert all(isinstance(a, Send) for a in actions)
    failures = [(a.peer, json.loads(a.text)) for a in actions if isinstance(a, Send)]
    assert sorted((peer, f["prev_response_id"]) for peer, f in failures) == [
        (CTL_1, "r2"),
        (CTL_1, "r3"),
        (CTL_2, "r1"),
    ]
    for _, failure in failures:
        ClientMessage.model_validate_json(json.dumps(failure))
        assert failure["type"] == "error" and failure["status"] == "error"
        assert failure["metadata"] == {"reason": "device_lost", "device": "alpha"}
        assert "connection closed (1006)" in failure["error"]
    assert "alpha" not in board.devices and DEV_A not in board.device_by_peer
    assert set(board.routes) == {"rb"}
    assert board.routes_by_controller == {CTL_1: {"rb"}}
    # gone twice is nothing more
    assert board.device_gone(DEV_A, "again") == []
    # new batches for it now fail as unavailable
    (failure,) = sends(board.controller_text(CTL_1, command_frame("r4", "alpha")))
    assert failure["metadata"]["reason"] == "device_unavailable"


def test_when_a_controller_goes_our_devices_get_a_cancel_per_batch_and_ufo_devices_nothing() -> None:
    board = registered((DEV_A, "ours", True), (DEV_B, "ufo", False))
    board.controller_text(CTL_1, command_frame("r2", "ours"))
    board.controller_text(CTL_1, command_frame("r1", "ours"))
    board.controller_text(CTL_1, command_frame("ru", "ufo"))
    board.controller_text(CTL_2, command_frame("other", "ours"))

    actions = board.controller_gone(CTL_1)

    assert all(isinstance(a, Send) and a.peer == DEV_A for a in actions)
    cancels = sends(actions)
    assert sorted(c["response_id"] for c in cancels) == ["r1", "r2"]
    for cancel in cancels:
        parsed = ServerMessage.model_validate_json(json.dumps(cancel))
        assert parsed.type is ServerMessageType.TASK_END and parsed.status is TaskStatus.FAILED
        assert cancel["error"]
    assert set(board.routes) == {"other"}
    assert board.devices["ours"].pending == {"other"} and board.devices["ufo"].pending == set()
    # late answers to the abandoned batches are dropped silently, from both kinds of device
    assert board.device_text(DEV_A, results_frame("r1")) == []
    assert board.device_text(DEV_B, results_frame("ru")) == []
    # the other controller's batch still routes
    assert board.device_text(DEV_A, results_frame("other")) == [Send(CTL_2, results_frame("other"))]
    assert board.controller_gone(CTL_1) == []


def test_a_late_answer_from_another_device_to_an_abandoned_batch_is_still_refused() -> None:
    board = registered((DEV_A, "alpha", True), (DEV_B, "beta", True))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    board.controller_gone(CTL_1)
    (error,) = sends(board.device_text(DEV_B, results_frame("r1")), DEV_B)
    assert is_error_frame(error)
    assert board.device_text(DEV_A, results_frame("r1")) == []


def test_the_memory_of_abandoned_batches_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aip.switchboard.ABANDONED_LIMIT", 2)
    board = registered((DEV_A, "alpha", False))
    for response_id in ("r1", "r2", "r3"):
        board.controller_text(CTL_1, command_frame(response_id, "alpha"))
    board.controller_gone(CTL_1)
    assert list(board.abandoned) == ["r2", "r3"]
    # the oldest was forgotten: its late answer is refused like any unknown one
    (error,) = sends(board.device_text(DEV_A, results_frame("r1")))
    assert is_error_frame(error)
    assert board.device_text(DEV_A, results_frame("r2")) == []
    assert board.device_text(DEV_A, results_frame("r3")) == []


def test_a_controller_task_end_cancels_its_batch() -> None:
    board = registered((DEV_A, "ours", True), (DEV_B, "ufo", False))
    board.controller_text(CTL_1, command_frame("r1", "ours"))
    board.controller_text(CTL_1, command_frame("r2", "ufo"))
    task_end = json.dumps({"type": "task_end", "status": "failed", "response_id": "r1"})

    # another controller cannot cancel it
    assert board.controller_text(CTL_2, task_end) == []
    assert "r1" in board.routes

    actions = board.controller_text(CTL_1, task_end)
    assert [a.peer for a in actions] == [DEV_A]
    (cancel,) = sends(actions)
    assert cancel["type"] == "task_end" and cancel["status"] == "failed" and cancel["response_id"] == "r1"
    assert "r1" not in board.routes and board.routes_by_controller == {CTL_1: {"r2"}}
    # cancelling again, or an unknown batch, does nothing
    assert board.controller_text(CTL_1, task_end) == []
    assert board.controller_text(CTL_1, json.dumps({"type": "task_end", "status": "failed"})) == []
    # a UFO device's batch is forgotten, but nothing is sent to it
    assert board.controller_text(CTL_1, task_end.replace("r1", "r2")) == []
    assert board.routes == {}
    assert board.device_text(DEV_B, results_frame("r2")) == []
    assert board.device_text(DEV_A, results_frame("r1")) == []


def test_device_info_lists_devices_sorted_with_tools_and_pending_count() -> None:
    board = Switchboard(clock=lambda: "T0")
    board.device_registers(DEV_B, register_frame("zulu"))
    board.device_registers(DEV_A, register_frame("alpha", ours=True))
    board.controller_text(CTL_1, command_frame("r1", "zulu"))
    board.controller_text(CTL_1, command_frame("r2", "zulu"))
    request = json.dumps({"type": "device_info_request", "status": "ok", "response_id": "q1"})

    actions = board.controller_text(CTL_2, request)

    assert [a.peer for a in actions] == [CTL_2]
    (answer,) = sends(actions)
    parsed = ClientMessage.model_validate_json(json.dumps(answer))
    assert parsed.type is ClientMessageType.DEVICE_INFO_RESPONSE and parsed.status is TaskStatus.OK
    assert answer["prev_response_id"] == "q1"
    devices = answer["metadata"]["devices"]
    assert [d["id"] for d in devices] == ["alpha", "zulu"]
    alpha, zulu = devices
    assert alpha["kind"] == "dispatch" and alpha["tools"] == OUR_TOOLS and alpha["pending_batches"] == 0
    assert zulu["kind"] == "ufo" and zulu["tools"] == [] and zulu["pending_batches"] == 2
    assert alpha["platform"] == "linux" and alpha["connected_at"] == "T0"


@pytest.mark.parametrize(
    "metadata",
    [{"system_info": "linux"}, {"system_info": ["linux"]}, {"system_info": 7}, {"dispatch": {"tools": "x"}}, {}],
    ids=["str", "list", "int", "odd-tools", "empty"],
)
def test_device_info_survives_any_registration_metadata(metadata: dict[str, Any]) -> None:
    """A device may register with any JSON object as metadata; listing devices must not raise."""
    board = Switchboard()
    device, _ = board.device_registers(DEV_A, register_frame("alpha", metadata=metadata))
    assert device is not None
    actions = board.controller_text(CTL_1, json.dumps({"type": "device_info_request", "status": "ok"}))
    (answer,) = sends(actions)
    assert [d["id"] for d in answer["metadata"]["devices"]] == ["alpha"]


def test_last_seen_follows_the_device_frames() -> None:
    ticks = iter(["T0", "T1", "T2"])
    board = Switchboard(clock=lambda: next(ticks))
    board.device_registers(DEV_A, register_frame("alpha"))
    assert board.devices["alpha"].last_seen == "T0"
    board.device_text(DEV_A, json.dumps({"type": "heartbeat", "status": "ok"}))
    assert board.devices["alpha"].last_seen == "T1"
    assert board.devices["alpha"].connected_at == "T0"


def test_heartbeats_are_answered_on_both_sides() -> None:
    board = registered((DEV_A, "alpha", False))
    heartbeat = json.dumps({"type": "heartbeat", "status": "ok"})
    (device_answer,) = board.device_text(DEV_A, heartbeat)
    assert isinstance(device_answer, Send) and device_answer.peer == DEV_A
    parsed = ServerMessage.model_validate_json(device_answer.text)
    assert parsed.type is ServerMessageType.HEARTBEAT and parsed.status is TaskStatus.OK
    (controller_answer,) = board.controller_text(CTL_1, heartbeat)
    assert isinstance(controller_answer, Send) and controller_answer.peer == CTL_1
    parsed_client = ClientMessage.model_validate_json(controller_answer.text)
    assert parsed_client.type is ClientMessageType.HEARTBEAT and parsed_client.status is TaskStatus.OK


BAD_FRAMES: list[str | bytes] = [
    "{",
    "",
    "null",
    "[]",
    "42",
    '"text"',
    json.dumps({"status": "ok"}),
    json.dumps({"type": "heartbeat"}),
    json.dumps({"type": "no_such_type", "status": "ok"}),
    json.dumps({"type": "heartbeat", "status": "nope"}),
    json.dumps({"type": 1, "status": "ok"}),
    json.dumps({"type": "command_results", "status": "ok", "action_results": "all fine"}),
    json.dumps({"type": "command_results", "status": "ok", "action_results": [{"status": "weird"}]}),
    json.dumps({"type": "command", "status": "ok", "actions": [{"tool_type": "action"}], "response_id": "r"}),
    json.dumps({"type": "command", "status": "ok", "timeout": -1, "response_id": "r", "target_id": "alpha"}),
    b"\x00\x01binary",
    b"\xff\xfe",
    register_frame("alpha").encode(),
]
#: Valid for one side's model but not the other's.
BAD_DEVICE_FRAMES: list[str | bytes] = [
    json.dumps({"type": "heartbeat", "status": "ok", "metadata": [1]}),
    json.dumps({"type": "heartbeat", "status": "ok", "client_type": "robot"}),
    json.dumps({"type": "command", "status": "ok", "response_id": "r", "target_id": "alpha"}),
]
BAD_CONTROLLER_FRAMES: list[str | bytes] = [
    json.dumps({"type": "command", "status": "ok", "actions": "x", "response_id": "r", "target_id": "alpha"}),
    json.dumps({"type": "register", "status": "ok", "client_id": "alpha"}),
    json.dumps({"type": "command_results", "status": "ok", "prev_response_id": "r1"}),
]


@pytest.mark.parametrize("frame", BAD_FRAMES + BAD_DEVICE_FRAMES, ids=lambda f: repr(f)[:40])
def test_bad_frames_from_a_device_get_an_error_frame_and_never_raise(frame: str | bytes) -> None:
    board = registered((DEV_A, "alpha", False))
    actions = board.device_text(DEV_A, frame)
    assert [a.peer for a in actions] == [DEV_A] and isinstance(actions[0], Send)
    error = ServerMessage.model_validate_json(actions[0].text)
    assert error.type is ServerMessageType.ERROR and error.status is TaskStatus.ERROR and error.error
    assert "alpha" in board.devices  # a bad frame does not unregister the device


@pytest.mark.parametrize("frame", BAD_FRAMES + BAD_CONTROLLER_FRAMES, ids=lambda f: repr(f)[:40])
def test_bad_frames_from_a_controller_get_a_rejection_and_never_raise(frame: str | bytes) -> None:
    board = registered((DEV_A, "alpha", False))
    actions = board.controller_text(CTL_1, frame)
    assert [a.peer for a in actions] == [CTL_1] and isinstance(actions[0], Send)
    failure = ClientMessage.model_validate_json(actions[0].text)
    assert failure.type is ClientMessageType.ERROR and failure.status is TaskStatus.ERROR and failure.error
    assert failure.metadata is not None and failure.metadata["reason"] == "rejected"
    assert board.routes == {}


@pytest.mark.parametrize("kind", ["task", "register", "task_end", "device_info_request", "device_info_response"])
def test_a_device_frame_type_the_hub_does_not_route_is_refused(kind: str) -> None:
    board = registered((DEV_A, "alpha", False))
    actions = board.device_text(DEV_A, json.dumps({"type": kind, "status": "ok", "client_id": "alpha"}))
    (error,) = sends(actions, DEV_A)
    assert len(actions) == 1 and is_error_frame(error) and repr(kind) in error["error"]


@pytest.mark.parametrize("kind", ["task", "error", "device_info_response"])
def test_a_controller_frame_type_the_hub_does_not_take_is_rejected(kind: str) -> None:
    board = registered((DEV_A, "alpha", False))
    frame = json.dumps({"type": kind, "status": "ok", "response_id": "r9", "target_id": "alpha"})
    actions = board.controller_text(CTL_1, frame)
    assert [a.peer for a in actions] == [CTL_1]
    (failure,) = sends(actions)
    assert failure["metadata"]["reason"] == "rejected" and failure["prev_response_id"] == "r9"


# -- Switchboard: real UFO frames -----------------------------------------------------


@pytest.mark.parametrize("frame", FRAMES, ids=FRAME_IDS)
def test_every_vector_frame_parses(frame: dict[str, Any]) -> None:
    model = ClientMessage if frame["dir"] == "client->server" else ServerMessage
    message = model.model_validate_json(frame["raw"])
    assert message.type.value == json.loads(frame["raw"])["type"]


def _vector(kind: str, direction: str = "client->server") -> str:
    (raw,) = [f["raw"] for f in FRAMES if f["dir"] == direction and json.loads(f["raw"])["type"] == kind]
    return str(raw)


def _ufo_board() -> Switchboard:
    board = Switchboard()
    device, actions = board.device_registers(DEV_A, _vector("register"))
    assert device is not None and device.id == "device_linux_01" and not device.speaks_dispatch
    assert len(actions) == 1
    return board


@pytest.mark.parametrize("frame", [f for f in FRAMES if f["dir"] == "client->server"], ids=lambda f: f["raw"][9:30])
def test_every_ufo_device_frame_is_handled(frame: dict[str, Any]) -> None:
    board = Switchboard()
    kind = json.loads(frame["raw"])["type"]
    if kind == "register":
        device, actions = board.device_registers(DEV_A, frame["raw"])
        assert device is not None and device.id == "device_linux_01"
        (ack,) = sends(actions, DEV_A)
        assert ack["type"] == "heartbeat" and ack["status"] == "ok"
        return
    board = _ufo_board()
    actions = board.device_text(DEV_A, frame["raw"])
    assert [a.peer for a in actions] == [DEV_A]
    (answer,) = sends(actions)
    ServerMessage.model_validate_json(json.dumps(answer))
    if kind == "heartbeat":
        assert answer["type"] == "heartbeat" and answer["status"] == "ok"
    else:  # task: this hub does not take tasks; command_results: no batch with that id was sent
        assert is_error_frame(answer)
        if kind == "command_results":
            assert "unknown prev_response_id" in answer["error"]


def test_a_ufo_batch_goes_out_and_comes_back_frame_for_frame() -> None:
    board = _ufo_board()
    command = json.loads(_vector("command", "server->client"))
    (out,) = board.controller_text(CTL_1, json.dumps({**command, "target_id": "device_linux_01"}))
    assert isinstance(out, Send) and out.peer == DEV_A
    assert json.loads(out.text) == command  # exactly what a UFO server would have sent
    answer = _vector("command_results")
    assert board.device_text(DEV_A, answer) == [Send(CTL_1, answer)]
    assert board.routes == {}


@pytest.mark.parametrize("frame", [f for f in FRAMES if f["dir"] == "server->client"], ids=lambda f: f["raw"][9:30])
def test_ufo_server_frames_from_a_controller_never_raise(frame: dict[str, Any]) -> None:
    board = _ufo_board()
    actions = board.controller_text(CTL_1, frame["raw"])
    for action in actions:
        assert isinstance(action, Send) and action.peer == CTL_1
        ClientMessage.model_validate_json(action.text)
    kind = json.loads(frame["raw"])["type"]
    if kind == "command":  # no target_id: nowhere to go
        assert sends(actions)[0]["metadata"]["reason"] == "device_unavailable"
    if kind == "heartbeat":
        assert sends(actions)[0]["type"] == "heartbeat"


# -- Switchboard: property -------------------------------------------------------------

CLIENT_IDS = ["alpha", "beta"]
RESPONSE_IDS = ["r1", "r2", "r3"]
DEVICE_PEERS = ["d1", "d2", "d3"]
CONTROLLER_PEERS = ["c1", "c2"]
ALL_TYPES = sorted({t.value for t in ClientMessageType} | {t.value for t in ServerMessageType})

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ids = st.sampled_from(CLIENT_IDS + RESPONSE_IDS) | st.none() | json_values
commands = st.fixed_dictionaries(
    {},
    optional={
        "tool_name": st.text(max_size=4) | json_values,
        "tool_type": st.sampled_from(["action", "data_collection", "demo", ""]) | json_values,
        "call_id": ids,
        "parameters": json_values,
        "timeout": st.floats() | json_values,
    },
)
results = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from([s.value for s in ResultStatus]) | json_values,
        "result": json_values,
        "call_id": ids,
    },
)
metadata = st.dictionaries(st.sampled_from(["system_info", "dispatch", "platform"]) | st.text(max_size=5), json_values)
frame_objects = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(ALL_TYPES) | json_values,
            "status": st.sampled_from([s.value for s in TaskStatus]) | json_values,
            "client_id": ids,
            "target_id": ids,
            "response_id": ids,
            "prev_response_id": ids,
            "actions": st.lists(commands, max_size=3) | json_values,
            "action_results": st.lists(results, max_size=3) | json_values,
            "metadata": metadata | json_values,
            "timeout": st.floats() | json_values,
            "error": json_values,
        },
    ),
    st.dictionaries(st.text(max_size=6), json_values, max_size=2),
)
frames = (
    frame_objects.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=30)
    | st.binary(max_size=30)
    | frame_objects.map(lambda obj: json.dumps(obj).encode())
)
#: Well-formed frames with ids that match, so batches really get routed, answered, cancelled and listed.
valid_commands = st.fixed_dictionaries(
    {"tool_name": st.sampled_from(["echo", "click"])},
    optional={
        "tool_type": st.sampled_from(["action", "data_collection", "demo", ""]),
        "call_id": st.sampled_from(["c1", "c2"]),
    },
)
good_controller_frames = st.builds(
    lambda kind, status, rid, target, actions: json.dumps(
        {"type": kind, "status": status, "response_id": rid, "target_id": target, "actions": actions}
    ),
    st.sampled_from([t.value for t in ServerMessageType]),
    st.sampled_from([s.value for s in TaskStatus]),
    st.sampled_from(RESPONSE_IDS),
    st.sampled_from(CLIENT_IDS),
    st.lists(valid_commands, max_size=3),
)
good_device_frames = st.builds(
    lambda kind, rid, answers: json.dumps(
        {"type": kind, "status": "ok", "prev_response_id": rid, "action_results": answers}
    ),
    st.sampled_from(["command_results", "command_results", "error", "heartbeat"]),
    st.sampled_from([*RESPONSE_IDS, None]),
    st.lists(st.fixed_dictionaries({"status": st.just("success"), "result": json_values}), max_size=2),
)
events = st.one_of(
    st.tuples(st.just("device"), st.sampled_from(DEVICE_PEERS), good_device_frames),
    st.tuples(st.just("controller"), st.sampled_from(CONTROLLER_PEERS), good_controller_frames),
    st.tuples(st.just("register"), st.sampled_from(DEVICE_PEERS), frames),
    st.tuples(
        st.just("register"),
        st.sampled_from(DEVICE_PEERS),
        st.builds(
            lambda cid, meta: json.dumps({"type": "register", "status": "ok", "client_id": cid, "metadata": meta}),
            st.sampled_from(CLIENT_IDS),
            metadata,
        ),
    ),
    st.tuples(st.just("device"), st.sampled_from(DEVICE_PEERS), frames),
    st.tuples(st.just("controller"), st.sampled_from(CONTROLLER_PEERS), frames),
    st.tuples(st.just("device_gone"), st.sampled_from(DEVICE_PEERS), st.just("")),
    st.tuples(st.just("controller_gone"), st.sampled_from(CONTROLLER_PEERS), st.just("")),
)


def _check_consistent(board: Switchboard) -> None:
    for client_id, device in board.devices.items():
        assert device.id == client_id and board.device_by_peer[device.peer] is device
    for response_id, route in board.routes.items():
        assert board.devices.get(route.device.id) is route.device
        assert response_id in route.device.pending
        assert response_id in board.routes_by_controller[route.controller]
    for device in board.devices.values():
        assert device.pending <= set(board.routes)


def _check_actions(actions: object) -> None:
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, Send | Close)
        if isinstance(action, Send):
            assert isinstance(json.loads(action.text), dict)
            action.text.encode("utf-8")  # sendable as a text frame
        else:
            assert action.code in (1000, 1003, 1008, 4000, 4001)
            assert len(action.reason.encode("utf-8")) <= 123  # fits in a close frame


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=1, max_size=30))
def test_any_frames_in_any_order_yield_only_valid_actions(script: list[tuple[str, str, str | bytes]]) -> None:
    board = Switchboard()
    for kind, peer, frame in script:
        if kind == "register":
            if peer in board.device_by_peer:
                continue  # the hub calls device_registers only for a connection's first frame
            _, actions = board.device_registers(peer, frame)
        elif kind == "device":
            actions = board.device_text(peer, frame)
        elif kind == "controller":
            actions = board.controller_text(peer, frame)
        elif kind == "device_gone":
            actions = board.device_gone(peer, "gone")
        else:
            actions = board.controller_gone(peer)
        _check_actions(actions)
        _check_consistent(board)

    # whatever happened, the device list can be asked for and names exactly who is connected
    listing = board.controller_text("c-last", json.dumps({"type": "device_info_request", "status": "ok"}))
    _check_actions(listing)
    (answer,) = sends(listing)
    assert [d["id"] for d in answer["metadata"]["devices"]] == sorted(board.devices)
    # and once every peer has gone, nothing is left behind
    for peer in CONTROLLER_PEERS:
        _check_actions(board.controller_gone(peer))
    for peer in DEVICE_PEERS:
        _check_actions(board.device_gone(peer, "gone"))
    assert board.devices == {} and board.device_by_peer == {}
    assert board.routes == {} and board.routes_by_controller == {} and not board.abandoned


# -- AccessPolicy ------------------------------------------------------------------------

TOKEN = "s3cret-token-0123456789"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("example.org:8765", "example.org"),
        ("Example.ORG", "example.org"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        (" localhost:1 ", "localhost"),
    ],
)
def test_host_name_strips_the_port(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:8765", "[::1]:8765", "[::1]", "::1"]
)
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert AccessPolicy(TOKEN).refusal("/ws", host, f"Bearer {TOKEN}") is None


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example",
        "evil.example:8765",
        "127.0.0.1.evil.example",
        "localhost.evil.example:80",
        "[::2]:8765",
    ],
)
def test_other_hosts_are_refused_with_403(host: str | None) -> None:
    assert AccessPolicy(TOKEN).refusal("/ws", host, f"Bearer {TOKEN}") == (403, "Host not allowed")


def test_the_host_is_checked_before_the_token() -> None:
    assert AccessPolicy(TOKEN).refusal("/ws", "evil.example", None) == (403, "Host not allowed")


@pytest.mark.parametrize(
    ("path", "authorization"),
    [
        ("/ws", f"Bearer {TOKEN}"),
        ("/ws", f"bearer {TOKEN}"),
        ("/ws", f"Bearer   {TOKEN}  "),
        (f"/ws?token={TOKEN}", None),
        (f"/ws?x=1&token={TOKEN}", None),
        (f"/ws?token={TOKEN}", "Basic dXNlcjpwYXNz"),
    ],
)
def test_the_right_token_is_accepted(path: str, authorization: str | None) -> None:
    policy = AccessPolicy(TOKEN)
    assert policy.token_matches(path, authorization)
    assert policy.refusal(path, "127.0.0.1:8765", authorization) is None


@pytest.mark.parametrize(
    ("path", "authorization"),
    [
        ("/ws", None),
        ("/ws", ""),
        ("/ws", "Bearer"),
        ("/ws", "Bearer wrong"),
        ("/ws", f"Bearer {TOKEN}x"),
        ("/ws", f"Bearer {TOKEN[:-1]}"),
        ("/ws", f"Basic {TOKEN}"),
        ("/ws", TOKEN),
        ("/ws?token=wrong", None),
        ("/ws?token=", None),
        (f"/ws?tok={TOKEN}", None),
        (f"/ws?token={TOKEN}", "Bearer wrong"),  # a wrong bearer is not rescued by the query
        ("/ws", "Bearer é"),
    ],
)
def test_a_wrong_or_missing_token_is_refused_with_401(path: str, authorization: str | None) -> None:
    policy = AccessPolicy(TOKEN)
    assert not policy.token_matches(path, authorization)
    assert policy.refusal(path, "localhost", authorization) == (401, "missing or wrong token")


def test_repr_and_str_hide_the_token() -> None:
    policy = AccessPolicy(TOKEN, origins=("https://ok.example",))
    for text in (repr(policy), str(policy), f"{policy}", f"{policy!r}", repr([policy])):
        assert TOKEN not in text and "<hidden>" in text
    assert "https://ok.example" in repr(policy)


def test_for_host_adds_the_bind_address_but_not_a_wildcard() -> None:
    assert "192.168.1.5" in AccessPolicy.for_host(TOKEN, "192.168.1.5").hosts
    assert AccessPolicy.for_host(TOKEN, "192.168.1.5").refusal("/ws", "192.168.1.5:8765", f"Bearer {TOKEN}") is None
    assert "hub.example" in AccessPolicy.for_host(TOKEN, "Hub.Example").hosts
    for wildcard in ("0.0.0.0", "::", ""):
        policy = AccessPolicy.for_host(TOKEN, wildcard)
        assert policy.hosts == frozenset({"127.0.0.1", "localhost", "::1"}), wildcard
        assert policy.refusal("/ws", "0.0.0.0:8765", f"Bearer {TOKEN}") == (403, "Host not allowed")


def test_for_host_keeps_extra_hosts_and_origins() -> None:
    policy = AccessPolicy.for_host(TOKEN, "127.0.0.1", extra_hosts=["Hub.Example"], origins=["https://a.example"])
    assert policy.refusal("/ws", "hub.example:443", f"Bearer {TOKEN}") is None
    assert policy.origins == ("https://a.example",)
    assert policy.token == TOKEN


@pytest.mark.parametrize("token", ["tökén", "has space", "tab\there", "newline\n", "\u00a0nbsp"])
def test_a_token_that_cannot_travel_in_a_header_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        AccessPolicy(token)
    with pytest.raises(ValueError, match="visible ASCII"):
        AccessPolicy.for_host(token, "127.0.0.1")


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        AccessPolicy("")


# -- CallMemory ------------------------------------------------------------------------


def cmd(call_id: str | None, tool: str = "echo") -> Command:
    return Command(tool_name=tool, parameters={}, tool_type="action", call_id=call_id)


def ok(command: Command) -> Result:
    return Result(status=ResultStatus.SUCCESS, result=f"ran {command.tool_name}", call_id=command.call_id)


def fail(commands: list[Command], error: BaseException) -> list[Result]:
    return [
        Result(status=ResultStatus.FAILURE, error=f"{type(error).__name__}: {error}", call_id=c.call_id)
        for c in commands
    ]


class Recorder:
    """A ``run`` that records the call_ids it was given and answers each with ``ok``."""

    def __init__(self) -> None:
        self.calls: list[list[str | None]] = []
        self.ran = asyncio.Event()

    async def __call__(self, commands: list[Command]) -> list[Result]:
        self.calls.append([c.call_id for c in commands])
        self.ran.set()
        return [ok(c) for c in commands]


async def test_a_repeat_is_answered_from_memory_without_running_again() -> None:
    memory, run = CallMemory(), Recorder()
    first = await memory.execute([cmd("a"), cmd("b")], run, fail)
    again = await memory.execute([cmd("b"), cmd("c"), cmd("a")], run, fail)
    assert run.calls == [["a", "b"], ["c"]]
    assert again == [first[1], ok(cmd("c")), first[0]]
    assert memory.recall("a") == first[0] and memory.recall("zzz") is None
    assert len(memory) == 3


async def test_a_failure_is_not_remembered_so_a_retry_runs_the_command_again() -> None:
    memory = CallMemory()

    async def run(commands: list[Command]) -> list[Result]:
        return fail(commands, RuntimeError("tool said no"))

    first = await memory.execute([cmd("a")], run, fail)
    assert first[0].status is ResultStatus.FAILURE and len(memory) == 0
    rerun = Recorder()
    assert await memory.execute([cmd("a")], rerun, fail) == [ok(cmd("a"))] and rerun.calls == [["a"]]


async def test_memory_is_bounded_in_bytes_and_forgets_the_oldest_first() -> None:
    memory, run = CallMemory(MemoryLimits(bytes=200)), Recorder()  # about 80 bytes each
    for call_id in ("a", "b", "c", "d"):
        await memory.execute([cmd(call_id)], run, fail)
    kept = [call_id for call_id in "abcd" if memory.recall(call_id) is not None]
    assert kept and kept == list("abcd")[-len(kept) :] and len(kept) < 4


async def test_a_result_that_cannot_be_serialised_is_answered_but_not_remembered() -> None:
    memory = CallMemory()

    async def run(commands: list[Command]) -> list[Result]:
        return [Result(status=ResultStatus.SUCCESS, result=b"\xff\xfe", call_id=c.call_id) for c in commands]

    [result] = await memory.execute([cmd("raw")], run, fail)
    assert result.result == b"\xff\xfe" and len(memory) == 0
    again = Recorder()
    await memory.execute([cmd("raw")], again, fail)
    assert again.calls == [["raw"]]


@pytest.mark.parametrize("call_id", [None, ""])
async def test_commands_without_call_id_are_always_run(call_id: str | None) -> None:
    memory, run = CallMemory(), Recorder()
    await memory.execute([cmd(call_id)], run, fail)
    await memory.execute([cmd(call_id), cmd(call_id)], run, fail)
    assert run.calls == [[call_id], [call_id, call_id]]
    assert len(memory) == 0


async def test_a_call_id_twice_in_one_batch_runs_once() -> None:
    memory, run = CallMemory(), Recorder()
    results = await memory.execute([cmd("a"), cmd("a")], run, fail)
    assert run.calls == [["a"]]
    assert results == [ok(cmd("a")), ok(cmd("a"))]


class Gate:
    """A ``run`` that blocks until released, so batches can overlap deterministically."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[list[str | None]] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.error = error

    async def __call__(self, commands: list[Command]) -> list[Result]:
        self.calls.append([c.call_id for c in commands])
        self.entered.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [ok(c) for c in commands]


async def test_concurrent_batches_with_the_same_call_id_run_the_tool_once() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(memory.execute([cmd("shared")], slow, fail))
    await slow.entered.wait()

    other_ran = asyncio.Event()
    other_calls: list[list[str | None]] = []

    async def second_run(commands: list[Command]) -> list[Result]:
        other_calls.append([c.call_id for c in commands])
        other_ran.set()
        return [ok(c) for c in commands]

    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await other_ran.wait()  # the second batch has looked "shared" up and is waiting for it
    assert not second.done()
    slow.release.set()
    first_results, second_results = await asyncio.gather(first, second)

    assert slow.calls == [["shared"]] and other_calls == [["own"]]
    assert first_results == [ok(cmd("shared"))]
    assert second_results == [ok(cmd("shared")), ok(cmd("own"))]
    assert memory.recall("shared") == ok(cmd("shared"))


async def test_a_run_that_raises_is_not_remembered_and_a_waiting_repeat_gets_a_failure() -> None:
    memory = CallMemory()
    broken = Gate(error=RuntimeError("executor exploded"))
    first = asyncio.create_task(memory.execute([cmd("shared")], broken, fail))
    await broken.entered.wait()

    second_run = Recorder()
    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await second_run.ran.wait()
    broken.release.set()

    with pytest.raises(RuntimeError, match="executor exploded"):
        await first
    shared, own = await second
    assert shared.status is ResultStatus.FAILURE and shared.call_id == "shared"
    assert shared.error == "RuntimeError: executor exploded"
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None
    # a later repeat runs it for real
    run = Recorder()
    assert await memory.execute([cmd("shared")], run, fail) == [ok(cmd("shared"))]
    assert run.calls == [["shared"]]


async def test_a_cancelled_first_run_gives_a_waiting_repeat_a_failure() -> None:
    memory = CallMemory()
    slow = Gate()
    first = asyncio.create_task(memory.execute([cmd("shared")], slow, fail))
    await slow.entered.wait()
    second_run = Recorder()
    second = asyncio.create_task(memory.execute([cmd("shared"), cmd("own")], second_run, fail))
    await second_run.ran.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    shared, own = await second
    assert shared.status is ResultStatus.FAILURE and "cancelled" in (shared.error or "")
    assert own == ok(cmd("own"))
    assert memory.recall("shared") is None


async def test_a_run_with_the_wrong_number_of_results_raises_and_remembers_nothing() -> None:
    memory = CallMemory()

    async def short(commands: list[Command]) -> list[Result]:
        return [ok(commands[0])]

    with pytest.raises(RuntimeError, match="2 commands"):
        await memory.execute([cmd("a"), cmd("b")], short, fail)
    assert len(memory) == 0 and memory.recall("a") is None
    run = Recorder()
    await memory.execute([cmd("a")], run, fail)
    assert run.calls == [["a"]]


async def test_memory_is_bounded_in_entries() -> None:
    memory, run = CallMemory(MemoryLimits(entries=2)), Recorder()
    for call_id in ("a", "b", "c"):
        await memory.execute([cmd(call_id)], run, fail)
    assert len(memory) == 2
    assert memory.recall("a") is None and memory.recall("b") is not None and memory.recall("c") is not None
    await memory.execute([cmd("a")], run, fail)
    assert run.calls == [["a"], ["b"], ["c"], ["a"]]
    assert memory.recall("b") is None  # the oldest went to make room


async def test_memory_is_bounded_in_age() -> None:
    now = [100.0]
    memory, run = CallMemory(MemoryLimits(seconds=10.0), clock=lambda: now[0]), Recorder()
    await memory.execute([cmd("old")], run, fail)
    now[0] = 105.0
    await memory.execute([cmd("young")], run, fail)
    now[0] = 110.0  # exactly the limit: still remembered
    await memory.execute([cmd("old")], run, fail)
    assert run.calls == [["old"], ["young"]]
    now[0] = 110.5
    assert memory.recall("old") is None and memory.recall("young") is not None
    await memory.execute([cmd("old"), cmd("young")], run, fail)
    assert run.calls == [["old"], ["young"], ["old"]]
    now[0] = 1000.0
    assert len(memory) == 2  # len does not expire by itself...
    assert memory.recall("young") is None and len(memory) == 0  # ...a lookup does


# -- Backoff -------------------------------------------------------------------------------


def test_backoff_delays_double_up_to_the_cap_without_jitter() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(10_000) == 30.0  # no overflow after a very long outage


def test_backoff_jitter_spans_exactly_the_documented_range(monkeypatch: pytest.MonkeyPatch) -> None:
    class Extremes:
        def __init__(self) -> None:
            self.asked: list[tuple[float, float]] = []

        def uniform(self, low: float, high: float) -> float:
            self.asked.append((low, high))
            return low if len(self.asked) % 2 else high

    extremes = Extremes()
    monkeypatch.setattr(aip.device, "random", extremes)
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.25)
    assert backoff.delay(2) == pytest.approx(3.0)  # 4 * 0.75
    assert backoff.delay(2) == pytest.approx(4.0)
    assert backoff.delay(20) == pytest.approx(8.0 * 0.75)
    assert extremes.asked[0] == (0.75, 1)


def test_backoff_delays_lie_within_jittered_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aip.device, "random", random.Random(20260101))
    backoff = Backoff(initial=0.5, maximum=30.0, jitter=0.5)
    for failures in range(12):
        base = min(30.0, 0.5 * 2**failures)
        delays = [backoff.delay(failures) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays), (failures, delays)
        assert len(set(delays)) > 1  # jitter actually spreads them
    assert max(backoff.delay(100) for _ in range(50)) <= 30.0
