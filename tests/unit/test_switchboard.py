"""``aip.switchboard.Switchboard``: the hub's routing rules, without a single socket.

The switchboard is a plain value: every rule is checked here with plain
calls, frames in and actions out, real UFO frames included. As the hub does
when a connection opens, every peer is first admitted with the ``Identity``
its credential proved. (Who may connect is in ``test_access.py``, a device's
memory of call_ids in ``test_call_memory.py``.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Sequence
from typing import Any

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aip.credentials import CredentialStore, Identity, Role, digest
from aip.messages import (
    ClientMessage,
    ClientMessageType,
    CloseCode,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from aip.registration import MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, MAX_REGISTRATION_BYTES, MAX_TOOLS
from aip.switchboard import NAMED_DEVICES, Action, Close, Device, Probe, Reason, Send, Switchboard

VECTORS = FIXTURES / "ufo-aip-frames.jsonl"
FRAMES: list[dict[str, Any]] = [
    json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()
]
FRAME_IDS = [f"{i}-{f['dir']}-{json.loads(f['raw'])['type']}" for i, f in enumerate(FRAMES)]

# Peers are any hashable value; plain strings keep the tests readable.
DEV_A, DEV_B, DEV_A2, DEV_A3 = "peer-device-a", "peer-device-b", "peer-device-a-again", "peer-device-a-third"
CTL_1, CTL_2, CTL_LAB = "peer-controller-1", "peer-controller-2", "peer-controller-lab"
#: The credential names of the controllers every ``new_board`` admits (both may use every device).
CONTROLLER_NAMES = {CTL_1: "ctl-1", CTL_2: "ctl-2"}
OUR_TOOLS = [{"name": "echo", "server": "demo", "description": "echoes"}]
DEVICE_INFO_REQUEST = json.dumps({"type": "device_info_request", "status": "ok", "response_id": "q1"})


# -- helpers -------------------------------------------------------------------


def device_identity(device_id: str, token: str | None = None) -> Identity:
    """What the hub knows of a connection holding ``device_id``'s credential (``token`` names another one)."""
    return Identity(Role.DEVICE, device_id, credential=digest(token or f"device-token-{device_id}"))


def controller_identity(name: str, devices: tuple[str, ...] = ("*",)) -> Identity:
    return Identity(Role.CONTROLLER, name, credential=digest(f"controller-token-{name}"), devices=devices)


def new_board(clock: Any = None) -> Switchboard:
    """A switchboard with the controllers ``CTL_1`` and ``CTL_2`` admitted."""
    board = Switchboard() if clock is None else Switchboard(clock=clock)
    for peer, name in CONTROLLER_NAMES.items():
        board.admit(peer, controller_identity(name))
    return board


def register_frame(client_id: str | None, *, ours: bool = False, metadata: dict[str, Any] | None = None) -> str:
    """A device's register frame; ``ours`` adds the ``dispatch`` key our own device client sends."""
    meta: dict[str, Any] = {"system_info": {"platform": "linux", "hostname": "vm"}}
    if ours:
        meta["dispatch"] = {"tools": OUR_TOOLS}
    if metadata is not None:
        meta = metadata
    return json.dumps({"type": "register", "status": "ok", "client_id": client_id, "metadata": meta})


def join(
    board: Switchboard,
    peer: Hashable,
    client_id: str | None,
    frame: str | bytes | None = None,
    *,
    ours: bool = False,
    metadata: dict[str, Any] | None = None,
    identity: Identity | None = None,
) -> tuple[Device | None, list[Action]]:
    """``peer`` connects with ``client_id``'s credential (or ``identity``) and sends its register frame."""
    board.admit(peer, identity or device_identity(client_id or "alpha"))
    if frame is None:
        frame = register_frame(client_id, ours=ours, metadata=metadata)
    return board.device_registers(peer, frame)


def command_frame(
    response_id: str | None, target: str | None, actions: list[dict[str, Any]] | None = None, **extra: Any
) -> str:
    """A controller's batch for ``target`` (``extra``: more fields)."""
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
            **extra,
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
    """A switchboard with ``(peer, client_id, ours)`` devices registered (and ``CTL_1``, ``CTL_2`` admitted)."""
    board = new_board()
    for peer, client_id, ours in devices:
        device, actions = join(board, peer, client_id, ours=ours)
        assert device is not None, actions
    return board


def reconnect(board: Switchboard, peer: Hashable, client_id: str, *, alive: bool) -> tuple[Device | None, list[Action]]:
    """``peer`` registers as ``client_id`` while another connection holds it; the probe finds that one ``alive``."""
    holder = board.devices[client_id]
    device, actions = join(board, peer, client_id)
    assert device is None and actions == [Probe(holder.peer, peer)]
    return board.probe_answered(peer, alive)


def is_error_frame(frame: dict[str, Any]) -> bool:
    return frame["type"] == "error" and frame["status"] == "error" and bool(frame["error"])


def assert_refused(actions: Sequence[Action], peer: Hashable, needle: str, code: int = CloseCode.POLICY) -> None:
    """``actions`` are exactly an error frame naming ``needle`` to ``peer`` and a close with ``code``."""
    assert [type(a) for a in actions] == [Send, Close] and all(a.peer == peer for a in actions)
    (refusal,) = sends(actions)
    assert is_error_frame(refusal) and needle in refusal["error"], refusal["error"]
    (close,) = closes(actions)
    assert close.code == code and len(close.reason.encode()) <= 123


# -- Switchboard: registration -----------------------------------------------------


def test_register_is_acknowledged_with_a_heartbeat_first_and_only() -> None:
    board = new_board(clock=lambda: "T0")
    device, actions = join(board, DEV_A, "alpha")
    assert device is not None
    assert device.id == "alpha" and device.peer == DEV_A and device.connected_at == "T0"
    assert device.identity == device_identity("alpha")
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
    board = new_board()
    device, actions = join(board, DEV_A, "alpha", frame)
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
    board = new_board()
    device, actions = join(board, DEV_A, "alpha", register_frame("alpha").encode())
    assert device is None
    assert [type(a) for a in actions] == [Send, Close]
    assert closes(actions)[0].code == CloseCode.POLICY


def test_a_frame_from_an_unregistered_peer_is_closed() -> None:
    board = new_board()
    actions = board.device_text(DEV_A, json.dumps({"type": "heartbeat", "status": "ok"}))
    assert actions == [Close(DEV_A, CloseCode.POLICY, "not registered")]


@pytest.mark.parametrize(
    "identity", [None, controller_identity("alpha")], ids=["not-admitted", "controller-credential"]
)
def test_a_peer_without_a_device_credential_cannot_register(identity: Identity | None) -> None:
    board = new_board()
    if identity is not None:
        board.admit(DEV_A, identity)
    device, actions = board.device_registers(DEV_A, register_frame("alpha"))
    assert device is None
    assert_refused(actions, DEV_A, "no device credential")
    assert board.devices == {} and board.device_by_peer == {}


def test_a_device_registers_only_as_the_id_its_credential_is_for() -> None:
    board = new_board()
    device, actions = join(board, DEV_A, "beta", identity=device_identity("alpha"))
    assert device is None
    assert_refused(actions, DEV_A, "'alpha'")
    assert "another id" in sends(actions)[0]["error"]
    assert board.devices == {}
    # nor may it take a connected device's id: no probe, the holder keeps it
    join(board, DEV_B, "beta")
    device, actions = join(board, DEV_A2, "beta", identity=device_identity("alpha"))
    assert device is None and not any(isinstance(a, Probe) for a in actions)
    assert_refused(actions, DEV_A2, "'alpha'")
    assert board.devices["beta"].peer == DEV_B and set(board.devices) == {"beta"}


def test_an_id_held_under_another_credential_is_refused_without_a_probe() -> None:
    """The credential of ``alpha`` was replaced since its live connection opened: the new one must wait."""
    board = registered((DEV_A, "alpha", False))
    device, actions = join(board, DEV_A2, "alpha", identity=device_identity("alpha", token="the-new-alpha-token"))
    assert device is None
    assert_refused(actions, DEV_A2, "another credential")
    assert board.devices["alpha"].peer == DEV_A and DEV_A2 not in board.device_by_peer


def test_a_live_connection_keeps_its_id_and_the_newcomer_is_refused_with_4004() -> None:
    board = registered((DEV_A, "alpha", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))

    device, actions = join(board, DEV_A2, "alpha")

    assert device is None and actions == [Probe(DEV_A, DEV_A2)]
    # while the hub pings the holder nothing changes, and the newcomer is not a device yet
    assert board.devices["alpha"].peer == DEV_A and set(board.routes) == {"r1"}
    assert board.device_text(DEV_A2, results_frame("r1")) == [Close(DEV_A2, CloseCode.POLICY, "not registered")]

    device, actions = board.probe_answered(DEV_A2, alive=True)

    assert device is None
    assert_refused(actions, DEV_A2, "already connected", CloseCode.DUPLICATE)
    assert closes(actions)[0].code == 4004
    # the live connection keeps its id and its batch
    assert board.devices["alpha"].peer == DEV_A and DEV_A2 not in board.device_by_peer
    assert board.device_text(DEV_A, results_frame("r1")) == [Send(CTL_1, results_frame("r1"))]
    # a second answer to the same probe, or the refused connection ending, changes nothing
    assert board.probe_answered(DEV_A2, alive=False) == (None, [])
    assert board.device_gone(DEV_A2, "closed") == []
    assert board.devices["alpha"].peer == DEV_A


def test_a_reconnect_replaces_a_dead_stale_connection() -> None:
    board = registered((DEV_A, "alpha", False), (DEV_B, "beta", False))
    board.controller_text(CTL_1, command_frame("r1", "alpha"))
    board.controller_text(CTL_2, command_frame("r2", "alpha"))
    board.controller_text(CTL_1, command_frame("r3", "beta"))

    device, actions = reconnect(board, DEV_A2, "alpha", alive=False)

    assert device is not None and device.peer == DEV_A2
    assert board.devices["alpha"] is device and board.device_by_peer.get(DEV_A) is None
    # the old batches fail to their controllers, naming the device and the reason
    for controller, response_id in ((CTL_1, "r1"), (CTL_2, "r2")):
        (failure,) = sends(actions, controller)
        assert failure["type"] == "error" and failure["status"] == "error"
        assert failure["prev_response_id"] == response_id
        assert failure["metadata"] == {"reason": "device_lost", "device": "alpha"}
        assert "reconnected" in failure["error"]
    # the stale peer is closed with 4000 at once (what is queued for it dropped), the new one gets exactly the ack
    assert closes(actions) == [
        Close(DEV_A, CloseCode.REPLACED, "replaced: this connection did not answer a ping", now=True)
    ]
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
    reconnect(board, DEV_A2, "alpha", alive=False)
    actions = board.controller_text(CTL_1, command_frame("r1", "alpha"))
    assert [a.peer for a in actions] == [DEV_A2]
    assert board.device_text(DEV_A2, results_frame("r1")) == [Send(CTL_1, results_frame("r1"))]


def test_a_probe_answer_after_the_contender_left_is_nothing() -> None:
    board = registered((DEV_A, "alpha", False))
    join(board, DEV_A2, "alpha")
    assert board.device_gone(DEV_A2, "closed") == []
    assert board.probe_answered(DEV_A2, alive=False) == (None, [])
    assert board.devices["alpha"].peer == DEV_A and set(board.device_by_peer) == {DEV_A}


@pytest.mark.parametrize("alive", [True, False])
def test_a_holder_that_left_during_the_probe_leaves_the_id_to_the_contender(alive: bool) -> None:
    board = registered((DEV_A, "alpha", False))
    join(board, DEV_A2, "alpha")
    board.device_gone(DEV_A, "closed")
    device, actions = board.probe_answered(DEV_A2, alive=alive)
    assert device is not None and device.peer == DEV_A2 and board.devices == {"alpha": device}
    (ack,) = sends(actions, DEV_A2)
    assert len(actions) == 1 and ack["type"] == "heartbeat"


def test_a_connection_that_took_the_id_during_the_probe_keeps_it() -> None:
    board = registered((DEV_A, "alpha", False))
    join(board, DEV_A2, "alpha")
    board.device_gone(DEV_A, "closed")
    third, _ = join(board, DEV_A3, "alpha")
    assert third is not None
    device, actions = board.probe_answered(DEV_A2, alive=False)  # the probed connection is dead, but not the holder
    assert device is None
    assert_refused(actions, DEV_A2, "already connected", CloseCode.DUPLICATE)
    assert board.devices["alpha"] is third and DEV_A2 not in board.device_by_peer


def padded_register_frame(size: int) -> str:
    """A register frame of exactly ``size`` characters (ASCII, so as many bytes)."""
    frame = register_frame("alpha", metadata={"padding": ""})
    return register_frame("alpha", metadata={"padding": "x" * (size - len(frame))})


def test_a_register_frame_larger_than_the_limit_is_refused_with_its_size() -> None:
    at_limit = padded_register_frame(MAX_REGISTRATION_BYTES)
    assert len(at_limit.encode()) == MAX_REGISTRATION_BYTES
    device, _ = join(new_board(), DEV_A, "alpha", at_limit)
    assert device is not None

    board = new_board()
    over = padded_register_frame(MAX_REGISTRATION_BYTES + 1)
    device, actions = join(board, DEV_A, "alpha", over)
    assert device is None
    assert_refused(actions, DEV_A, f"at most {MAX_REGISTRATION_BYTES}")
    assert str(len(over)) in sends(actions)[0]["error"]
    assert board.devices == {}


def test_the_registration_limit_counts_bytes_not_characters() -> None:
    padding = "é" * (MAX_REGISTRATION_BYTES // 2 + 1024)  # two bytes each in UTF-8
    frame = json.dumps(
        {"type": "register", "status": "ok", "client_id": "alpha", "metadata": {"padding": padding}},
        ensure_ascii=False,
    )
    assert len(frame) < MAX_REGISTRATION_BYTES < len(frame.encode())
    device, actions = join(new_board(), DEV_A, "alpha", frame)
    assert device is None
    assert_refused(actions, DEV_A, f"at most {MAX_REGISTRATION_BYTES}")


def test_the_profile_keeps_at_most_max_tools_and_cuts_every_string() -> None:
    tools: list[dict[str, Any]] = [{"name": f"t{i}", "server": "demo"} for i in range(MAX_TOOLS + 50)]
    tools[0] = {"name": "n" * 1000, "server": "s" * 1000, "description": "d" * 5000}
    system_info = {"platform": "p" * 1000, "hostname": "vm", "not_a_system_field": "kept nowhere"}
    board = new_board()
    device, _ = join(board, DEV_A, "alpha", metadata={"dispatch": {"tools": tools}, "system_info": system_info})
    assert device is not None

    kept = device.profile.tools
    assert len(kept) == MAX_TOOLS and kept[-1].name == f"t{MAX_TOOLS - 1}"
    assert kept[0].name == "n" * MAX_NAME_CHARS and kept[0].server == "s" * MAX_NAME_CHARS
    assert kept[0].description == "d" * MAX_DESCRIPTION_CHARS
    assert device.profile.platform == "p" * MAX_NAME_CHARS

    (answer,) = sends(board.controller_text(CTL_1, DEVICE_INFO_REQUEST))
    (listed,) = answer["metadata"]["devices"]
    assert len(listed["tools"]) == MAX_TOOLS and listed["tools"][0]["name"] == "n" * MAX_NAME_CHARS
    assert listed["system_info"] == {"platform": "p" * MAX_NAME_CHARS, "hostname": "vm"}


def test_odd_tool_names_become_strings_or_are_dropped_and_the_listing_never_fails() -> None:
    huge = "1" * 4300  # the longest integer Python turns into a string
    raw_tools = (
        '[{"name": 5}, {"name": 1.5}, {"name": true}, {"name": null}, {"name": ["x"]}, {"name": {"a": 1}},'
        f' {{"name": ""}}, {{"name": 0}}, {{"server": "no name"}}, "just text", 7, {{"name": {huge}}},'
        ' {"name": "ok", "server": 3, "description": ["not", "text"]}]'
    )
    frame = (
        '{"type": "register", "status": "ok", "client_id": "alpha",'
        f' "metadata": {{"dispatch": {{"tools": {raw_tools}}}, "platform": false}}}}'
    )
    board = new_board()
    device, actions = join(board, DEV_A, "alpha", frame)
    assert device is not None, actions
    assert [tool.name for tool in device.profile.tools] == ["5", "1.5", "0", "1" * MAX_NAME_CHARS, "ok"]
    assert device.profile.tools[-1].describe() == {"name": "ok", "server": "3", "description": ""}
    assert device.profile.platform is None

    (answer,) = sends(board.controller_text(CTL_1, DEVICE_INFO_REQUEST))
    (listed,) = answer["metadata"]["devices"]
    assert all(isinstance(value, str) for tool in listed["tools"] for value in tool.values())
    assert [tool["name"] for tool in listed["tools"]] == ["5", "1.5", "0", "1" * MAX_NAME_CHARS, "ok"]


# -- Switchboard: batches out ----------------------------------------------------------


def test_a_command_reaches_the_device_without_target_id_and_otherwise_unchanged() -> None:
    board = registered((DEV_A, "alpha", True))
    frame = command_frame("r1", "alpha")
    actions = board.controller_text(CTL_1, frame)
    assert len(actions) == 1 and isinstance(actions[0], Send) and actions[0].peer == DEV_A
    sent = json.loads(actions[0].text)
    assert "target_id" not in sent
    # who sent it, for the device's call memory: the name and the credential it holds
    assert sent["controller_id"] == f"ctl-1#{controller_identity('ctl-1').credential[:16]}"
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
    board = new_board()
    join(board, DEV_A, "alpha", metadata={"dispatch": "yes"})
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
    assert "(connected: 'alpha', 'beta')" in failure["error"]  # ids are data: quoted, never bare
    assert board.routes == {}


def test_with_no_device_connected_the_error_says_so() -> None:
    (failure,) = sends(new_board().controller_text(CTL_1, command_frame("r1", "alpha")))
    assert failure["metadata"]["reason"] == "device_unavailable"
    assert "no device this controller may use is connected" in failure["error"]


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


@pytest.mark.parametrize("identity", [None, device_identity("alpha")], ids=["not-admitted", "device-credential"])
def test_a_peer_without_a_controller_credential_is_closed(identity: Identity | None) -> None:
    board = registered((DEV_A, "alpha", True))
    if identity is not None:
        board.admit("peer-x", identity)
    for frame in (command_frame("r1", "alpha"), DEVICE_INFO_REQUEST):
        (close,) = board.controller_text("peer-x", frame)
        assert isinstance(close, Close) and close.peer == "peer-x" and close.code == CloseCode.POLICY
    assert board.routes == {} and board.devices["alpha"].pending == set()


def test_our_devices_learn_which_controller_sent_a_batch_and_ufo_devices_never_do() -> None:
    board = registered((DEV_A, "ours", True), (DEV_B, "ufo", False))
    for controller, response_id, target in ((CTL_1, "r1", "ours"), (CTL_2, "r2", "ours"), (CTL_1, "r3", "ufo")):
        claimed = {**json.loads(command_frame(response_id, target)), "controller_id": "someone-else"}
        (out,) = board.controller_text(controller, json.dumps(claimed))
        assert isinstance(out, Send)
        sent = json.loads(out.text)
        if target == "ours":  # from the credential, whatever the frame claimed
            name = CONTROLLER_NAMES[controller]
            assert out.peer == DEV_A and sent["controller_id"] == f"{name}#{controller_identity(name).credential[:16]}"
        else:  # a UFO device never sees a key UFO does not send
            assert out.peer == DEV_B and "controller_id" not in sent and "target_id" not in sent
    # a name issued again (a new credential) is another controller: it does not inherit the old holder's calls
    reissued = Identity(
        Role.CONTROLLER, "ctl-1", credential=digest("controller-token-ctl-1-issued-again"), devices=("*",)
    )
    board.admit(CTL_LAB, reissued)
    (out,) = board.controller_text(CTL_LAB, command_frame("r4", "ours"))
    assert isinstance(out, Send) and out.peer == DEV_A
    tag = json.loads(out.text)["controller_id"]
    assert tag == f"ctl-1#{reissued.credential[:16]}"
    assert tag != f"ctl-1#{controller_identity('ctl-1').credential[:16]}"


LAB_DEVICES = [f"lab-{i:02d}" for i in range(1, 9)]


def lab_board() -> Switchboard:
    """``CTL_LAB`` may use ``lab-*`` only; the eight lab devices and ``other-pc`` are connected."""
    board = new_board(clock=lambda: "T0")
    board.admit(CTL_LAB, controller_identity("lab-runner", ("lab-*",)))
    for device_id in [*LAB_DEVICES, "other-pc"]:
        device, actions = join(board, f"peer-{device_id}", device_id)
        assert device is not None, actions
    return board


def test_a_device_the_controller_credential_does_not_cover_is_forbidden_whether_or_not_it_is_connected() -> None:
    board = new_board()
    board.admit(CTL_LAB, controller_identity("lab-runner", ("lab-*",)))
    join(board, DEV_A, "lab-01")
    (absent,) = sends(board.controller_text(CTL_LAB, command_frame("r1", "other-pc")))
    join(board, DEV_B, "other-pc")
    actions = board.controller_text(CTL_LAB, command_frame("r2", "other-pc"))
    assert [a.peer for a in actions] == [CTL_LAB]  # nothing reaches other-pc
    (present,) = sends(actions)
    for failure, response_id in ((absent, "r1"), (present, "r2")):
        ClientMessage.model_validate_json(json.dumps(failure))
        assert failure["type"] == "error" and failure["prev_response_id"] == response_id
        assert failure["metadata"] == {"reason": Reason.FORBIDDEN.value} == {"reason": "forbidden"}
    assert absent["error"] == present["error"]  # nothing tells whether other-pc exists
    assert "'lab-runner'" in present["error"] and "'other-pc'" in present["error"]
    assert board.routes == {} and board.devices["other-pc"].pending == set()
    # the devices it covers it reaches, and a controller covering everything reaches other-pc
    assert [a.peer for a in board.controller_text(CTL_LAB, command_frame("r3", "lab-01"))] == [DEV_A]
    assert [a.peer for a in board.controller_text(CTL_1, command_frame("r4", "other-pc"))] == [DEV_B]


def test_the_device_list_holds_only_the_devices_the_controller_may_use() -> None:
    board = lab_board()
    (limited,) = sends(board.controller_text(CTL_LAB, DEVICE_INFO_REQUEST))
    assert [d["id"] for d in limited["metadata"]["devices"]] == LAB_DEVICES
    (everything,) = sends(board.controller_text(CTL_1, DEVICE_INFO_REQUEST))
    assert [d["id"] for d in everything["metadata"]["devices"]] == [*LAB_DEVICES, "other-pc"]
    assert "omitted" not in limited["metadata"] and "omitted" not in everything["metadata"]


def test_a_device_list_larger_than_the_limit_says_how_many_it_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    board = lab_board()
    one = len(json.dumps(board.devices["lab-01"].describe()))
    monkeypatch.setattr("aip.switchboard.MAX_LISTING_CHARS", 3 * one + 1)
    (answer,) = sends(board.controller_text(CTL_LAB, DEVICE_INFO_REQUEST))
    assert [d["id"] for d in answer["metadata"]["devices"]] == LAB_DEVICES[:3]
    assert answer["metadata"]["omitted"] == len(LAB_DEVICES) - 3  # other-pc is not counted: it is not listable


def named_devices(error: str, target: str) -> set[str]:
    return set(re.findall(r"lab-\d\d|other-pc", error)) - {target}


@pytest.mark.parametrize(
    ("target", "needle"),
    [("lab-99", "did you mean"), ("lab-zzzzzzzzzzzzzzzzzzzzzzzzzz", "and 3 more")],
    ids=["close-names", "no-close-name"],
)
def test_the_not_connected_error_names_at_most_five_devices_the_controller_may_use(target: str, needle: str) -> None:
    (failure,) = sends(lab_board().controller_text(CTL_LAB, command_frame("r1", target)))
    assert failure["metadata"]["reason"] == "device_unavailable"
    assert needle in failure["error"]
    named = named_devices(failure["error"], target)
    assert named and len(named) <= NAMED_DEVICES == 5 and named <= set(LAB_DEVICES)


def test_the_not_connected_error_names_no_device_the_controller_may_not_use() -> None:
    board = new_board()
    board.admit(CTL_LAB, controller_identity("lab-runner", ("lab-*",)))
    join(board, DEV_B, "other-pc")
    (failure,) = sends(board.controller_text(CTL_LAB, command_frame("r1", "lab-01")))
    assert failure["metadata"]["reason"] == "device_unavailable"
    assert "no device this controller may use is connected" in failure["error"]
    assert "other-pc" not in failure["error"]


#: Ids a ``lab-*`` controller may not use, some of them one keystroke from a lab id.
NOT_LAB = ["lab_09", "lab09", "xlab-09", "Lab-09", "other-pc", "prod-db-01"]


@pytest.mark.parametrize("target", ["lab-9", "lab_09", "lab-zzzzzzzzzzzzzzzzzzzzzzzz", "x" * 100_000])
def test_a_restricted_controller_never_sees_other_ids_in_the_not_connected_error(target: str) -> None:
    board = new_board()
    board.admit(CTL_LAB, controller_identity("lab-runner", ("lab-*",)))
    for device_id in [*LAB_DEVICES, *NOT_LAB]:
        join(board, f"peer-{device_id}", device_id)
    (failure,) = sends(board.controller_text(CTL_LAB, command_frame("r1", f"lab-{target}")))
    assert failure["metadata"]["reason"] == "device_unavailable", failure
    named = set(re.findall(r"'([^']*)'", failure["error"])) - {f"lab-{target}"[:128]}
    assert named and named <= set(LAB_DEVICES), failure["error"]
    # the same question from a controller covering everything may hear of the others
    (everything,) = sends(board.controller_text(CTL_1, command_frame("r2", "lab_9")))
    assert "'lab_09'" in everything["error"], everything["error"]


@pytest.fixture(scope="module")
def fleet() -> Switchboard:
    """10,000 devices connected (``dev-00000`` ...), ``CTL_LAB`` covering only ``dev-01*`` (1,000 of them)."""
    board = new_board(clock=lambda: "T0")
    board.admit(CTL_LAB, controller_identity("dev-01-runner", ("dev-01*",)))
    for number in range(10_000):
        device_id = f"dev-{number:05d}"
        board.admit(f"peer-{device_id}", device_identity(device_id))
        device, actions = board.device_registers(f"peer-{device_id}", register_frame(device_id))
        assert device is not None, actions
    return board


@pytest.mark.parametrize(
    ("target", "guess"),
    [("dev-0143l", "dev-0143"), ("dev-01" + "z" * 30, None), ("dev-01" + "x" * 1_000_000, None)],
    ids=["typo", "far", "huge"],
)
def test_the_not_connected_error_stays_short_with_ten_thousand_devices(
    fleet: Switchboard, target: str, guess: str | None
) -> None:
    for peer, usable in ((CTL_1, 10_000), (CTL_LAB, 1_000)):
        (failure,) = sends(fleet.controller_text(peer, command_frame("r1", target)))
        error = failure["error"]
        assert len(error) < 400, error
        named = re.findall(r"'(dev-\d{5})'", error)
        assert 0 < len(named) <= NAMED_DEVICES, error
        assert f" and {usable - len(named)} more)" in error, error
        if guess is not None:  # numbered ids tie: any of dev-01430 ... dev-01439 is a fair guess
            assert re.search(rf"did you mean '{guess}\d'.*\? \(also connected: ", error), error
        else:
            assert "did you mean" not in error, error
        if peer == CTL_LAB:
            assert all(device_id.startswith("dev-01") for device_id in named), error


def test_the_not_connected_error_asks_did_you_mean_first_and_quotes_every_id() -> None:
    board = lab_board()
    (failure,) = sends(board.controller_text(CTL_LAB, command_frame("r1", "lab-8")))
    error = failure["error"]
    assert error.startswith("device 'lab-8' is not connected; did you mean 'lab-08'"), error
    assert "?" in error and error.index("?") < error.index("also connected:"), error
    unquoted = re.sub(r"'[^']*'", "", error)
    assert not re.search(r"lab-\d", unquoted), error  # every id named is a quoted repr: data, never text
    assert len(named_devices(error, "lab-8")) == NAMED_DEVICES and error.endswith(" and 3 more)"), error


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


def test_a_controller_back_after_losing_its_connection_may_send_its_abandoned_batch_again_and_no_one_else() -> None:
    board = registered((DEV_A, "ours", True))
    board.controller_text(CTL_1, command_frame("r1", "ours"))
    board.controller_gone(CTL_1)
    board.admit("intruder", controller_identity(CONTROLLER_NAMES[CTL_2]))
    (refused,) = sends(board.controller_text("intruder", command_frame("r1", "ours")))
    assert refused["metadata"]["reason"] == "rejected" and "already in use" in refused["error"]
    board.admit("back", controller_identity(CONTROLLER_NAMES[CTL_1]))  # the same credential, a new connection

    (forwarded,) = board.controller_text("back", command_frame("r1", "ours"))

    assert isinstance(forwarded, Send) and forwarded.peer == DEV_A
    assert board.routes["r1"].controller == "back"
    assert [a.peer for a in board.device_text(DEV_A, results_frame("r1"))] == ["back"]


def test_a_batch_sent_again_goes_to_our_devices_but_never_to_a_ufo_device_which_would_run_it_twice() -> None:
    board = registered((DEV_A, "ours", True), (DEV_B, "ufo", False))

    (forwarded,) = board.controller_text(CTL_1, command_frame("r1", "ours", resent=True))
    (refused,) = sends(board.controller_text(CTL_1, command_frame("r2", "ufo", resent=True)))

    assert isinstance(forwarded, Send) and forwarded.peer == DEV_A
    assert refused["metadata"] == {"reason": "device_lost", "device": "ufo"} and "no memory" in refused["error"]
    assert "r2" not in board.routes and board.devices["ufo"].pending == set()


def test_when_a_controller_goes_our_devices_are_told_to_start_nothing_more_per_batch_and_ufo_devices_nothing() -> None:
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
        assert parsed.type is ServerMessageType.TASK_END and parsed.status is TaskStatus.OK  # not "failed": no cancel
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
    board = new_board(clock=lambda: "T0")
    join(board, DEV_B, "zulu")
    join(board, DEV_A, "alpha", ours=True)
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
    board = new_board()
    device, _ = join(board, DEV_A, "alpha", metadata=metadata)
    assert device is not None
    actions = board.controller_text(CTL_1, json.dumps({"type": "device_info_request", "status": "ok"}))
    (answer,) = sends(actions)
    assert [d["id"] for d in answer["metadata"]["devices"]] == ["alpha"]


def test_last_seen_follows_the_device_frames() -> None:
    ticks = iter(["T0", "T1", "T2"])
    board = new_board(clock=lambda: next(ticks))
    join(board, DEV_A, "alpha")
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


# -- Switchboard: revoked credentials ----------------------------------------------------


def test_revoke_takes_the_rights_away_at_once_and_closes_exactly_the_connections_that_lost_them() -> None:
    store = CredentialStore()
    tokens = {device_id: store.issue(Role.DEVICE, device_id) for device_id in ("alpha", "beta", "gamma", "delta")}
    all_token = store.issue(Role.CONTROLLER, "all")
    lab_token = store.issue(Role.CONTROLLER, "lab", devices=("delta", "lab-*"))
    board = Switchboard()
    peers = {DEV_A: tokens["alpha"], DEV_B: tokens["beta"], DEV_A2: tokens["gamma"], DEV_A3: tokens["delta"]}
    for peer, token in [*peers.items(), (CTL_1, all_token), (CTL_2, lab_token)]:
        identity = store.identify(token)
        assert identity is not None
        board.admit(peer, identity)
    # gamma has not registered yet; delta is one of our own devices (it understands TASK_END)
    for peer, device_id, ours in ((DEV_A, "alpha", False), (DEV_B, "beta", False), (DEV_A3, "delta", True)):
        device, actions = board.device_registers(peer, register_frame(device_id, ours=ours))
        assert device is not None, actions
    for controller, response_id, target in ((CTL_1, "r1", "alpha"), (CTL_1, "r2", "beta"), (CTL_1, "r3", "delta")):
        (out,) = board.controller_text(controller, command_frame(response_id, target))
        assert isinstance(out, Send) and out.peer == board.devices[target].peer
    (out,) = board.controller_text(CTL_2, command_frame("r4", "delta"))
    assert isinstance(out, Send) and out.peer == DEV_A3
    assert board.revoke(store.is_current) == []

    store.revoke(Role.DEVICE, "alpha")
    store.revoke(Role.DEVICE, "gamma")
    store.issue(Role.DEVICE, "beta", replace_old=True)  # a new token: the old one no longer holds
    store.issue(Role.CONTROLLER, "lab", devices=("lab-1",), token=lab_token, replace_old=True)  # fewer rights
    actions = board.revoke(store.is_current)

    # each is closed at once, what is queued for it dropped: it has no right to it any more
    assert sorted(closes(actions), key=lambda close: str(close.peer)) == [
        Close(peer, CloseCode.REVOKED, "credential revoked", now=True) for peer in sorted([DEV_A, DEV_A2, DEV_B, CTL_2])
    ]
    assert CloseCode.REVOKED == 4003
    # the revoked devices' batches fail to their controller now, not when the close gets through
    failures = sends(actions, CTL_1)
    assert [(f["type"], f["status"], f["prev_response_id"], f["metadata"]) for f in failures] == [
        ("error", "error", "r1", {"reason": "device_lost", "device": "alpha"}),
        ("error", "error", "r2", {"reason": "device_lost", "device": "beta"}),
    ]
    assert all("credential was revoked" in f["error"] for f in failures)
    # the revoked controller's batch is abandoned: our device is told to stop it
    (cancel,) = sends(actions, DEV_A3)
    assert cancel["type"] == "task_end" and cancel["status"] == "failed" and cancel["response_id"] == "r4"
    assert cancel["error"] == "the controller that sent this batch disconnected"
    # nothing else: no frame for a revoked peer, and nobody else hears of it
    assert len(actions) == 4 + 2 + 1
    assert [a.peer for a in actions if isinstance(a, Send)] == [CTL_1, CTL_1, DEV_A3]

    # what is left is only what still holds
    assert set(board.devices) == {"delta"} and set(board.device_by_peer) == {DEV_A3}
    assert set(board.identities) == {DEV_A3, CTL_1}
    assert set(board.routes) == {"r3"} and board.routes_by_controller == {CTL_1: {"r3"}}
    assert board.devices["delta"].pending == {"r3"}
    assert [peer for peer, _ in board.abandoned.values()] == [DEV_A3] and list(board.abandoned) == ["r4"]
    # frames still arriving from a revoked peer are refused
    for peer in (DEV_A, DEV_B):
        assert board.device_text(peer, results_frame("r1")) == [Close(peer, CloseCode.POLICY, "not registered")]
    assert_refused(board.device_registers(DEV_A2, register_frame("gamma"))[1], DEV_A2, "no device credential")
    for frame in (command_frame("r5", "delta"), DEVICE_INFO_REQUEST):
        assert board.controller_text(CTL_2, frame) == [
            Close(CTL_2, CloseCode.POLICY, "this connection holds no controller credential")
        ]
    assert board.routes.keys() == {"r3"} and board.devices["delta"].pending == {"r3"}
    # the rest goes on: delta's late answer to the abandoned batch is dropped, r3 still comes back
    assert board.device_text(DEV_A3, results_frame("r4")) == []
    assert board.device_text(DEV_A3, results_frame("r3")) == [Send(CTL_1, results_frame("r3"))]
    # the connections ending later change nothing, and nothing is revoked twice
    for peer in (DEV_A, DEV_B, DEV_A2):
        assert board.device_gone(peer, "closed") == []
    assert board.controller_gone(CTL_2) == []
    assert board.revoke(store.is_current) == []
    assert set(board.devices) == {"delta"} and set(board.identities) == {DEV_A3, CTL_1}
    assert store.identify(tokens["alpha"]) is None and store.identify(tokens["beta"]) is None


# -- Switchboard: real UFO frames -----------------------------------------------------


@pytest.mark.parametrize("frame", FRAMES, ids=FRAME_IDS)
def test_every_vector_frame_parses(frame: dict[str, Any]) -> None:
    model = ClientMessage if frame["dir"] == "client->server" else ServerMessage
    message = model.model_validate_json(frame["raw"])
    assert message.type.value == json.loads(frame["raw"])["type"]


def _vector(kind: str, direction: str = "client->server") -> str:
    (raw,) = [f["raw"] for f in FRAMES if f["dir"] == direction and json.loads(f["raw"])["type"] == kind]
    return str(raw)


#: The id the UFO device in the vectors registers as (its credential is bound to it).
UFO_DEVICE_ID = "device_linux_01"


def _ufo_board() -> Switchboard:
    board = new_board()
    device, actions = join(board, DEV_A, UFO_DEVICE_ID, _vector("register"))
    assert device is not None and device.id == "device_linux_01" and not device.speaks_dispatch
    assert len(actions) == 1
    return board


@pytest.mark.parametrize("frame", [f for f in FRAMES if f["dir"] == "client->server"], ids=lambda f: f["raw"][9:30])
def test_every_ufo_device_frame_is_handled(frame: dict[str, Any]) -> None:
    board = new_board()
    kind = json.loads(frame["raw"])["type"]
    if kind == "register":
        device, actions = join(board, DEV_A, UFO_DEVICE_ID, frame["raw"])
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
    assert json.loads(out.text) == command  # exactly what a UFO server sends: no target_id, no controller_id
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
#: The credential each peer connects with: d1 and d3 share alpha's (so they contest its id), c2 may use alpha only.
PEER_IDENTITIES = {
    "d1": device_identity("alpha"),
    "d2": device_identity("beta"),
    "d3": device_identity("alpha"),
    "c1": controller_identity("c1"),
    "c2": controller_identity("c2", ("alpha",)),
    "c-last": controller_identity("c-last"),
}
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
    st.sampled_from(["command", "command", "command", "task_end"])
    | st.sampled_from([t.value for t in ServerMessageType]),
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
#: A device registering as the id its credential is for (it may still have to contest it).
own_registrations = st.sampled_from(DEVICE_PEERS).flatmap(
    lambda peer: st.tuples(
        st.just("register"),
        st.just(peer),
        metadata.map(
            lambda meta: json.dumps(
                {"type": "register", "status": "ok", "client_id": PEER_IDENTITIES[peer].name, "metadata": meta}
            )
        ),
    )
)
events = st.one_of(
    own_registrations,
    own_registrations,
    st.tuples(st.just("device"), st.sampled_from(DEVICE_PEERS), good_device_frames),
    st.tuples(st.just("controller"), st.sampled_from(CONTROLLER_PEERS), good_controller_frames),
    st.tuples(st.just("controller"), st.sampled_from(CONTROLLER_PEERS), good_controller_frames),
    st.tuples(st.just("device"), st.sampled_from(DEVICE_PEERS), good_device_frames),
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
    st.tuples(st.just("probe"), st.just(""), st.booleans()),  # the oldest probe out is answered, alive or not
    st.tuples(
        st.just("exchange"),
        st.sampled_from(CONTROLLER_PEERS),
        st.tuples(st.sampled_from(DEVICE_PEERS), st.sampled_from(RESPONSE_IDS)),
    ),
    st.tuples(st.just("revoke"), st.sampled_from(CLIENT_IDS + CONTROLLER_PEERS), st.just("")),
)


def _check_consistent(board: Switchboard) -> None:
    for client_id, device in board.devices.items():
        assert device.id == client_id and board.device_by_peer[device.peer] is device
        assert device.identity.role is Role.DEVICE and device.identity.name == client_id
    for response_id, route in board.routes.items():
        assert board.devices.get(route.device.id) is route.device
        assert response_id in route.device.pending
        assert response_id in board.routes_by_controller[route.controller]
        assert board.identities[route.controller].may_use(route.device.id)
    for device in board.devices.values():
        assert device.pending <= set(board.routes)


def _check_actions(actions: object) -> None:
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, Send | Close | Probe)
        if isinstance(action, Send):
            assert isinstance(json.loads(action.text), dict)
            action.text.encode("utf-8")  # sendable as a text frame
        elif isinstance(action, Close):
            assert action.code in (1000, 1003, 1008, 4000, 4001, 4003, 4004)
            assert len(action.reason.encode("utf-8")) <= 123  # fits in a close frame
            # only a replaced or revoked connection is closed at once, dropping what is queued for it
            assert action.now is (action.code in (CloseCode.REPLACED, CloseCode.REVOKED))
        else:
            assert actions == [action]  # a probe comes alone: nothing else happens until it is answered


class SimulatedHub:
    """Drives a switchboard as the hub does: admits each new connection, probes, ends what it closes."""

    def __init__(self) -> None:
        self.board = Switchboard()
        self.contending: set[str] = set()  # device peers whose registration waits for a probe

    def step(self, kind: str, peer: str, payload: Any) -> None:
        board = self.board
        if kind in ("register", "controller", "exchange") and peer not in board.identities:
            board.admit(peer, PEER_IDENTITIES[peer])  # a new connection, with its credential
        if kind == "register":
            if peer in board.device_by_peer or peer in self.contending:
                return  # the hub calls device_registers only for a connection's first frame
            _, actions = board.device_registers(peer, payload)
            if any(isinstance(action, Probe) for action in actions):
                assert actions == [Probe(board.devices[PEER_IDENTITIES[peer].name].peer, peer)]
                self.contending.add(peer)
        elif kind == "probe":
            if not self.contending:
                return  # the hub reports a probe only for the Probe it was given
            peer = min(self.contending)
            self.contending.discard(peer)
            _, actions = board.probe_answered(peer, payload)
        elif kind == "device":
            actions = board.device_text(peer, payload)
        elif kind == "controller":
            actions = board.controller_text(peer, payload)
        elif kind in ("device_gone", "controller_gone"):
            actions = self.gone(peer)
        elif kind == "exchange":  # a batch for the device ``payload[0]`` holds, and that device's answer
            device_peer, response_id = payload
            self.step("controller", peer, command_frame(response_id, PEER_IDENTITIES[device_peer].name))
            actions = board.device_text(device_peer, results_frame(response_id))
        else:  # the credential named ``peer`` is revoked (and issued again to the next connection)
            actions = self.revoke(peer)
        self.check(actions)
        for close in closes(actions):  # a closed connection ends
            ended = self.gone(close.peer)
            if close.now:  # its rights were taken away with the close: its end has nothing left to do
                assert ended == []
            self.check(ended)

    def revoke(self, name: str) -> list[Action]:
        """Revoke ``name``'s credential: its connections lose every right at once, and are closed now."""
        board = self.board
        revoked = {holder for holder, identity in board.identities.items() if identity.name == name}
        expected = sorted(
            [(route.controller, "error", rid) for rid, route in board.routes.items() if route.device.peer in revoked]
            + [
                (route.device.peer, "task_end", rid)
                for rid, route in board.routes.items()
                if route.controller in revoked and route.device.speaks_dispatch
            ]
        )
        actions = board.revoke(lambda identity: identity.name != name)
        assert sorted(closes(actions), key=lambda close: str(close.peer)) == [
            Close(holder, CloseCode.REVOKED, "credential revoked", now=True) for holder in sorted(revoked, key=str)
        ]
        # the revoked devices' batches fail to their controllers, the revoked controllers' are stopped
        told = [(a.peer, json.loads(a.text)) for a in actions if isinstance(a, Send)]
        assert sorted((peer, f["type"], f.get("prev_response_id") or f.get("response_id")) for peer, f in told) == (
            expected
        )
        assert all(f["metadata"]["reason"] == "device_lost" for _, f in told if f["type"] == "error")
        # nothing of theirs is left, and what they send now is refused
        assert all(identity.name != name for identity in board.identities.values())
        assert all(device.identity.name != name for device in board.devices.values())
        assert not any(route.device.peer in revoked or route.controller in revoked for route in board.routes.values())
        assert not revoked & set(board.routes_by_controller)
        for holder in revoked:
            if holder in DEVICE_PEERS:
                refused = board.device_text(holder, results_frame("r1"))
                assert refused == [Close(holder, CloseCode.POLICY, "not registered")]
            else:
                refused = board.controller_text(holder, command_frame("r1", "alpha"))
                assert refused == [Close(holder, CloseCode.POLICY, "this connection holds no controller credential")]
        return actions

    def gone(self, peer: Hashable) -> list[Action]:
        if peer in DEVICE_PEERS:
            self.contending.discard(str(peer))
            return self.board.device_gone(peer, "gone")
        return self.board.controller_gone(peer)

    def check(self, actions: list[Action]) -> None:
        _check_actions(actions)
        _check_consistent(self.board)


def listed(board: Switchboard, peer: str) -> list[str]:
    if peer not in board.identities:
        board.admit(peer, PEER_IDENTITIES[peer])
    listing = board.controller_text(peer, json.dumps({"type": "device_info_request", "status": "ok"}))
    _check_actions(listing)
    (answer,) = sends(listing)
    return [d["id"] for d in answer["metadata"]["devices"]]


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(events, min_size=1, max_size=30))
def test_any_frames_in_any_order_yield_only_valid_actions(
    devices_first: bool, script: list[tuple[str, str, Any]]
) -> None:
    hub = SimulatedHub()
    if devices_first:  # start with alpha and beta connected, so that short scripts route batches too
        for peer in ("d1", "d2"):
            hub.step("register", peer, register_frame(PEER_IDENTITIES[peer].name, ours=peer == "d1"))
        assert set(hub.board.devices) == {"alpha", "beta"}
    for kind, peer, payload in script:
        hub.step(kind, peer, payload)
    board = hub.board

    # whatever happened, the device list can be asked for and names exactly who is connected (and may be used)
    assert listed(board, "c-last") == sorted(board.devices)
    assert listed(board, "c2") == [device_id for device_id in sorted(board.devices) if device_id == "alpha"]
    # and once every peer has gone, nothing is left behind
    for peer in [*CONTROLLER_PEERS, "c-last", *DEVICE_PEERS]:
        _check_actions(hub.gone(peer))
    assert board.devices == {} and board.device_by_peer == {} and board.identities == {}
    assert board.routes == {} and board.routes_by_controller == {} and not board.abandoned
    assert board.probe_answered("d3", alive=False) == (None, [])  # no registration is left waiting
