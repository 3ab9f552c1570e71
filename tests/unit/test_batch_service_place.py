"""Which batch service a ``dispatch run`` may use, where its socket lives, and what the two ends say."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aip.messages import Command, Result, ResultStatus
from cli.batch_service import wire
from cli.batch_service.place import (
    SOCKET_DIRECTORY_LIMIT,
    ServicePlace,
    UnsafeDirectory,
    enabled,
    holds_lock,
    idle_seconds,
    place_key,
    runtime_directory,
    sweep,
)
from flows.hub_access import HubAccess
from tasks.report import CommandReport


def test_the_place_key_follows_the_environment_and_directory_but_not_a_shells_own_variables(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "API_KEY": "one"}
    key = place_key(base, tmp_path)

    assert place_key({**base, "PWD": "/elsewhere", "SHLVL": "3", "DISPATCH_SERVICE_IDLE": "5"}, tmp_path) == key
    assert place_key({**base, "API_KEY": "two"}, tmp_path) != key
    assert place_key(base, tmp_path / "sub") != key
    assert len(ServicePlace(tmp_path, key).socket.name) <= 30


def test_the_service_is_on_unless_turned_off() -> None:
    assert enabled({})
    assert enabled({"DISPATCH_SERVICE": "on"})
    assert not any(enabled({"DISPATCH_SERVICE": value}) for value in ("off", "0", "no", "FALSE", " Off "))


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf", "nan"])
def test_an_idle_period_that_is_not_a_positive_number_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="DISPATCH_SERVICE_IDLE must be a positive number of seconds"):
        idle_seconds({"DISPATCH_SERVICE_IDLE": value})
    assert idle_seconds({"DISPATCH_SERVICE_IDLE": "2.5"}) == 2.5
    assert idle_seconds({}) == 900.0


@pytest.fixture
def short() -> Iterator[Path]:
    """A directory with a path short enough for a socket's (pytest's own are too deep)."""
    path = Path(tempfile.mkdtemp(prefix="dispatch-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_runtime_directory_is_made_private(short: Path) -> None:
    path = runtime_directory({"XDG_RUNTIME_DIR": str(short)})

    assert path == short / "command-dispatcher"
    assert path.stat().st_mode & 0o777 == 0o700


def test_a_runtime_directory_others_can_reach_is_refused(short: Path) -> None:
    shared = short / "command-dispatcher"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeDirectory, match="not a directory of this user's alone"):
        runtime_directory({"XDG_RUNTIME_DIR": str(short)})


def test_a_symlink_in_place_of_the_runtime_directory_is_refused(short: Path) -> None:
    target = short / "target"
    target.mkdir(mode=0o700)
    (short / "command-dispatcher").symlink_to(target)
    with pytest.raises(UnsafeDirectory):
        runtime_directory({"XDG_RUNTIME_DIR": str(short)})


def test_a_runtime_directory_too_deep_for_a_socket_is_passed_over(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * SOCKET_DIRECTORY_LIMIT)
    assert runtime_directory({"XDG_RUNTIME_DIR": str(deep)}) == Path(f"/tmp/command-dispatcher-{os.getuid()}")


def test_messages_travel_as_one_json_line_each() -> None:
    command = Command(tool_name="echo", parameters={"value": [1, "two"]}, call_id="a")
    result = Result(status=ResultStatus.SUCCESS, result={"result": [1, "two"]}, call_id="a")
    report = CommandReport(call_id="a", attempts=2, seconds=0.5)
    line = wire.encode(
        "command_finished",
        commands=wire.commands_to_wire([command]),
        results=wire.results_to_wire([result]),
        report=wire.report_to_wire(report),
        access=wire.access_to_wire(HubAccess(hub="ws://127.0.0.1:1", token="secret")),
    )

    assert line.endswith(b"\n") and line.count(b"\n") == 1
    message = wire.decode(line)
    assert message["type"] == "command_finished"
    assert wire.commands_from_wire(message["commands"]) == [command]
    assert wire.results_from_wire(message["results"]) == [result]
    assert wire.report_from_wire(message["report"]) == report
    assert wire.report_from_wire(None) is None
    assert wire.access_from_wire(message["access"]) == HubAccess(hub="ws://127.0.0.1:1", token="secret")


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"kind": "run"}\n', b'{"type": 3}\n'])
def test_a_line_that_is_not_a_message_is_refused(line: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(line)


def test_hub_access_of_other_types_is_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.access_from_wire({"hub": 3})
    with pytest.raises(wire.WireError):
        wire.report_from_wire(["a"])


def test_a_sweep_removes_only_the_files_of_services_long_ended(tmp_path: Path) -> None:
    old = time.time() - 2 * 86400
    for key in ("ended", "held", "mine"):
        for suffix in (".lock", ".log"):
            (tmp_path / f"{key}{suffix}").touch()
            os.utime(tmp_path / f"{key}{suffix}", (old, old))
    (tmp_path / "recent.lock").touch()
    with open(tmp_path / "held.lock", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert holds_lock(tmp_path / "held.lock")
        assert not holds_lock(tmp_path / "ended.lock")

        sweep(tmp_path, keep="mine")

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "held.lock",
        "held.log",
        "mine.lock",
        "mine.log",
        "recent.lock",
    ]
