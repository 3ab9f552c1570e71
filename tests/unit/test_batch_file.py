"""Reading batch files: typos are refused with their fix, tool_types are checked against the config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from aip.messages import Command
from dispatchers.errors import validation_message
from flows.batch_file import BatchFile, BatchFileError, check_tool_types, load_batch

pytestmark = pytest.mark.timeout(60)


def write(tmp_path: Path, data: Any, name: str = "batch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(BatchFileError) as caught:
        load_batch(path)
    return str(caught.value)


# --- unknown keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["batch.yaml", "batch.json"])
def test_a_misspelt_command_key_is_refused_with_its_fix(tmp_path: Path, name: str) -> None:
    """``paramters:`` used to be dropped, and the call then failed for want of 'a'."""
    commands = [{"tool_name": "add", "parameters": {"a": 1, "b": 2}}, {"tool_name": "add", "paramters": {"a": 1}}]
    path = write(tmp_path, {"commands": commands}, name)

    assert refusal(path) == f"{path}: commands.1.paramters: unknown key (did you mean 'parameters'?)"


def test_a_batch_file_that_is_a_bare_list_is_checked_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, [{"tool_name": "add", "tool_typ": "action"}])
    assert refusal(path) == f"{path}: commands.0.tool_typ: unknown key (did you mean 'tool_type'?)"


def test_a_misspelt_top_level_key_is_refused_with_its_fix(tmp_path: Path) -> None:
    path = write(tmp_path, {"timout": 3, "commands": [{"tool_name": "add"}]})
    assert refusal(path) == f"{path}: timout: unknown key (did you mean 'timeout'?)"


def test_a_misspelt_key_of_the_agent_context_is_refused_with_its_fix(tmp_path: Path) -> None:
    path = write(tmp_path, {"agent_context": {"agent_nam": "HostAgent"}, "commands": [{"tool_name": "add"}]})
    assert refusal(path) == f"{path}: agent_context.agent_nam: unknown key (did you mean 'agent_name'?)"


def test_an_unknown_key_like_no_field_lists_the_keys(tmp_path: Path) -> None:
    path = write(tmp_path, [{"tool_name": "add", "zzzz": 1}])
    assert refusal(path) == (
        f"{path}: commands.0.zzzz: unknown key; "
        "known keys: call_id, namespace, parameters, timeout, tool_name, tool_type"
    )


def test_other_problems_read_as_before(tmp_path: Path) -> None:
    path = write(tmp_path, [{"tool_name": "add"}, {"parameters": {}}])
    assert refusal(path) == f"{path}: commands.1.tool_name: Field required"


def test_without_the_model_an_unknown_key_has_no_suggestion() -> None:
    with pytest.raises(ValidationError) as caught:
        BatchFile.model_validate({"timout": 3, "commands": [{"tool_name": "add"}]})
    assert validation_message(caught.value) == "timout: unknown key"
    assert validation_message(caught.value, BatchFile) == "timout: unknown key (did you mean 'timeout'?)"


def test_the_commands_are_plain_commands_and_the_wire_model_stays_lenient(tmp_path: Path) -> None:
    """Strict in a file a person wrote; a peer's frame with keys we don't know still parses."""
    path = write(tmp_path, [{"tool_name": "add", "parameters": {"a": 1}, "call_id": "c1"}])
    batch = load_batch(path)
    given = Command(tool_name="add", parameters={"a": 1}, call_id="c1")

    assert [type(command) for command in batch.commands] == [Command]
    assert batch.commands == [given]
    assert BatchFile(commands=[given]).commands == [given]
    assert Command.model_validate({"tool_name": "add", "paramters": {}}).parameters == {}


# --- tool_type against the config ----------------------------------------------------------------------------


def test_a_tool_type_neither_a_category_nor_a_server_is_refused_naming_where(tmp_path: Path) -> None:
    commands = [
        {"tool_name": "add"},
        {"tool_name": "add", "tool_type": "action"},
        {"tool_name": "add", "tool_type": "dmeo"},
    ]
    batch = load_batch(write(tmp_path, commands))

    with pytest.raises(BatchFileError) as caught:
        check_tool_types(batch, ["demo", "time"])

    assert str(caught.value) == (
        f"{tmp_path / 'batch.yaml'}: commands.2.tool_type: 'dmeo' is neither action, data_collection "
        "nor a server of the config (did you mean 'demo'?); servers: demo, time"
    )


def test_the_first_bad_tool_type_is_the_one_named(tmp_path: Path) -> None:
    batch = load_batch(write(tmp_path, [{"tool_name": "a", "tool_type": "x"}, {"tool_name": "b", "tool_type": "y"}]))
    with pytest.raises(BatchFileError, match=r"commands\.0\.tool_type: 'x' is neither"):
        check_tool_types(batch, iter(["demo"]))


def test_a_batch_built_in_code_is_refused_without_a_file_name() -> None:
    batch = BatchFile(commands=[Command(tool_name="add", tool_type="nosuch")])
    with pytest.raises(BatchFileError) as caught:
        check_tool_types(batch, [])
    assert str(caught.value).startswith("commands.0.tool_type: 'nosuch' is neither")
