"""What our local path adds on top of MCP and Prefect themselves.

Run it from the project root::

    python bench/local_overhead.py          # from the repository root

Three comparisons, all in one process, all against the same stdio demo server
(``examples/demo_server.py``, tool ``echo``). Why each baseline is what it is:

(a) one command at a time: ``LocalCommandDispatcher.execute_commands([cmd])``
    against a raw ``mcp.Client.call_tool``, the floor: the same JSON-RPC round
    trip with nothing of ours around it (routing, schema check, tenacity,
    deadlines, the batch engine, Result building). The headline baseline is
    the raw call on the dispatcher's own connection (its ``mcp.Client``, see
    ``live_client``), the two alternating on one pipe to one server process. That is the fairer
    baseline: both sides then share the same process, pipe and scheduling,
    so the ratio is our code alone, with no difference between two server
    processes in it. A raw client on a server process of its own (the
    earlier headline) is kept as a second row, with its A/A pair (a second
    raw client on a third process). The two groups are timed separately,
    each interleaved call by call: a server that has just answered answers
    about 0.2 ms faster than one left idle for a few calls, so putting all
    subjects in one rotation favours whichever subject follows another call
    on its server, and flatters "ours" by about 0.1 in the ratio. Each group
    has an A/A pair (the raw call twice on the one connection; two raw
    clients on two processes): a ratio far from 1.00 there means the run was
    too noisy to trust.
(b) a batch of 100 in parallel: the dispatcher (the default
    ``max_concurrency`` of 8, and a bound as large as the batch) against 100
    raw ``call_tool`` calls under one ``asyncio.gather``, the fastest way the
    raw client can run the same batch.
(c) the ``dispatch_batch`` flow (100 commands, parallel) against a bare async
    Prefect flow that gathers 100 no-op async tasks the way our flow gathers
    its tasks: the price of Prefect itself (a flow run, a task run per
    command). The headline bare flow persists its tasks' results, as ours
    does by default (``persist_results``, for resume): each task has a
    cache key of its flow run and index, so no run reuses another's result.
    The same flow without persistence (``NO_CACHE``) is a context row.
    ``dispatch_batch`` starts its MCP servers once per ServerPool and config
    (``dispatchers.shared_manager``); untimed warm-up runs start them, so
    the timed runs find them warm, as every batch after a process's first
    does; the script checks that no timed run started a server. The headline
    ratio is that flow against the persisting no-op flow. The no-op flows
    make no MCP calls, so the bare flow whose tasks call ``call_tool`` on a
    connected raw client (not persisting) against the non-persisting no-op
    flow is the floor of what MCP adds: the same MCP calls with none of our
    code. Our flow against that bare MCP flow is the stricter baseline:
    Prefect plus MCP, so the ratio is what our own code (and persistence)
    adds; against the same flow persisting its results, what our code alone
    adds, and that flow against the persisting no-op flow is the lowest the
    headline could go. The persisting no-op flow run twice per repetition gives an A/A
    ratio, the noise floor of (c): flow runs vary far more than single
    calls, so under load the (c) ratios move by tenths from run to run.
    1-command flows of each kind give the fixed cost per flow run, hence the
    marginal cost per command. The cold start and stop of the MCP server
    (``MCPServerManager`` started and closed, what ``shared_manager`` does
    once per ServerPool) and the warm ``shared_manager`` call (what every
    run pays) are timed as context; neither is in any ratio. Prefect runs on
    a throwaway API (``prefect_test_harness``); after each flow run the
    benchmark waits, untimed, for the API server to finish its deferred work
    (see ``ApiSettle``), which it records as that run's server CPU.

The machine is shared and noisy (2 cores), so every figure is a median over
repetitions, and baselines and subjects are interleaved (call by call in (a),
in an order rotating per repetition in (b) and (c)) so that a slow spell hits
both. Ratios are subject/baseline of the medians. Rows marked ``*`` are the
headlines, the ones the targets apply to.
"""

from __future__ import annotations

import os

# Before Prefect is imported (it reads them once): offline and quiet.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness import (
    ROOT,
    Provenance,
    Timed,
    arguments,
    broken,
    echo_commands,
    interleaved,
    ms,
    print_json,
    rotation,
    table,
    timed,
    verdict,
    wait_quiet,
)
from mcp import Client, StdioServerParameters
from processes import child_pids, cpu_seconds

from aip.messages import Command, Result, ResultStatus
from dispatchers import (
    BatchPolicy,
    ExecutionMode,
    LocalCommandDispatcher,
    ManagedServer,
    MCPServerManager,
    ServerPool,
    shared_manager,
)

#: The code under test.
CODE_PACKAGES = ("aip", "dispatchers", "flows", "tasks")
DEMO_SERVER = ROOT / "examples" / "demo_server.py"
UFO_NOTE = "Microsoft UFO's local path costs 110\u2013180 ms per command on this kind of machine"

#: Targets from the project brief: subject/baseline of the medians.
TARGET_SINGLE = 1.1  # issue 10, goal 3 (it was 1.15)
TARGET_FLOW = 1.2
TARGET_FLOW_1 = 1.3


def server_params() -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[str(DEMO_SERVER)])


def mcp_config() -> dict[str, Any]:
    """The same server command as ``server_params``, as an ``mcp.json`` dict."""
    return {"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}


def check_results(results: Sequence[Result], expected: int) -> None:
    bad = [r for r in results if r.status is not ResultStatus.SUCCESS]
    if len(results) != expected or bad:
        raise broken(f"{len(bad)} of {len(results)} results failed, e.g. {bad[:1]}")


async def live_client(connection: ManagedServer) -> Client:
    """The ``mcp.Client`` a dispatcher's connection calls through, starting the server if need be."""
    return await connection.client()


# -- (a) and (b): the dispatcher against a raw client ---------------------------------------------


#: One call of a subject in (a): call number, and the command for it.
Call = Callable[[int, Command], Awaitable[None]]


@dataclass
class CallTimes:
    """Per-call wall and CPU times of each subject of (a), and each repetition's mean wall time."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    means: dict[str, list[float]] = field(default_factory=dict)

    async def rotate(self, subjects: dict[str, Call], commands: Sequence[Command], rep: int) -> None:
        """Each command once per subject, the subjects' order rotating call by call."""
        labels = list(subjects)
        before = {label: len(self.wall.setdefault(label, [])) for label in labels}
        for i, command in enumerate(commands):
            for label in rotation(labels, i + rep):
                cpu_start, start = time.process_time(), time.perf_counter()
                await subjects[label](i, command)
                self.wall[label].append(time.perf_counter() - start)
                self.cpu.setdefault(label, []).append(time.process_time() - cpu_start)
        for label in labels:
            self.means.setdefault(label, []).append(statistics.fmean(self.wall[label][before[label] :]))

    def figures(self, label: str) -> tuple[float, float, float]:
        """Median wall time per call, mean CPU per call, median of the repetitions' mean wall times."""
        return (
            statistics.median(self.wall[label]),
            statistics.fmean(self.cpu[label]),
            statistics.median(self.means[label]),
        )


async def bench_single(
    raw: Client, control: Client, dispatcher: LocalCommandDispatcher, calls: int, repeats: int
) -> dict[str, Any]:
    """(a) ``calls`` one-command batches against ``calls`` raw calls, interleaved call by call, in two groups.

    Same connection (the headline): ``same`` is a raw ``call_tool`` on the
    dispatcher's own ``mcp.Client``, ``same_aa`` the same call once more (an
    A/A pair), ``ours`` the dispatcher. Own servers: ``raw`` is a raw client
    with a server process of its own, ``control`` a second one on a third
    server process (A/A), ``ours`` the dispatcher. The groups take turns by
    repetition. Every subject of a group is preceded by a call to a server
    equally often: a server that has just answered answers about 0.2 ms
    faster than one idle for a few calls, so mixing the groups in one
    rotation would favour whichever subject follows another on its server.
    """
    same = await live_client(dispatcher.manager.servers["demo"])

    def client_call(client: Client) -> Call:
        async def call(i: int, command: Command) -> None:
            answer = await client.call_tool("echo", {"value": i})
            if answer.is_error:
                raise broken(f"raw echo failed: {answer}")

        return call

    async def our_call(i: int, command: Command) -> None:
        check_results(await dispatcher.execute_commands([command]), 1)

    groups: dict[str, dict[str, Call]] = {
        "same": {"same": client_call(same), "same_aa": client_call(same), "ours": our_call},
        "own": {"raw": client_call(raw), "control": client_call(control), "ours": our_call},
    }
    times = {name: CallTimes() for name in groups}
    for rep in range(repeats):
        order = list(groups) if rep % 2 == 0 else list(reversed(groups))
        for name in order:
            await times[name].rotate(groups[name], echo_commands(calls, f"a{rep}{name}"), rep)
    if await live_client(dispatcher.manager.servers["demo"]) is not same:
        raise broken("the dispatcher's server restarted during (a)")
    same_w, same_c, same_m = times["same"].figures("same")
    aa_w, _, _ = times["same"].figures("same_aa")
    ours_w, ours_c, ours_m = times["same"].figures("ours")
    raw_w, raw_c, raw_m = times["own"].figures("raw")
    control_w, _, _ = times["own"].figures("control")
    own_w, own_c, own_m = times["own"].figures("ours")
    return {
        "calls": calls * repeats,
        "headline": "same_connection",
        # Headline: the raw call on the dispatcher's own connection.
        "same_ms": ms(same_w),
        "ours_ms": ms(ours_w),
        "added_ms": ms(ours_w - same_w),
        "ratio": round(ours_w / same_w, 3),
        "same_mean_ms": ms(same_m),
        "ours_mean_ms": ms(ours_m),
        "mean_ratio": round(ours_m / same_m, 3),
        "same_cpu_ms": ms(same_c),
        "ours_cpu_ms": ms(ours_c),
        "added_cpu_ms": ms(ours_c - same_c),
        "cpu_ratio": round(ours_c / same_c, 3),
        "same_aa_ms": ms(aa_w),
        "same_aa_ratio": round(aa_w / same_w, 3),
        # The earlier baseline: a raw client with a server process of its own.
        "raw_ms": ms(raw_w),
        "ours_own_ms": ms(own_w),
        "ratio_own_server": round(own_w / raw_w, 3),
        "raw_mean_ms": ms(raw_m),
        "ours_own_mean_ms": ms(own_m),
        "mean_ratio_own_server": round(own_m / raw_m, 3),
        "raw_cpu_ms": ms(raw_c),
        "ours_own_cpu_ms": ms(own_c),
        "control_ms": ms(control_w),
        "control_ratio": round(control_w / raw_w, 3),
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
            raise broken("a raw echo failed")

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
    """(a) and (b): one dispatcher, and raw clients on its connection and on server processes of their own."""
    async with (
        MCPServerManager.from_config(mcp_config()) as manager,
        Client(server_params()) as raw,
        Client(server_params()) as control,
    ):
        if not manager.servers["demo"].available:
            raise broken(f"the demo server did not start: {manager.servers['demo'].error}")
        dispatcher = LocalCommandDispatcher(manager)
        await bench_single(raw, control, dispatcher, min(calls, 20), 1)  # warm-up: imports, first-call caches
        single = await bench_single(raw, control, dispatcher, calls, repeats)
        parallel = await bench_batch(raw, manager, batch, repeats)
    return {"a": single, "b": parallel}


# -- (c): the dispatch_batch flow against a bare Prefect flow --------------------------------------


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
            await wait_quiet(self._server_cpu, self.quiet, self.limit, self.window)
        server, client = self._server_cpu(), time.process_time()
        figures = {
            "server_cpu": server - self.server_mark,
            "client_cpu": client - self.client_mark,
            "settle": time.perf_counter() - started,
        }
        self.server_mark, self.client_mark = server, client
        return figures


async def bench_flow(batch: int, repeats: int, raw: Client) -> dict[str, Any]:
    """(c) ``dispatch_batch``, its MCP servers warm, against a bare flow of no-op tasks; also 1-command flows.

    ``dispatch_batch`` gets its servers from ``shared_manager(config)``, which
    starts them on the first run in a ServerPool and hands the same ones to
    every later run; the untimed warm-up runs start them here, and the check
    after the timed runs proves that no run started its own. A second,
    stricter baseline (``bare_mcp``) is the bare flow whose tasks each make the
    raw ``call_tool`` on ``raw``, an already connected client: Prefect plus MCP
    with nothing of ours; ``bare_mcp_p`` the same persisting its results, as
    ours and the headline's floor do, so it is the floor no dispatcher can go
    under. ``bare_n_aa`` is the no-op flow once more, an A/A
    pair: the noise floor of the ratios. The cold start and stop of the MCP
    server (what the first batch of a ServerPool pays, once) is timed on its
    own after the rotation, as context; it is in no ratio.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.batch import dispatch_batch

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def noop(value: int) -> int:
        return value

    def run_and_index(context: Any, parameters: dict[str, Any]) -> str:
        """A key of its own per task run: the flow run and the task's index, as ours has (namespace, call_id)."""
        return f"bare-{context.task_run.flow_run_id}-{parameters['value']}"

    @task(cache_key_fn=run_and_index, persist_result=True)
    async def noop_persisted(value: int) -> int:
        return value

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def raw_echo(value: int) -> Any:
        answer = await raw.call_tool("echo", {"value": value})
        if answer.is_error:
            raise RuntimeError(f"raw echo failed: {answer}")
        return answer.structured_content

    @task(cache_key_fn=run_and_index, persist_result=True)
    async def raw_echo_persisted(value: int) -> Any:
        return await raw_echo.fn(value)

    @flow(persist_result=False, log_prints=False)
    async def bare(count: int) -> list[int]:
        return list(await asyncio.gather(*(noop(i) for i in range(count))))

    @flow(persist_result=False, log_prints=False)
    async def bare_persisted(count: int) -> list[int]:
        return list(await asyncio.gather(*(noop_persisted(i) for i in range(count))))

    @flow(persist_result=False, log_prints=False)
    async def bare_mcp(count: int) -> list[Any]:
        return list(await asyncio.gather(*(raw_echo(i) for i in range(count))))

    @flow(persist_result=False, log_prints=False)
    async def bare_mcp_persisted(count: int) -> list[Any]:
        return list(await asyncio.gather(*(raw_echo_persisted(i) for i in range(count))))

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
                raise broken(f"dispatch_batch ended {state.name}: {state.message}")
            results = await state.aresult()
            if not isinstance(results, list):
                raise broken(f"dispatch_batch returned {type(results).__name__}")
            check_results(results, count)

        return run

    def baseline(count: int, kind: Any = bare) -> Timed:
        async def run() -> None:
            if len(await kind(count)) != count:
                raise broken("a bare flow lost results")

        return run

    async def server_cold() -> None:
        """A cold start of the MCP server, then its stop: what ``shared_manager`` does once per ServerPool."""
        begin = time.perf_counter()
        manager = MCPServerManager.from_config(config)
        await manager.start()
        up = time.perf_counter()
        if not manager.servers["demo"].available:
            raise broken(f"{manager.servers['demo'].error}")
        await manager.close()
        start_stop["start"].append(up - begin)
        start_stop["stop"].append(time.perf_counter() - up)

    # The first flow run of the process pays for imports and API connections; the first of each kind too.
    first = await timed(baseline(1))
    await baseline(1, bare_persisted)()
    await ours(1)()  # also starts this loop's shared MCP server, which every later run reuses
    shared = shared_manager(config)
    session = await live_client(shared.servers["demo"])
    runs = {
        "bare_p_n": baseline(batch, bare_persisted),
        "bare_p_n_aa": baseline(batch, bare_persisted),
        "bare_n": baseline(batch),
        "bare_mcp_n": baseline(batch, bare_mcp),
        "bare_mcp_p_n": baseline(batch, bare_mcp_persisted),
        "ours_n": ours(batch),
        "bare_p_1": baseline(1, bare_persisted),
        "bare_1": baseline(1),
        "ours_1": ours(1),
    }
    # The first big batch of each kind, untimed.
    for label in ("bare_p_n", "bare_n", "bare_mcp_n", "bare_mcp_p_n", "ours_n"):
        await runs[label]()
    settle = ApiSettle()
    await settle()
    samples = await interleaved(runs, repeats, settle)
    for _ in range(repeats):  # context only, so not in the rotation: it makes no API calls to wait for
        await server_cold()
    if shared_manager(config) is not shared or await live_client(shared.servers["demo"]) is not session:
        raise broken("the timed flow runs did not all use the one warm MCP server")

    # What every run still pays for the sharing: the warm lookup (config parsed, key built, start a no-op).
    async def warm_lookup() -> None:
        shared_manager(config)

    warm = [await timed(warm_lookup) for _ in range(200)]
    m = {label: samples.median(label) for label in runs}
    cpu = {
        f"{label}_{kind}_ms": ms(samples.median(f"{label}:{kind}"))
        for label in runs
        for kind in ("client_cpu", "server_cpu")
    }
    return {
        "size": batch,
        "headline": "ours_n/bare_p_n (bare flow persisting its results), servers warm",
        "first_flow_s": round(first, 2),
        "api_pid_found": settle.pid is not None,
        "bare_p_n_ms": ms(m["bare_p_n"]),
        "bare_n_ms": ms(m["bare_n"]),
        "bare_mcp_n_ms": ms(m["bare_mcp_n"]),
        "bare_mcp_p_n_ms": ms(m["bare_mcp_p_n"]),
        "ours_n_ms": ms(m["ours_n"]),
        "bare_p_1_ms": ms(m["bare_p_1"]),
        "bare_1_ms": ms(m["bare_1"]),
        "ours_1_ms": ms(m["ours_1"]),
        "ratio": round(m["ours_n"] / m["bare_p_n"], 3),
        "ratio_vs_no_persistence": round(m["ours_n"] / m["bare_n"], 3),
        "persistence_ratio": round(m["bare_p_n"] / m["bare_n"], 3),
        "ratio_vs_bare_mcp": round(m["ours_n"] / m["bare_mcp_n"], 3),
        "floor_ratio": round(m["bare_mcp_n"] / m["bare_n"], 3),
        "ratio_vs_bare_mcp_persisted": round(m["ours_n"] / m["bare_mcp_p_n"], 3),
        "floor_ratio_persisted": round(m["bare_mcp_p_n"] / m["bare_p_n"], 3),
        "ratio_marginal": round((m["ours_n"] - m["ours_1"]) / (m["bare_p_n"] - m["bare_p_1"]), 3),
        "ratio_1": round(m["ours_1"] / m["bare_p_1"], 3),
        "ratio_1_vs_no_persistence": round(m["ours_1"] / m["bare_1"], 3),
        "bare_p_n_aa_ms": ms(m["bare_p_n_aa"]),
        "aa_ratio": round(m["bare_p_n_aa"] / m["bare_p_n"], 3),
        "per_command_ours_ms": ms((m["ours_n"] - m["ours_1"]) / (batch - 1)),
        "per_command_bare_ms": ms((m["bare_p_n"] - m["bare_p_1"]) / (batch - 1)),
        "per_command_bare_no_persistence_ms": ms((m["bare_n"] - m["bare_1"]) / (batch - 1)),
        "server_cold_start_ms": ms(statistics.median(start_stop["start"])),
        "server_stop_ms": ms(statistics.median(start_stop["stop"])),
        "shared_manager_warm_ms": ms(statistics.median(warm)),
        "settle_median_s": round(
            statistics.median([v for k, vs in samples.times.items() if k.endswith(":settle") for v in vs]), 2
        ),
        **cpu,
        "target": TARGET_FLOW,
    }


async def with_raw_client(body: Callable[[Client], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    async with Client(server_params()) as raw, ServerPool():  # the pool keeps the flows' servers warm between runs
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


def print_table(figures: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, f: dict[str, Any], baseline: str, ours: str, ratio: str | float, places: int) -> None:
        """A row: the figures ``f[baseline]`` and ``f[ours]`` in ms, and the ratio (a key of ``f``, or a value)."""
        value = f[ratio] if isinstance(ratio, str) else ratio
        rows.append((label, f"{f[baseline]:.{places}f} ms", f"{f[ours]:.{places}f} ms", f"{value:.2f}"))

    a = figures.get("a")
    if a:
        row("(a) 1 command, raw on same connection *", a, "same_ms", "ours_ms", "ratio", 3)
        row("    same, mean per call", a, "same_mean_ms", "ours_mean_ms", "mean_ratio", 3)
        row("    client CPU per call", a, "same_cpu_ms", "ours_cpu_ms", "cpu_ratio", 3)
        row("    A/A: the raw call again", a, "same_ms", "same_aa_ms", "same_aa_ratio", 3)
        row("(a) 1 command, raw on own server", a, "raw_ms", "ours_own_ms", "ratio_own_server", 3)
        row("    same, mean per call", a, "raw_mean_ms", "ours_own_mean_ms", "mean_ratio_own_server", 3)
        row("    A/A: 2nd raw client, 3rd server", a, "raw_ms", "control_ms", "control_ratio", 3)
    b = figures.get("b")
    if b:
        limit = b["default_max_concurrency"]
        row(f"(b) {b['size']} parallel, limit {limit}", b, "raw_gather_ms", "ours_default_ms", "ratio_default", 1)
        row(f"(b) {b['size']} parallel, limit {b['size']}", b, "raw_gather_ms", "ours_wide_ms", "ratio_wide", 1)
    c = figures.get("c")
    if c:
        n = c["size"]
        row(f"(c) flow, {n} commands, servers warm *", c, "bare_p_n_ms", "ours_n_ms", "ratio", 0)
        row("    A/A: the persisting no-op flow again", c, "bare_p_n_ms", "bare_p_n_aa_ms", "aa_ratio", 0)
        row("    vs no-op flow, no persistence", c, "bare_n_ms", "ours_n_ms", "ratio_vs_no_persistence", 0)
        row("    persistence: no-op flow, on vs off", c, "bare_n_ms", "bare_p_n_ms", "persistence_ratio", 0)
        row("    vs bare flow of raw call_tools", c, "bare_mcp_n_ms", "ours_n_ms", "ratio_vs_bare_mcp", 0)
        row("    floor: raw call_tools vs no-op", c, "bare_n_ms", "bare_mcp_n_ms", "floor_ratio", 0)
        row("    vs the same, persisting", c, "bare_mcp_p_n_ms", "ours_n_ms", "ratio_vs_bare_mcp_persisted", 0)
        row("    floor, persisting: raw vs no-op", c, "bare_p_n_ms", "bare_mcp_p_n_ms", "floor_ratio_persisted", 0)
        row("(c) flow, 1 command *", c, "bare_p_1_ms", "ours_1_ms", "ratio_1", 0)
        row("    vs 1 no-op task, no persistence", c, "bare_1_ms", "ours_1_ms", "ratio_1_vs_no_persistence", 0)
        row("    per command ((n) - (1))/(n-1)", c, "per_command_bare_ms", "per_command_ours_ms", "ratio_marginal", 2)
        client = c["ours_n_client_cpu_ms"] / c["bare_p_n_client_cpu_ms"]
        row(f"    client CPU, flow of {n}", c, "bare_p_n_client_cpu_ms", "ours_n_client_cpu_ms", client, 0)
        server = c["ours_n_server_cpu_ms"] / max(c["bare_p_n_server_cpu_ms"], 1e-3)
        row(f"    API server CPU, flow of {n}", c, "bare_p_n_server_cpu_ms", "ours_n_server_cpu_ms", server, 0)
        cold = f"{c['server_cold_start_ms']:.0f} / {c['server_stop_ms']:.0f} ms"
        rows.append(("    MCP server cold start / stop", "", cold, ""))
        rows.append(("    shared_manager(), warm", "", f"{c['shared_manager_warm_ms']:.3f} ms", ""))
    table(("case (* = headline)", "baseline", "ours", "ratio"), rows)
    if a:
        print(
            f"(a) target ratio <= {TARGET_SINGLE} (headline: raw call_tool on the dispatcher's own connection): "
            f"{verdict(a['ratio'] <= TARGET_SINGLE)}"
        )
    if c:
        print(
            f"(c) target ratio <= {TARGET_FLOW} (headline: {n} commands, servers warm, vs bare flow of no-op tasks "
            f"persisting their results): {verdict(c['ratio'] <= TARGET_FLOW)}; 1 command, target <= {TARGET_FLOW_1}: "
            f"{verdict(c['ratio_1'] <= TARGET_FLOW_1)}; with none of our code, the same MCP calls alone score "
            f"{c['floor_ratio_persisted']:.2f} (persisting, as the headline's floor does; "
            f"{c['floor_ratio']:.2f} without persistence)"
        )
        print(
            "    (the MCP server cold start is paid once per ServerPool by the first batch; in no ratio. "
            f"Not timed: API start {c['api_start_s']} s, first flow {c['first_flow_s']} s, "
            f"median settle after a run {c['settle_median_s']} s)"
        )
    print(f"For context: {UFO_NOTE}.")


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per figure (default 5)")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per repetition in (a) (default 200)")
    parser.add_argument("--batch", type=int, default=100, help="commands per batch in (b) and (c) (default 100)")
    parser.add_argument("--skip-flow", action="store_true", help="skip (c), the Prefect flow comparison")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1 or args.batch < 2:
        parser.error("--repeats and --calls must be at least 1, --batch at least 2")

    provenance = Provenance(CODE_PACKAGES)
    figures: dict[str, Any] = {
        "repeats": args.repeats,
        "calls": args.calls,
        "batch": args.batch,
        "code": provenance.code,
    }
    figures.update(asyncio.run(bench_dispatcher(args.calls, args.batch, args.repeats)))
    if not args.skip_flow:
        figures["c"] = run_flow_bench(args.batch, args.repeats)
    provenance.finish(figures)
    print_table(figures)
    provenance.print()
    print_json(figures)


if __name__ == "__main__":
    main()
