"""``RunSettings`` (how a batch runs, merged once) and call_id assignment (unit tests, no I/O)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from aip.messages import Command
from dispatchers import DEFAULT_TIMEOUT, BatchPolicy, DuplicateCallIds, ExecutionMode, RetryPolicy
from dispatchers.base import assign_call_ids, check_unique_call_ids
from flows.batch_file import BatchFile
from flows.run_settings import RunSettings

ADD = Command(tool_name="add", parameters={"a": 1, "b": 2})


def test_the_defaults_are_one_value_with_ufos_timeout() -> None:
    settings = RunSettings.resolve()
    assert settings == RunSettings(
        timeout=DEFAULT_TIMEOUT, mode=ExecutionMode.SEQUENTIAL, stop_on_failure=False, retries=2, max_concurrency=8
    )
    assert RunSettings.default("retries") == 2 and RunSettings.default("timeout") == DEFAULT_TIMEOUT


def test_given_beats_the_batch_file_which_beats_the_default() -> None:
    batch = BatchFile(commands=[ADD], timeout=30, mode=ExecutionMode.PARALLEL, retries=0)
    settings = RunSettings.resolve(batch, timeout=5, mode=None, max_concurrency=None)
    assert settings.timeout == 5  # given
    assert settings.mode is ExecutionMode.PARALLEL and settings.retries == 0  # the batch file's
    assert settings.max_concurrency == 8 and settings.stop_on_failure is False  # defaults


def test_a_false_or_zero_given_is_a_value_not_a_gap() -> None:
    batch = BatchFile(commands=[ADD], stop_on_failure=True, retries=3)
    settings = RunSettings.resolve(batch, stop_on_failure=False, retries=0)
    assert settings.stop_on_failure is False and settings.retries == 0


@pytest.mark.parametrize(
    "given",
    [
        {"timeout": 0},
        {"timeout": float("inf")},
        {"timeout": -1},
        {"retries": -1},
        {"max_concurrency": 0},
        {"mode": "x"},
    ],
)
def test_a_setting_that_cannot_be_meant_is_refused(given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RunSettings.resolve(**given)


def test_an_unknown_setting_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not run settings: timout"):
        RunSettings.resolve(timout=3)


def test_the_policies_derive_from_the_settings() -> None:
    settings = RunSettings(mode=ExecutionMode.PARALLEL, stop_on_failure=True, retries=4, max_concurrency=3)
    assert settings.batch_policy == BatchPolicy(ExecutionMode.PARALLEL, stop_on_failure=True, max_concurrency=3)
    assert settings.retry_policy == RetryPolicy(attempts=5)


def test_settings_are_frozen_and_travel_as_flow_parameters() -> None:
    settings = RunSettings(timeout=12.5, mode=ExecutionMode.PARALLEL)
    with pytest.raises(ValidationError):
        settings.retries = 9  # type: ignore[misc]
    assert RunSettings.model_validate_json(settings.model_dump_json()) == settings


# --- call_ids --------------------------------------------------------------------------------------------------


def test_a_call_id_given_is_kept_and_a_missing_one_is_filled_at_random() -> None:
    own = ADD.model_copy(update={"call_id": "mine"})
    first, second = assign_call_ids([own, ADD]), assign_call_ids([own, ADD])
    assert first[0] is own and second[0] is own
    assert uuid.UUID(first[1].call_id or "") and first[1].call_id != second[1].call_id
    assert ADD.call_id is None  # the caller's command is not changed


def test_call_ids_derived_from_a_namespace_repeat_within_it_and_differ_across() -> None:
    run = [ADD, ADD]
    again, other = assign_call_ids(run, "run-1"), assign_call_ids(run, "run-2")
    assert [c.call_id for c in assign_call_ids(run, "run-1")] == [c.call_id for c in again]
    assert again[0].call_id != again[1].call_id  # each place in the batch its own
    assert {c.call_id for c in again}.isdisjoint({c.call_id for c in other})


def test_repeated_call_ids_are_named_once_each() -> None:
    commands = [ADD.model_copy(update={"call_id": name}) for name in ["b", "a", "b", "c", "a", "b"]] + [ADD]
    with pytest.raises(DuplicateCallIds, match=r"call_ids must be unique within a batch; repeated: a, b$"):
        check_unique_call_ids(commands)
    check_unique_call_ids([ADD, ADD])  # missing call_ids are no repeat: each gets its own
