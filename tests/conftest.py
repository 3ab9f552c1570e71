"""Shared fixtures for every tier: real MCP servers as subprocesses, a real Prefect API.

The tiers are folders, and each test is marked with its folder's name:
``tests/unit/`` (pure: no sockets, no subprocess, no Prefect API; seconds),
``tests/integration/`` (real parts in this process: MCP servers as
subprocesses, hubs and devices on 127.0.0.1, the Prefect API) and
``tests/system/`` (our own programs run as processes: ``dispatch``,
``dispatch up``, ``serve``, ``device``; minutes). ``pytest -m unit`` runs one tier.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Offline and quiet: no telemetry, and Prefect's own logs only when they matter.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# `dispatch run` runs its batch in-process: a batch service (cli.batch_service) would outlive the test
# that started it. The tests of the service turn it on for their own runs.
os.environ["DISPATCH_SERVICE"] = "off"

#: The repository root (this file is ``tests/conftest.py``).
ROOT = Path(__file__).resolve().parent.parent
#: Data the tests read (captured UFO frames, helper servers), kept inside the repository.
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"
DEMO_SERVER = EXAMPLES / "demo_server.py"


def demo_server_spec(**extra: Any) -> dict[str, Any]:
    """An ``mcp.json`` server entry that runs our demo server over stdio."""
    return {"command": sys.executable, "args": [str(DEMO_SERVER)], **extra}


#: How a process is told its hub (``flows.hub_access``).
HUB_VARIABLES = ("DISPATCH_HUB", "DISPATCH_TOKEN", "DISPATCH_CAFILE")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the ``HUB_VARIABLES`` set, for the test."""
    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def demo_config() -> dict[str, Any]:
    """The demo server and the third-party ``mcp-server-time``, both over stdio."""
    return {
        "mcpServers": {
            "demo": demo_server_spec(),
            "time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"]},
        }
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def http_demo_url() -> Iterator[str]:
    """The demo server over streamable HTTP on 127.0.0.1, for the session."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(DEMO_SERVER), "--http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the demo HTTP server did not come up") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect API (database and server subprocess) for the whole session.

    Yields its URL, so CLI subprocesses can use the same server instead of
    starting an embedded one each (6-10 s apiece).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield str(PREFECT_API_URL.value())


TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, the folder it is in (``pytest -m unit``)."""
    tests = ROOT / "tests"
    for item in items:
        folder = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else ""
        if folder in TIERS:
            item.add_marker(folder)
