"""Where a ``dispatch_batch`` flow's time goes beyond bare Prefect: a ladder, one step at a time.

Run it from the project root::

    python bench/flow_costs.py [--batch 100] [--repeats 7]

Each step is a flow of ``--batch`` tasks gathered in parallel, under one
throwaway Prefect API (``prefect_test_harness``), and adds one thing to the
step before it, so that the difference between two neighbours is the price
of that one thing:

1. ``noop``: the floor of issue 10's goal 2: no-op tasks persisting their
   results, each under a key of its flow run and index.
2. ``params``: the task takes our five quoted parameters (the command, the
   dispatcher, the deadline, the batch context, the report) and its key is
   ours (``tasks.command.result_key``).
3. ``named``: plus our ``task_run_name`` (``tool_name[call_id]``).
4. ``result``: returning a ``Result`` (pickled into the result store) in
   place of an int.
5. ``event``: plus the ``dispatch.command.succeeded`` event.
6. ``mcp``: plus a raw ``call_tool`` on the warm server's own connected
   ``mcp.Client``: what MCP itself costs, with nothing of ours around it.
7. ``task``: our own task (``tasks.command.execute_as_task``): the same MCP
   call through ``LocalCommandDispatcher``, so the difference is the
   dispatcher's and the task wrapper's.
8. ``ours``: ``dispatch_batch`` itself (its run engine, naming and tagging,
   progress and results artifacts, the batch-finished event).

Every step is timed once per repetition, the order rotating; after each run
the script waits, untimed, for the API server to go idle (``ApiSettle``),
and records this process's CPU (all threads) and the server's. Medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harness import interleaved  # noqa: E402
from local_overhead import ApiSettle, echo_commands, live_client, mcp_config  # noqa: E402

from aip.budget import Deadline  # noqa: E402
from aip.messages import Command, Result, ResultStatus  # noqa: E402

STEPS = ("noop", "params", "named", "result", "event", "mcp", "task", "ours")


async def ladder(batch: int, repeats: int) -> dict[str, Any]:
    from prefect import flow, task
    from prefect.runtime import flow_run
    from prefect.utilities.annotations import quote

    from dispatchers import LocalCommandDispatcher, ServerPool, shared_manager
    from flows.batch import dispatch_batch
    from tasks.command import BatchContext, execute_as_task, result_key, task_run_name
    from tasks.events import DispatchEvent, emit_command_event
    from tasks.report import CommandReport

    config = mcp_config()

    def index_key(context: Any, parameters: dict[str, Any]) -> str:
        return f"bare-{context.task_run.flow_run_id}-{parameters['value']}"

    @task(cache_key_fn=index_key, persist_result=True)
    async def noop(value: int) -> int:
        return value

    def echo_result(command: Command) -> Result:
        value = {"value": command.parameters["value"]}
        return Result(status=ResultStatus.SUCCESS, result=value, call_id=command.call_id)

    @task(name="command", cache_key_fn=result_key, persist_result=True)
    async def params(command: Command, dispatcher: Any, deadline: Deadline, batch: BatchContext, report: Any) -> int:
        return 0

    @task(name="command", task_run_name=task_run_name, cache_key_fn=result_key, persist_result=True)
    async def named(command: Command, dispatcher: Any, deadline: Deadline, batch: BatchContext, report: Any) -> int:
        return 0

    @task(name="command", task_run_name=task_run_name, cache_key_fn=result_key, persist_result=True)
    async def result(command: Command, dispatcher: Any, deadline: Deadline, batch: BatchContext, report: Any) -> Result:
        return echo_result(command)

    @task(name="command", task_run_name=task_run_name, cache_key_fn=result_key, persist_result=True)
    async def event(command: Command, dispatcher: Any, deadline: Deadline, batch: BatchContext, report: Any) -> Result:
        emit_command_event(DispatchEvent.COMMAND_SUCCEEDED, command, batch, {"attempts": 1, "status": "success"})
        return echo_result(command)

    raw: list[Any] = []  # the warm server's connected client, once the pool has started it

    @task(name="command", task_run_name=task_run_name, cache_key_fn=result_key, persist_result=True)
    async def mcp(command: Command, dispatcher: Any, deadline: Deadline, batch: BatchContext, report: Any) -> Result:
        answer = await raw[0].call_tool(command.tool_name, command.parameters)
        if answer.is_error:
            raise RuntimeError(f"raw call failed: {answer}")
        emit_command_event(DispatchEvent.COMMAND_SUCCEEDED, command, batch, {"attempts": 1, "status": "success"})
        return Result(status=ResultStatus.SUCCESS, result=answer.structured_content, call_id=command.call_id)

    def quoted_flow(kind: Any) -> Any:
        @flow(persist_result=False, log_prints=False)
        async def bare(commands: list[Command]) -> int:
            context = BatchContext(namespace=str(flow_run.id), flow_run_id=str(flow_run.id))
            deadline = Deadline.after(60)
            calls = (
                kind(quote(c), quote(None), quote(deadline), quote(context), quote(CommandReport(c.call_id)))
                for c in commands
            )
            return len(await asyncio.gather(*calls))

        return bare

    @flow(persist_result=False, log_prints=False)
    async def noop_flow(commands: list[Command]) -> int:
        return len(await asyncio.gather(*(noop(i) for i in range(len(commands)))))

    @flow(persist_result=False, log_prints=False)
    async def task_flow(commands: list[Command]) -> int:
        context = BatchContext(namespace=str(flow_run.id), flow_run_id=str(flow_run.id))
        dispatcher = LocalCommandDispatcher(shared_manager(config))
        deadline = Deadline.after(60)
        done = await asyncio.gather(*(execute_as_task(c, dispatcher, deadline, context) for c in commands))
        if any(r.status is not ResultStatus.SUCCESS for r, _ in done):
            raise RuntimeError("a command failed")
        return len(done)

    async def ours_flow(commands: list[Command]) -> int:
        state = await dispatch_batch(
            commands, config=config, mode="parallel", max_concurrency=len(commands), return_state=True
        )
        if not state.is_completed():
            raise RuntimeError(f"dispatch_batch ended {state.name}: {state.message}")
        return len(await state.aresult())

    flows: dict[str, Callable[[list[Command]], Awaitable[int]]] = {
        "noop": noop_flow,
        "params": quoted_flow(params),
        "named": quoted_flow(named),
        "result": quoted_flow(result),
        "event": quoted_flow(event),
        "mcp": quoted_flow(mcp),
        "task": task_flow,
        "ours": ours_flow,
    }
    counter = iter(range(10**9))

    def step(name: str, count: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if await flows[name](echo_commands(count, f"{name}{next(counter)}")) != count:
                raise RuntimeError(f"{name}: results lost")

        return run

    async with ServerPool():
        raw.append(await live_client(shared_manager(config).servers["demo"]))  # the one our task steps call too
        for name in STEPS:  # the first run of each kind pays for imports and connections; a server starts
            await step(name, 1)()
            await step(name, batch)()
        settle = ApiSettle()
        await settle()
        samples = await interleaved({name: step(name, batch) for name in STEPS}, repeats, settle)
    rows = {}
    for name in STEPS:
        rows[name] = {
            "wall_ms": round(samples.median(name) * 1000, 1),
            "client_cpu_ms": round(samples.median(f"{name}:client_cpu") * 1000, 1),
            "server_cpu_ms": round(samples.median(f"{name}:server_cpu") * 1000, 1),
        }
    return {"batch": batch, "repeats": repeats, "steps": rows}


def print_ladder(figures: dict[str, Any]) -> None:
    steps, batch = figures["steps"], figures["batch"]
    floor = steps["noop"]
    print(f"{'step':8} {'wall':>9} {'vs noop':>8} {'Δ/task':>8} {'client CPU':>11} {'Δ/task':>8} {'server CPU':>11}")
    previous = floor
    for name in STEPS:
        row = steps[name]
        print(
            f"{name:8} {row['wall_ms']:7.0f}ms {row['wall_ms'] / floor['wall_ms']:8.2f} "
            f"{(row['wall_ms'] - previous['wall_ms']) / batch:6.2f}ms {row['client_cpu_ms']:9.0f}ms "
            f"{(row['client_cpu_ms'] - previous['client_cpu_ms']) / batch:6.2f}ms {row['server_cpu_ms']:9.0f}ms"
        )
        previous = row
    print("Δ/task: the step's median less the step before it, per task (noise: tenths of a ms).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="tasks per flow run (default 100)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each step (default 7)")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        figures = asyncio.run(ladder(args.batch, args.repeats))
    print_ladder(figures)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
