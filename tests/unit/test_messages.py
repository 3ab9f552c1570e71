"""The AIP wire models against real UFO frames, and our extensions to them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FIXTURES
from pydantic import ValidationError

from aip.messages import (
    ClientMessage,
    ClientMessageType,
    ClientType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)

VECTORS = FIXTURES / "ufo-aip-frames.jsonl"


def _frames() -> list[dict[str, Any]]:
    return [json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()]


FRAMES = _frames()
MODELS = {"client->server": ClientMessage, "server->client": ServerMessage}


def test_the_vector_file_holds_both_directions() -> None:
    directions = {frame["dir"] for frame in FRAMES}
    assert len(FRAMES) == 10
    assert directions == set(MODELS)


@pytest.mark.parametrize("frame", FRAMES, ids=[f"{i}-{json.loads(f['raw'])['type']}" for i, f in enumerate(FRAMES)])
def test_every_ufo_frame_round_trips(frame: dict[str, Any]) -> None:
    model = MODELS[frame["dir"]]
    message = model.model_validate_json(frame["raw"])
    assert json.loads(message.model_dump_json()) == json.loads(frame["raw"])


def _key_order(value: Any) -> Any:
    """Every object's keys in order, recursively: what UFO's field order looks like on the wire."""
    if isinstance(value, list):
        return [_key_order(item) for item in value]
    if isinstance(value, dict):
        return [(key, _key_order(item)) for key, item in value.items()]
    return None


@pytest.mark.parametrize("frame", FRAMES, ids=[f"{i}-{json.loads(f['raw'])['type']}" for i, f in enumerate(FRAMES)])
def test_every_ufo_frame_keeps_ufo_field_order(frame: dict[str, Any]) -> None:
    message = MODELS[frame["dir"]].model_validate_json(frame["raw"])
    assert _key_order(json.loads(message.model_dump_json())) == _key_order(json.loads(frame["raw"]))


def test_a_ufo_command_frame_parses_into_commands() -> None:
    raw = next(f["raw"] for f in FRAMES if json.loads(f["raw"])["type"] == "command")
    message = ServerMessage.model_validate_json(raw)
    assert message.type is ServerMessageType.COMMAND
    assert message.status is TaskStatus.CONTINUE
    assert message.actions is not None
    assert [c.tool_name for c in message.actions] == ["click_input", "get_desktop_app_info"]
    assert message.actions[0].call_id == "802c3b24-1fc7-46df-9d9a-bf67d12069c7"
    assert message.actions[0].namespace is None
    assert message.actions[0].timeout is None


def test_a_ufo_results_frame_parses_into_results() -> None:
    raw = next(f["raw"] for f in FRAMES if json.loads(f["raw"])["type"] == "command_results")
    message = ClientMessage.model_validate_json(raw)
    assert message.type is ClientMessageType.COMMAND_RESULTS
    assert message.client_type is ClientType.DEVICE
    assert message.action_results is not None
    assert all(r.status is ResultStatus.SUCCESS for r in message.action_results)
    assert [r.call_id for r in message.action_results] == [
        "802c3b24-1fc7-46df-9d9a-bf67d12069c7",
        "c81c27f7-5563-481c-8cc7-90c72ddc1f53",
    ]


def test_unknown_keys_are_ignored_and_optional_keys_may_be_missing() -> None:
    message = ClientMessage.model_validate({"type": "heartbeat", "status": "ok", "something_new": 1})
    assert message.type is ClientMessageType.HEARTBEAT
    dumped = json.loads(message.model_dump_json())
    assert "something_new" not in dumped
    # Every UFO field is serialised, unset ones as null.
    assert dumped["client_id"] is None
    assert dumped["client_type"] == "device"
    assert set(dumped) == set(ClientMessage.model_fields)


def test_command_extensions_are_omitted_when_unset() -> None:
    command = Command(tool_name="echo", parameters={"value": 1}, tool_type="action", call_id="c1")
    dumped = json.loads(command.model_dump_json())
    assert dumped == {"tool_name": "echo", "parameters": {"value": 1}, "tool_type": "action", "call_id": "c1"}
    assert "namespace" not in command.model_dump()
    assert "timeout" not in command.model_dump()


def test_command_extensions_are_omitted_when_explicitly_none() -> None:
    command = Command(tool_name="echo", namespace=None, timeout=None)
    dumped = json.loads(command.model_dump_json())
    assert "namespace" not in dumped
    assert "timeout" not in dumped
    # UFO's own fields stay, even when null.
    assert "call_id" in dumped
    assert dumped["call_id"] is None


def test_command_extensions_are_present_when_set() -> None:
    command = Command(tool_name="echo", call_id="c1", namespace="demo", timeout=2.5)
    dumped = json.loads(command.model_dump_json())
    assert dumped["namespace"] == "demo"
    assert dumped["timeout"] == 2.5
    assert Command.model_validate_json(command.model_dump_json()) == command


def test_only_the_set_extension_is_serialised() -> None:
    dumped = json.loads(Command(tool_name="echo", namespace="demo").model_dump_json())
    assert dumped["namespace"] == "demo"
    assert "timeout" not in dumped


def test_extensions_are_omitted_inside_a_server_message() -> None:
    message = ServerMessage(
        type=ServerMessageType.COMMAND,
        status=TaskStatus.CONTINUE,
        actions=[Command(tool_name="a", call_id="1"), Command(tool_name="b", call_id="2", timeout=3.0)],
    )
    actions = json.loads(message.model_dump_json())["actions"]
    assert "namespace" not in actions[0]
    assert "timeout" not in actions[0]
    assert actions[1]["timeout"] == 3.0
    assert "namespace" not in actions[1]


def test_result_namespace_is_a_ufo_field_and_always_serialised() -> None:
    dumped = json.loads(Result(status=ResultStatus.SUCCESS, result=0).model_dump_json())
    assert dumped == {"status": "success", "error": None, "result": 0, "namespace": None, "call_id": None}


def test_str_of_a_command_has_no_unset_extensions() -> None:
    text = str(Command(tool_name="echo", parameters={"value": 1}, tool_type="action", call_id="c1"))
    assert text == "tool_name='echo' parameters={'value': 1} tool_type='action' call_id='c1'"
    assert "namespace" not in text
    assert "timeout" not in text
    assert "namespace" not in repr(Command(tool_name="echo"))
    assert "timeout" not in repr(Command(tool_name="echo"))


def test_str_of_a_command_shows_set_extensions() -> None:
    text = str(Command(tool_name="echo", call_id="c1", namespace="demo", timeout=1.5))
    assert "namespace='demo'" in text
    assert "timeout=1.5" in text


@pytest.mark.parametrize("tool_type", ["", "action", "data_collection", "demo", "some server", "ÜNICODE"])
def test_tool_type_accepts_any_string(tool_type: str) -> None:
    command = Command.model_validate({"tool_name": "echo", "tool_type": tool_type})
    assert command.tool_type == tool_type
    assert json.loads(command.model_dump_json())["tool_type"] == tool_type


def test_command_timeout_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        Command(tool_name="echo", timeout=0)
    with pytest.raises(ValidationError):
        Command(tool_name="echo", timeout=-1)


def test_command_requires_a_tool_name() -> None:
    with pytest.raises(ValidationError):
        Command.model_validate({"tool_type": "action"})


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (ServerMessage, {"type": "commandz", "status": "continue"}),
        (ServerMessage, {"type": "command", "status": "running"}),
        (ServerMessage, {"type": "register", "status": "ok"}),  # a client-only type
        (ClientMessage, {"type": "command", "status": "ok"}),  # a server-only type
        (ClientMessage, {"type": "heartbeat", "status": "ok", "client_type": "robot"}),
        (ClientMessage, {"type": "heartbeat", "status": "OK"}),
        (Result, {"status": "succeeded"}),
    ],
)
def test_a_bad_enum_value_is_rejected(model: Any, data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(data)


def test_a_bad_enum_value_inside_a_frame_rejects_the_whole_frame() -> None:
    frame = {
        "type": "command_results",
        "status": "continue",
        "action_results": [{"status": "success", "call_id": "1"}, {"status": "maybe", "call_id": "2"}],
    }
    with pytest.raises(ValidationError):
        ClientMessage.model_validate(frame)


@pytest.mark.parametrize("missing", ["type", "status"])
def test_a_missing_required_field_is_rejected(missing: str) -> None:
    data = {"type": "heartbeat", "status": "ok"}
    del data[missing]
    with pytest.raises(ValidationError):
        ServerMessage.model_validate(data)
    with pytest.raises(ValidationError):
        ClientMessage.model_validate(data)


def test_enum_values_are_lowercase_strings() -> None:
    for enum in (ResultStatus, TaskStatus, ClientType, ClientMessageType, ServerMessageType):
        for member in enum:
            assert member.value == member.value.lower()
    assert {m.value for m in ClientMessageType} == {
        "task",
        "heartbeat",
        "command_results",
        "error",
        "register",
        "task_end",
        "device_info_request",
        "device_info_response",
    }
    assert {m.value for m in ServerMessageType} == {
        "task",
        "heartbeat",
        "task_end",
        "command",
        "error",
        "device_info_request",
        "device_info_response",
    }
