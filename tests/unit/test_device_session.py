"""The device's protocol rules, without a single socket.

``DeviceSession`` is a plain value: every rule of the device side of AIP is
checked here with plain calls, frames and events in, actions out. Peers (the
client's connections) are plain strings, and time is whatever number the
test says it is; ``tests/integration/test_hub.py`` and its neighbours check the asyncio
loop around it against a real hub.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from aip.backoff import Backoff
from aip.budget import Budget
from aip.connect import CredentialRefused, HubRefused, HubUnavailable
from aip.device_session import (
    FRAGMENT_CHARS,
    RECONNECT_BACKOFF,
    Batch,
    CancelBatch,
    DeviceReplaced,
    DeviceSession,
    GiveUp,
    InHand,
    Log,
    Reconnect,
    Refusal,
    StartBatch,
    Transmit,
    system_info,
)
from aip.messages import (
    UFO_BATCH_TIMEOUT,
    ClientMessage,
    ClientMessageType,
    CloseCode,
    Result,
    ResultStatus,
    RetryRule,
    ServerMessage,
    TaskStatus,
)
from aip.registration import DISPATCH_METADATA

CONN_1, CONN_2 = "connection-1", "connection-2"
OUR_TOOLS = [{"name": "echo", "server": "demo", "description": "echoes"}]
#: Deterministic delays: 1, 2, 4, then 8 for ever.
STEADY = Backoff(initial=0.5, maximum=8.0, jitter=0.0)  # 0.5 s after a drop, 1 s after a first failed dial
NOW = 1000.0


# -- helpers -------------------------------------------------------------------


def new_session(*, budget: Budget = Budget(), fragment_chars: int = FRAGMENT_CHARS) -> DeviceSession[str]:
    """The session of device ``alpha``, its frames stamped ``T0``, its delays ``STEADY``."""
    return DeviceSession("alpha", budget=budget, backoff=STEADY, fragment_chars=fragment_chars, clock=lambda: "T0")


def command_frame(response_id: str | None, actions: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    """A batch as the hub hands it to our device (``extra``: more fields)."""
    if actions is None:
        actions = [
            {"tool_name": "echo", "parameters": {"x": 1}, "tool_type": "action", "call_id": "c1"},
            {"tool_name": "echo", "parameters": {"x": 2}, "tool_type": "action", "call_id": "c2"},
        ]
    frame = {"type": "command", "status": "continue", "response_id": response_id, "session_id": "s1"}
    return json.dumps({**frame, "timeout": 30.0, "controller_id": "ctl#abc", "actions": actions, **extra})


def task_end(response_id: str, status: str, error: str | None = None) -> str:
    return json.dumps({"type": "task_end", "status": status, "response_id": response_id, "error": error})


def start(session: DeviceSession[str], response_id: str = "r1", peer: str = CONN_1, **extra: Any) -> Batch[str]:
    """``response_id`` arrives on ``peer`` and starts a batch run (which the test returns)."""
    actions = session.receive(peer, command_frame(response_id, **extra), now=NOW, latency=0.0)
    assert len(actions) == 1 and isinstance(actions[0], StartBatch), actions
    return actions[0].batch


def success(call_id: str, value: Any = "done") -> Result:
    return Result(status=ResultStatus.SUCCESS, result=value, call_id=call_id)


def sent(action: object) -> dict[str, Any]:
    """The JSON of a ``Transmit``, its fragments joined."""
    assert isinstance(action, Transmit), action
    parsed: dict[str, Any] = json.loads(action.text)
    return parsed


def closed(code: int | None, reason: str = "") -> ConnectionClosed:
    """How websockets reports a connection the hub closed with ``code`` (``None``: with no close frame)."""
    return ConnectionClosed(None if code is None else Close(code, reason), None)


# -- registration --------------------------------------------------------------


def test_register_names_the_device_its_machine_and_the_tools_it_announces() -> None:
    frame = ClientMessage.model_validate_json(new_session().register(OUR_TOOLS))
    assert frame.type is ClientMessageType.REGISTER and frame.status is TaskStatus.OK
    assert frame.client_id == "alpha" and frame.timestamp == "T0"
    assert frame.metadata is not None
    assert frame.metadata["system_info"] == system_info("alpha")
    assert frame.metadata["registration_time"] == "T0"
    assert frame.metadata[DISPATCH_METADATA] == {"tools": OUR_TOOLS}


def test_a_heartbeat_answer_accepts_the_registration() -> None:
    session = new_session()
    assert session.registration_answer(json.dumps({"type": "heartbeat", "status": "ok"})) is None
    assert session.registrations == 0  # counted once the client has done its part
    session.registered()
    assert session.registrations == 1


def test_an_error_answer_is_a_refusal_and_the_close_that_follows_says_which() -> None:
    refusal = new_session().registration_answer(json.dumps({"type": "error", "status": "error", "error": "no"}))
    assert refusal == Refusal("no")
    duplicate = refusal.failure(CloseCode.DUPLICATE)
    assert isinstance(duplicate, DeviceReplaced) and "refused the registration: no" in str(duplicate)
    for code in (CloseCode.POLICY, None):
        refused = refusal.failure(code)
        assert isinstance(refused, HubRefused) and not isinstance(refused, DeviceReplaced | CredentialRefused)
        assert "refused the registration: no" in str(refused)


@pytest.mark.parametrize(
    "answer",
    ["not json", b"", "[]", json.dumps({"type": "bogus", "status": "ok"}), json.dumps({"type": "heartbeat"})],
    ids=["not-json", "empty-binary", "json-array", "bad-type", "no-status"],
)
def test_a_garbled_answer_to_register_is_a_failure_worth_retrying(answer: str | bytes) -> None:
    with pytest.raises(HubUnavailable, match="answered register with a malformed frame") as raised:
        new_session().registration_answer(answer)
    assert not isinstance(raised.value, HubRefused)


def test_heartbeats_name_the_device() -> None:
    beat = ClientMessage.model_validate_json(new_session().heartbeat())
    assert beat.type is ClientMessageType.HEARTBEAT and beat.status is TaskStatus.OK
    assert beat.client_id == "alpha" and beat.timestamp == "T0"


# -- batches: starting ------------------------------------------------------------


def test_a_command_starts_a_batch_with_its_commands_its_controller_and_its_time() -> None:
    session = new_session()
    rule = {"attempts": 3, "initial_delay": 0.1, "max_delay": 1.0, "jitter": 0.0}
    batch = start(session, "r1", retry=rule)
    assert batch.response_id == "r1" and batch.peer == CONN_1
    assert [c.call_id for c in batch.commands] == ["c1", "c2"]
    assert batch.controller == "ctl#abc" and batch.session_id == "s1"
    assert batch.retry == RetryRule.model_validate(rule)
    assert batch.expires_at == NOW + Budget().on_device(30.0, 0.0)
    assert batch.orphaned is None and batch.cancelled is None
    assert session.batches == {"r1": batch} and session.runs == {batch}


def test_a_batch_gets_its_senders_wait_less_the_way_back() -> None:
    session = new_session()
    [action] = session.receive(CONN_1, command_frame("r1"), now=NOW, latency=0.5)
    assert isinstance(action, StartBatch) and action.batch.expires_at == NOW + 30.0 - 2 * 0.5
    [ufo] = session.receive(CONN_1, command_frame("r2", timeout=None), now=NOW, latency=0.5)
    assert isinstance(ufo, StartBatch) and ufo.batch.expires_at == NOW + UFO_BATCH_TIMEOUT - 2 * 0.5


def test_a_command_without_a_response_id_still_runs_under_an_id_of_its_own() -> None:
    session = new_session()
    [action] = session.receive(CONN_1, command_frame(None), now=NOW, latency=0.0)
    assert isinstance(action, StartBatch) and action.batch.response_id
    assert session.batches == {action.batch.response_id: action.batch}


def test_a_batch_delivered_again_while_it_runs_is_ignored() -> None:
    session = new_session()
    batch = start(session)
    assert session.receive(CONN_2, command_frame("r1"), now=NOW + 1, latency=0.0) == []
    assert session.batches == {"r1": batch} and session.runs == {batch}


def test_a_batch_delivered_again_after_it_was_orphaned_starts_a_new_run_beside_the_old() -> None:
    session = new_session()
    old = start(session, peer=CONN_1)
    session.lost(CONN_1)
    new = start(session, peer=CONN_2)
    assert new is not old and new.orphaned is None
    assert session.batches == {"r1": new} and session.runs == {old, new}
    session.finished(old)  # the old run finishing into memory does not forget the new one
    assert session.batches == {"r1": new} and session.runs == {new}
    session.finished(new)
    assert session.batches == {} and session.runs == set()


def test_a_finished_batch_delivered_again_runs_again() -> None:
    session = new_session()
    session.finished(start(session))
    again = start(session)  # the call memory, not the session, answers what already ran
    assert session.batches == {"r1": again}


def test_a_batch_beyond_the_runs_in_hand_is_answered_busy_not_run_until_one_finishes() -> None:
    session = DeviceSession("alpha", backoff=STEADY, clock=lambda: "T0", in_hand=InHand(batches=2))
    first, _ = start(session, "r1"), start(session, "r2")
    [answer] = session.receive(CONN_1, command_frame("r3"), now=NOW, latency=0.0)
    busy = sent(answer)
    assert busy["type"] == "error" and busy["prev_response_id"] == "r3", busy
    assert busy["metadata"] == {"reason": "device_busy"} and "not run" in busy["error"], busy
    assert set(session.batches) == {"r1", "r2"}
    session.finished(first)
    start(session, "r3")  # room again


def test_a_batch_beyond_the_characters_in_hand_is_answered_busy_and_finishing_gives_them_back() -> None:
    frame = command_frame("r1")
    session = DeviceSession("alpha", backoff=STEADY, clock=lambda: "T0", in_hand=InHand(chars=len(frame) + 10))
    first = start(session, "r1")
    assert session.chars_in_hand == len(frame)
    [answer] = session.receive(CONN_1, command_frame("r2"), now=NOW, latency=0.0)
    assert sent(answer)["metadata"] == {"reason": "device_busy"}
    session.finished(first)
    session.finished(first)  # twice: given back once
    assert session.chars_in_hand == 0
    start(session, "r2")


# -- batches: what the hub says about them ------------------------------------------


def test_task_end_failed_cancels_the_batch_once() -> None:
    session = new_session()
    batch = start(session)
    assert session.receive(CONN_1, task_end("r1", "failed", "nobody waits"), now=NOW, latency=0.0) == [
        CancelBatch(batch)
    ]
    assert batch.cancelled == "nobody waits"
    assert session.receive(CONN_1, task_end("r1", "failed", "again"), now=NOW, latency=0.0) == []
    assert batch.cancelled == "nobody waits"


def test_task_end_without_a_reason_still_says_why() -> None:
    session = new_session()
    batch = start(session)
    session.receive(CONN_1, task_end("r1", "failed"), now=NOW, latency=0.0)
    assert batch.cancelled == "the hub ended this batch"


def test_task_end_ok_orphans_the_batch_so_it_starts_nothing_more_and_lets_what_runs_finish() -> None:
    session = new_session()
    batch = start(session)
    assert session.receive(CONN_1, task_end("r1", "ok", "the controller left"), now=NOW, latency=0.0) == []
    assert batch.orphaned == "the controller left" and batch.cancelled is None
    session.receive(CONN_1, task_end("r1", "ok", "later news"), now=NOW, latency=0.0)
    assert batch.orphaned == "the controller left"  # the first reason is the one that counts


@pytest.mark.parametrize("status", ["ok", "failed"])
def test_task_end_for_a_batch_not_running_changes_nothing(status: str) -> None:
    session = new_session()
    batch = start(session)
    assert session.receive(CONN_1, task_end("other", status), now=NOW, latency=0.0) == []
    session.finished(batch)
    assert session.receive(CONN_1, task_end("r1", status), now=NOW, latency=0.0) == []
    assert batch.orphaned is None and batch.cancelled is None


def test_an_error_from_the_hub_is_logged() -> None:
    frame = json.dumps({"type": "error", "status": "error", "error": "unknown prev_response_id"})
    assert new_session().receive(CONN_1, frame, now=NOW, latency=0.0) == [
        Log(logging.WARNING, "device 'alpha': the hub reported: unknown prev_response_id")
    ]


@pytest.mark.parametrize("kind", ["heartbeat", "task", "device_info_request"])
def test_heartbeats_and_frames_a_ufo_server_may_add_need_nothing(kind: str) -> None:
    frame = json.dumps({"type": kind, "status": "ok", "response_id": "r1"})
    assert new_session().receive(CONN_1, frame, now=NOW, latency=0.0) == []


# -- frames the device cannot read -------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        json.dumps({"type": "command", "status": "bogus", "response_id": "r9"}),
        json.dumps({"type": "command", "response_id": "r9"}),
        json.dumps({"type": "command", "status": "ok", "response_id": "r9", "actions": [{"tool_name": 5}]}),
        json.dumps([{"type": "command", "response_id": "r9"}]),
        json.dumps({"type": "command", "status": "ok", "response_id": "r9"}).encode() + b"\xff",
        '{"response_id": "r9", "type": "command", "status": "ok", "actions": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["bad-status", "no-status", "bad-command", "json-array", "bad-utf8", "too-deep-to-parse"],
)
def test_a_frame_that_names_its_batch_is_answered_with_an_error_for_that_batch(frame: str | bytes) -> None:
    warning, answer = new_session().receive(CONN_1, frame, now=NOW, latency=0.0)
    assert isinstance(warning, Log) and warning.level == logging.WARNING
    assert warning.message.startswith("device 'alpha': a malformed frame from the hub: ")
    assert isinstance(answer, Transmit) and answer.peer == CONN_1
    error = ClientMessage.model_validate(sent(answer))
    assert error.type is ClientMessageType.ERROR and error.status is TaskStatus.ERROR
    assert error.prev_response_id == "r9" and error.client_id == "alpha" and error.timestamp == "T0"
    assert error.error is not None and error.error.startswith("malformed frame: ")


@pytest.mark.parametrize(
    "frame",
    ["not json", json.dumps({"type": "command", "response_id": 5}), json.dumps({"type": "command"}), b"\x00"],
    ids=["not-json", "int-response-id", "no-response-id", "binary"],
)
def test_a_frame_that_names_no_batch_is_only_logged(frame: str | bytes) -> None:
    [warning] = new_session().receive(CONN_1, frame, now=NOW, latency=0.0)
    assert isinstance(warning, Log) and "malformed frame" in warning.message


# -- connections and shutdown --------------------------------------------------------


def test_a_lost_connection_orphans_its_batches_and_only_those() -> None:
    session = new_session()
    first, second, elsewhere = start(session, "r1", CONN_1), start(session, "r2", CONN_1), start(session, "r3", CONN_2)
    session.lost(CONN_1)
    assert first.orphaned == second.orphaned == "the connection to the hub was lost"
    assert elsewhere.orphaned is None
    assert first.cancelled is None  # what runs finishes into memory


def test_shutting_down_cancels_every_run_orphaned_ones_too_once() -> None:
    session = new_session()
    running, orphaned = start(session, "r1", CONN_1), start(session, "r2", CONN_2)
    session.lost(CONN_2)
    actions = session.shutdown("the device is shutting down")
    assert len(actions) == 2 and set(actions) == {CancelBatch(running), CancelBatch(orphaned)}
    assert running.cancelled == orphaned.cancelled == "the device is shutting down"
    assert session.shutdown("again") == []


def test_shutting_down_with_no_batch_does_nothing() -> None:
    session = new_session()
    session.finished(start(session))
    assert session.shutdown("the device is shutting down") == []


# -- answers ----------------------------------------------------------------------


def test_a_batch_is_answered_with_command_results_on_the_connection_it_came_by() -> None:
    session = new_session()
    batch = start(session, peer=CONN_2)
    results = [success("c1", 0), success("c2", [])]
    answer = session.answer(batch, results)
    assert isinstance(answer, Transmit) and answer.peer == CONN_2 and len(answer.parts) == 1
    reply = ClientMessage.model_validate(sent(answer))
    assert reply.type is ClientMessageType.COMMAND_RESULTS and reply.status is TaskStatus.CONTINUE
    assert reply.prev_response_id == "r1" and reply.session_id == "s1" and reply.client_id == "alpha"
    assert reply.action_results == results and reply.request_id and reply.timestamp == "T0"


def test_an_orphaned_batch_is_not_answered_its_results_stay_in_memory() -> None:
    session = new_session()
    batch = start(session)
    session.lost(CONN_1)
    assert session.answer(batch, [success("c1"), success("c2")]) == Log(
        logging.INFO,
        "device 'alpha': batch r1 orphaned (the connection to the hub was lost); its results stay in memory",
    )


def test_a_cancelled_batch_is_answered_even_when_orphaned() -> None:
    session = new_session()
    batch = start(session)
    session.lost(CONN_1)
    session.shutdown("the device is shutting down")
    assert sent(session.answer(batch, [success("c1"), success("c2")]))["prev_response_id"] == "r1"


def circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def nested(depth: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


@pytest.mark.parametrize("unsendable", [object(), circular(), nested(100_000)], ids=["object", "circular", "too-deep"])
def test_a_result_json_cannot_carry_fails_that_command_and_the_others_stand(unsendable: object) -> None:
    session = new_session()
    batch = start(session)
    reply = ClientMessage.model_validate(sent(session.answer(batch, [success("c1"), success("c2", unsendable)])))
    assert reply.action_results is not None
    kept, failed = reply.action_results
    assert kept == success("c1")
    assert failed.status is ResultStatus.FAILURE and failed.call_id == "c2"
    assert "ProtocolError: the result could not be sent as JSON" in (failed.error or "")


def test_a_long_answer_goes_in_fragments_of_the_sessions_size() -> None:
    session = new_session(fragment_chars=1000)
    batch = start(session)
    shot = "A" * 5000
    answer = session.answer(batch, [success("c1", shot), success("c2")])
    assert isinstance(answer, Transmit) and len(answer.parts) > 5
    assert all(len(part) == 1000 for part in answer.parts[:-1]) and 0 < len(answer.parts[-1]) <= 1000
    assert ClientMessage.model_validate(sent(answer)).action_results == [success("c1", shot), success("c2")]


def test_the_error_for_an_unreadable_frame_is_fragmented_like_any_other_message() -> None:
    session = new_session(fragment_chars=10)
    _, answer = session.receive(CONN_1, json.dumps({"type": "command", "response_id": "r9"}), now=NOW, latency=0.0)
    assert isinstance(answer, Transmit) and len(answer.parts) > 1 and sent(answer)["prev_response_id"] == "r9"


# -- how a connection ends, and what then ---------------------------------------------


def test_a_close_with_revoked_means_the_credential_is_refused() -> None:
    error = new_session().closed(closed(CloseCode.REVOKED, "credential revoked"))
    assert isinstance(error, CredentialRefused)
    assert str(error) == "the hub revoked this device's credential (credential revoked)"


def test_a_close_with_replaced_means_another_connection_took_the_id() -> None:
    error = new_session().closed(closed(CloseCode.REPLACED, "replaced"))
    assert isinstance(error, DeviceReplaced) and "registered as 'alpha' and replaced this one" in str(error)


@pytest.mark.parametrize("code", [1011, CloseCode.POLICY, CloseCode.DUPLICATE, None])
def test_any_other_close_is_a_connection_worth_trying_again(code: int | None) -> None:
    ending = closed(code, "bye")
    error = new_session().closed(ending)
    assert type(error) is HubUnavailable and str(error) == f"the connection to the hub closed: {ending}"


def test_a_clean_end_is_a_connection_worth_trying_again() -> None:
    error = new_session().closed(None)
    assert type(error) is HubUnavailable and str(error) == "the hub closed the connection"


def invalid_frame() -> ValidationError:
    try:
        ServerMessage.model_validate_json("{}")
    except ValidationError as error:
        return error
    raise AssertionError("an empty object is not a ServerMessage")


@pytest.mark.parametrize(
    "error",
    [CredentialRefused("HTTP 401"), ValueError("a hub URL looks like ws://HOST:PORT")],
    ids=["credential-refused", "bad-url-or-token"],
)
def test_a_failure_no_retry_can_cure_gives_up(error: BaseException) -> None:
    assert new_session().attempt_ended(error) == [GiveUp(error)]


@pytest.mark.parametrize(
    "error",
    [HubUnavailable("down"), HubRefused("HTTP 403"), TimeoutError(), OSError("reset"), invalid_frame(), None],
    ids=["unavailable", "refused", "timeout", "os-error", "garbled-frame", "none"],
)
def test_any_other_failure_is_tried_again(error: BaseException | None) -> None:
    actions = new_session().attempt_ended(error)
    assert actions[-1] == Reconnect(1.0) and not any(isinstance(a, GiveUp) for a in actions)


def test_delays_double_up_to_the_cap_and_a_failure_is_logged_once_not_at_every_retry() -> None:
    session = new_session()
    down = HubUnavailable("cannot reach the hub")
    assert session.attempt_ended(down) == [
        Log(logging.WARNING, "device 'alpha': cannot reach the hub"),
        Reconnect(1.0),
    ]
    assert [session.attempt_ended(down) for _ in range(4)] == [
        [Reconnect(2.0)],
        [Reconnect(4.0)],
        [Reconnect(8.0)],
        [Reconnect(8.0)],
    ]
    assert session.attempt_ended(TimeoutError()) == [Log(logging.WARNING, "device 'alpha': "), Reconnect(8.0)]


def test_a_refusal_is_logged_as_an_error() -> None:
    [log, _] = new_session().attempt_ended(HubRefused("HTTP 403 Forbidden"))
    assert log == Log(logging.ERROR, "device 'alpha': HTTP 403 Forbidden")


def test_a_device_replaced_waits_the_longest_delay_at_once() -> None:
    # Two devices with one id would otherwise take it from each other for ever.
    assert new_session().attempt_ended(DeviceReplaced("taken")) == [
        Log(logging.ERROR, "device 'alpha': taken"),
        Reconnect(STEADY.maximum),
    ]


def test_after_a_registration_the_delays_start_again_from_the_first() -> None:
    session = new_session()
    for _ in range(3):
        session.attempt_ended(HubUnavailable("cannot reach the hub"))
    session.registered()
    dropped = HubUnavailable("the hub closed the connection")
    assert session.attempt_ended(dropped) == [
        Log(logging.WARNING, "device 'alpha': the hub closed the connection"),
        Reconnect(STEADY.initial),
    ]
    down = HubUnavailable("cannot reach the hub")
    assert session.attempt_ended(down) == [Log(logging.WARNING, "device 'alpha': cannot reach the hub"), Reconnect(1.0)]
    assert session.attempt_ended(down) == [Reconnect(2.0)]


def test_by_default_a_device_returns_half_a_second_after_a_drop_and_a_second_after_a_failed_dial() -> None:
    assert Backoff(initial=0.5, maximum=30.0, jitter=0.5) == RECONNECT_BACKOFF
    cold = DeviceSession("alpha")
    [_, first] = cold.attempt_ended(HubUnavailable("cannot reach the hub"))
    assert isinstance(first, Reconnect) and 0.5 <= first.delay <= 1.0
    cold.registered()
    [_, after_a_drop] = cold.attempt_ended(HubUnavailable("the hub closed the connection"))
    assert isinstance(after_a_drop, Reconnect) and 0.25 <= after_a_drop.delay <= 0.5
