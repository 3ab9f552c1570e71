"""Many workers, measured (issue 11): R deployment runs of 10 commands queued at once over 1, 2 and 3 workers.

Run it from the project root::

    python bench/workers.py                          # R=200 over 1, 2 and 3 workers, on PostgreSQL
    python bench/workers.py --quick                  # R=20 over 1 and 2 workers (development)
    python bench/workers.py --runs 100 --workers 2 3 --limit 2 --sqlite

For each worker count W, on a stack of its own (so that no count pays for a
database the one before filled):

- a PostgreSQL server of its own (``tests/postgres_support.py``: a temporary
  cluster on 127.0.0.1, as the operations tests start it), or Prefect's SQLite
  with ``--sqlite``;
- ``dispatch up --database URL --workers W --limit L --no-hub`` in a copy of
  the project (the files a worker needs, as the ``dispatch up`` tests copy
  them) with a ``PREFECT_HOME`` of its own. In that copy the scheduled example
  deployment's schedule is made inactive, so that no run but ours lands on the
  workers;
- once the W workers are online, R runs of ``dispatch-batch/on-demand`` are
  created at once (``create_flow_run_from_deployment``, 8 requests in
  flight), each with 10 commands (``add`` and ``echo`` on the demo server of
  ``examples/mcp.json``, which also starts the ``time`` server: real MCP calls
  in the flow run's own MCP servers), every command with a call_id of its own;
  every tenth run's last command is the demo server's ``fail``, so that run
  must end Failed with its 10 Results, the others Completed;
- the runs' states are read every second until every run is final, or until
  ``--timeout``: then the runs not final are reported by state and the checks
  fail.

Checked for every run, once they are all final: its state is Completed, or
Failed for the tenth ones; it ran once (``run_count`` 1, one Running state in
its history, one ``prefect.worker.submitted-flow-run`` event); its
``batch-results`` artifact has 10 rows whose call_ids are the run's own, each
once; and each call_id has exactly one task run in the API (a command run
twice would have two). The concurrency limit is read twice: this script
counts, every 0.25 s, the flow processes (``-m prefect.engine``) each worker
process has as children, whose maximum must be at most L (children only: a
process the engine forks to start an MCP server shows the engine's command
line until it execs); and from the state histories (Running to final) with
the events (which worker submitted which run), the most runs of one worker
Running at once, also at most L (a run is Running and final while its process
lives, which is while it holds its worker's slot).

Figures: runs per minute, from the first run created to the last final state
(the server's timestamps); the median time from creation to final state; the
CPU seconds per run of every process of the stack (the Prefect server, each
worker with the flow processes and MCP servers it started, ``dispatch up``
itself, PostgreSQL with its backends), from just before the first run is
created until the server is quiet again after the last one (its recorders write
task runs and events after the fact), summed and divided by R; the server's
share of it (and the server's with PostgreSQL's), the idle CPU of the stack
(measured for 5 s before the runs), this process's CPU (the client) on its
own line, and the cores every other process of the machine kept busy over the
same window (``/proc/stat``): on a shared machine, what the stack competed
with. On 2 cores the runs per minute are bounded by CPU: the CPU per run is
the figure that transfers to other machines (cores / CPU per run = the most
runs per second a machine can sustain, at full load).

Every child runs in a process group of its own; at the end (or on an error or
Ctrl-C) ``dispatch up`` gets SIGTERM and stops its stack, and whatever is left
of it is killed; the PostgreSQL cluster is stopped and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

from harness import ROOT, Provenance, arguments, broken, print_json, table, wait_quiet
from processes import Children, free_port, proc_table, process_cpu, subtree

# The PostgreSQL the operations tests run on, started the same way: importing it beats a second copy.
sys.path.insert(0, str(ROOT / "tests"))
from postgres_support import Postgres, running_postgres

CODE_PACKAGES = ("aip", "dispatchers", "flows", "tasks", "cli")
DEPLOYMENT = "dispatch-batch/on-demand"
POOL = "dispatch"
CONFIG = "examples/mcp.json"  # relative to the project the workers run flows from
COMMANDS = 10
#: What a copy of the project needs to be deployed and run by the workers (as the dispatch up tests copy it).
NOT_COPIED = shutil.ignore_patterns(
    ".venv", ".git", ".dispatch", "__pycache__", "*.egg-info", ".*_cache", "bench", "tests"
)
READY = "Ctrl-C stops everything"  # what dispatch up says once its workers are started
UP_TIMEOUT = 180.0  # seconds dispatch up may take to be ready
ONLINE_TIMEOUT = 120.0  # seconds the workers may take to come online after that
RECORDED_TIMEOUT = 120.0  # seconds the API may take to show every task run and event after the last run
SAMPLE = 0.25  # seconds between two counts of the flow processes under each worker
IN_FLIGHT = 8  # API requests at once from this process
IDLE_SECONDS = 5.0
ENGINE = "prefect.engine"  # in the command line of every flow process (the locked job template's command)


#: Every this many runs, the last command is the demo server's ``fail``: that run must end Failed, with 10 Results.
FAILING_EVERY = 10


def fails(run: int) -> bool:
    return run % FAILING_EVERY == FAILING_EVERY - 1


def commands(run: int, prefix: str) -> list[dict[str, Any]]:
    """The run's 10 commands, alternately ``add`` and ``echo`` (``fail`` last if it ``fails``), own call_ids."""
    found: list[dict[str, Any]] = [
        {
            "tool_name": "add" if i % 2 == 0 else "echo",
            "parameters": {"a": run, "b": i} if i % 2 == 0 else {"value": f"{run}-{i}"},
            "call_id": f"{prefix}-r{run}-c{i}",
        }
        for i in range(COMMANDS)
    ]
    if fails(run):
        found[-1] |= {"tool_name": "fail", "parameters": {"message": "failed on purpose"}}
    return found


# -- processes ----------------------------------------------------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Stack:
    """The processes of one stack by role: server, worker-N, up (dispatch up alone), postgres."""

    up: int
    postgres: int | None
    roots: dict[str, int] = field(default_factory=dict)

    def find(self, workers: int) -> None:
        """The server and the workers among dispatch up's children."""
        table = proc_table()
        for pid, (parent, _) in table.items():
            if parent != self.up:
                continue
            line = cmdline(pid)
            if "cli.prefect_server" in line:
                self.roots["server"] = pid
            elif "worker start" in line:
                name = line.split("--name ", 1)[1].split()[0] if "--name " in line else "worker"
                self.roots[name] = pid
        if "server" not in self.roots or len(self.workers()) != workers:
            raise broken(f"dispatch up's children are not a server and {workers} workers: {self.roots}")

    def workers(self) -> list[str]:
        return sorted(name for name in self.roots if name != "server")

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each role's process tree (the reaped processes too: their parents' cutime)."""
        table = proc_table()
        found: dict[str, float] = {}
        trees = {name: subtree(pid, table) for name, pid in self.roots.items()}
        for name, pids in trees.items():
            found[name] = sum(table[pid][1] for pid in pids)
        others = set().union(*trees.values())
        found["up"] = sum(table[pid][1] for pid in subtree(self.up, table) - others)
        if self.postgres is not None:
            found["postgres"] = sum(table[pid][1] for pid in subtree(self.postgres, table))
        return found

    def flow_processes(self) -> dict[str, int]:
        """How many flow processes each worker has now: its own children running the engine.

        Children only: a process the engine forks to start an MCP server shows the engine's command line
        until it execs, and would count as a second flow process.
        """
        table = proc_table()
        workers = {self.roots[name]: name for name in self.workers()}
        found = dict.fromkeys(workers.values(), 0)
        for pid, (parent, _) in table.items():
            if parent in workers and ENGINE in cmdline(pid):
                found[workers[parent]] += 1
        return found


def machine_busy() -> float:
    """CPU seconds every process of the machine has used so far (``/proc/stat``: all but idle and iowait)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def postmaster(database: Postgres) -> int:
    """The PostgreSQL server's pid: the first line of ``postmaster.pid`` in its data folder (beside its log)."""
    return int((database.log.parent / "data" / "postmaster.pid").read_text().split()[0])


def stop_up(children: Children, up: subprocess.Popen[bytes]) -> float:
    """SIGTERM dispatch up (it stops its stack), up to a minute; then kill whatever is left of it. Seconds taken."""
    begin = time.monotonic()
    before = subtree(up.pid, proc_table())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(up.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        up.wait(timeout=60)
    children.stop()
    for pid in before & set(proc_table()):  # a child dispatch up could not stop (it is in a group of its own)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return time.monotonic() - begin


def child_env(home: Path, project: Path) -> dict[str, str]:
    """dispatch up's environment: none of this one's Prefect or dispatch settings, a home of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "DISPATCH_")) or key == "DISPATCH_SERVICE"
    }
    return env | {
        "PREFECT_HOME": str(home),
        "PREFECT_UI_ENABLED": "false",
        "PYTHONPATH": str(project),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DISPATCH_SERVICE": "off",
    }


def project_copy(folder: Path) -> Path:
    """The project as the workers run it, the scheduled example's schedule inactive (no runs but ours)."""
    project = folder / "project"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    deployments = project / "prefect.yaml"
    text = deployments.read_text()
    if text.count("active: true") != 1:
        raise broken("prefect.yaml no longer has the one active schedule this benchmark turns off")
    deployments.write_text(text.replace("active: true", "active: false"))
    return project


# -- reading the API ----------------------------------------------------------------------------------


async def paged(read: Any, page: int = 200) -> list[Any]:
    """Every item of ``read(limit=, offset=)``, page by page."""
    found: list[Any] = []
    while True:
        items = await read(limit=page, offset=len(found))
        found.extend(items)
        if len(items) < page:
            return found


async def gathered(calls: Sequence[Any]) -> list[Any]:
    """The awaitables' results, at most ``IN_FLIGHT`` at once."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(call: Any) -> Any:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(call) for call in calls)))


def most_at_once(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals (start, end) open at one time."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@dataclass
class Checks:
    """What was found wrong, by kind (empty lists: nothing)."""

    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, what: str) -> None:
        self.problems.setdefault(kind, []).append(what)

    def counts(self) -> dict[str, int]:
        return {kind: len(items) for kind, items in self.problems.items()}


async def submissions(client: Any, ids: set[str], deadline: float) -> dict[str, list[str]]:
    """The workers that submitted each run (by run id), once every run has one submission or the deadline passed."""
    from prefect.events.filters import EventFilter, EventNameFilter

    while True:
        page = await client.read_events(
            EventFilter(event=EventNameFilter(prefix=["prefect.worker.submitted-flow-run"])), limit=50
        )
        events = list(page.events)
        while page.next_page is not None:
            page = await client.read_events_page(page.next_page)
            events.extend(page.events)
        by_run: dict[str, list[str]] = {}
        for event in events:
            for related in event.related:
                if related.role == "flow-run":
                    by_run.setdefault(related.id.removeprefix("prefect.flow-run."), []).append(event.resource.name)
        if ids <= set(by_run) or time.monotonic() > deadline:
            return by_run
        await asyncio.sleep(1)


async def task_runs(client: Any, ids: list[UUID], expected: int, deadline: float) -> list[Any]:
    """The runs' task runs, once ``expected`` are recorded (or the deadline passed)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=ids))
    while True:
        found = await paged(lambda **page: client.read_task_runs(flow_run_filter=flow_runs, **page))
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1)


# -- one stack ----------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, stack: Stack, workers: int, prefix: str) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.objects import StateType

    figures: dict[str, Any] = {}
    checks = Checks()
    async with get_client() as client:
        begin = time.monotonic()
        while len([w for w in await client.read_workers_for_work_pool(POOL) if w.status.value == "ONLINE"]) < workers:
            if time.monotonic() - begin > ONLINE_TIMEOUT:
                raise broken(f"{workers} workers were not online within {ONLINE_TIMEOUT:g} s")
            await asyncio.sleep(0.5)
        stack.find(workers)
        deployment = await client.read_deployment_by_name(DEPLOYMENT)

        before, at = stack.cpu(), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        idle, idle_for = stack.cpu(), time.monotonic() - at
        figures["idle_cpu_cores"] = round(sum(idle[k] - before[k] for k in idle) / idle_for, 3)

        mark, client_mark, machine_mark = stack.cpu(), process_cpu(os.getpid()), machine_busy()
        t0 = time.time()
        created = await gathered(
            [
                client.create_flow_run_from_deployment(
                    deployment.id, parameters={"commands": commands(run, prefix), "config": CONFIG}
                )
                for run in range(args.runs)
            ]
        )
        figures["queue_s"] = round(time.time() - t0, 2)
        ids = [run.id for run in created]
        number = {run.id: index for index, run in enumerate(created)}
        by_id = FlowRunFilter(id=FlowRunFilterId(any_=ids))

        peak: dict[str, int] = dict.fromkeys(stack.workers(), 0)
        deadline = time.monotonic() + args.timeout
        runs: list[Any] = []
        while time.monotonic() < deadline:
            runs = await paged(lambda **page: client.read_flow_runs(flow_run_filter=by_id, **page))
            if len(runs) == len(ids) and all(run.state is not None and run.state.is_final() for run in runs):
                break
            for _ in range(4):
                for name, count in stack.flow_processes().items():
                    peak[name] = max(peak[name], count)
                await asyncio.sleep(SAMPLE)
        seen_final = time.time()
        # The server records task runs and events after the fact: their CPU belongs to the runs too.
        await wait_quiet(lambda: stack.cpu()["server"], 0.15, 60.0, 0.5)
        end, client_end, machine_end = stack.cpu(), process_cpu(os.getpid()), machine_busy()

        for index in sorted(set(number.values()) - {number[run.id] for run in runs}):
            checks.add("missing", f"run {index}: not in the API")
        not_final = [run for run in runs if run.state is None or not run.state.is_final()]
        for run in not_final:
            checks.add("not_final", f"run {number[run.id]}: {run.state.name if run.state else 'no state'}")
        by_state: dict[str, int] = {}
        for run in runs:
            name = run.state.name if run.state else "none"
            by_state[name] = by_state.get(name, 0) + 1
            expected = StateType.FAILED if fails(number[run.id]) else StateType.COMPLETED
            if run.state is not None and run.state.is_final() and run.state.type is not expected:
                checks.add("unexpected_state", f"run {number[run.id]}: {run.state.name}, expected {expected.value}")
            if run.run_count != 1:
                checks.add("run_count", f"run {number[run.id]}: run_count {run.run_count}")
        figures["states"] = by_state

        # Throughput: first created to last final, on the server's clock.
        finals = [run.state.timestamp.timestamp() for run in runs if run.state is not None and run.state.is_final()]
        last = max(finals) if finals else seen_final
        span = last - t0
        figures["span_s"] = round(span, 1)
        figures["runs_per_min"] = round(len(finals) / span * 60, 2) if span > 0 else 0.0
        latencies = [
            run.state.timestamp.timestamp() - run.created.timestamp()
            for run in runs
            if run.state and run.state.is_final()
        ]
        figures["latency_median_s"] = round(statistics.median(latencies), 1) if latencies else None

        # CPU: every process of the stack, from just before the first run to the server quiet after the last.
        spent = {name: end[name] - mark.get(name, 0.0) for name in end}
        total = sum(spent.values())
        r = args.runs
        workers_cpu = sum(spent[name] for name in stack.workers())
        figures["cpu_per_run_s"] = {
            "total": round(total / r, 2),
            "server": round(spent["server"] / r, 2),
            "workers_and_flows": round(workers_cpu / r, 2),
            "up": round(spent["up"] / r, 3),
            **({"postgres": round(spent["postgres"] / r, 2)} if "postgres" in spent else {}),
            "client": round((client_end - client_mark) / r, 3),
        }
        figures["server_share"] = round(spent["server"] / total, 3) if total else None
        if "postgres" in spent:
            figures["server_and_postgres_share"] = round((spent["server"] + spent["postgres"]) / total, 3)
        figures["cpu_window_s"] = round(time.monotonic() - at - idle_for, 1)
        window = figures["cpu_window_s"]
        figures["cpu_cores_busy"] = round(total / window, 2) if window else None
        # The machine is shared: what everything else used meanwhile (the client's share is ours, not theirs).
        others = machine_end - machine_mark - total - (client_end - client_mark)
        figures["other_cores_busy"] = round(others / window, 2) if window else None

        # Results: the batch-results table of each run, 10 rows, its own call_ids, each once.
        artifacts = await paged(
            lambda **page: client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=ids), key=ArtifactFilterKey(any_=["batch-results"])
                ),
                **page,
            )
        )
        tables: dict[UUID, list[Any]] = {}
        for artifact in artifacts:
            if artifact.flow_run_id is not None:
                tables.setdefault(artifact.flow_run_id, []).append(artifact)
        for run_id in ids:
            index = number[run_id]
            expected = sorted(command["call_id"] for command in commands(index, prefix))
            found = tables.get(run_id, [])
            if len(found) != 1:
                checks.add("results_table", f"run {index}: {len(found)} batch-results tables")
                continue
            data = found[0].data
            rows = json.loads(data) if isinstance(data, str) else data
            call_ids = sorted(str(row.get("call_id")) for row in rows) if isinstance(rows, list) else []
            if call_ids != expected:
                checks.add("results", f"run {index}: {len(call_ids)} Results, call_ids {call_ids[:3]}...")

        # No command twice: one task run per call_id (the task run's name is tool[call_id]).
        recorded_by = time.monotonic() + RECORDED_TIMEOUT
        tasks = await task_runs(client, ids, r * COMMANDS, recorded_by)
        per_call: dict[str, int] = {}
        for task in tasks:
            call_id = task.name.rsplit("[", 1)[-1].rstrip("]")
            per_call[call_id] = per_call.get(call_id, 0) + 1
        every = {command["call_id"] for run in range(r) for command in commands(run, prefix)}
        for call_id in sorted(every):
            if per_call.get(call_id, 0) != 1:
                checks.add("task_runs_per_call_id", f"{call_id}: {per_call.get(call_id, 0)} task runs")
        if stray := set(per_call) - every:
            checks.add("stray_task_runs", f"{len(stray)} task runs of no command queued here")
        figures["task_runs"] = len(tasks)

        # Each run once: one submission by one worker, one Running state in its history.
        submitted = await submissions(client, {str(run_id) for run_id in ids}, recorded_by)
        histories = await gathered([client.read_flow_run_states(run_id) for run_id in ids])
        intervals: dict[str, list[tuple[float, float]]] = {}
        everything: list[tuple[float, float]] = []
        for run_id, states in zip(ids, histories, strict=True):
            index = number[run_id]
            by = submitted.get(str(run_id), [])
            if len(by) != 1:
                checks.add("submissions", f"run {index}: submitted {len(by)} times ({by})")
            running = [s.timestamp.timestamp() for s in states if s.type is StateType.RUNNING]
            final = [s.timestamp.timestamp() for s in states if s.is_final()]
            if len(running) != 1:
                checks.add("running_states", f"run {index}: {len(running)} Running states")
            if running and final:
                interval = (min(running), max(final))
                everything.append(interval)
                if by:
                    intervals.setdefault(by[0], []).append(interval)
        figures["runs_per_worker"] = {name: len(items) for name, items in sorted(intervals.items())}
        figures["max_running_per_worker_api"] = {name: most_at_once(items) for name, items in sorted(intervals.items())}
        figures["max_running_all_api"] = most_at_once(everything)
        figures["max_flow_processes_per_worker"] = peak
        for name, most in peak.items():
            if most > args.limit:
                checks.add("limit_processes", f"{name}: {most} flow processes at once, limit {args.limit}")
        for name, most in figures["max_running_per_worker_api"].items():
            if most > args.limit:
                checks.add("limit_api", f"{name}: {most} runs Running at once, limit {args.limit}")
    figures["problems"] = checks.counts()
    figures["problem_examples"] = {kind: items[:5] for kind, items in checks.problems.items()}
    figures["ok"] = not checks.problems
    return figures


@contextlib.contextmanager
def database(sqlite: bool) -> Iterator[Postgres | None]:
    if sqlite:
        yield None
        return
    with running_postgres() as server:
        yield server


def one_stack(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Start PostgreSQL (unless --sqlite) and dispatch up with ``workers`` workers; measure; stop everything."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    folder = Path(tempfile.mkdtemp(prefix=f"bench-workers-{workers}-"))
    figures: dict[str, Any] = {"workers": workers}
    try:
        project = project_copy(folder)
        env = child_env(folder / "home", project)
        port = free_port()
        begin = time.monotonic()
        with database(args.sqlite) as db:
            options = ["--workers", str(workers), "--limit", str(args.limit)]
            if db is not None:
                options += ["--database", db.url]
            children = Children(folder, project)
            argv = [sys.executable, "-m", "cli.main", "up", "--port", str(port), "--no-hub", *options]
            up = children.start("up", argv, env)
            try:
                log = folder / "up.log"
                while READY not in log.read_text(errors="replace"):
                    if up.poll() is not None or time.monotonic() - begin > UP_TIMEOUT:
                        raise broken(f"dispatch up was not ready:\n{log.read_text(errors='replace')[-3000:]}")
                    time.sleep(0.25)
                figures["up_s"] = round(time.monotonic() - begin, 1)
                auth = (project / ".dispatch" / "prefect-auth").read_text().strip()
                stack = Stack(up.pid, postmaster(db) if db is not None else None)
                settings = {PREFECT_API_URL: f"http://127.0.0.1:{port}/api", PREFECT_API_AUTH_STRING: auth}
                with temporary_settings(updates=settings):
                    figures.update(asyncio.run(measure(args, stack, workers, f"w{workers}")))
            finally:
                figures["stop_s"] = round(stop_up(children, up), 1)
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return figures


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def cpu(item: dict[str, Any], key: str) -> str:
        value = item["cpu_per_run_s"].get(key)
        return "" if value is None else f"{value:.2f} s"

    def row(title: str, cell: Any) -> list[str]:
        return [title, *(cell(item) for item in results)]

    backend = "SQLite" if args.sqlite else "PostgreSQL"
    print(
        f"{args.runs} deployment runs of {COMMANDS} commands queued at once, limit {args.limit} per worker, {backend}"
    )
    rows = [
        row(
            "runs: Completed / Failed / other",
            lambda i: "{} / {} / {}".format(
                i["states"].get("Completed", 0),
                i["states"].get("Failed", 0),
                args.runs - i["states"].get("Completed", 0) - i["states"].get("Failed", 0),
            ),
        ),
        row("* runs per minute", lambda i: f"{i['runs_per_min']:.1f}"),
        row("first created -> last final", lambda i: f"{i['span_s']:.0f} s"),
        row("created -> final, median", lambda i: f"{i['latency_median_s']} s"),
        row("* CPU per run, whole stack", lambda i: cpu(i, "total")),
        row("  Prefect server", lambda i: cpu(i, "server")),
        row("  workers + flow processes + MCP", lambda i: cpu(i, "workers_and_flows")),
        row("  PostgreSQL", lambda i: cpu(i, "postgres")),
        row("  this client (not in the total)", lambda i: cpu(i, "client")),
        row("server share of the stack's CPU", lambda i: f"{i['server_share']:.0%}"),
        row("cores busy over the window", lambda i: f"{i['cpu_cores_busy']:.2f}"),
        row("other processes of the machine, cores", lambda i: f"{i['other_cores_busy']:.2f}"),
        row("idle stack, cores", lambda i: f"{i['idle_cpu_cores']:.2f}"),
        row("runs per worker", lambda i: " ".join(str(v) for v in i["runs_per_worker"].values())),
        row(
            "max flow processes / worker",
            lambda i: " ".join(str(v) for v in i["max_flow_processes_per_worker"].values()),
        ),
        row("max Running / worker (API)", lambda i: " ".join(str(v) for v in i["max_running_per_worker_api"].values())),
        row("checks", lambda i: "ok" if i["ok"] else "FAILED"),
    ]
    table(["", *(f"{item['workers']} worker" + ("s" if item["workers"] > 1 else "") for item in results)], rows)
    for item in results:
        for kind, examples in item["problem_examples"].items():
            print(f"{item['workers']} workers, {kind} ({item['problems'][kind]}): {'; '.join(examples)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--runs", type=int, default=200, help="runs queued at once (default 200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker counts (default 1 2 3)")
    parser.add_argument("--limit", type=int, default=2, help="flow runs at once per worker (default 2)")
    parser.add_argument("--sqlite", action="store_true", help="Prefect's SQLite instead of PostgreSQL")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for every run to be final (default 900)")
    parser.add_argument("--quick", action="store_true", help="20 runs over 1 and 2 workers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs, project, home)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.workers = 20, [1, 2]
    if min(args.runs, args.limit, *args.workers) < 1:
        parser.error("counts must be at least 1")

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "date": date.today().isoformat(),
        "runs": args.runs,
        "limit": args.limit,
        "database": "sqlite" if args.sqlite else "postgresql",
        "code": provenance.code,
    }
    # This process's Prefect client: a home of its own (never ~/.prefect), the API set per stack.
    client_home = Path(tempfile.mkdtemp(prefix="bench-workers-client-"))
    for key in [key for key in os.environ if key.startswith("PREFECT_")]:
        del os.environ[key]
    os.environ.update(
        {"PREFECT_HOME": str(client_home), "DO_NOT_TRACK": "1", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks stop the children
    results = []
    try:
        for workers in args.workers:
            results.append(one_stack(args, workers))
            print(f"{workers} workers: {results[-1]['runs_per_min']} runs/min", file=sys.stderr)
    finally:
        shutil.rmtree(client_home, ignore_errors=True)
    figures["stacks"] = results
    provenance.finish(figures)
    print_table(results, args)
    provenance.print()
    print(f"Elapsed {figures['elapsed_s']} s.")
    print_json(figures)
    if not all(item["ok"] for item in results):
        raise broken("some runs were lost, run twice, or broke the limit (see above)")


if __name__ == "__main__":
    main()
