"""What a newcomer sees at the edges of ``dispatch``: usage errors, contradictions, what a run prints.

``dispatch`` runs as a subprocess; the table and the progress lines themselves
are rendered in-process in ``tests/unit/test_batch_display.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, demo_server_spec


def dispatch(*args: str | Path, api: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user types it; stderr is a pipe (not a terminal)."""
    env = {**os.environ, "COLUMNS": "80"}
    if api is not None:
        env["PREFECT_API_URL"] = api
    script = Path(sys.executable).parent / "dispatch"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with an mcp.json (the demo server) and a one-command batch beside it."""
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    (tmp_path / "batch.yaml").write_text(
        "config: mcp.json\ncommands:\n  - {tool_name: add, parameters: {a: 1, b: 2}}\n"
    )
    return tmp_path


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()  # one line, however long: stderr is not a terminal
    assert line.startswith("error: "), line
    return line


# -- usage ----------------------------------------------------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    done = dispatch("--version")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"dispatch \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout


def test_a_usage_error_is_one_lowercase_error_line_with_where_to_look() -> None:
    line = one_error_line(dispatch("tools", "--bogus"))
    assert line == "error: No such option: --bogus (see `dispatch tools --help`)"


def test_help_shows_flags_bare_and_the_defaults_of_run_options() -> None:
    done = dispatch("run", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "<bool>" not in text
    assert "--stop-on-failure / --keep-going" in text
    assert "(default: the batch file's, else 6000)" in text  # --timeout
    assert "(default: the batch file's, else sequential)" in text  # --mode
    assert "(default: the batch file's, else 2)" in text  # --retries


def test_an_unknown_key_in_a_command_is_refused_with_a_did_you_mean(project: Path) -> None:
    (project / "typo.yaml").write_text("config: mcp.json\ncommands:\n  - {tool_name: add, paramters: {a: 1, b: 2}}\n")
    line = one_error_line(dispatch("run", "typo.yaml", cwd=project))
    assert line == "error: typo.yaml: commands.0.paramters: unknown key (did you mean 'parameters'?)"


def test_an_unknown_tool_type_is_refused_before_anything_runs(project: Path) -> None:
    (project / "type.yaml").write_text("config: mcp.json\ncommands:\n  - {tool_name: add, tool_type: dem}\n")
    line = one_error_line(dispatch("run", "type.yaml", cwd=project))
    assert "commands.0.tool_type: 'dem' is neither action, data_collection nor a server" in line
    assert "did you mean 'demo'?" in line


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--hub", "ws://127.0.0.1:9"], "error: --hub is for --device: without it the batch runs here"),
        (
            ["--token-file", "t", "--cafile", "c"],
            "error: --token-file and --cafile are for --device: without it the batch runs here",
        ),
        (
            ["--device", "pc", "--hub", "ws://127.0.0.1:9", "--config", "mcp.json"],
            "error: --config is for a local run: a device runs commands on the MCP servers of its own config",
        ),
    ],
    ids=["hub-without-device", "credentials-without-device", "config-with-device"],
)
def test_contradictory_options_are_refused(project: Path, options: list[str], expected: str) -> None:
    assert one_error_line(dispatch("run", "batch.yaml", *options, cwd=project)) == expected


def test_the_hub_from_the_environment_is_no_contradiction(project: Path, prefect_api: str) -> None:
    env_hub = {**os.environ, "DISPATCH_HUB": "ws://127.0.0.1:9", "PREFECT_API_URL": prefect_api}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dispatch"), "run", "batch.yaml", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project,
        env=env_hub,
    )
    assert done.returncode == 0, done.stderr
    assert [result["status"] for result in json.loads(done.stdout)] == ["success"]


def test_ineffective_options_are_warned_about_once_and_the_run_goes_on(project: Path, prefect_api: str) -> None:
    done = dispatch(
        "run", "batch.yaml", "--mode", "parallel", "--stop-on-failure", "--json", cwd=project, api=prefect_api
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --stop-on-failure does nothing here: in parallel mode every command has started by the time "
        "one fails (max concurrency 8, 1 command)"
    ]
    done = dispatch("run", "batch.yaml", "--max-concurrency", "3", "--json", cwd=project, api=prefect_api)
    assert "warning: --max-concurrency does nothing in sequential mode (add --mode parallel)" in done.stderr


# -- what a run prints ----------------------------------------------------------------------------------------------


def test_a_run_prints_its_flow_run_and_dashboard_then_a_line_per_command_and_how_to_resume(
    project: Path, prefect_api: str
) -> None:
    (project / "mixed.yaml").write_text(
        "config: mcp.json\ncommands:\n"
        "  - {tool_name: add, parameters: {a: 1, b: 2}, call_id: first}\n"
        "  - {tool_name: fail, parameters: {message: 'broken [bold]on[/] purpose'}, call_id: second}\n"
    )
    done = dispatch("run", "mixed.yaml", cwd=project, api=prefect_api)

    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    started = next(line for line in lines if line.startswith("flow run "))
    match = re.fullmatch(r"flow run batch-2-commands-(\w{8}) ([0-9a-f-]{36}) · (\S+)", started)
    assert match is not None, started
    prefix, run_id, link = match.groups()
    assert run_id.startswith(prefix)
    assert link == f"{prefect_api.removesuffix('/api')}/runs/flow-run/{run_id}"
    assert re.search(r"^1/2 add\[first\] success \d+\.\d\ds$", done.stderr, re.MULTILINE), done.stderr
    assert "2/2 fail[second] failure " in done.stderr
    assert "ToolError: Error executing tool fail: broken [bold]on[/] purpose" in done.stderr  # the cause, literally
    assert lines[-1] == f"to run again only the commands that did not succeed: dispatch resume {run_id}"
    assert "Finished in state" not in done.stderr and "NoneType" not in done.stderr  # Prefect's lines stay in the API
    # stdout: the table alone, with the cause, not UFO's prefix
    assert "Error occurred while executing command" not in done.stdout
    assert "ToolError: Error executing tool fail: broken [bold]on[/] purpose" in " ".join(done.stdout.split())


def test_resume_refuses_an_id_that_is_not_a_uuid_at_once() -> None:
    line = one_error_line(dispatch("resume", "not-a-run"))
    assert line == "error: 'not-a-run' is not a flow run id (a UUID, as `dispatch run` prints it)"


def test_a_prefect_api_that_does_not_answer_fails_the_run_at_once(project: Path) -> None:
    done = dispatch("run", "batch.yaml", cwd=project, api="http://127.0.0.1:9/api")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "error: the Prefect API at http://127.0.0.1:9/api does not answer (ConnectError)" in done.stderr
