"""Import contracts at run time: what one import pulls in, and the lazy ``dispatchers`` exports.

The layers are aip <- dispatchers <- tasks <- flows <- cli. Each check runs
in a fresh interpreter, so modules other tests imported cannot hide (or fake)
what one import pulls in (or what it installs, such as log handlers). What
each layer's source may import is read statically in ``tests/unit/test_layers.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

LAYERS = ["aip", "dispatchers", "tasks", "flows", "cli"]
TIMEOUT = 60


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repository root; answer its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _top_packages_after(module: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after importing ``module`` alone."""
    out = _run(
        f"import json, sys\nimport {module}\nprint(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    )
    return set(json.loads(out.splitlines()[-1]))


def test_every_export_resolves() -> None:
    code = """
import json, sys
import dispatchers
missing = [name for name in dispatchers.__all__ if getattr(dispatchers, name, None) is None]
listed = set(dir(dispatchers))
print(json.dumps({
    "count": len(dispatchers.__all__),
    "unique": len(set(dispatchers.__all__)),
    "missing": missing,
    "undirred": [name for name in dispatchers.__all__ if name not in listed],
}))
"""
    found = json.loads(_run(code).splitlines()[-1])
    assert found["count"] == found["unique"]
    assert found["missing"] == []
    assert found["undirred"] == []


def test_star_import() -> None:
    code = """
import json
namespace = {}
exec("from dispatchers import *", namespace)
import dispatchers
print(json.dumps([name for name in dispatchers.__all__ if namespace.get(name) is not getattr(dispatchers, name)]))
"""
    assert json.loads(_run(code).splitlines()[-1]) == []


def test_unknown_name_is_an_attribute_error() -> None:
    _run(
        "import dispatchers\n"
        "try:\n    dispatchers.NoSuchName\n"
        "except AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )


def test_importing_dispatchers_is_lazy() -> None:
    # The package itself and its light submodules pull in neither MCP nor Prefect.
    for module in ("dispatchers", "dispatchers.policy"):
        loaded = _top_packages_after(module)
        assert "mcp" not in loaded, module
        assert "prefect" not in loaded, module


@pytest.mark.parametrize("module", ["aip.hub", "aip.switchboard", "aip.messages"])
def test_hub_side_imports_neither_mcp_nor_prefect(module: str) -> None:
    loaded = _top_packages_after(module)
    assert "mcp" not in loaded
    assert "prefect" not in loaded


@pytest.mark.parametrize("module", ["aip.device", "dispatchers", "dispatchers.local"])
def test_device_side_imports_no_prefect(module: str) -> None:
    assert "prefect" not in _top_packages_after(module)


def test_cli_main_imports_no_prefect() -> None:
    # What ``dispatch device --help`` (or ``dispatch hub``) loads before any command runs.
    assert "prefect" not in _top_packages_after("cli.main")


# -- run logging -------------------------------------------------------------------------


def test_importing_the_tasks_flows_and_hub_events_installs_no_log_handler_or_filter() -> None:
    code = """
import json, logging
import tasks, flows.batch, cli.hub_events
print(json.dumps([len(logging.getLogger("dispatchers").handlers), len(logging.getLogger("prefect.task_runs").filters)]))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, 0]


def test_aip_dispatchers_and_the_batch_file_reader_never_import_prefect() -> None:
    check = "import sys, aip.messages, dispatchers, flows.batch_file; print('prefect' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "False"


# -- what a run imports ------------------------------------------------------------------


def _modules_after(module: str) -> set[str]:
    """Every module in ``sys.modules`` after importing ``module`` alone."""
    out = _run(f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))")
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("module", ["flows.batch", "flows.batch_file"])
def test_the_flow_imports_mcp_only_for_a_local_run(module: str) -> None:
    # A deployment's flow process imports flows.batch before its run starts: a remote run never needs MCP.
    loaded = _modules_after(module)
    assert "mcp" not in loaded
    assert not {"dispatchers.local", "dispatchers.server_pool", "dispatchers.remote", "aip.controller"} & loaded


def test_the_hub_events_import_neither_the_command_task_nor_the_dispatchers() -> None:
    # ``dispatch serve`` with a Prefect API: the events only, none of what a flow run needs.
    loaded = _modules_after("cli.hub_events")
    assert "tasks.command" not in loaded
    assert not {"flows", "mcp"} & {name.partition(".")[0] for name in loaded}
    # The package itself and its lazy names' helper (``tasks`` uses it), none of its transports.
    assert {name for name in loaded if name.partition(".")[0] == "dispatchers"} <= {
        "dispatchers",
        "dispatchers.lazy_names",
    }
