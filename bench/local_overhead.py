"""What our local path adds on top of MCP and Prefect themselves.

Run it from the project root::

    cd /work/main && /work/venv/bin/python bench/local_overhead.py

Three comparisons, all in one process, all against the same stdio demo server
(``examples/demo_server.py``, tool ``echo``). Why each baseline is what it is:

(a) one command at a time: ``LocalCommandDispatcher.execute_commands([cmd])``
    against a raw ``mcp.Client.call_tool``. The raw client is the floor: the
    same JSON-RPC round trip over the same kind of pipe to the same server
    program, with nothing of ours around it (routing, schema check, tenacity,
    deadlines, the batch engine, Result building). It has its own server
    process, so neither side queues behind the other's calls. A second raw
    client on a third server process gives an A/A ratio: the noise floor.
(b) a batch of 100 in parallel: the dispatcher (the default
    ``max_concurrency`` of 8, and a bound as large as the batch) against 100
    raw ``call_tool`` calls under one ``asyncio.gather``, the fastest way the
    raw client can run the same batch.
(c) the ``dispatch_batch`` flow (100 commands, parallel) against a bare async
    Prefect flow that gathers 100 no-op async tasks the way our flow gathers
    its tasks: the price of Prefect itself (a flow run, a task run per
    command), so the ratio shows what our flow adds to it. Our flow also
    starts and stops its MCP server in every run, which a no-op baseline
    cannot do; that is timed on its own (``MCPServerManager`` started and
    closed) and the headline ratio subtracts it. A stricter baseline, the bare
    flow whose tasks make raw ``call_tool`` calls on a connected client, is
    Prefect plus MCP with nothing of ours. 1-command flows of each kind give
    the fixed cost per flow run, hence the marginal cost per command. Prefect
    runs on a throwaway API (``prefect_test_harness``); after each flow run
    the benchmark waits, untimed, for the API server to finish its deferred
    work (see ``ApiSettle``), which it records as that run's server CPU.

The machine is shared and noisy (2 cores), so every figure is a median over
repetitions, and baselines and subjects are interleaved (call by call in (a),
in an order rotating per repetition in (b) and (c)) so that a slow spell hits
both. Ratios are subject/baseline of the medians.
"""

from __future__ import annotations

import os

# Before Prefect is imported (it reads them once): offline and quiet.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from aip.messages import Command, Result, ResultStatus
from dispatchers import BatchPolicy, ExecutionMode, LocalCommandDispatcher, MCPServerManager

ROOT = Path(__file__).resolve().parent.parent
DEMO_SERVER = ROOT / "examples" / "demo_server.py"
UFO_NOTE = "Microsoft UFO's local path costs 110\u2013180 ms per command on this kind of machine"

#: Targets from the project brief: subject/baseline of the medians.
TARGET_SINGLE = 1.15
TARGET_FLOW = 1.2

Timed = Callable[[], Awaitable[Any]]
Settle = Callable[[], Awaitable[dict[str, float]]]


def server_params() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(DEMO_SERVER)])


def mcp_config() -> dict[str, Any]:
    """The same server command as ``server_params``, as an ``mcp.json`` dict."""
    return {"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}


def echo_commands(count: int, prefix: str) -> list[Command]:
    """Commands with call_ids, as a UFO peer sends them."""
    return [Command(tool_name="echo", parameters={"value": i}, call_id=f"{prefix}-{i}") for i in range(count)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Samples:
    """Figures in seconds (wall times, CPU times), by label, gathered over repetitions."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def median(self, label: str) -> float:
        return median(self.times[label])


async def timed(action: Timed) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def interleaved(runs: dict[str, Timed], repeats: int, settle: Settle | None = None) -> Samples:
    """Run every action once per repetition, the order rotating, and time each.

    ``settle``, when given, runs after each timed action (untimed) and returns
    extra figures to record under ``label:name``.
    """
    samples = Samples()
    labels = list(runs)
    for rep in range(repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            samples.add(label, await timed(runs[label]))
            if settle is not None:
                for name, value in (await settle()).items():
                    samples.add(f"{label}:{name}", value)
    return samples


def check_results(results: Sequence[Result], expected: int) -> None:
    bad = [r for r in results if r.status is not ResultStatus.SUCCESS]
    if len(results) != expected or bad:
        raise SystemExit(f"benchmark broken: {len(bad)} of {len(results)} results failed, e.g. {bad[:1]}")


# -- (a) and (b): the dispatcher against a raw client ---------------------------------------------


async def bench_single(
    raw: Client, control: Client, dispatcher: LocalCommandDispatcher, calls: int, repeats: int
) -> dict[str, Any]:
    """(a) ``calls`` one-command batches against ``calls`` raw calls, interleaved call by call.

    ``control`` is a second raw client on a third server process: raw against
    control is an A/A comparison, the noise floor of the ratio on this machine.
    Each call's wall time and this process's CPU time are recorded.
    """
    wall: dict[str, list[float]] = {"raw": [], "control": [], "ours": []}
    cpu: dict[str, list[float]] = {"raw": [], "control": [], "ours": []}
    means: dict[str, list[float]] = {"raw": [], "control": [], "ours": []}

    def client_call(client: Client) -> Callable[[int, Command], Awaitable[None]]:
        async def call(i: int, command: Command) -> None:
            answer = await client.call_tool("echo", {"value": i})
            if answer.is_error:
                raise SystemExit(f"benchmark broken: raw echo failed: {answer}")

        return call

    async def our_call(i: int, command: Command) -> None:
        check_results(await dispatcher.execute_commands([command]), 1)

    subjects = {"raw": client_call(raw), "control": client_call(control), "ours": our_call}
    labels = list(subjects)
    for rep in range(repeats):
        commands = echo_commands(calls, f"a{rep}")
        before = {label: len(wall[label]) for label in labels}
        for i, command in enumerate(commands):
            shift = (i + rep) % len(labels)
            for label in labels[shift:] + labels[:shift]:
                cpu_start, start = time.process_time(), time.perf_counter()
                await subjects[label](i, command)
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - cpu_start)
        for label in labels:
            means[label].append(statistics.fmean(wall[label][before[label] :]))
    w = {label: median(wall[label]) for label in labels}
    c = {label: statistics.fmean(cpu[label]) for label in labels}
    m = {label: median(means[label]) for label in labels}
    return {
        "calls": calls * repeats,
        "raw_ms": ms(w["raw"]),
        "ours_ms": ms(w["ours"]),
        "added_ms": ms(w["ours"] - w["raw"]),
        "ratio": round(w["ours"] / w["raw"], 3),
        "control_ms": ms(w["control"]),
        "control_ratio": round(w["control"] / w["raw"], 3),
        "raw_mean_ms": ms(m["raw"]),
        "ours_mean_ms": ms(m["ours"]),
        "mean_ratio": round(m["ours"] / m["raw"], 3),
        "raw_cpu_ms": ms(c["raw"]),
        "ours_cpu_ms": ms(c["ours"]),
        "added_cpu_ms": ms(c["ours"] - c["raw"]),
        "cpu_ratio": round(c["ours"] / c["raw"], 3),
        "target": TARGET_SINGLE,
    }


async def bench_batch(
    raw: Client, manager: MCPServerManager, size: int, repeats: int, warmup: int = 2
) -> dict[str, Any]:
    """(b) one parallel batch of ``size`` through the dispatcher against ``asyncio.gather`` on the raw client."""
    default = LocalCommandDispatcher(manager, batch=BatchPolicy(mode=ExecutionMode.PARALLEL))
    wide = LocalCommandDispatcher(manager, batch=BatchPolicy(mode=ExecutionMode.PARALLEL, max_concurrency=size))
    counter = iter(range(10**9))

    async def raw_batch() -> None:
        answers = await asyncio.gather(*(raw.call_tool("echo", {"value": i}) for i in range(size)))
        if any(answer.is_error for answer in answers):
            raise SystemExit("benchmark broken: a raw echo failed")

    def ours(dispatcher: LocalCommandDispatcher) -> Timed:
        async def run() -> None:
            check_results(await dispatcher.execute_commands(echo_commands(size, f"b{next(counter)}")), size)

        return run

    runs = {"raw_gather": raw_batch, "ours_default": ours(default), "ours_wide": ours(wide)}
    await interleaved(runs, warmup)
    samples = await interleaved(runs, repeats)
    raw_median = samples.median("raw_gather")
    return {
        "size": size,
        "default_max_concurrency": default.batch.max_concurrency,
        "raw_gather_ms": ms(raw_median),
        "ours_default_ms": ms(samples.median("ours_default")),
        "ours_wide_ms": ms(samples.median("ours_wide")),
        "ratio_default": round(samples.median("ours_default") / raw_median, 3),
        "ratio_wide": round(samples.median("ours_wide") / raw_median, 3),
        "per_command_wide_ms": ms(samples.median("ours_wide") / size),
        "per_command_raw_ms": ms(raw_median / size),
    }


async def bench_dispatcher(calls: int, batch: int, repeats: int) -> dict[str, Any]:
    """(a) and (b), on one dispatcher connection and one raw client, each with its own server process."""
    async with (
        MCPServerManager.from_config(mcp_config()) as manager,
        Client(server_params()) as raw,
        Client(server_params()) as control,
    ):
        if not manager.connections["demo"].available:
            raise SystemExit(f"benchmark broken: the demo server did not start: {manager.connections['demo'].error}")
        dispatcher = LocalCommandDispatcher(manager)
        await bench_single(raw, control, dispatcher, min(calls, 20), 1)  # warm-up: imports, first-call caches
        single = await bench_single(raw, control, dispatcher, calls, repeats)
        parallel = await bench_batch(raw, manager, batch, repeats)
    return {"a": single, "b": parallel}


# -- (c): the dispatch_batch flow against a bare Prefect flow --------------------------------------


def child_pids(word: str) -> list[int]:
    """This process's children whose command line contains ``word`` (Linux ``/proc``; else none)."""
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ApiSettle:
    """Waits, untimed, for the Prefect API server to go idle after each flow run.

    The server records task runs after the fact (one per transaction by
    default): about 2 s of its CPU per 100 task runs, and SQLite locks that
    stall the next flow run by seconds. Without a pause, whichever run comes
    after a big one pays for it, and the medians measure the order of the
    runs. The server's CPU from one idle point to the next is recorded as the
    run's own (``server_cpu``), with this process's CPU (``client_cpu``, all
    threads, Prefect's event and log workers included).
    """

    def __init__(self, quiet: float = 0.05, window: float = 0.25, limit: float = 20.0) -> None:
        pids = child_pids("uvicorn")
        self.pid = pids[0] if len(pids) == 1 else None
        self.quiet, self.window, self.limit = quiet, window, limit
        self.server_mark = self._server_cpu()
        self.client_mark = time.process_time()

    def _server_cpu(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            return cpu_seconds(self.pid)
        except OSError:
            self.pid = None
            return 0.0

    async def __call__(self) -> dict[str, float]:
        started = time.perf_counter()
        if self.pid is None:
            await asyncio.sleep(3.0)  # no /proc view of the server: a fixed pause instead
        else:
            calm, before = 0, self._server_cpu()
            while calm < 2 and time.perf_counter() - started < self.limit:
                await asyncio.sleep(self.window)
                now = self._server_cpu()
                calm = calm + 1 if now - before <= self.quiet * self.window else 0
                before = now
        server, client = self._server_cpu(), time.process_time()
        figures = {
            "server_cpu": server - self.server_mark,
            "client_cpu": client - self.client_mark,
            "settle": time.perf_counter() - started,
        }
        self.server_mark, self.client_mark = server, client
        return figures


async def bench_flow(batch: int, repeats: int, raw: Client) -> dict[str, Any]:
    """(c) ``dispatch_batch`` against a bare flow of no-op tasks; also server start, and 1-command flows.

    A second, stricter baseline (``bare_mcp``) is the bare flow whose tasks
    each make the raw ``call_tool`` on ``raw``, an already connected client:
    Prefect plus MCP with nothing of ours, so that ``ours`` less the server
    start against it is what our own code adds.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.batch import dispatch_batch

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def noop(value: int) -> int:
        return value

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def raw_echo(value: int) -> Any:
        answer = await raw.call_tool("echo", {"value": value})
        if answer.is_error:
            raise RuntimeError(f"raw echo failed: {answer}")
        return answer.structured_content

    @flow(persist_result=False, log_prints=False)
    async def bare(count: int) -> list[int]:
        return list(await asyncio.gather(*(noop(i) for i in range(count))))

    @flow(persist_result=False, log_prints=False)
    async def bare_mcp(count: int) -> list[Any]:
        return list(await asyncio.gather(*(raw_echo(i) for i in range(count))))

    config = mcp_config()
    counter = iter(range(10**9))
    start_stop: dict[str, list[float]] = {"start": [], "stop": []}

    def ours(count: int) -> Timed:
        async def run() -> None:
            commands = echo_commands(count, f"c{next(counter)}")
            state = await dispatch_batch(
                commands, config=config, mode="parallel", max_concurrency=max(count, 1), return_state=True
            )
            if not state.is_completed():
                raise SystemExit(f"benchmark broken: dispatch_batch ended {state.name}: {state.message}")
            results = await state.aresult()
            if not isinstance(results, list):
                raise SystemExit(f"benchmark broken: dispatch_batch returned {type(results).__name__}")
            check_results(results, count)

        return run

    def baseline(count: int, kind: Any = bare) -> Timed:
        async def run() -> None:
            if len(await kind(count)) != count:
                raise SystemExit("benchmark broken: a bare flow lost results")

        return run

    async def server_start() -> None:
        """What ``dispatch_batch`` does around its commands: start the MCP server, then stop it."""
        begin = time.perf_counter()
        manager = MCPServerManager.from_config(config)
        await manager.start()
        up = time.perf_counter()
        if not manager.connections["demo"].available:
            raise SystemExit(f"benchmark broken: {manager.connections['demo'].error}")
        await manager.close()
        start_stop["start"].append(up - begin)
        start_stop["stop"].append(time.perf_counter() - up)

    # The first flow run of the process pays for imports and API connections; the first of each kind too.
    first = await timed(baseline(1))
    await ours(1)()
    runs = {
        "bare_n": baseline(batch),
        "bare_mcp_n": baseline(batch, bare_mcp),
        "ours_n": ours(batch),
        "bare_1": baseline(1),
        "ours_1": ours(1),
        "server_start": server_start,
    }
    for label in ("bare_n", "bare_mcp_n", "ours_n"):  # first big batch of each kind, untimed
        await runs[label]()
    settle = ApiSettle()
    await settle()
    for times in start_stop.values():
        times.clear()
    samples = await interleaved(runs, repeats, settle)
    m = {label: samples.median(label) for label in runs}
    cpu = {
        f"{label}_{kind}_ms": ms(samples.median(f"{label}:{kind}"))
        for label in runs
        for kind in ("client_cpu", "server_cpu")
    }
    return {
        "size": batch,
        "first_flow_s": round(first, 2),
        "api_pid_found": settle.pid is not None,
        "bare_n_ms": ms(m["bare_n"]),
        "bare_mcp_n_ms": ms(m["bare_mcp_n"]),
        "ours_n_ms": ms(m["ours_n"]),
        "bare_1_ms": ms(m["bare_1"]),
        "ours_1_ms": ms(m["ours_1"]),
        "server_start_ms": ms(m["server_start"]),
        "server_start_only_ms": ms(median(start_stop["start"])),
        "server_stop_only_ms": ms(median(start_stop["stop"])),
        "ratio_total": round(m["ours_n"] / m["bare_n"], 3),
        "ratio_without_server_start": round((m["ours_n"] - m["server_start"]) / m["bare_n"], 3),
        "ratio_vs_bare_mcp": round((m["ours_n"] - m["server_start"]) / m["bare_mcp_n"], 3),
        "ratio_marginal": round((m["ours_n"] - m["ours_1"]) / (m["bare_n"] - m["bare_1"]), 3),
        "per_command_ours_ms": ms((m["ours_n"] - m["ours_1"]) / (batch - 1)),
        "per_command_bare_ms": ms((m["bare_n"] - m["bare_1"]) / (batch - 1)),
        "settle_median_s": round(
            median([v for k, vs in samples.times.items() if k.endswith(":settle") for v in vs]), 2
        ),
        **cpu,
        "target": TARGET_FLOW,
    }


async def with_raw_client(body: Callable[[Client], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    async with Client(server_params()) as raw:
        return await body(raw)


def run_flow_bench(batch: int, repeats: int) -> dict[str, Any]:
    """(c) under a throwaway Prefect API and database (``prefect_test_harness``), started here."""
    from prefect.testing.utilities import prefect_test_harness

    begin = time.perf_counter()
    with prefect_test_harness():
        started = time.perf_counter() - begin
        figures = asyncio.run(with_raw_client(lambda raw: bench_flow(batch, repeats, raw)))
    return {"api_start_s": round(started, 2), **figures}


# -- report -------------------------------------------------------------------------------------


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISSED"


def print_table(figures: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    a = figures.get("a")
    if a:
        rows += [
            ("(a) 1 command, sequential", f"{a['raw_ms']:.3f} ms", f"{a['ours_ms']:.3f} ms", f"{a['ratio']:.2f}"),
            (
                "    same, mean per call",
                f"{a['raw_mean_ms']:.3f} ms",
                f"{a['ours_mean_ms']:.3f} ms",
                f"{a['mean_ratio']:.2f}",
            ),
            (
                "    client CPU per call",
                f"{a['raw_cpu_ms']:.3f} ms",
                f"{a['ours_cpu_ms']:.3f} ms",
                f"{a['cpu_ratio']:.2f}",
            ),
            (
                "    A/A: 2nd raw client",
                f"{a['raw_ms']:.3f} ms",
                f"{a['control_ms']:.3f} ms",
                f"{a['control_ratio']:.2f}",
            ),
        ]
    b = figures.get("b")
    if b:
        label = f"(b) {b['size']} parallel, limit {b['default_max_concurrency']}"
        rows.append(
            (label, f"{b['raw_gather_ms']:.1f} ms", f"{b['ours_default_ms']:.1f} ms", f"{b['ratio_default']:.2f}")
        )
        rows.append(
            (
                f"(b) {b['size']} parallel, limit {b['size']}",
                f"{b['raw_gather_ms']:.1f} ms",
                f"{b['ours_wide_ms']:.1f} ms",
                f"{b['ratio_wide']:.2f}",
            )
        )
    c = figures.get("c")
    if c:
        n = c["size"]
        rows += [
            (
                f"(c) flow, {n} commands",
                f"{c['bare_n_ms']:.0f} ms",
                f"{c['ours_n_ms']:.0f} ms",
                f"{c['ratio_total']:.2f}",
            ),
            (
                "    less MCP server start+stop",
                f"{c['bare_n_ms']:.0f} ms",
                f"{c['ours_n_ms'] - c['server_start_ms']:.0f} ms",
                f"{c['ratio_without_server_start']:.2f}",
            ),
            (
                "    vs bare flow of raw call_tools",
                f"{c['bare_mcp_n_ms']:.0f} ms",
                f"{c['ours_n_ms'] - c['server_start_ms']:.0f} ms",
                f"{c['ratio_vs_bare_mcp']:.2f}",
            ),
            ("(c) flow, 1 command", f"{c['bare_1_ms']:.0f} ms", f"{c['ours_1_ms']:.0f} ms", ""),
            (
                "    per command ((n) - (1))/(n-1)",
                f"{c['per_command_bare_ms']:.2f} ms",
                f"{c['per_command_ours_ms']:.2f} ms",
                f"{c['ratio_marginal']:.2f}",
            ),
            (
                f"    client CPU, flow of {n}",
                f"{c['bare_n_client_cpu_ms']:.0f} ms",
                f"{c['ours_n_client_cpu_ms']:.0f} ms",
                f"{c['ours_n_client_cpu_ms'] / c['bare_n_client_cpu_ms']:.2f}",
            ),
            (
                f"    API server CPU, flow of {n}",
                f"{c['bare_n_server_cpu_ms']:.0f} ms",
                f"{c['ours_n_server_cpu_ms']:.0f} ms",
                f"{c['ours_n_server_cpu_ms'] / max(c['bare_n_server_cpu_ms'], 1e-3):.2f}",
            ),
            (
                "    MCP server start / stop",
                "",
                f"{c['server_start_only_ms']:.0f} / {c['server_stop_only_ms']:.0f} ms",
                "",
            ),
        ]
    widths = [max(len(row[i]) for row in [("case", "baseline", "ours", "ratio"), *rows]) for i in range(4)]
    for row in [("case", "baseline", "ours", "ratio"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    if a:
        print(f"(a) target ratio <= {TARGET_SINGLE}: {verdict(a['ratio'], TARGET_SINGLE)}")
    if c:
        ratio = c["ratio_without_server_start"]
        print(f"(c) target ratio <= {TARGET_FLOW} (server start subtracted): {verdict(ratio, TARGET_FLOW)}")
        print(
            f"    (not timed: API start {c['api_start_s']} s, first flow {c['first_flow_s']} s, "
            f"median settle after a run {c['settle_median_s']} s)"
        )
    print(f"For context: {UFO_NOTE}.")


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the code under test had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "aip", "dispatchers", "flows", "tasks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changes)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per figure (default 5)")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per repetition in (a) (default 200)")
    parser.add_argument("--batch", type=int, default=100, help="commands per batch in (b) and (c) (default 100)")
    parser.add_argument("--skip-flow", action="store_true", help="skip (c), the Prefect flow comparison")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1 or args.batch < 2:
        parser.error("--repeats and --calls must be at least 1, --batch at least 2")

    started = time.perf_counter()
    figures: dict[str, Any] = {
        "repeats": args.repeats,
        "calls": args.calls,
        "batch": args.batch,
        "code": code_version(),
    }
    figures.update(asyncio.run(bench_dispatcher(args.calls, args.batch, args.repeats)))
    if not args.skip_flow:
        figures["c"] = run_flow_bench(args.batch, args.repeats)
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    print_table(figures)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
