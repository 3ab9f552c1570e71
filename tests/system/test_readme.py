"""The README's snippets run as pasted.

Every fenced block of README.md is accounted for here: each ```python block
runs as it is (a subprocess with this interpreter, from the repository root);
each command line of a ```bash block is either run (``RUN``, with what its
output must show) or listed in ``NOT_RUN`` with the reason; each other block
(the batch file, mcp.json and Result examples) has a check of its own
(``CHECKED``). A README block or line that is none of these fails
``test_every_snippet_is_accounted_for``, and so does an entry here that the
README no longer has.

Subprocesses use the session's Prefect API (``prefect_api``) rather than
starting a temporary one each, and get the venv's ``bin`` on ``PATH`` (so
``dispatch`` is the one installed here) and none of the caller's
``DISPATCH_*`` settings.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"

#: Seconds any one snippet may take (they take 0.3-5 s).
SNIPPET_TIMEOUT = 60


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    blocks = []
    lines = README.read_text(encoding="utf-8").splitlines()
    opened: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        fence = re.fullmatch(r"\s*```(\S*)\s*", line)
        if fence is None:
            if opened is not None:
                body.append(line)
        elif opened is None:
            opened, body = (fence.group(1), number), []
        else:
            blocks.append(Block(opened[0], "\n".join(body) + "\n", opened[1]))
            opened = None
    assert opened is None, f"README.md:{opened[1]}: a fenced block is never closed"
    return blocks


BLOCKS = readme_blocks()


def command_of(line: str) -> str:
    """A shell line without its trailing comment, whitespace squeezed: how RUN and NOT_RUN name it."""
    return " ".join(re.sub(r"\s+#\s.*$", "", line).split())


def shell_lines(block: Block) -> list[str]:
    """The lines of a bash block that are commands (not blank, not only a comment), as written."""
    return [line for line in block.code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def snippet_env(prefect_api: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if (not name.startswith("DISPATCH_") or name == "DISPATCH_SERVICE") and name != "PREFECT_API_AUTH_STRING"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_API_URL"] = prefect_api
    return env


def run_shell(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT
    )


def explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def the_block(language: str, starts_with: str) -> Block:
    found = [block for block in BLOCKS if block.language == language and block.code.startswith(starts_with)]
    assert len(found) == 1, f"README.md should have one {language} block starting {starts_with!r}, has {len(found)}"
    return found[0]


# -- what each run bash line must show ------------------------------------------


def succeeded(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert done.returncode == 0, explain(done)


def results_json(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """`--json`: exactly a JSON array of Results on stdout, the first being the README's Result example."""
    assert done.returncode == 0, explain(done)
    results = json.loads(done.stdout)
    assert [result["status"] for result in results] == ["success"] * 3, results
    assert results[0] == json.loads(the_block("json", '{"status"').code)


def lists_the_example_tools(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert done.returncode == 0, explain(done)
    for tool in ("echo", "add", "get_current_time"):
        assert tool in done.stdout, done.stdout


def private_file(path: Path) -> str:
    assert path.is_file(), f"{path.name} was not written"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name} is not 0600"
    return path.read_text(encoding="utf-8").strip()


def device_credential(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert done.returncode == 0, explain(done)
    assert private_file(cwd / "lab-pc.token")
    assert "lab-pc" in private_file(cwd / ".dispatch" / "credentials.json")


def controller_credential(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert done.returncode == 0, explain(done)
    token = (cwd / "ops.token").read_text(encoding="utf-8").strip()
    assert token and "\n" not in token, "ops.token should hold the one token printed"
    credentials = private_file(cwd / ".dispatch" / "credentials.json")
    assert "ops" in credentials and token not in credentials, "the hub keeps a digest, never the token"


def job_template(done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    assert done.returncode == 0, explain(done)
    template = json.loads((cwd / "job.json").read_text(encoding="utf-8"))
    assert {"job_configuration", "variables"} <= set(template), template


@dataclass(frozen=True)
class Run:
    check: Callable[[subprocess.CompletedProcess[str], Path], None]
    #: "repo": from the repository root, as the README says; "tmp": a fresh folder, for lines that write files.
    cwd: str = "repo"


#: The bash lines that are run, by their command (no trailing comment).
RUN: dict[str, Run] = {
    "dispatch run examples/batch.yaml": Run(succeeded),
    "dispatch run examples/batch.json --config examples/mcp.json --timeout 30 --json": Run(results_json),
    "dispatch run examples/batch.yaml --mode parallel --max-concurrency 4 --retries 4": Run(succeeded),
    "dispatch run examples/batch.yaml --stop-on-failure": Run(succeeded),
    "dispatch tools --config examples/mcp.json": Run(lists_the_example_tools),
    "dispatch credentials add-device lab-pc --token-file lab-pc.token": Run(device_credential, cwd="tmp"),
    "dispatch credentials add-controller ops > ops.token": Run(controller_credential, cwd="tmp"),
    "python -c 'import json, cli.up; print(json.dumps(cli.up.locked_job_template()))' > job.json": Run(
        job_template, cwd="tmp"
    ),
}

LONG_RUNNING = (
    "runs until stopped (a server, a worker, a device); test_dispatch_up, test_operations and the remote tests"
    " run these"
)
NEEDS_HUB = "needs the hub (and device) of the lines above, which run until stopped"
SHELL_STATE = "only sets this shell's environment for the lines after it"

#: The bash lines deliberately not run, by their command, and why.
NOT_RUN: dict[str, str] = {
    # Getting started: the install lines.
    (
        "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e '.[examples]'"
        " && dispatch run examples/batch.yaml"
    ): "makes a venv and installs from the network; its `dispatch run examples/batch.yaml` is run (Use it)",
    "python3.11 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest -n 2": (
        "makes a venv and installs from the network, then runs this whole suite"
    ),
    # Remote devices.
    "dispatch serve --host 127.0.0.1 --port 8765": LONG_RUNNING,
    (
        "DISPATCH_TOKEN=$(cat lab-pc.token) dispatch device --hub ws://127.0.0.1:8765 --id lab-pc"
        " --config examples/mcp.json"
    ): LONG_RUNNING,
    "export DISPATCH_TOKEN=$(cat ops.token)": SHELL_STATE,
    "dispatch devices --hub ws://127.0.0.1:8765": NEEDS_HUB,
    "dispatch run examples/batch.yaml --hub ws://127.0.0.1:8765 --device lab-pc --timeout 30 --json": NEEDS_HUB,
    # Operations: dispatch up.
    "dispatch up": LONG_RUNNING,
    'export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$(cat .dispatch/prefect-auth)"': (
        SHELL_STATE
    ),
    "prefect deployment run 'dispatch-batch/example-every-5-min'": "needs the server and deployments of `dispatch up`",
    # Operations: the plain Prefect recipe.
    'export PREFECT_SERVER_API_AUTH_STRING="dispatch:$(openssl rand -hex 32)"': SHELL_STATE,
    "prefect server start": LONG_RUNNING,
    'export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"': (
        SHELL_STATE
    ),
    "prefect work-pool create dispatch --type process --base-job-template job.json": (
        "changes the Prefect server started above (a pool named dispatch); its job.json is checked"
    ),
    "prefect --no-prompt deploy --all": "changes the Prefect server started above (our deployments)",
    "prefect worker start --pool dispatch": LONG_RUNNING,
    "dispatch serve": LONG_RUNNING,
}

#: Blocks neither python nor bash, by language and how they start: each has its test below.
CHECKED: dict[tuple[str, str], str] = {
    ("yaml", "config: mcp.json"): "test_batch_file_snippet runs it as a batch file",
    ("json", '{"mcpServers"'): "test_mcp_json_snippet starts its servers with `dispatch tools`",
    ("json", '{"status"'): "the first Result of `dispatch run examples/batch.json ... --json` and of the batch file",
}

#: Python blocks whose output is checked beyond exit 0, by a line they contain.
PYTHON_OUTPUT: dict[str, str] = {
    "LocalCommandDispatcher(": "*result={'result': 3.0}*",
    "run_batch_flow(": "*result={'result': 3.0}*",
    # Only defines on_device(): running it needs the hub and device of "Remote devices" (see NOT_RUN).
    "WebSocketCommandDispatcher.connect(": "",
    "InMemoryCommandDispatcher({": "the comments at its end",
}

#: Python blocks that must not import Prefect, by a line they contain (the README says so of them).
WITHOUT_PREFECT = ("LocalCommandDispatcher(", "WebSocketCommandDispatcher.connect(", "InMemoryCommandDispatcher({")

#: Runs a snippet as a script, then says on stderr whether it imported Prefect.
SCRIPT_RUNNER = (
    "import runpy, sys\n"
    "runpy.run_path(sys.argv[1], run_name='__main__')\n"
    "print('\\nimported prefect:', 'prefect' in sys.modules, file=sys.stderr)\n"
)


def test_every_snippet_is_accounted_for() -> None:
    unaccounted = []
    seen: set[str] = set()
    for block in BLOCKS:
        if block.language == "python":
            continue  # every one is run: test_python_snippet
        if block.language == "bash":
            for line in shell_lines(block):
                command = command_of(line)
                seen.add(command)
                if command not in RUN and command not in NOT_RUN:
                    unaccounted.append(f"{block.where}: bash line neither run nor listed in NOT_RUN: {line!r}")
        elif not any(block.language == language and block.code.startswith(start) for language, start in CHECKED):
            unaccounted.append(f"{block.where}: a {block.language or 'plain'} block with no check in CHECKED")
    assert not unaccounted, "\n".join(unaccounted)
    stale = sorted((set(RUN) | set(NOT_RUN)) - seen)
    assert not stale, f"RUN / NOT_RUN name lines the README no longer has: {stale}"
    assert not set(RUN) & set(NOT_RUN)
    for language, start in CHECKED:
        the_block(language, start)
    python = [block.code for block in BLOCKS if block.language == "python"]
    for marker in {*PYTHON_OUTPUT, *WITHOUT_PREFECT}:
        assert sum(marker in code for code in python) == 1, f"no single python block has {marker!r}"


def trailing_comments(code: str) -> list[str]:
    """The ``# ...`` lines that end a block: the output it shows, ``...`` standing for anything."""
    lines = code.rstrip().splitlines()
    shown: list[str] = []
    while lines and lines[-1].startswith("# "):
        shown.insert(0, lines.pop()[2:])
    return shown


PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.where for block in PYTHON_BLOCKS])
def test_python_snippet(block: Block, prefect_api: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT_RUNNER, str(script)],
        cwd=ROOT,
        env=snippet_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT,
    )
    assert done.returncode == 0, explain(done)
    if any(marker in block.code for marker in WITHOUT_PREFECT):
        assert "imported prefect: False" in done.stderr, f"{block.where} imports Prefect"
    expected = next((pattern for marker, pattern in PYTHON_OUTPUT.items() if marker in block.code), None)
    if expected == "the comments at its end":
        shown = trailing_comments(block.code)
        assert shown, f"{block.where} should end with the output it prints, as comments"
        printed = done.stdout.splitlines()
        assert len(printed) == len(shown), explain(done)
        for line, pattern in zip(printed, shown, strict=True):
            assert fnmatch.fnmatchcase(line, pattern.replace("...", "*")), f"{line!r} is not {pattern!r}"
    elif expected:
        assert fnmatch.fnmatchcase(done.stdout, expected), explain(done)


BASH_RUNS = [
    (block, line)
    for block in BLOCKS
    if block.language == "bash"
    for line in shell_lines(block)
    if command_of(line) in RUN
]


@pytest.mark.parametrize(
    ("block", "line"), BASH_RUNS, ids=[f"{block.where}: {command_of(line)[:60]}" for block, line in BASH_RUNS]
)
def test_bash_line(block: Block, line: str, prefect_api: str, tmp_path: Path) -> None:
    run = RUN[command_of(line)]
    cwd = ROOT if run.cwd == "repo" else tmp_path
    run.check(run_shell(line, cwd, snippet_env(prefect_api)), cwd)


def test_batch_file_snippet(prefect_api: str, tmp_path: Path) -> None:
    """The batch-file example is a batch that runs: beside the example mcp.json it names, as `config: mcp.json`."""
    for name in ("mcp.json", "demo_server.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "batch.yaml").write_text(the_block("yaml", "config: mcp.json").code, encoding="utf-8")
    done = run_shell("dispatch run batch.yaml --json", tmp_path, snippet_env(prefect_api))
    assert done.returncode == 0, explain(done)
    results = json.loads(done.stdout)
    assert [(result["status"], result["namespace"]) for result in results] == [
        ("success", "demo"),
        ("success", "demo"),
        ("success", "time"),
    ], results
    assert results[0] == json.loads(the_block("json", '{"status"').code)


def test_mcp_json_snippet(prefect_api: str, tmp_path: Path) -> None:
    """The mcp.json example's stdio servers start from a plain install; `remote` is whatever is at :8000."""
    shutil.copy(EXAMPLES / "demo_server.py", tmp_path / "demo_server.py")  # "demo_server.py" beside the config
    (tmp_path / "mcp.json").write_text(the_block("json", '{"mcpServers"').code, encoding="utf-8")
    env = snippet_env(prefect_api) | {"API_TOKEN": "example-token"}  # the ${API_TOKEN} it names
    done = run_shell("dispatch tools --config mcp.json --json", tmp_path, env)
    servers = {server["server"]: server for server in json.loads(done.stdout)}
    assert set(servers) == {"demo", "time", "remote"}
    for name in ("demo", "time"):
        assert servers[name]["up"] and servers[name]["tools"], servers[name]
    assert done.returncode == (0 if servers["remote"]["up"] else 1), explain(done)  # exit 1: some server is down
