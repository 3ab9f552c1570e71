"""The ``dispatch`` CLI as a user runs it: a subprocess, real servers, a real Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, demo_server_spec


def dispatch(*args: str | Path, api: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if api is not None:
        env["PREFECT_API_URL"] = api
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    return path


def write_batch(tmp_path: Path, batch: Any, name: str = "batch.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(batch) if name.endswith(".json") else batch)
    return path


def test_run_json_prints_exactly_the_results_and_exits_0(tmp_path: Path, config_file: Path, prefect_api: str) -> None:
    batch = write_batch(
        tmp_path,
        [
            {"tool_name": "echo", "parameters": {"value": ""}, "call_id": "x"},
            {"tool_name": "add", "parameters": {"a": 1, "b": 1}},
        ],
    )

    done = dispatch("run", batch, "--config", config_file, "--json", api=prefect_api)

    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["status"] for r in results] == ["success", "success"]
    assert results[0] == {
        "status": "success",
        "error": None,
        "result": {"result": ""},
        "namespace": "demo",
        "call_id": "x",
    }
    assert results[1]["result"] == {"result": 2.0} and results[1]["call_id"]


def test_run_exits_1_when_a_command_fails_and_skips_the_rest_on_request(
    tmp_path: Path, config_file: Path, prefect_api: str
) -> None:
    batch = write_batch(
        tmp_path,
        "commands:\n  - {tool_name: fail, call_id: one}\n  - {tool_name: echo, parameters: {value: 1}, call_id: two}\n",
        name="batch.yaml",
    )

    done = dispatch("run", batch, "--config", config_file, "--json", "--stop-on-failure", api=prefect_api)

    assert done.returncode == 1, done.stderr
    results = json.loads(done.stdout)
    assert [(r["call_id"], r["status"]) for r in results] == [("one", "failure"), ("two", "skipped")]


def test_run_reads_options_and_config_from_the_batch_file(tmp_path: Path, config_file: Path, prefect_api: str) -> None:
    batch = write_batch(
        tmp_path,
        {
            "config": "mcp.json",
            "timeout": 8,
            "mode": "parallel",
            "commands": [
                {"tool_name": "sleep", "parameters": {"seconds": 20}, "call_id": "slow"},
                {"tool_name": "echo", "parameters": {"value": 0}, "call_id": "fast"},
            ],
        },
    )

    done = dispatch("run", batch, "--json", api=prefect_api, cwd=tmp_path.parent)

    assert done.returncode == 1, done.stderr
    slow, fast = json.loads(done.stdout)
    assert slow["error"].endswith("TimeoutError: no result within 8.0s")
    assert fast["status"] == "success" and fast["result"] == {"result": 0}


def test_the_human_output_is_a_table_on_stdout(tmp_path: Path, config_file: Path, prefect_api: str) -> None:
    batch = write_batch(tmp_path, [{"tool_name": "text", "parameters": {"message": "hello table"}}])

    done = dispatch("run", batch, "--config", config_file, api=prefect_api)

    assert done.returncode == 0, done.stderr
    assert "hello table" in done.stdout and "success" in done.stdout


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        ('[{"tool_name": ', "batch.json", "batch.json: line 1 column"),
        ('[{"parameters": {}}]', "batch.json", "commands.0.tool_name: Field required"),
        ("commands: []", "batch.yaml", "commands: List should have at least 1 item"),
        ('{"commands": [{"tool_name": "x"}], "mode": "sideways"}', "batch.json", "mode:"),
        ("commands: [tool_name: x", "batch.yaml", "batch.yaml: line"),
        (
            '[{"tool_name": "a", "call_id": "x"}, {"tool_name": "b", "call_id": "x"}]',
            "batch.json",
            "call_ids must be unique within a batch; repeated: x",
        ),
    ],
)
def test_a_bad_batch_file_exits_2_with_one_clear_line(
    tmp_path: Path, config_file: Path, content: str, name: str, expected: str
) -> None:
    batch = tmp_path / name
    batch.write_text(content)

    done = dispatch("run", batch, "--config", config_file)

    assert done.returncode == 2
    assert expected in done.stderr
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_bad_config_or_missing_file_exits_2(tmp_path: Path) -> None:
    batch = write_batch(tmp_path, [{"tool_name": "echo"}])
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"mcpServers": {"x": {"args": []}}}))

    missing_batch = dispatch("run", tmp_path / "nope.yaml", "--config", bad_config)
    bad = dispatch("run", batch, "--config", bad_config)
    no_config = dispatch("run", batch, cwd=tmp_path)

    assert missing_batch.returncode == 2 and "nope.yaml: no such file" in missing_batch.stderr
    assert bad.returncode == 2 and 'mcpServers.x: needs "command"' in bad.stderr
    assert no_config.returncode == 2 and "no MCP config" in no_config.stderr


def test_bad_usage_exits_2(tmp_path: Path, config_file: Path) -> None:
    batch = write_batch(tmp_path, [{"tool_name": "echo"}])

    done = dispatch("run", batch, "--config", config_file, "--mode", "sideways")

    assert done.returncode == 2
    assert "sideways" in done.stderr


def test_tools_lists_servers_tools_and_schemas(tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": demo_server_spec(),
                    "time": {"command": sys.executable, "args": ["-m", "mcp_server_time"]},
                }
            }
        )
    )

    done = dispatch("tools", "--config", config, "--json")

    assert done.returncode == 0, done.stderr
    servers = {server["server"]: server for server in json.loads(done.stdout)}
    demo_tools = {tool["name"]: tool for tool in servers["demo"]["tools"]}
    assert demo_tools["add"]["input_schema"]["required"] == ["a", "b"]
    assert {tool["name"] for tool in servers["time"]["tools"]} == {"get_current_time", "convert_time"}


def test_tools_exits_1_and_says_why_when_a_server_is_down(tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": demo_server_spec(),
                    "broken": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('missing API key')"]},
                }
            }
        )
    )

    done = dispatch("tools", "--config", config)

    assert done.returncode == 1
    assert "missing API key" in done.stdout
    assert "echo" in done.stdout
