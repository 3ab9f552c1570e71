"""What a deployment run costs against the same batch in-process, and what persisting Results costs.

Run it from the project root::

    python bench/deployment.py           # about 4 minutes on 2 cores
    python bench/deployment.py --quick   # smoke run, about 2 minutes
    python bench/deployment.py --server-env NAME=VALUE ...   # a server setting over SERVER_TUNING

Everything runs against a real ``prefect server start`` on 127.0.0.1 that this
script starts with a temporary ``PREFECT_HOME`` (its own SQLite database and
result storage; ``~/.prefect`` is not touched), the server settings of
``cli.up.SERVER_TUNING``, ``DO_NOT_TRACK=1`` and
``PREFECT_SERVER_ANALYTICS_ENABLED=false``. As ``dispatch up`` does, it creates
the process pool ``dispatch`` and deploys ``on-demand`` from ``prefect.yaml``
(``prefect --no-prompt deploy --name on-demand``; not the scheduled deployment,
whose runs would land in the middle of the measurements). Two process workers
serve the pool: ``prefect worker start --pool dispatch --work-queue default``
with ``PREFECT_WORKER_QUERY_SECONDS=1``, and one on a second queue, ``slow``,
with the default poll interval (10 s). Every child runs in a process group of
its own; at the end (or on an error or Ctrl-C) each group gets SIGTERM, then
SIGKILL after a grace, and any process they started that is still alive is
killed too.

(1) Trigger to completion of one 10-command batch (5 ``add`` and 5 ``echo``
    on the demo server of ``examples/mcp.json``, the flow's default settings,
    ``persist_results`` on as by default), per repetition, in a rotating order:

    - *deployment, poll 1 s*: ``run_deployment("dispatch-batch/on-demand",
      parameters=..., timeout=0)`` (the client call that ``prefect deployment
      run`` makes), then ``read_flow_run`` every 0.2 s until the run is final.
      The ``default`` queue, so the 1 s worker runs it in a fresh subprocess
      that starts the MCP servers of ``examples/mcp.json`` (``demo`` and
      ``time``).
    - *deployment, poll 10 s*: the same on the ``slow`` queue (fewer
      repetitions: each costs up to 10 s more; the wait for the poll is
      uniform between 0 and 10 s, so two or three runs only show its range).
    - *in-process, MCP servers cold*: ``await dispatch_batch(...)`` in this
      process, against the same API, inside a ``dispatchers.ServerPool`` of
      its own, opened just before the call and closed after it (untimed), so
      the run starts its MCP servers, as the subprocess does.
    - *in-process, servers warm*: the same inside the one ``ServerPool`` that
      stays open around every warm run, its servers already running (the
      warm-up started them), as every batch after the first in a long-lived
      process (``dispatch run``); and again as an A/A pair. The script checks
      that each in-process run took its servers from its pool and that no
      warm run restarted them.

    The breakdown comes from the flow run's state timestamps and its task
    runs: trigger to Pending (the worker picked the run up: the API call
    creating it, then the wait for the worker's next poll), Pending to Running
    (the worker starts ``python -m prefect.engine``, which imports Prefect and
    our packages and loads the flow), Running to the first command's task run
    (the flow's own set-up), first command start to last command end, last
    command to Completed (results table, events, the flow's end). For
    in-process runs the first phase is the call to Running (creating the flow
    run). Also: when ``run_deployment`` returned, when polling saw the final
    state, and how long after Completed the flow's process (and the MCP
    servers it started) had exited. Each figure is a median over the
    repetitions; the phases are medians of their own, so they need not add up
    to the median total. The client side of the deployment path is measured as
    ``prefect deployment run`` itself too (the CLI, a Python process of its
    own): the wall time of the command, and its run's trigger to Completed.

(2) The cost of persisting Results: the same in-process batch of 100
    commands, servers warm, with ``persist_results=True`` and ``False``
    (and ``False`` again, the A/A pair), interleaved. The difference per
    command, and the ratio, of the time from the first command's start to
    the last one's end (the flow runs commands one after the other by
    default, so that is the sum of the commands' times), and of the median
    task run (start to end, over each run's 100; the result is written
    before the task run ends); the flow call's wall
    time too, but the end of a flow waits for the progress artifact's writer,
    which adds between 0 and 1 s depending on when the last write was, so its
    A/A moves by tenths. The script checks that each persisted run wrote
    100 result files into the temporary storage (so none was a cache hit) and
    that the others wrote none.

After each run the script waits, untimed, until the API server's CPU is back
to its idle rate (the recorders write task runs and events after the fact),
and records this process's CPU (with its MCP servers), the server's and the
workers' (each worker with its flow subprocesses and their MCP servers) for
the run, less each process's idle rate (measured once, after the warm-up
runs) over the same time. The script warns when the idle API server uses more
than a tenth of a core: then it competes with everything measured. The machine
is shared and noisy: read the ratios against the A/A rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

from harness import ROOT, Provenance, arguments, broken, interleaved, ms, print_json, table, wait_quiet
from processes import Children, free_port, proc_table, subtree

from dispatchers import MCPServerManager, ServerPool  # no Prefect: it is imported once the environment is set

CODE_PACKAGES = ("aip", "dispatchers", "flows", "tasks", "cli")
POOL = "dispatch"
DEPLOYMENT = "dispatch-batch/on-demand"
#: Queues of the pool and the poll interval (PREFECT_WORKER_QUERY_SECONDS) of the worker serving each.
QUEUES = {"default": 1, "slow": 10}
CONFIG = "examples/mcp.json"  # as a deployment gets it: relative to the worker's working directory (ROOT)
POLL = 0.2  # seconds between two reads of a deployment run's state
RUN_LIMIT = 120.0  # seconds a deployment run may take, trigger to exit, before the benchmark gives up
SETTLE_LIMIT = 10.0  # seconds the wait for an idle API server may take after a run
#: Above this idle CPU rate (cores) of the API server, the figures are suspect and the script says so.
IDLE_WARNING = 0.1
#: The Prefect CLI of this environment.
PREFECT = str(Path(sys.executable).parent / "prefect")


def batch(count: int) -> list[dict[str, Any]]:
    """``count`` commands without call_ids (each run derives its own), alternately ``add`` and ``echo``."""
    return [
        {"tool_name": "add", "parameters": {"a": i, "b": 1}}
        if i % 2 == 0
        else {"tool_name": "echo", "parameters": {"value": i}}
        for i in range(count)
    ]


# -- processes ----------------------------------------------------------------------------------


class Meter:
    """CPU seconds so far of this process (with its MCP servers), of the API server and of each worker."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots

    def read(self) -> dict[str, float]:
        table = proc_table()
        trees = {name: subtree(pid, table) for name, pid in self.roots.items()}
        ours = subtree(os.getpid(), table) - set().union(*trees.values())
        cpu = {name: sum(table[pid][1] for pid in pids) for name, pids in trees.items()}
        cpu["client"] = sum(table[pid][1] for pid in ours)
        return cpu

    def busy_workers(self, worker: str) -> bool:
        table = proc_table()
        return len(subtree(self.roots[worker], table)) > 1


class Settle:
    """Waits, untimed, until the API server's CPU rate is back near its idle rate; CPU per run since last time."""

    def __init__(self, meter: Meter, window: float = 0.25) -> None:
        self.meter, self.window = meter, window
        self.idle: dict[str, float] = {}
        self.mark, self.mark_at = meter.read(), time.perf_counter()

    async def calibrate(self, seconds: float = 3.0) -> None:
        """The idle CPU rate of each process (cores), over ``seconds`` of doing nothing."""
        before, begin = self.meter.read(), time.perf_counter()
        await asyncio.sleep(seconds)
        now, elapsed = self.meter.read(), time.perf_counter() - begin
        self.idle = {name: (now[name] - before[name]) / elapsed for name in now}
        self.mark, self.mark_at = now, time.perf_counter()

    async def __call__(self) -> dict[str, float]:
        """Wait; then each process's CPU since the last call, less its idle rate over that time."""
        started = time.perf_counter()
        quiet_rate = self.idle.get("server", 0.0) * 1.5 + 0.04
        quiet = await wait_quiet(lambda: self.meter.read()["server"], quiet_rate, SETTLE_LIMIT, self.window)
        now_all, at = self.meter.read(), time.perf_counter()
        elapsed = at - self.mark_at
        figures = {
            f"{name}_cpu": now_all[name] - self.mark[name] - self.idle.get(name, 0.0) * elapsed for name in now_all
        }
        figures["settle"] = at - started
        figures["settle_limit_hit"] = float(not quiet)
        self.mark, self.mark_at = now_all, at
        return figures


# -- one run of each kind ------------------------------------------------------------------------


class Pool(ServerPool):
    """A ``ServerPool`` that counts the managers it hands out: the proof that a flow run took its servers here."""

    def __init__(self) -> None:
        super().__init__()
        self.handed_out = 0

    def manager(self, source: str | Path | Mapping[str, Any]) -> MCPServerManager:
        self.handed_out += 1
        return super().manager(source)


Run = dict[str, float]


async def phases(client: Any, flow_run_id: UUID, t0: float, count: int) -> Run:
    """Times (seconds) from ``t0`` (epoch) to each state of the flow run and to its first/last task run.

    The server records task runs after the fact: they are read again until all ``count`` are there.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states = await client.read_flow_run_states(flow_run_id)
    first: dict[str, float] = {}
    for state in sorted(states, key=lambda s: s.timestamp):
        first.setdefault(state.type.value, state.timestamp.timestamp() - t0)
    begin = time.perf_counter()
    while True:
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        ends = [t.end_time.timestamp() - t0 for t in tasks if t.end_time]
        if len(ends) >= count or time.perf_counter() - begin > SETTLE_LIMIT:
            break
        await asyncio.sleep(0.25)
    starts = [t.start_time.timestamp() - t0 for t in tasks if t.start_time]
    found = {key.lower(): value for key, value in first.items()}
    found["tasks"] = len(tasks)
    if starts and ends:
        found["first_task"], found["last_task"] = min(starts), max(ends)
    durations = [(t.end_time - t.start_time).total_seconds() for t in tasks if t.start_time and t.end_time]
    if durations:
        found["task_median"] = statistics.median(durations)
    return found


async def still_up(manager: MCPServerManager, before: MCPServerManager, clients: list[Any]) -> bool:
    """Whether ``manager`` is ``before`` and each of its servers still runs the client it had (no restart)."""
    if manager is not before:
        return False
    now = [await server.client() for server in manager.servers.values()]
    return len(now) == len(clients) and all(a is b for a, b in zip(now, clients, strict=True))


def split(times: Run, since: str) -> Run:
    """Phase durations from the times of ``phases``: ``since`` (pending or t0) to running, and so on."""
    begin = times.get(since, 0.0) if since != "t0" else 0.0
    out = {
        "to_running": times["running"] - begin,
        "setup": times["first_task"] - times["running"],
        "commands": times["last_task"] - times["first_task"],
        "finish": times["completed"] - times["last_task"],
        "total": times["completed"],
        "task": times.get("task_median", 0.0),
    }
    if since == "pending":
        out["pickup"] = times["pending"]
    return out


@dataclass
class Bench:
    client: Any
    meter: Meter
    settle: Settle
    storage: Path
    size: int
    #: The pool open around every warm in-process run, entered by ``measure``.
    warm: Pool
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def record(self, label: str, run: Run) -> None:
        self.runs.setdefault(label, []).append(run)

    def stored_files(self) -> int:
        return sum(1 for path in self.storage.rglob("*") if path.is_file()) if self.storage.exists() else 0

    async def wait_final(self, flow_run_id: UUID, begin: float, worker: str) -> tuple[Any, float, float]:
        """Poll until the run is final; then until the worker's flow process exited. (run, seen, exited) in s."""
        while True:
            run = await self.client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                break
            if time.perf_counter() - begin > RUN_LIMIT:
                raise broken(f"flow run {flow_run_id} not final after {RUN_LIMIT:g} s")
            await asyncio.sleep(POLL)
        seen = time.perf_counter() - begin
        if not run.state.is_completed():
            raise broken(f"deployment run ended {run.state.name}: {run.state.message}")
        while self.meter.busy_workers(worker):
            if time.perf_counter() - begin > RUN_LIMIT:
                raise broken(f"the flow process of {flow_run_id} did not exit")
            await asyncio.sleep(0.05)
        return run, seen, time.time()

    async def deployment(self, queue: str, label: str) -> None:
        from prefect.deployments import arun_deployment

        parameters = {"commands": batch(self.size), "batch_file": None, "config": CONFIG}
        files = self.stored_files()
        t0, begin = time.time(), time.perf_counter()
        created = await arun_deployment(
            DEPLOYMENT, parameters=parameters, timeout=0, work_queue_name=queue, as_subflow=False, client=self.client
        )
        returned = time.perf_counter() - begin
        run, seen, exited = await self.wait_final(created.id, begin, f"worker_{queue}")
        await self.record_deployment_run(label, run, t0, files, returned, seen, exited)

    async def cli(self, label: str) -> None:
        """``prefect deployment run`` (the CLI, no --watch) on the default queue, then the same polling."""
        parameters = json.dumps({"commands": batch(self.size), "batch_file": None, "config": CONFIG})
        files = self.stored_files()
        t0, begin = time.time(), time.perf_counter()
        done = await asyncio.to_thread(
            subprocess.run,
            [PREFECT, "deployment", "run", DEPLOYMENT, "--params", parameters],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        returned = time.perf_counter() - begin
        ids = [word for word in done.stdout.split() if len(word) == 36 and word.count("-") == 4]
        if done.returncode != 0 or not ids:
            raise broken(f"prefect deployment run failed:\n{done.stdout}\n{done.stderr}")
        run, seen, exited = await self.wait_final(UUID(ids[0]), begin, "worker_default")
        await self.record_deployment_run(label, run, t0, files, returned, seen, exited)

    async def record_deployment_run(
        self, label: str, run: Any, t0: float, files: int, returned: float, seen: float, exited: float
    ) -> None:
        """Phases, CPU and checks of one finished deployment run, however it was triggered."""
        cpu = await self.settle()
        times = await phases(self.client, run.id, t0, self.size)
        self.check(run.state.message, times, files + self.size, label)
        self.record(
            label,
            {
                **split(times, "pending"),
                "returned": returned,
                "seen": seen,
                "exit": exited - t0 - times["completed"],
                **cpu,
            },
        )

    async def in_process(self, label: str, count: int, cold: bool, persist: bool = True) -> None:
        """One ``dispatch_batch`` call here: in a fresh pool closed after it (``cold``), else in the warm one."""
        from flows.batch import dispatch_batch

        config = str(ROOT / CONFIG)
        pool = Pool() if cold else self.warm
        owner: AbstractAsyncContextManager[Pool] = pool if cold else nullcontext(pool)
        async with owner:  # current for the flow run; a cold pool stops its servers at the end (untimed)
            warm: tuple[MCPServerManager, list[Any]] | None = None
            if not cold:  # the warm servers, started (untimed) if need be: the run must find them up
                manager = pool.manager(config)
                warm = manager, [await server.client() for server in manager.servers.values()]
            handed_out = pool.handed_out
            files = self.stored_files()
            t0, begin = time.time(), time.perf_counter()
            state = await dispatch_batch(
                commands=batch(count), config=config, persist_results=persist, return_state=True
            )
            wall = time.perf_counter() - begin
            if pool.handed_out == handed_out:
                raise broken(f"{label}: the flow run did not take its MCP servers from the benchmark's pool")
            if warm is not None and not await still_up(pool.manager(config), *warm):
                raise broken("a warm in-process run did not use the warm MCP servers")
        results = await state.aresult(raise_on_failure=False)
        if not state.is_completed() or not isinstance(results, list) or len(results) != count:
            raise broken(f"dispatch_batch ended {state.name}: {state.message}")
        cpu = await self.settle()
        if state.state_details.flow_run_id is None:
            raise broken("the flow's final state names no flow run")
        times = await phases(self.client, state.state_details.flow_run_id, t0, count)
        self.check(state.message, times, files + (count if persist else 0), label, count)
        self.record(label, {**split(times, "t0"), "wall": wall, "returned": wall - times["completed"], **cpu})

    def check(self, message: str | None, times: Run, files: int, label: str, count: int | None = None) -> None:
        count = count or self.size
        if message != f"{count} commands succeeded":
            raise broken(f"{label}: {message}")
        missing = [key for key in ("running", "completed", "first_task", "last_task") if key not in times]
        if missing or times.get("tasks") != count:
            raise SystemExit(
                f"benchmark broken: {label}: no {missing} in the run's history, {times.get('tasks')} tasks"
            )
        if self.stored_files() != files:
            raise broken(f"{label}: {self.stored_files()} result files, expected {files}")


# -- the whole run -------------------------------------------------------------------------------


def child_env(home: Path, api_url: str, overrides: dict[str, str]) -> dict[str, str]:
    """The environment of the server, the workers, the CLI calls and (for Prefect) this process."""
    from cli.up import SERVER_TUNING

    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(SERVER_TUNING)
    env.update(overrides)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api_url,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The code measured is the code beside this script, in every process.
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            # prefect.yaml's pull step is `set_working_directory: {{ $PWD }}`: the worker runs flows here.
            "PWD": str(ROOT),
        }
    )
    return env


async def mcp_cold_starts(repeats: int) -> dict[str, float]:
    """Seconds to start each server of the config alone, and all of them together (medians; context)."""
    from dispatchers import MCPServerManager
    from dispatchers.mcp_config import load_config

    specs = load_config(ROOT / CONFIG)
    groups = {**{name: {name: spec} for name, spec in specs.items()}, "all": specs}
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for label, group in groups.items():
            manager = MCPServerManager(group)
            begin = time.perf_counter()
            await manager.start()
            times.setdefault(label, []).append(time.perf_counter() - begin)
            down = [name for name, connection in manager.servers.items() if not connection.available]
            await manager.close()
            if down:
                raise broken(f"MCP server(s) {down} did not start")
    return {label: statistics.median(values) for label, values in times.items()}


async def measure(args: argparse.Namespace, children: Children, home: Path, env: dict[str, str]) -> dict[str, Any]:
    from prefect import get_client

    from cli.up import run_step

    queues = {queue: seconds for queue, seconds in QUEUES.items() if queue == "default" or not args.skip_slow}
    figures: dict[str, Any] = {}
    async with get_client() as client:
        begin = time.perf_counter()
        for queue, seconds in queues.items():
            if queue != "default":
                await client.create_work_queue(name=queue, work_pool_name=POOL)
            await asyncio.to_thread(
                children.start,
                f"worker_{queue}",
                [PREFECT, "worker", "start", "--pool", POOL, "--work-queue", queue],
                {**env, "PREFECT_WORKER_QUERY_SECONDS": str(seconds)},
            )
        deploy = asyncio.create_task(
            asyncio.to_thread(
                run_step, [PREFECT, "--no-prompt", "deploy", "--name", "on-demand"], env, ROOT, "deploying on-demand"
            )
        )
        while True:  # the workers register with the pool once they poll
            workers = await client.read_workers_for_work_pool(POOL)
            if len([w for w in workers if w.status.value == "ONLINE"]) >= len(queues):
                break
            if (dead := children.died()) is not None:
                raise broken(f"{dead} exited at start (see {children.log_dir})")
            if time.perf_counter() - begin > 90:
                raise broken("the workers did not come online within 90 s")
            await asyncio.sleep(0.25)
        figures["workers_online_s"] = round(time.perf_counter() - begin, 1)
        await asyncio.wait_for(deploy, timeout=200)
        figures["deploy_s"] = round(time.perf_counter() - begin, 1)
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        figures["pull_steps"] = deployment.pull_steps

        roots = {name: process.pid for name, process in children.started.items()}
        meter = Meter(roots)
        settle = Settle(meter)
        # The warm runs' servers: one pool open around them all, closed before the cold starts below.
        async with Pool() as warm:
            bench = Bench(client, meter, settle, home / "storage", args.batch, warm)

            # Untimed: the first in-process run (imports, API client, MCP servers), the first deployment run
            # (the worker's first subprocess, the OS file cache) and a first batch of the size of (2).
            await bench.in_process("warmup", args.batch, cold=False)
            await bench.deployment("default", "warmup")
            await bench.in_process("warmup", args.persist_batch, cold=False, persist=False)
            await settle.calibrate()
            figures["idle_cpu_ms_per_s"] = {name: ms(rate, 1) for name, rate in settle.idle.items()}

            subjects: dict[str, Callable[[], Awaitable[None]]] = {
                "deploy_1": lambda: bench.deployment("default", "deploy_1"),
                "inproc_cold": lambda: bench.in_process("inproc_cold", args.batch, cold=True),
                "inproc_warm": lambda: bench.in_process("inproc_warm", args.batch, cold=False),
                "inproc_warm_aa": lambda: bench.in_process("inproc_warm_aa", args.batch, cold=False),
            }
            counts = dict.fromkeys(subjects, args.repeats)
            if "slow" in queues:
                subjects["deploy_10"] = lambda: bench.deployment("slow", "deploy_10")
                counts["deploy_10"] = args.slow_repeats
            if args.cli_runs:
                subjects["cli_1"] = lambda: bench.cli("cli_1")
                counts["cli_1"] = args.cli_runs
            await interleaved(subjects, counts)

            n = args.persist_batch
            persist: dict[str, Callable[[], Awaitable[None]]] = {
                "persist_on": lambda: bench.in_process("persist_on", n, cold=False, persist=True),
                "persist_off": lambda: bench.in_process("persist_off", n, cold=False, persist=False),
                "persist_off_aa": lambda: bench.in_process("persist_off_aa", n, cold=False, persist=False),
            }
            await interleaved(persist, args.persist_repeats)
        figures["mcp_cold_start_ms"] = {k: ms(v, 1) for k, v in (await mcp_cold_starts(1)).items()}
    figures["runs"] = {label: runs for label, runs in bench.runs.items() if label != "warmup"}
    return figures


def summarise(runs: dict[str, list[Run]], persist_size: int) -> dict[str, Any]:
    """Medians (ms) of every figure of every subject, and the headline ratios."""
    out: dict[str, Any] = {}
    for label, items in runs.items():
        keys = sorted(set().union(*(item.keys() for item in items)) - {"settle_limit_hit"})
        out[label] = {key: ms(statistics.median([item[key] for item in items if key in item]), 1) for key in keys}
        out[label]["n"] = len(items)
        out[label]["settle_limit_hits"] = int(sum(item.get("settle_limit_hit", 0) for item in items))
    warm = out["inproc_warm"]["total"]
    ratios: dict[str, float] = {
        "deploy_1_vs_inproc_warm": round(out["deploy_1"]["total"] / warm, 2),
        "deploy_1_vs_inproc_cold": round(out["deploy_1"]["total"] / out["inproc_cold"]["total"], 2),
        "inproc_warm_aa": round(out["inproc_warm_aa"]["total"] / warm, 3),
    }
    if "deploy_10" in out:
        ratios["deploy_10_vs_inproc_warm"] = round(out["deploy_10"]["total"] / warm, 2)
    on, off, aa = (out[k] for k in ("persist_on", "persist_off", "persist_off_aa"))
    ratios.update(
        {
            "persist_ratio": round(on["commands"] / off["commands"], 3),
            "persist_aa": round(aa["commands"] / off["commands"], 3),
            "persist_ms_per_command": round((on["commands"] - off["commands"]) / persist_size, 2),
            "persist_task_ratio": round(on["task"] / off["task"], 3),
            "persist_task_aa": round(aa["task"] / off["task"], 3),
            "persist_task_ms": round(on["task"] - off["task"], 2),
            "persist_wall_ratio": round(on["wall"] / off["wall"], 3),
            "persist_wall_aa": round(aa["wall"] / off["wall"], 3),
            "persist_wall_ms_per_command": round((on["wall"] - off["wall"]) / persist_size, 2),
            "persist_client_cpu_ms_per_command": round((on["client_cpu"] - off["client_cpu"]) / persist_size, 2),
            "persist_server_cpu_ms_per_command": round((on["server_cpu"] - off["server_cpu"]) / persist_size, 2),
        }
    )
    out["ratios"] = ratios
    return out


def quotient(a: float, b: float) -> str:
    """``a / b`` to two places; blank unless both are positive (CPU above idle can be negative)."""
    return f"{a / b:.2f}" if a > 0 and b > 0 else ""


def print_table(s: dict[str, Any], figures: dict[str, Any]) -> None:
    names = {
        "deploy_1": "deploy, poll 1s",
        "deploy_10": "deploy, poll 10s",
        "cli_1": "CLI, poll 1s",
        "inproc_cold": "in-proc, cold",
        "inproc_warm": "in-proc, warm",
    }
    columns = [c for c in names if c in s]

    def cell(label: str, key: str) -> str:
        value = s[label].get(key)
        return "" if value is None else f"{value:,.0f} ms"

    def row(title: str, key: str) -> list[str]:
        return [title, *(cell(c, key) for c in columns)]

    print(f"(1) one batch of {figures['batch']} commands, trigger to completion (medians)")
    rows = [
        ["runs", *(str(s[c]["n"]) for c in columns)],
        row("trigger -> Pending (worker picks it up)", "pickup"),
        row("-> Running (deploy: flow process start)", "to_running"),
        row("Running -> 1st command starts (flow set-up)", "setup"),
        row("1st command starts -> last one ends", "commands"),
        row("last command ends -> Completed", "finish"),
        row("* total: trigger -> Completed", "total"),
        row("trigger call returned", "returned"),
        row("final state seen (poll 0.2 s)", "seen"),
        row("Completed -> flow process exited", "exit"),
        row("CPU above idle: this process + MCP", "client_cpu"),
        row("CPU above idle: API server", "server_cpu"),
    ]
    for worker, title in (("worker_default", "worker poll 1s"), ("worker_slow", "worker poll 10s")):
        if any(f"{worker}_cpu" in s[c] for c in columns):
            rows.append(row(f"CPU above idle: {title} + flow proc.", f"{worker}_cpu"))
    table(["", *(names[c] for c in columns)], rows)
    r = s["ratios"]
    line = (
        f"total, deployment (poll 1s) / in-process warm: {r['deploy_1_vs_inproc_warm']:.1f}x, "
        f"/ in-process cold: {r['deploy_1_vs_inproc_cold']:.1f}x"
    )
    if "deploy_10_vs_inproc_warm" in r:
        line += f"; poll 10s / in-process warm: {r['deploy_10_vs_inproc_warm']:.1f}x"
    print(line + f"; A/A in-process warm again: {s['inproc_warm_aa']['total']:,.0f} ms ({r['inproc_warm_aa']:.2f})")

    n = figures["persist_batch"]
    on, off, aa = s["persist_on"], s["persist_off"], s["persist_off_aa"]
    print()
    print(f"(2) {n} commands in-process, MCP servers warm, persist_results on/off ({on['n']} runs each, medians)")

    def pair(label: str, key: str, other: dict[str, Any], ratio: str, per_command: str, places: int = 0) -> list[str]:
        return [label, f"{off[key]:,.{places}f} ms", f"{other[key]:,.{places}f} ms", ratio, per_command]

    def per(key: str) -> str:
        return f"{r[key]:+.2f} ms"

    rows_2 = [
        pair(
            "* 1st command starts -> last one ends",
            "commands",
            on,
            f"{r['persist_ratio']:.2f}",
            per("persist_ms_per_command"),
        ),
        pair("  A/A: off again", "commands", aa, f"{r['persist_aa']:.2f}", ""),
        pair("  one task run, start to end", "task", on, f"{r['persist_task_ratio']:.2f}", per("persist_task_ms"), 1),
        pair("  A/A: off again", "task", aa, f"{r['persist_task_aa']:.2f}", "-", 1),
        pair("  flow call, wall", "wall", on, f"{r['persist_wall_ratio']:.2f}", per("persist_wall_ms_per_command")),
        pair("  A/A: off again", "wall", aa, f"{r['persist_wall_aa']:.2f}", "-"),
    ]
    for label, key in (("this process + MCP", "client_cpu"), ("API server", "server_cpu")):
        ratio = quotient(on[key], off[key])
        rows_2.append(pair(f"  CPU above idle, {label}", key, on, ratio, per(f"persist_{key}_ms_per_command")))
    table(["", "off", "on", "on/off", "per command"], rows_2)
    idle = figures["idle_cpu_ms_per_s"]
    cold = figures["mcp_cold_start_ms"]
    print()
    print(
        "Trigger: run_deployment(..., timeout=0), then read_flow_run every 0.2 s; the CLI column is "
        "`prefect deployment run` (its 'trigger call' is the command's process, start to exit)."
    )
    print(
        "MCP cold start of examples/mcp.json, alone: "
        + ", ".join(f"{name} {value:,.0f} ms" for name, value in cold.items() if name != "all")
        + f"; together {cold['all']:,.0f} ms (a command routed by name waits for every server)."
    )
    print(
        f"Idle CPU, ms per s: API server {idle.get('server', 0):.0f}, worker poll 1s "
        f"{idle.get('worker_default', 0):.0f}"
        + (f", worker poll 10s {idle['worker_slow']:.0f}" if "worker_slow" in idle else "")
        + f". Server healthy after {figures['server_start_s']} s; pool {figures['pool_s']} s; workers online "
        f"{figures['workers_online_s']} s and deploy {figures['deploy_s']} s after that; stop {figures['stop_s']} s."
    )
    hits = sum(s[label]["settle_limit_hits"] for label in s if label != "ratios")
    if hits:
        print(f"Note: {hits} waits for an idle API server gave up after {SETTLE_LIMIT:g} s.")
    if idle.get("server", 0) > IDLE_WARNING * 1000:
        print(
            f"WARNING: the idle API server used {idle['server']:.0f} ms of CPU per second: it competes with "
            "everything measured here (see the server settings in the JSON line)."
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, no 10 s worker, small (2)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each subject in (1) (default 5)")
    parser.add_argument("--slow-repeats", type=int, default=2, help="runs through the 10 s worker (default 2)")
    parser.add_argument("--cli-runs", type=int, default=1, help="runs triggered with the CLI (default 1)")
    parser.add_argument("--skip-slow", action="store_true", help="no worker with the default 10 s poll")
    parser.add_argument("--batch", type=int, default=10, help="commands per batch in (1) (default 10)")
    parser.add_argument("--persist-batch", type=int, default=100, help="commands per batch in (2) (default 100)")
    parser.add_argument("--persist-repeats", type=int, default=5, help="repetitions in (2) (default 5)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the server, workers and flows, over cli.up.SERVER_TUNING (repeatable)",
    )
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary PREFECT_HOME (logs, database)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.skip_slow, args.cli_runs = 1, True, 1
        args.persist_batch, args.persist_repeats = 20, 1
    if min(args.repeats, args.slow_repeats, args.persist_repeats, args.batch, args.persist_batch) < 1:
        parser.error("counts must be at least 1")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    overrides = dict(item.split("=", 1) for item in args.server_env)

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "date": date.today().isoformat(),
        "repeats": args.repeats,
        "batch": args.batch,
        "persist_batch": args.persist_batch,
        "code": provenance.code,
    }
    home = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = child_env(home, api_url, overrides)
    figures["server_settings"] = {k: v for k, v in env.items() if k.startswith("PREFECT_SERVER_SERVICES_")}
    # This process too, before Prefect is imported: the same API and home; no console logs below WARNING
    # (flow and task runs still send theirs to the API, as they do in the deployment runs).
    for key in [key for key in os.environ if key.startswith("PREFECT_")]:
        del os.environ[key]
    os.environ.update(env)
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops the children

    from cli.up import StackError, run_step, wait_healthy

    children = Children(home, ROOT)
    try:
        begin = time.perf_counter()
        server = children.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        wait_healthy(api_url, server, timeout=120)
        figures["server_start_s"] = round(time.perf_counter() - begin, 1)
        begin = time.perf_counter()
        run_step([PREFECT, "work-pool", "create", POOL, "--type", "process"], env, ROOT, "creating the pool")
        figures["pool_s"] = round(time.perf_counter() - begin, 1)
        figures.update(asyncio.run(measure(args, children, home, env)))
    except StackError as error:
        raise broken(f"{error} (logs in {home}; --keep-home keeps them)") from None
    finally:
        figures["stop_s"] = round(children.stop(), 1)
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    figures["summary"] = summarise(figures["runs"], args.persist_batch)
    provenance.finish(figures)
    print_table(figures["summary"], figures)
    provenance.print()
    print(f"Elapsed {figures['elapsed_s']} s.")
    print_json({k: v for k, v in figures.items() if k != "runs"})


if __name__ == "__main__":
    main()
