"""Real processes for tests: started in their own process group, logged to a file, stopped for sure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from conftest import ROOT

T = TypeVar("T")

#: The ``dispatch`` command, run by this interpreter (no reliance on PATH).
CLI = [sys.executable, "-m", "cli.main"]


def start(argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """A child in its own process group, its output in ``log`` (a pipe nobody reads could fill up)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace``; then kill whatever the group still holds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s (last: {value!r})")
        time.sleep(interval)


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def processes_mentioning(*needles: str) -> list[str]:
    """Running processes (not zombies) whose command line or environment holds one of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(needle in cmdline or needle in environ for needle in needles):
                found.append(f"{entry.name}: {cmdline}")
    return found


@contextlib.contextmanager
def batch_service_runtime() -> Iterator[Path]:
    """An XDG_RUNTIME_DIR for the batch services of one test, all of them stopped at its end.

    Short, under /tmp: a socket's path holds 107 bytes, pytest's own
    directories are too deep.
    """
    runtime = Path(tempfile.mkdtemp(prefix="dispatch-", dir="/tmp"))
    try:
        yield runtime
    finally:
        subprocess.run(
            [*CLI, "service", "stop", "--all"],
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(runtime, ignore_errors=True)
