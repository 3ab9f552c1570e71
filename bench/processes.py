"""Processes of a benchmark: what ``/proc`` says about them, and starting and stopping children.

- Readings (Linux ``/proc``): ``proc_table`` and ``subtree`` (every process's
  parent and CPU, a process's descendants), ``cpu_seconds`` and
  ``process_cpu`` (one process's CPU so far), ``child_pids``, ``memory_kib``,
  ``Noise`` (the share of a phase a process spent waiting for a CPU).
- Children: ``Children`` (long-lived servers, each in a process group of its
  own with a log file, stopped group by group with whatever they started),
  ``role`` (a child that says READY on stdout and ends when its stdin
  closes, and, on the child's side, ``stdin_reader`` and ``say``),
  ``free_port`` and ``raise_file_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Bound on the wait for a child's first line, in seconds.
START_TIMEOUT = 30.0
#: Seconds a child gets after SIGTERM (or after its stdin closed) before SIGKILL.
STOP_GRACE = 5.0


# -- /proc -----------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, float]]:
    """Every process: pid -> (parent pid, CPU seconds: its own plus that of its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return table


def subtree(root: int, table: dict[int, tuple[int, float]]) -> set[int]:
    """``root`` and its descendants in ``table`` (of ``proc_table``)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` so far (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds ``pid`` has used so far (all its threads; nanosecond ``schedstat`` where available)."""
    total = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0]) / 1e9
        return total
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


def child_pids(word: str) -> list[int]:
    """This process's children whose command line contains ``word`` (none where there is no ``/proc``)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == os.getpid() and word in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``RssAnon`` of ``pid``, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            found[name] = int(value.split()[0])
    return found


def run_delay(pid: int) -> float | None:
    """Seconds ``pid``'s threads have spent runnable but waiting for a CPU (``schedstat``), if the kernel says."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((task / "schedstat").read_text().split()[1]) / 1e9 for task in tasks)
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Noise:
    """The share of a phase's wall time that a process spent waiting for a CPU.

    A machine shared with other work shows here: a process that waits for a
    CPU for a large share of a phase was measured on a loaded machine.
    """

    pid: int = field(default_factory=os.getpid)
    since: float = field(default_factory=time.perf_counter)
    delay: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.delay = run_delay(self.pid)

    def share(self) -> float | None:
        """The share since this was made (None if the kernel does not say)."""
        now = run_delay(self.pid)
        if now is None or self.delay is None:
            return None
        elapsed = time.perf_counter() - self.since
        return round((now - self.delay) / elapsed, 3) if elapsed > 0.01 else 0.0


# -- children --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raise_file_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to ``needed`` if the hard limit allows (subprocesses inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


@dataclass
class Children:
    """Long-lived children, each in a session (process group) of its own, its output in ``log_dir/<name>.log``."""

    log_dir: Path
    cwd: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                list(argv), env=dict(env), cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started[name] = process
        return process

    def died(self) -> str | None:
        return next((name for name, process in self.started.items() if process.poll() is not None), None)

    def stop(self, names: Sequence[str] | None = None) -> float:
        """SIGTERM the groups, SIGKILL them after the grace, then kill any descendant left; the seconds it took."""
        begin = time.monotonic()
        chosen = {name: self.started.pop(name) for name in list(names or self.started) if name in self.started}
        table = proc_table()
        descendants = set().union(*(subtree(p.pid, table) for p in chosen.values())) if chosen else set()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for process in chosen.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signum)
            until = time.monotonic() + STOP_GRACE
            for process in chosen.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, until - time.monotonic()))
            if all(process.poll() is not None for process in chosen.values()):
                break
        for process in chosen.values():  # the leader is gone; its group may still hold what it started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        alive = set(proc_table())
        for pid in descendants & alive:  # e.g. flow processes a worker started in sessions of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return time.monotonic() - begin


@dataclass
class Role:
    """A child that says a line (``READY <port>``, say) when ready, and ends when its stdin closes."""

    process: asyncio.subprocess.Process
    line: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.line.split()[1])

    async def expect(self, word: str, timeout: float = START_TIMEOUT) -> str:
        """Read the child's next line, which must start with ``word``."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            line = (await self.process.stdout.readline()).decode().strip()
        if not line.startswith(word):
            raise SystemExit(f"benchmark broken: a role subprocess said {line!r}, expected {word}")
        self.line = line
        return line

    def tell(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")


@contextlib.asynccontextmanager
async def role(name: str, argv: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[Role]:
    """Start ``argv`` (the ``name`` role), wait for its first line; on exit close its stdin, kill it after 30 s."""
    process = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(env))
    started = Role(process, "")
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            started.line = (await process.stdout.readline()).decode().strip()
        if not started.line:
            raise SystemExit(f"benchmark broken: the {name} subprocess exited before it was ready")
        yield started
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin, read in the event loop (a role child's: its end comes when it closes)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def say(line: str) -> None:
    """A line to the parent of a role child."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
