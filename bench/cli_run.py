"""What a one-shot ``dispatch run`` costs from the command line, against a bare Prefect flow doing the same call.

Run it from the project root::

    python bench/cli_run.py           # about 7 minutes on 2 cores (load average 1-5)
    python bench/cli_run.py --quick   # smoke run: 2 repetitions, the first run once; 3.5 minutes under load 5

Every figure is the wall time of a fresh process, from its start to its exit,
as a user typing the command waits for it: ``python -m cli.main run
batch.json --json`` (what the ``dispatch`` script runs), or ``python bare.py``.
The batch is one ``echo`` command on ``examples/demo_server.py`` (stdio),
written with its ``mcp.json`` to a temporary directory, which is the working
directory of every run. ``PYTHONPATH`` points every process at a copy of the
code beside this script taken at the start (``aip``, ``dispatchers``,
``flows``, ``tasks``, ``cli`` and the demo server; ``--in-place``: the work
tree itself): a batch service serves one place, code included, so an edit of
the work tree during the run (other sessions edit it) would make the next run
start a new service and mix two versions in the figures. Two modes, one after
the other, each with its own temporary ``PREFECT_HOME``:

(1) embedded Prefect: no ``PREFECT_API_URL``, so every process that runs a
    flow starts Prefect's temporary API server (``dispatch run`` its
    shielded copy, ``cli.embedded_api``);
(2) a running server: ``prefect server start --host 127.0.0.1 --port <free>``
    started by this script (Prefect's defaults, as a user starts it), and
    ``PREFECT_API_URL`` set in every run; the server's health is waited for.

In each mode, per repetition, in an order rotating from one repetition to the
next:

- *floor: bare Prefect flow*: a script written by hand for the run (see
  ``BARE_FLOW``): an async ``@flow`` awaiting one ``@task`` that opens a raw
  ``mcp.Client`` on the demo server over stdio and calls ``echo``, printing
  the Results as a JSON line. Nothing of ours is imported; Prefect's
  defaults (no result persistence).
- *in-process*: ``dispatch run`` with ``DISPATCH_SERVICE=off``: the flow runs
  in the ``dispatch`` process, as before the batch service.
- *first, starts the service*: ``dispatch run`` with the batch service on and
  none running (an ``XDG_RUNTIME_DIR`` of its own, new for the repetition,
  mode 0700): the run starts the service and sends it the batch. Then, right
  after (the wait for an idle machine in between, see below), *second in a
  row* on the service it started, and the service is stopped (``dispatch
  service stop --all``, untimed; its time is reported).
- *service warm*: ``dispatch run`` on a service started before the
  repetitions (two untimed runs: the first starts it; in embedded mode it is
  also what creates the database of the mode's ``PREFECT_HOME``, so that no
  timed run pays for that), one run per repetition: the later runs.

Ratios are the subject's median over the floor's median of the same mode.
The issue's targets (rows marked ``*``): the second and the warm run at most
0.35x the floor in embedded mode and 0.25x against a running server, and, for
the in-process and the warm run, at most 0.3 s from the last Result to the
process's exit. The exit time comes from the same runs: stdout is a pipe,
read as it comes; the moment the Results' JSON line is complete is the last
Result; the process's exit is seen through a pidfd, and its CPU (with the
children it waited for) from ``wait4``. stderr goes to a file, polled every
50 ms while the process runs, so that each line has a time (to 50 ms): the
phases table (first line, the flow run announced, the command finished, the
Results, the exit) says where the time of each subject goes.

Every run is checked: exit code 0, one Result, success, ``{"result": 0}``;
a service run's stderr must say it started a service (the first) or must not
(the others: a second or warm run that started one means the place changed,
e.g. the installed packages, or with ``--in-place`` a source file of ours;
that run is not counted and is reported, and a warm run is run again once).
A subject that fails stops the benchmark with the tail of its stderr (and of
the service's log) and exit code 1.

After every run the script waits, untimed (at most 10 s), until the processes
it started (every process whose environment carries this run's marker: the
API server, the services, their temporary API servers and MCP servers, and
anything a run left behind) use at most a tenth of a core together, so a run
does not pay for the previous one's deferred work. The "Noise" line gives the
share of each mode's time in which some task of the machine waited for a CPU
(``/proc/pressure/cpu``, "some") and the load average: the machine is
shared. At the end (or on an error, Ctrl-C or SIGTERM) every service is
stopped with ``dispatch service stop --all``, the API server's process group
gets SIGTERM (SIGKILL after 5 s), and whatever marked process is left is
killed. The last line is every figure as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from harness import ROOT, Provenance, Samples, arguments, broken, print_json, rotation, table, verdict, wait_quiet
from processes import Children, cpu_seconds, free_port

#: The code under test (``dispatch run`` imports from all of it).
CODE_PACKAGES = ("aip", "dispatchers", "flows", "tasks", "cli")
DEMO_SERVER = ROOT / "examples" / "demo_server.py"
PREFECT = str(Path(sys.executable).parent / "prefect")

#: Targets from issue 10 (goals 1 and 5): warm / floor by mode, and last Result -> exit.
TARGETS = {"embedded": 0.35, "server": 0.25}
TARGET_EXIT = 0.3

#: Seconds a single run may take before the benchmark gives up on it.
RUN_LIMIT = 300.0
#: Seconds between two reads of a running process's stderr file.
POLL = 0.05
#: The wait for an idle machine after each run: at most this CPU rate (cores) of our processes, this many seconds.
SETTLE_RATE = 0.1
SETTLE_LIMIT = 10.0
#: Seconds an idle batch service waits before it stops: past the longest gap between two warm runs.
SERVICE_IDLE = 300
#: The environment variable that marks every process of this run (and its descendants).
MARKER = "BENCH_CLI_RUN"

#: The subjects of a mode, in the order of the tables.
SUBJECTS = ("bare", "off", "first", "second", "warm")
TITLES = {
    "bare": "floor: bare Prefect flow, 1 task, raw call_tool",
    "off": "dispatch run, in-process (DISPATCH_SERVICE=off)",
    "first": "dispatch run, first (starts the service)",
    "second": "dispatch run, second in a row",
    "warm": "dispatch run, service warm (later runs)",
}
#: The subjects the ratio targets apply to, and those the exit target applies to.
RATIO_TARGETED = ("second", "warm")
EXIT_TARGETED = ("off", "warm")

BARE_FLOW = '''\
"""A bare Prefect flow: one task doing the raw MCP call that a one-command batch makes (written by bench/cli_run.py)."""

import asyncio
import json
import sys

from mcp import Client, StdioServerParameters
from prefect import flow, task

SERVER = StdioServerParameters(command=sys.executable, args=[{demo!r}])


@task
async def echo(value):
    async with Client(SERVER) as client:
        answer = await client.call_tool("echo", {{"value": value}})
    return {{"status": "failure" if answer.is_error else "success", "result": answer.structured_content}}


@flow
async def bare():
    return [await echo(0)]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(bare())), flush=True)
'''

#: stderr lines that mark the phases of a run: the flow run announced, the command finished.
ANNOUNCED = re.compile(r"^flow run |Beginning flow run")
COMMAND_DONE = re.compile(r"^\d+/\d+ \S+ |Task run .* Finished in state")
STARTING_SERVICE = "starting the batch service"
FELL_BACK = "running the batch in this process"


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One process, start to exit: when its Results were complete, its exit code, CPU and stderr lines."""

    label: str
    log: Path
    wall: float = 0.0
    results_at: float | None = None
    cpu: float = 0.0
    code: int | None = None
    results: Any = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    pressure: float | None = None

    @property
    def exit_after_results(self) -> float | None:
        return None if self.results_at is None else max(0.0, self.wall - self.results_at)

    def said(self, text: str) -> bool:
        return any(text in line for _, line in self.lines)

    def first(self, pattern: re.Pattern[str]) -> float | None:
        return next((at for at, line in self.lines if pattern.search(line)), None)

    def phases(self) -> dict[str, float | None]:
        return {
            "first_line": self.lines[0][0] if self.lines else None,
            "announced": self.first(ANNOUNCED),
            "command_done": self.first(COMMAND_DONE),
            "results": self.results_at,
            "exit": self.wall,
        }


class StderrTail:
    """New complete lines of a file being written, each with the time it was first seen."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("rb")
        self.pending = b""

    def read(self, at: float, into: list[tuple[float, str]]) -> None:
        self.pending += self.handle.read()
        *complete, self.pending = self.pending.split(b"\n")
        into.extend((at, line.decode(errors="replace")) for line in complete)

    def close(self, at: float, into: list[tuple[float, str]]) -> None:
        self.read(at, into)
        if self.pending:
            into.append((at, self.pending.decode(errors="replace")))
        self.handle.close()


def parse_results(data: bytes) -> Any:
    """The JSON array on stdout, once its line is complete; None before."""
    for line in data.split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, list):
                return value
    return None


def run_once(label: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> Run:
    """Run ``argv`` to its exit; stdout read as it comes (the Results' moment), stderr to ``log``, timed."""
    run = Run(label, log)
    pressure_before = cpu_pressure()
    with log.open("wb") as err:
        begin = time.perf_counter()
        process = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # a group of its own, killed whole if it overruns
        )
    assert process.stdout is not None
    out = process.stdout.fileno()
    os.set_blocking(out, False)
    pidfd = os.pidfd_open(process.pid)
    tail = StderrTail(log)
    data = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ, "out")
            selector.register(pidfd, selectors.EVENT_READ, "exit")
            exited = False
            while not exited:
                now = time.perf_counter() - begin
                if now > RUN_LIMIT:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
                    raise broken(f"{TITLES[label]}: no exit within {RUN_LIMIT:g} s{stderr_tail(log)}")
                events = sorted(selector.select(POLL), key=lambda event: event[0].data != "out")  # output first
                now = time.perf_counter() - begin
                for key, _ in events:
                    if key.data == "out":
                        chunk = read_some(out)
                        if chunk == b"":
                            selector.unregister(out)
                        elif chunk:
                            data += chunk
                            if run.results_at is None and b"\n" in chunk:
                                run.results = parse_results(data)
                                if run.results is not None:
                                    run.results_at = now
                    else:
                        exited = True
                        run.wall = now
                tail.read(now, run.lines)
        data += read_some(out) or b""  # what was written just before the exit
    finally:
        os.close(pidfd)
        process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = run.code = os.waitstatus_to_exitcode(status)
    run.cpu = usage.ru_utime + usage.ru_stime
    tail.close(run.wall, run.lines)
    if run.results is None:
        run.results = parse_results(data + b"\n")
        if run.results is not None:
            run.results_at = run.wall  # seen only with the exit
    pressure_after = cpu_pressure()
    if pressure_before is not None and pressure_after is not None and run.wall > 0:
        run.pressure = (pressure_after - pressure_before) / run.wall
    return run


def read_some(fd: int) -> bytes | None:
    """What the pipe holds (b"" at its end, None when it is empty for now)."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def stderr_tail(log: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace").strip().splitlines()[-lines:]
        if text:
            return f"; the last lines of its stderr ({log}):\n" + "\n".join(text)
    return f" (no stderr; {log})"


def service_logs(xdg: Path, lines: int = 10) -> str:
    found = ""
    for log in sorted((xdg / "command-dispatcher").glob("*.log")):
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                found += f"\nthe service's log ({log}):\n" + "\n".join(text)
    return found


def check(run: Run, service: str | None, xdg: Path | None) -> None:
    """The run succeeded with the right Result; ``service``: "starts" or "reuses" (None: no service involved)."""
    problem = None
    if run.code != 0:
        problem = f"exit code {run.code}"
    elif not isinstance(run.results, list) or len(run.results) != 1:
        problem = f"expected one Result on stdout, got {run.results!r}"
    elif run.results[0].get("status") != "success" or run.results[0].get("result") != {"result": 0}:
        problem = f"the Result is not echo's success: {run.results[0]!r}"
    elif service is not None and run.said(FELL_BACK):
        problem = "the batch service did not start: the batch ran in the dispatch process"
    elif service == "starts" and not run.said(STARTING_SERVICE):
        problem = "the run did not start a batch service (one was running already?)"
    elif service is None and run.said(STARTING_SERVICE):
        problem = "the run started a batch service though DISPATCH_SERVICE=off"
    if problem:
        logs = service_logs(xdg) if xdg is not None else ""
        raise broken(f"{TITLES[run.label]}: {problem}{stderr_tail(run.log)}{logs}")


# -- the machine -----------------------------------------------------------------------------------


def cpu_pressure() -> float | None:
    """Seconds so far in which some task of the machine waited for a CPU (PSI), None where the kernel does not say."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(first.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def marked(marker: str) -> list[int]:
    """The processes whose environment carries ``MARKER=marker``: those this run started, and their descendants."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            continue
    return found


def marked_cpu(marker: str) -> float:
    total = 0.0
    for pid in marked(marker):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(pid)
    return total


# -- a mode ----------------------------------------------------------------------------------------


@dataclass
class Mode:
    """One mode's runs: where they run, with what environment, and what they gave."""

    name: str
    work: Path
    env: dict[str, str]
    batch: Path
    bare: Path
    count: int = 0
    runs: dict[str, list[Run]] = field(default_factory=dict)
    discarded: list[dict[str, Any]] = field(default_factory=list)
    settle: Samples = field(default_factory=Samples)
    settle_hits: int = 0
    service_stops: list[float] = field(default_factory=list)
    xdgs: list[Path] = field(default_factory=list)

    def new_xdg(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"xdg-{self.name}-{name}-", dir=self.work))  # mode 0700
        self.xdgs.append(path)
        return path

    def ours(self) -> list[str]:
        return [sys.executable, "-m", "cli.main", "run", str(self.batch), "--json"]

    def run(self, label: str, argv: Sequence[str], extra: dict[str, str], record: bool = True) -> Run:
        self.count += 1
        log = self.work / "logs" / f"{self.name}-{self.count:02d}-{label}.log"
        done = run_once(label, argv, {**self.env, **extra}, self.work, log)
        if record:
            self.runs.setdefault(label, []).append(done)
        self.quiet()
        return done

    def quiet(self) -> None:
        begin = time.perf_counter()
        calm = asyncio.run(wait_quiet(lambda: marked_cpu(self.env[MARKER]), SETTLE_RATE, SETTLE_LIMIT))
        self.settle.add("settle", time.perf_counter() - begin)
        self.settle_hits += not calm

    def bare_run(self) -> None:
        check(self.run("bare", [sys.executable, str(self.bare)], {"DISPATCH_SERVICE": "off"}), None, None)

    def off_run(self) -> None:
        check(self.run("off", self.ours(), {"DISPATCH_SERVICE": "off"}), None, None)

    def first_and_second(self) -> None:
        xdg = self.new_xdg("first")
        extra = {"XDG_RUNTIME_DIR": str(xdg)}
        check(self.run("first", self.ours(), extra), "starts", xdg)
        second = self.run("second", self.ours(), extra, record=False)
        if second.said(STARTING_SERVICE):
            check(second, "starts", xdg)
            self.restarted(second)
        else:
            check(second, "reuses", xdg)
            self.runs.setdefault("second", []).append(second)
        self.service_stops.append(stop_services(self.env, xdg))
        self.quiet()

    def warm_up(self, xdg: Path) -> None:
        """Start the long-lived service (and, embedded, the database of the home) with two untimed runs."""
        extra = {"XDG_RUNTIME_DIR": str(xdg)}
        check(self.run("warm", self.ours(), extra, record=False), "starts", xdg)
        check(self.run("warm", self.ours(), extra, record=False), "reuses", xdg)

    def warm_run(self, xdg: Path) -> None:
        extra = {"XDG_RUNTIME_DIR": str(xdg)}
        for attempt in range(2):
            done = self.run("warm", self.ours(), extra, record=False)
            if not done.said(STARTING_SERVICE):
                check(done, "reuses", xdg)
                self.runs.setdefault("warm", []).append(done)
                return
            check(done, "starts", xdg)
            self.restarted(done, again=attempt == 0)
        raise broken("two warm runs in a row started a new batch service: the place keeps changing")

    def restarted(self, run: Run, again: bool = False) -> None:
        """A run that should have found a service and started one: not counted, reported."""
        self.discarded.append({"label": run.label, "wall_s": round(run.wall, 3), "log": str(run.log)})
        print(
            f"note: a {run.label} run started a new batch service (the environment or the installed packages "
            f"changed?); not counted{', running it again' if again else ''}",
            file=sys.stderr,
        )


def stop_services(env: dict[str, str], xdg: Path) -> float:
    """``dispatch service stop --all`` for the services under ``xdg``; its wall time."""
    begin = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "service", "stop", "--all"],
        env={**env, "XDG_RUNTIME_DIR": str(xdg)},
        cwd=xdg,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    if done.returncode != 0:
        raise broken(f"dispatch service stop --all failed ({done.returncode}): {done.stdout}{done.stderr}")
    return time.perf_counter() - begin


def measure_mode(mode: Mode, repeats: int, first_repeats: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The warm service, then ``repeats`` repetitions of every subject in a rotating order; the figures."""
    pressure, begin = cpu_pressure(), time.perf_counter()
    warm = mode.new_xdg("warm")
    say(f"{mode.name}: starting the warm service (two untimed runs)")
    mode.warm_up(warm)
    subjects: dict[str, Callable[[], None]] = {
        "bare": mode.bare_run,
        "off": mode.off_run,
        "first": mode.first_and_second,
        "warm": lambda: mode.warm_run(warm),
    }
    for rep in range(repeats):
        order = [label for label in rotation(list(subjects), rep) if label != "first" or rep < first_repeats]
        say(f"{mode.name}: repetition {rep + 1} of {repeats}: {', '.join(order)}")
        for label in order:
            subjects[label]()
    mode.service_stops.append(stop_services(mode.env, warm))
    elapsed = time.perf_counter() - begin
    after = cpu_pressure()
    return {
        "subjects": summarise(mode),
        "discarded_runs": mode.discarded,
        "settle_median_s": round(mode.settle.median("settle"), 2),
        "settle_limit_hits": mode.settle_hits,
        "service_stop_s": [round(value, 2) for value in mode.service_stops],
        "elapsed_s": round(elapsed, 1),
        "cpu_pressure": None if pressure is None or after is None else round((after - pressure) / elapsed, 3),
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 3) if present else None


def summarise(mode: Mode) -> dict[str, Any]:
    floor = statistics.median(run.wall for run in mode.runs["bare"])
    found: dict[str, Any] = {}
    for label in SUBJECTS:
        runs = mode.runs.get(label, [])
        if not runs:
            continue
        wall = statistics.median(run.wall for run in runs)
        phases = [run.phases() for run in runs]
        found[label] = {
            "runs": len(runs),
            "wall_s": [round(run.wall, 3) for run in runs],
            "median_s": round(wall, 3),
            "ratio": round(wall / floor, 3),
            "exit_after_results_s": [None if (e := run.exit_after_results) is None else round(e, 3) for run in runs],
            "exit_median_s": median([run.exit_after_results for run in runs]),
            "cpu_median_s": median([run.cpu for run in runs]),
            "cpu_pressure_median": median([run.pressure for run in runs]),
            "phases_median_s": {name: median([p[name] for p in phases]) for name in phases[0]},
        }
    return found


# -- the whole run ---------------------------------------------------------------------------------


def base_env(marker: str, home: Path, code: Path) -> dict[str, str]:
    """The environment of every process of a mode: this one's without Prefect or dispatch settings, and ours."""
    dropped = ("PREFECT_", "DISPATCH_", "XDG_RUNTIME_DIR")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DISPATCH_SERVICE_IDLE": str(SERVICE_IDLE),
            "PYTHONPATH": os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])]),
            MARKER: marker,
        }
    )
    return env


def snapshot(work: Path) -> Path:
    """A copy of the code under test (and the demo server), as it is now: what the runs import and the service keys.

    Other sessions edit the work tree while a run goes on; each edit would
    make the next ``dispatch run`` start a new service (its place includes
    the code), and the figures would mix versions.
    """
    code = work / "code"
    for package in CODE_PACKAGES:
        shutil.copytree(ROOT / package, code / package, symlinks=True)  # with __pycache__: mtimes kept, still valid
    (code / "examples").mkdir()
    shutil.copy2(DEMO_SERVER, code / "examples" / DEMO_SERVER.name)
    return code


def write_inputs(work: Path, code: Path) -> tuple[Path, Path]:
    """The batch file (one echo), its mcp.json and the bare flow script."""
    demo = code / "examples" / DEMO_SERVER.name
    (work / "mcp.json").write_text(
        json.dumps({"mcpServers": {"demo": {"command": "${DISPATCH_PYTHON}", "args": [str(demo)]}}})
    )
    batch = work / "batch.json"
    batch.write_text(
        json.dumps({"config": "mcp.json", "commands": [{"tool_name": "echo", "parameters": {"value": 0}}]})
    )
    bare = work / "bare.py"
    bare.write_text(BARE_FLOW.format(demo=str(demo)))
    return batch, bare


def clean_up(work: Path, marker: str, modes: Sequence[Mode], children: Children) -> None:
    """Every service stopped, the API server stopped, anything marked that is left killed."""
    for mode in modes:
        for xdg in mode.xdgs:
            if any((xdg / "command-dispatcher").glob("*.sock")):
                with contextlib.suppress(SystemExit, subprocess.TimeoutExpired, OSError):
                    stop_services(mode.env, xdg)
    children.stop()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        left = marked(marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        until = time.monotonic() + 5
        while left and time.monotonic() < until:
            time.sleep(0.1)
            left = marked(marker)
        if not left:
            break


def start_server(children: Children, env: dict[str, str]) -> tuple[str, float]:
    from cli.up import StackError, wait_healthy

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    begin = time.perf_counter()
    server = children.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    try:
        wait_healthy(api_url, server, timeout=180)
    except StackError as error:
        raise broken(f"{error}{stderr_tail(children.log_dir / 'server.log')}") from None
    return api_url, time.perf_counter() - begin


def cell(value: float | None, places: int = 2) -> str:
    return "-" if value is None else f"{value:,.{places}f}"


def print_tables(figures: dict[str, Any]) -> None:
    for name, mode in figures["modes"].items():
        subjects = mode["subjects"]
        target = TARGETS[name]
        title = (
            "(1) embedded Prefect (no PREFECT_API_URL)"
            if name == "embedded"
            else f"(2) running `prefect server start` (server healthy after {figures['server_start_s']} s)"
        )
        print()
        print(f"{title}: wall time of a fresh process, start to exit, median of {figures['repeats']}")
        rows = []
        for label, s in subjects.items():
            star = " *" if label in RATIO_TARGETED else ""
            rows.append(
                [
                    TITLES[label] + star,
                    str(s["runs"]),
                    cell(s["median_s"]),
                    f"{s['ratio']:.3f}",
                    f"<= {target:g} {verdict(s['ratio'] <= target)}" if star else "",
                    cell(s["cpu_median_s"]),
                    cell(s["exit_median_s"], 3),
                ]
            )
        table(("case (* = target)", "runs", "median s", "/ floor", "target", "CPU s", "Result->exit s"), rows)
        print("Phases, seconds from the start (medians): 1st stderr line, flow run announced, command done, Results")
        print("complete on stdout, exit")
        rows = []
        for label, s in subjects.items():
            p = s["phases_median_s"]
            rows.append(
                [
                    TITLES[label],
                    *(cell(p[key]) for key in ("first_line", "announced", "command_done", "results", "exit")),
                ]
            )
        table(("case", "1st line", "flow run", "done", "Results", "exit"), rows)
        if mode["discarded_runs"]:
            print(f"Not counted: {len(mode['discarded_runs'])} warm runs that started a new service.")
        print(
            f"Untimed: wait for idle after a run {mode['settle_median_s']} s (median; {mode['settle_limit_hits']} "
            f"gave up after {SETTLE_LIMIT:g} s); `dispatch service stop --all` "
            + ", ".join(f"{value:g}" for value in mode["service_stop_s"])
            + f" s. Mode took {mode['elapsed_s']} s."
        )
    print()
    print(f"(3) last Result -> process exit (target <= {TARGET_EXIT:g} s), median s")
    names = list(figures["modes"])
    rows = []
    for label in ("off", "warm", "first", "second", "bare"):
        cells = []
        for name in names:
            s = figures["modes"][name]["subjects"].get(label)
            value = s["exit_median_s"] if s else None
            mark = f" {verdict(value <= TARGET_EXIT)}" if label in EXIT_TARGETED and value is not None else ""
            cells.append(cell(value, 3) + mark)
        rows.append([TITLES[label] + (" *" if label in EXIT_TARGETED else ""), *cells])
    table(("case (* = target)", *names), rows)
    print()
    pressures = ", ".join(
        f"{mode['cpu_pressure']:.0%} of {name} ({mode['elapsed_s']:g} s)"
        for name, mode in figures["modes"].items()
        if mode["cpu_pressure"] is not None
    )
    print(
        f"Noise: some task of the machine waited for a CPU {pressures or '(no /proc/pressure/cpu)'}; "
        f"load average {figures['load_average_start']} at the start, {figures['load_average_end']} at the end"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, the first run once per mode")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each subject (default 5, --quick 2)")
    parser.add_argument("--only", choices=("embedded", "server"), help="one mode only")
    parser.add_argument(
        "--in-place", action="store_true", help="run the code of the work tree itself, not a copy taken at the start"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, homes)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick and args.repeats == 5 else args.repeats
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    first_repeats = 1 if args.quick else repeats

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "date": date.today().isoformat(),
        "repeats": repeats,
        "quick": args.quick,
        "code": provenance.code,
        "load_average_start": [round(value, 2) for value in os.getloadavg()],
        "modes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="bench-cli-run-"))
    (work / "logs").mkdir()
    code = ROOT if args.in_place else snapshot(work)
    figures["measured"] = str(code)
    batch, bare = write_inputs(work, code)
    marker = work.name
    children = Children(work / "logs", work)
    modes: list[Mode] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops everything
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`... &`)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - provenance.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    try:
        if args.only in (None, "embedded"):
            home = work / "home-embedded"
            home.mkdir()
            mode = Mode("embedded", work, base_env(marker, home, code), batch, bare)
            modes.append(mode)
            figures["modes"]["embedded"] = measure_mode(mode, repeats, first_repeats, say)
        if args.only in (None, "server"):
            home = work / "home-server"
            home.mkdir()
            env = base_env(marker, home, code)
            say("server: starting prefect server")
            api_url, started = start_server(children, env)
            figures["server_start_s"] = round(started, 1)
            mode = Mode("server", work, {**env, "PREFECT_API_URL": api_url}, batch, bare)
            modes.append(mode)
            figures["modes"]["server"] = measure_mode(mode, repeats, first_repeats, say)
    except BaseException:
        print(f"(logs kept in {work})", file=sys.stderr)
        args.keep = True
        raise
    finally:
        clean_up(work, marker, modes, children)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    provenance.finish(figures)
    if not args.in_place:  # the runs imported the copy taken at the start: later edits of the tree are not in them
        provenance.code["work_tree_changed_during_run"] = provenance.code["changed_during_run"]
        provenance.code["changed_during_run"] = False
    print_tables(figures)
    provenance.print(f"; elapsed {figures['elapsed_s']} s.")
    if not args.in_place:
        print(
            "The runs imported a copy of that code taken at the start"
            + (" (the work tree changed since)." if provenance.code["work_tree_changed_during_run"] else ".")
        )
    print_json(figures)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted (everything it started is stopped)") from None
