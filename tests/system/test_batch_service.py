"""``dispatch run`` through the batch service: the same Results and flow runs as in-process, one warm service reused.

Each test gives the service a runtime directory of its own (short: a
socket's path holds 107 bytes) and stops it at the end. The Ctrl-C cases
run both ways in ``test_interrupt.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import demo_server_spec
from process_support import batch_service_runtime

DISPATCH = Path(sys.executable).parent / "dispatch"
STARTING = "starting the batch service"
FLOW_RUN = re.compile(r"^flow run (\S+) ([0-9a-f-]{36})\b", re.MULTILINE)
#: Seconds any one `dispatch` gets: a loaded machine takes seconds to import Prefect.
WAIT = 120


@pytest.fixture
def runtime() -> Iterator[Path]:
    with batch_service_runtime() as path:
        yield path


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    """Explicit call_ids (so two runs' Results can be compared whole): two successes and a failure."""
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    path = tmp_path / "batch.json"
    commands = [
        {"tool_name": "echo", "parameters": {"value": {"nested": [1, "two"]}}, "call_id": "a"},
        {"tool_name": "add", "parameters": {"a": 2, "b": 3}, "call_id": "b"},
        {"tool_name": "fail", "parameters": {"message": "on purpose"}, "call_id": "c"},
    ]
    path.write_text(json.dumps({"config": "mcp.json", "commands": commands}))
    return path


def start(batch: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """``dispatch run BATCH --json``, running."""
    return subprocess.Popen(
        [str(DISPATCH), "run", str(batch), "--json"],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dispatch(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DISPATCH), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=WAIT)


def environment(api: str, runtime: Path | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISPATCH_")}
    env |= {"PREFECT_API_URL": api, **extra}
    return env | ({"DISPATCH_SERVICE": "off"} if runtime is None else {"XDG_RUNTIME_DIR": str(runtime)})


def flow_run(api: str, stderr: str) -> dict[str, Any]:
    """What the dashboard shows of the run a `dispatch run` printed: its flow, state, tags, task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    match = FLOW_RUN.search(stderr)
    assert match is not None, stderr
    run_id = uuid.UUID(match.group(2))
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        flow = client.read_flow(run.flow_id)
    assert run.state is not None
    return {
        "flow": flow.name,
        "state": run.state.type.value,
        "name_shape": re.sub(r"[0-9a-f]{8}$", "…", run.name),
        "tags": sorted(tag for tag in run.tags if not tag.startswith("batch:")),
        "parameters": sorted(run.parameters),
        "tasks": sorted((task.name.split("[")[0], task.state.type.value if task.state else None) for task in tasks),
    }


def alive(pid: int) -> bool:
    """Whether the process runs: not gone, nor a zombie (its parent, the first `dispatch run`, is gone too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_the_service_runs_a_batch_as_dispatch_does_in_process_and_stays_warm(
    tmp_path: Path, batch: Path, runtime: Path, prefect_api: str
) -> None:
    cold = dispatch("run", str(batch), "--json", env=environment(prefect_api, None), cwd=tmp_path)
    first = dispatch("run", str(batch), "--json", env=environment(prefect_api, runtime), cwd=tmp_path)
    second = dispatch("run", str(batch), "--json", env=environment(prefect_api, runtime), cwd=tmp_path)

    for done in (cold, first, second):
        assert done.returncode == 1, done.stderr  # the `fail` command
        assert "Traceback" not in done.stderr, done.stderr
    assert STARTING not in cold.stderr
    assert STARTING in first.stderr
    assert STARTING not in second.stderr, "the second run started another service"
    assert json.loads(first.stdout) == json.loads(cold.stdout) == json.loads(second.stdout)
    assert [result["status"] for result in json.loads(cold.stdout)] == ["success", "success", "failure"]
    assert (
        flow_run(prefect_api, first.stderr)
        == flow_run(prefect_api, cold.stderr)
        == flow_run(prefect_api, second.stderr)
    )
    lines = [re.sub(r"\d+\.\d\ds", "…s", line) for line in cold.stderr.splitlines() if re.match(r"\d/3 ", line)]
    assert lines == [
        re.sub(r"\d+\.\d\ds", "…s", line) for line in second.stderr.splitlines() if re.match(r"\d/3 ", line)
    ]
    assert second.stderr.rstrip().splitlines()[-1].startswith("to run again only the commands that did not succeed")

    status = dispatch("service", "status", env=environment(prefect_api, runtime), cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "0 flow runs running" in status.stdout and "(this directory and environment)" in status.stdout


def test_another_directory_or_environment_gets_its_own_service(
    tmp_path: Path, batch: Path, runtime: Path, prefect_api: str
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = dispatch("run", str(batch), "--json", env=environment(prefect_api, runtime), cwd=tmp_path)
    moved = dispatch("run", str(batch), "--json", env=environment(prefect_api, runtime), cwd=elsewhere)
    changed = dispatch(
        "run", str(batch), "--json", env=environment(prefect_api, runtime, TOOL_API_KEY="other"), cwd=tmp_path
    )

    assert all(STARTING in done.stderr for done in (here, moved, changed)), [here.stderr, moved.stderr, changed.stderr]
    assert json.loads(here.stdout) == json.loads(moved.stdout) == json.loads(changed.stdout)
    listed = dispatch("service", "status", env=environment(prefect_api, runtime), cwd=tmp_path)
    assert len(re.findall(r"^pid \d+:", listed.stdout, re.MULTILINE)) == 3, listed.stdout


def test_stop_ends_the_service(tmp_path: Path, batch: Path, runtime: Path, prefect_api: str) -> None:
    env = environment(prefect_api, runtime)
    dispatch("run", str(batch), "--json", env=env, cwd=tmp_path)
    listed = dispatch("service", "status", env=env, cwd=tmp_path)
    found = re.search(r"^pid (\d+):", listed.stdout, re.MULTILINE)
    assert found is not None, listed.stdout
    pid = int(found.group(1))

    stopped = dispatch("service", "stop", env=env, cwd=tmp_path)

    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the batch service (pid {pid})" in stopped.stdout
    assert not alive(pid), "the service still runs after `dispatch service stop` returned"
    after = dispatch("service", "status", env=env, cwd=tmp_path)
    assert after.returncode == 1 and "the next `dispatch run` starts one" in after.stdout
    assert not list((runtime / "command-dispatcher").glob("*.sock"))


def test_an_idle_service_stops_itself(tmp_path: Path, batch: Path, runtime: Path, prefect_api: str) -> None:
    env = environment(prefect_api, runtime, DISPATCH_SERVICE_IDLE="0.5")
    done = dispatch("run", str(batch), "--json", env=env, cwd=tmp_path)
    assert STARTING in done.stderr and "idle 0.5 s" in done.stderr, done.stderr

    deadline = time.monotonic() + WAIT
    while list((runtime / "command-dispatcher").glob("*.sock")):  # its exit has no event to wait on
        assert time.monotonic() < deadline, "the idle service did not stop"
        time.sleep(0.1)


def test_a_bad_idle_setting_is_a_usage_error(tmp_path: Path, batch: Path, runtime: Path, prefect_api: str) -> None:
    done = dispatch(
        "run", str(batch), env=environment(prefect_api, runtime, DISPATCH_SERVICE_IDLE="soon"), cwd=tmp_path
    )
    assert done.returncode == 2
    assert "DISPATCH_SERVICE_IDLE must be a positive number of seconds, not 'soon'" in done.stderr


def test_resume_through_the_service_reruns_only_what_did_not_succeed(
    tmp_path: Path, runtime: Path, prefect_api: str
) -> None:
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    counter, gate = tmp_path / "counter", tmp_path / "gate"
    commands = [
        {"tool_name": "count_to_file", "parameters": {"path": str(counter)}},
        {"tool_name": "file_gate", "parameters": {"path": str(gate)}},
    ]
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"config": "mcp.json", "commands": commands}))
    env = environment(prefect_api, runtime)
    failed = dispatch("run", str(batch), "--json", env=env, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    hint = re.search(r"dispatch resume (\S+)$", failed.stderr.rstrip())
    assert hint is not None, failed.stderr
    gate.write_text("open")

    resumed = dispatch("resume", hint.group(1), "--json", env=env, cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert STARTING not in resumed.stderr
    first, second = json.loads(resumed.stdout)
    assert first == json.loads(failed.stdout)[0]  # reused, not run again
    assert second["status"] == "success" and second["result"] == {"result": "open"}
    assert counter.read_text() == "ran\n"


def test_batches_sent_at_once_run_side_by_side_in_one_service(
    tmp_path: Path, batch: Path, runtime: Path, prefect_api: str
) -> None:
    env = environment(prefect_api, runtime)
    dispatch("run", str(batch), "--json", env=env, cwd=tmp_path)  # warm
    runs = [start(batch, env, tmp_path) for _ in range(3)]
    outputs = [run.communicate(timeout=WAIT) for run in runs]

    assert [run.returncode for run in runs] == [1, 1, 1], [stderr for _, stderr in outputs]
    assert all(STARTING not in stderr for _, stderr in outputs)
    assert len({json.dumps(json.loads(stdout)) for stdout, _ in outputs}) == 1
    run_ids = {FLOW_RUN.search(stderr).group(2) for _, stderr in outputs}  # type: ignore[union-attr]
    assert len(run_ids) == 3


def test_a_service_killed_mid_batch_leaves_every_command_a_result_and_the_next_run_a_new_service(
    tmp_path: Path, runtime: Path, prefect_api: str
) -> None:
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"demo": demo_server_spec()}}))
    batch = tmp_path / "batch.json"
    commands = [
        {"tool_name": "echo", "parameters": {"value": 1}, "call_id": "first"},
        {"tool_name": "sleep", "parameters": {"seconds": 60}, "call_id": "held"},
        {"tool_name": "echo", "parameters": {"value": 3}, "call_id": "never"},
    ]
    batch.write_text(json.dumps({"config": "mcp.json", "commands": commands}))
    env = environment(prefect_api, runtime)
    run = start(batch, env, tmp_path)
    try:
        assert run.stderr is not None
        lines = []
        for line in run.stderr:  # the first command's line: the batch runs in the service
            lines.append(line)
            if line.startswith("1/3 echo[first] success"):
                break
        else:
            raise AssertionError("".join(lines))
        listed = dispatch("service", "status", env=env, cwd=tmp_path)
        found = re.search(r"^pid (\d+): 1 flow run running", listed.stdout, re.MULTILINE)
        assert found is not None, listed.stdout
        os.kill(int(found.group(1)), signal.SIGKILL)
        stdout, rest = run.communicate(timeout=WAIT)
    finally:
        run.kill()
    stderr = "".join(lines) + rest

    assert run.returncode == 1, stderr
    results = json.loads(stdout)
    assert [result["call_id"] for result in results] == ["first", "held", "never"]
    assert results[0]["status"] == "success"
    assert all(result["status"] == "failure" and "ServiceLost" in result["error"] for result in results[1:])
    assert "error: the batch service" in stderr and "Traceback" not in stderr, stderr

    # The next run, from the same folder and environment (so the same service's place): its first command alone,
    # not the held one cut short by a deadline (a second of deadline includes the MCP server's start: too little
    # on a loaded machine).
    next_batch = tmp_path / "next.json"
    next_batch.write_text(json.dumps({"config": "mcp.json", "commands": commands[:1]}))
    again = dispatch("run", str(next_batch), "--json", env=env, cwd=tmp_path)
    assert STARTING in again.stderr and "Traceback" not in again.stderr, again.stderr
    assert [result["status"] for result in json.loads(again.stdout)] == ["success"], again.stdout
