"""``aip.failure``: UFO's failure Result format, built in one place for controller and device (unit tests)."""

from __future__ import annotations

from aip.failure import describe, error_result, failure_cause
from aip.messages import Command, ResultStatus

COMMAND = Command(tool_name="click", parameters={"x": 1}, call_id="c1", namespace="ui")


class Timeout(Exception):
    kind = "TimeoutError"


def test_a_failure_reads_as_ufos_does() -> None:
    result = error_result(COMMAND, "TimeoutError: no result within 30.0s")
    prefix = f"Error occurred while executing command {COMMAND}: "
    assert result.status is ResultStatus.FAILURE
    assert result.error == prefix + "TimeoutError: no result within 30.0s"
    assert result.result == f"{result.error}, please retry or execute a different command."
    assert (result.call_id, result.namespace) == ("c1", "ui")


def test_the_cause_comes_back_out_without_the_command_it_quotes() -> None:
    result = error_result(COMMAND, RuntimeError("boom"))
    assert failure_cause(COMMAND, result) == "RuntimeError: boom"


def test_an_error_names_its_kind_when_it_has_one_and_is_never_empty() -> None:
    assert describe(Timeout("no result within 1s")) == "TimeoutError: no result within 1s"
    assert describe(ValueError()) == "ValueError: ValueError()"
