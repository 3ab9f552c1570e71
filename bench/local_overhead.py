"""What our local path adds on top of MCP and Prefect themselves.

Run it from the project root::

    cd /work/main && /work/venv/bin/python bench/local_overhead.py

Three comparisons, all in one process, all against the same stdio demo server
(``examples/demo_server.py``, tool ``echo``):

(a) one command at a time: ``LocalCommandDispatcher.execute_commands([cmd])``
    against a raw ``mcp.Client.call_tool``. The raw client is the floor: it is
    the same JSON-RPC round trip over the same kind of pipe to the same server
    program, with nothing of ours around it (routing, schema check, tenacity,
    deadlines, the batch engine, Result building). It has its own server
    process, so neither side queues behind the other's calls.
(b) a batch of 100 in parallel: the dispatcher (default ``max_concurrency``
    of 8, and one bound as large as the batch) against 100 raw ``call_tool``
    calls under one ``asyncio.gather``, the fastest way the raw client can run
    the same batch.
(c) the ``dispatch_batch`` flow (100 commands, parallel) against a bare async
    Prefect flow that gathers 100 no-op async tasks the way our flow gathers
    its tasks. That baseline is the price of Prefect itself (a flow run, one
    task run per command), so the ratio shows what our flow adds to it. Our
    flow also starts its MCP server per run, which a no-op baseline cannot
    have; that cost is measured on its own (``MCPServerManager`` entered and
    left) and the headline ratio subtracts it. A 1-command flow of each kind
    gives the fixed cost per flow run, hence the marginal cost per command.

The machine is shared and noisy, so every figure is a median over
repetitions, and baselines and subjects are interleaved (per call in (a), in
a rotating order per repetition in (b) and (c)) so that a slow spell hits
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
import json
import statistics
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
UFO_NOTE = "Microsoft UFO's local path costs 110–180 ms per command on this kind of machine"

#: Targets from the project brief: subject/baseline of the medians.
TARGET_SINGLE = 1.15
TARGET_FLOW = 1.2

Timed = Callable[[], Awaitable[Any]]


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
    """Wall times in seconds, by label, gathered over repetitions."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def median(self, label: str) -> float:
        return median(self.times[label])


async def timed(action: Timed) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def interleaved(runs: dict[str, Timed], repeats: int) -> Samples:
    """Run every action once per repetition, the order rotating, and time each."""
    samples = Samples()
    labels = list(runs)
    for rep in range(repeats):
        shift = rep % len(labels)
        for label in labels[shift:] + labels[:shift]:
            samples.add(label, await timed(runs[label]))
    return samples


def check_results(results: Sequence[Result], expected: int) -> None:
    bad = [r for r in results if r.status is not ResultStatus.SUCCESS]
    if len(results) != expected or bad:
        raise SystemExit(f"benchmark broken: {len(bad)} of {len(results)} results failed, e.g. {bad[:1]}")


# -- (a) and (b): the dispatcher against a raw client ---------------------------------------------


async def bench_single(raw: Client, dispatcher: LocalCommandDispatcher, calls: int, repeats: int) -> dict[str, Any]:
    """(a) ``calls`` one-command batches against ``calls`` raw calls, alternating call by call."""
    raw_times: list[float] = []
    ours_times: list[float] = []
    raw_means: list[float] = []
    ours_means: list[float] = []

    async def raw_call(i: int) -> None:
        start = time.perf_counter()
        answer = await raw.call_tool("echo", {"value": i})
        raw_times.append(time.perf_counter() - start)
        if answer.is_error:
            raise SystemExit(f"benchmark broken: raw echo failed: {answer}")

    async def our_call(command: Command) -> None:
        start = time.perf_counter()
        results = await dispatcher.execute_commands([command])
        ours_times.append(time.perf_counter() - start)
        check_results(results, 1)

    for rep in range(repeats):
        commands = echo_commands(calls, f"a{rep}")
        raw_before, ours_before = len(raw_times), len(ours_times)
        for i, command in enumerate(commands):
            if (i + rep) % 2:
                await raw_call(i)
                await our_call(command)
            else:
                await our_call(command)
                await raw_call(i)
        raw_means.append(statistics.fmean(raw_times[raw_before:]))
        ours_means.append(statistics.fmean(ours_times[ours_before:]))
    raw_median, ours_median = median(raw_times), median(ours_times)
    return {
        "calls": calls * repeats,
        "raw_ms": ms(raw_median),
        "ours_ms": ms(ours_median),
        "added_ms": ms(ours_median - raw_median),
        "ratio": round(ours_median / raw_median, 3),
        "raw_mean_ms": ms(median(raw_means)),
        "ours_mean_ms": ms(median(ours_means)),
        "mean_ratio": round(median(ours_means) / median(raw_means), 3),
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
    async with MCPServerManager.from_config(mcp_config()) as manager, Client(server_params()) as raw:
        if not manager.connections["demo"].available:
            raise SystemExit(f"benchmark broken: the demo server did not start: {manager.connections['demo'].error}")
        dispatcher = LocalCommandDispatcher(manager)
        await bench_single(raw, dispatcher, min(calls, 20), 1)  # warm-up: imports, caches, JIT-less paths
        single = await bench_single(raw, dispatcher, calls, repeats)
        parallel = await bench_batch(raw, manager, batch, repeats)
    return {"a": single, "b": parallel}


# -- (c): the dispatch_batch flow against a bare Prefect flow --------------------------------------


async def bench_flow(batch: int, repeats: int) -> dict[str, Any]:
    """(c) ``dispatch_batch`` against a bare flow of no-op tasks; also server start, and 1-command flows."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.batch import dispatch_batch

    @task(cache_policy=NO_CACHE, persist_result=False)
    async def noop(value: int) -> int:
        return value

    @flow(persist_result=False, log_prints=False)
    async def bare(count: int) -> list[int]:
        return list(await asyncio.gather(*(noop(i) for i in range(count))))

    config = mcp_config()
    counter = iter(range(10**9))

    def ours(count: int) -> Timed:
        async def run() -> None:
            commands = echo_commands(count, f"c{next(counter)}")
            state = await dispatch_batch(
                commands, config=config, mode="parallel", max_concurrency=max(count, 1), return_state=True
            )
            if not state.is_completed():
                raise SystemExit(f"benchmark broken: dispatch_batch ended {state.name}: {state.message}")
            check_results(await state.aresult(), count)

        return run

    def baseline(count: int) -> Timed:
        async def run() -> None:
            if len(await bare(count)) != count:
                raise SystemExit("benchmark broken: the bare flow lost results")

        return run

    async def server_start() -> None:
        async with MCPServerManager.from_config(config) as manager:
            if not manager.connections["demo"].available:
                raise SystemExit(f"benchmark broken: {manager.connections['demo'].error}")

    # The first flow run of the process starts the API; the first of each kind pays for imports.
    first = await timed(baseline(1))
    await ours(1)()
    runs = {
        "bare_n": baseline(batch),
        "ours_n": ours(batch),
        "bare_1": baseline(1),
        "ours_1": ours(1),
        "server_start": server_start,
    }
    await interleaved(runs, 1)
    samples = await interleaved(runs, repeats)
    m = {label: samples.median(label) for label in runs}
    return {
        "size": batch,
        "api_start_and_first_flow_s": round(first, 2),
        "bare_n_ms": ms(m["bare_n"]),
        "ours_n_ms": ms(m["ours_n"]),
        "bare_1_ms": ms(m["bare_1"]),
        "ours_1_ms": ms(m["ours_1"]),
        "server_start_ms": ms(m["server_start"]),
        "ratio_total": round(m["ours_n"] / m["bare_n"], 3),
        "ratio_without_server_start": round((m["ours_n"] - m["server_start"]) / m["bare_n"], 3),
        "ratio_marginal": round((m["ours_n"] - m["ours_1"]) / (m["bare_n"] - m["bare_1"]), 3),
        "per_command_ours_ms": ms((m["ours_n"] - m["ours_1"]) / (batch - 1)),
        "per_command_bare_ms": ms((m["bare_n"] - m["bare_1"]) / (batch - 1)),
        "target": TARGET_FLOW,
    }


def run_flow_bench(batch: int, repeats: int) -> dict[str, Any]:
    """(c) under a throwaway Prefect API and database (``prefect_test_harness``)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        return asyncio.run(bench_flow(batch, repeats))


# -- report -------------------------------------------------------------------------------------


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISSED"


def print_table(figures: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str]] = []
    a = figures.get("a")
    if a:
        rows.append(
            ("(a) 1 command, sequential", f"{a['raw_ms']:.3f} ms", f"{a['ours_ms']:.3f} ms", f"{a['ratio']:.2f}")
        )
        rows.append(
            (
                "    same, mean per call",
                f"{a['raw_mean_ms']:.3f} ms",
                f"{a['ours_mean_ms']:.3f} ms",
                f"{a['mean_ratio']:.2f}",
            )
        )
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
        rows.append(
            (
                f"(c) flow, {n} commands",
                f"{c['bare_n_ms']:.0f} ms",
                f"{c['ours_n_ms']:.0f} ms",
                f"{c['ratio_total']:.2f}",
            )
        )
        rows.append(
            (
                "    less MCP server start",
                f"{c['bare_n_ms']:.0f} ms",
                f"{c['ours_n_ms'] - c['server_start_ms']:.0f} ms",
                f"{c['ratio_without_server_start']:.2f}",
            )
        )
        rows.append(("(c) flow, 1 command", f"{c['bare_1_ms']:.0f} ms", f"{c['ours_1_ms']:.0f} ms", ""))
        rows.append(
            (
                "    per command (n - 1)",
                f"{c['per_command_bare_ms']:.2f} ms",
                f"{c['per_command_ours_ms']:.2f} ms",
                f"{c['ratio_marginal']:.2f}",
            )
        )
        rows.append(("    MCP server start + stop", "", f"{c['server_start_ms']:.0f} ms", ""))
    widths = [max(len(row[i]) for row in [("case", "baseline", "ours", "ratio"), *rows]) for i in range(4)]
    for row in [("case", "baseline", "ours", "ratio"), *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    if a:
        print(f"(a) target ratio <= {TARGET_SINGLE}: {verdict(a['ratio'], TARGET_SINGLE)}")
    if c:
        ratio = c["ratio_without_server_start"]
        print(f"(c) target ratio <= {TARGET_FLOW} (server start subtracted): {verdict(ratio, TARGET_FLOW)}")
        print(f"    (first flow of the process, API start included: {c['api_start_and_first_flow_s']} s)")
    print(f"For context: {UFO_NOTE}.")


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
    figures: dict[str, Any] = {"repeats": args.repeats, "calls": args.calls, "batch": args.batch}
    figures.update(asyncio.run(bench_dispatcher(args.calls, args.batch, args.repeats)))
    if not args.skip_flow:
        figures["c"] = run_flow_bench(args.batch, args.repeats)
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    print_table(figures)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
