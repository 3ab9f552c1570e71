"""No single hub: batches flowing through two hubs while one of them dies, and what it costs them.

Run it from the project root::

    python bench/failover.py                      # the hub SIGKILLed, then again SIGSTOPped: about 1 minute
    python bench/failover.py --failure hang       # only the hung hub (its sockets open, nothing answers)
    python bench/failover.py --quick              # a smoke run, about 20 s

Two hubs run as ``dispatch serve`` processes reading one credentials file.
A device process holds ``--devices`` (100) devices, each dialling both hubs
(``aip.device.device_clients``: one call memory per device shared by its two
connections), whose one tool ``hold`` waits ``--hold`` (0.2) seconds and
counts how often each call_id ran. This process is the controllers:
``--concurrency`` (50) loops, each with its own ``WebSocketCommandDispatcher``
over a ``FailoverLink`` to both hubs, sending one-command batches to its
device, each with a new call_id, back to back. After ``--before`` seconds the
first hub (the one every link starts on) is killed (``kill``: SIGKILL, its
connections reset) or hung (``hang``: SIGSTOP, the way a machine that
vanished looks: nothing answers, nothing closes); the loops carry on for
``--after`` seconds.

Reported, per failure: batches sent and how many failed (the target is none);
commands that ran more than once on a device (none); for the batches that
were out when the hub failed, the time from the failure until the last of
them was answered (the failover time) and their worst latency; latency p50
and p99 of the batches started before the failure and of those started once
every in-flight batch was answered (the floor is the same loop on the same
hubs before anything failed); throughput before and after. Everything on
127.0.0.1, bounded by ``--limit`` seconds, every child stopped at the end.
The last line is every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import ROOT, Provenance, arguments, broken, ms, p99, print_json, table
from processes import Children, Noise, free_port, role, say, stdin_reader

SCRIPT = Path(__file__).resolve()
HOST = "127.0.0.1"
#: The run's secret: made by the parent, inherited by its device process; every token is derived from it.
SECRET = os.environ.setdefault("BENCH_FAILOVER_SECRET", uuid.uuid4().hex)
#: The credential every controller loop presents (a controller for every device).
CONTROLLER_TOKEN = f"bench-controller-{SECRET}"


def device_token(device_id: str) -> str:
    return f"bench-device-{device_id}-{SECRET}"


def device_ids(count: int) -> list[str]:
    return [f"failover-{index:05d}" for index in range(count)]


def write_credentials(path: Path, devices: Sequence[str]) -> None:
    """One credentials file for both hubs, as an operator copies one file to every hub of a fleet."""
    from aip.credential_file import write_store
    from aip.credentials import CredentialStore, Role

    store = CredentialStore()
    store.issue(Role.CONTROLLER, "bench", token=CONTROLLER_TOKEN)
    for device in devices:
        store.issue(Role.DEVICE, device, token=device_token(device))
    write_store(path, store)


# -- the device process -----------------------------------------------------------------------------


async def device_role(hubs: str, count: int) -> None:
    """``count`` devices on every hub of ``hubs``; READY once all are registered; the run counts at stdin's end."""
    from aip.device import DeviceClient, device_clients, serve_hubs
    from aip.messages import Command
    from dispatchers import InMemoryCommandDispatcher

    stdin = await stdin_reader()
    runs: Counter[str] = Counter()

    async def hold(command: Command) -> str:
        runs[command.call_id or ""] += 1
        await asyncio.sleep(float((command.parameters or {}).get("seconds", 0)))
        return "held"

    executor = InMemoryCommandDispatcher({"hold": hold})
    stop = asyncio.Event()
    clients: list[DeviceClient] = []
    serving = []
    for device in device_ids(count):
        mine = device_clients(hubs, device, executor, token=device_token(device), heartbeat_interval=10)
        clients += mine
        serving.append(asyncio.create_task(serve_hubs(mine, stop)))
    async with asyncio.timeout(120):
        await asyncio.gather(*(client.registered.wait() for client in clients))
    say(f"READY {len(clients)}")
    await stdin.read()
    say("RUNS " + json.dumps({"ran": len(runs), "ran_twice": sum(count > 1 for count in runs.values())}))
    stop.set()
    await asyncio.wait(serving, timeout=10)


# -- the controllers (this process) -----------------------------------------------------------------


@dataclass
class Batch:
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class Traffic:
    batches: list[Batch] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def controller_loop(hubs: str, device: str, hold: float, traffic: Traffic) -> None:
    from aip.failover import controller_link
    from aip.messages import Command, ResultStatus
    from dispatchers import WebSocketCommandDispatcher

    async with WebSocketCommandDispatcher(controller_link(hubs, CONTROLLER_TOKEN), device) as dispatcher:
        while not traffic.stop.is_set():
            command = Command(tool_name="hold", parameters={"seconds": hold}, call_id=uuid.uuid4().hex)
            started = time.perf_counter()
            [result] = await dispatcher.execute_commands([command], timeout=60)
            ok = result.status is ResultStatus.SUCCESS
            traffic.batches.append(Batch(started, time.perf_counter(), ok, "" if ok else (result.error or "")[-300:]))


@dataclass
class Failure:
    name: str
    signum: int


FAILURES = {"kill": Failure("kill", signal.SIGKILL), "hang": Failure("hang", signal.SIGSTOP)}


async def one_failure(args: Any, failure: Failure, log_dir: Path) -> dict[str, Any]:
    devices = device_ids(args.devices)
    credentials = log_dir / f"credentials-{failure.name}.json"
    write_credentials(credentials, devices)
    ports = [free_port(), free_port()]
    hubs = ",".join(f"ws://{HOST}:{port}" for port in ports)
    children = Children(log_dir, ROOT)
    env = {**os.environ, "DISPATCH_SERVICE": "off"}
    env.pop("DISPATCH_TOKEN", None)
    for index, port in enumerate(ports):
        argv = [sys.executable, "-m", "cli.main", "serve", "--host", HOST, "--port", str(port)]
        children.start(f"hub-{index}-{failure.name}", [*argv, "--credentials", str(credentials)], env)
    try:
        argv = [sys.executable, str(SCRIPT), "--role", "device", "--hubs", hubs, "--devices", str(args.devices)]
        async with role("devices", argv, env) as device_process:
            if not device_process.line.startswith("READY"):
                raise broken(f"the device process said {device_process.line!r}")
            traffic = Traffic()
            loops = [
                asyncio.create_task(controller_loop(hubs, devices[index % len(devices)], args.hold, traffic))
                for index in range(args.concurrency)
            ]
            noise = Noise(os.getpid())
            await asyncio.sleep(args.before)
            victim = children.started[f"hub-0-{failure.name}"]
            failed_at = time.perf_counter()
            os.kill(victim.pid, failure.signum)
            await asyncio.sleep(args.after)
            traffic.stop.set()
            async with asyncio.timeout(90):
                await asyncio.gather(*loops)
            waited = noise.share()
            assert device_process.process.stdin is not None
            device_process.process.stdin.close()
            await device_process.expect("RUNS", timeout=30)
            runs: dict[str, int] = json.loads(device_process.line.split(" ", 1)[1])  # one line, whatever the traffic
    finally:
        children.stop()
    return figures_of(traffic.batches, failed_at, runs, waited, failure)


def figures_of(
    batches: list[Batch], failed_at: float, runs: dict[str, int], waited: float | None, failure: Failure
) -> dict[str, Any]:
    out = [batch for batch in batches if batch.started < failed_at < batch.ended]
    recovered_at = max((batch.ended for batch in out), default=failed_at)
    before = [batch for batch in batches if batch.ended < failed_at]
    after = [batch for batch in batches if batch.started > recovered_at]
    span_before = (max(b.ended for b in before) - min(b.started for b in before)) if before else 0
    span_after = (max(b.ended for b in after) - min(b.started for b in after)) if after else 0

    def latencies(chosen: list[Batch]) -> list[float]:
        return [batch.ended - batch.started for batch in chosen]

    errors = Counter(batch.error.split(":")[0] for batch in batches if not batch.ok)
    return {
        "failure": failure.name,
        "batches": len(batches),
        "failed": sum(not batch.ok for batch in batches),
        "errors": dict(errors.most_common(3)),
        "ran_twice": runs["ran_twice"],
        "ran": runs["ran"],
        "in_flight_at_failure": len(out),
        "failover_s": round(recovered_at - failed_at, 2),
        "in_flight_worst_ms": ms(max(latencies(out), default=0)),
        "p50_before_ms": ms(statistics.median(latencies(before))) if before else None,
        "p99_before_ms": ms(p99(latencies(before))) if before else None,
        "p50_after_ms": ms(statistics.median(latencies(after))) if after else None,
        "p99_after_ms": ms(p99(latencies(after))) if after else None,
        "per_s_before": round(len(before) / span_before, 1) if span_before else None,
        "per_s_after": round(len(after) / span_after, 1) if span_after else None,
        "cpu_wait_share": waited,
    }


def print_figures(runs: list[dict[str, Any]], args: Any) -> None:
    print(
        f"Two hubs (dispatch serve), {args.devices} devices each on both, {args.concurrency} controllers "
        f"sending one-command batches ({args.hold:g} s each) back to back; the first hub fails after "
        f"{args.before:g} s, traffic goes on {args.after:g} s."
    )
    rows = [
        [
            run["failure"],
            str(run["batches"]),
            str(run["failed"]),
            str(run["ran_twice"]),
            str(run["in_flight_at_failure"]),
            f"{run['failover_s']:.2f} s",
            f"{run['in_flight_worst_ms']:.0f} ms",
            f"{run['p50_before_ms']} / {run['p99_before_ms']} ms",
            f"{run['p50_after_ms']} / {run['p99_after_ms']} ms",
            f"{run['per_s_before']} / {run['per_s_after']}",
        ]
        for run in runs
    ]
    header = ["failure", "batches", "failed", "ran twice", "out at failure", "failover", "worst out"]
    table([*header, "p50/p99 before", "p50/p99 after", "batches/s before/after"], rows)
    for run in runs:
        if run["errors"]:
            print(f"  {run['failure']}: failures by cause: {run['errors']}")
    worst = max((run["cpu_wait_share"] or 0) for run in runs)
    print(
        f"Noise: this process waited for a CPU {worst:.0%} of the time at worst; load average {os.getloadavg()[0]:.1f}."
    )


async def bench(args: Any) -> dict[str, Any]:
    logging.getLogger("dispatchers.remote").setLevel(logging.ERROR)  # a re-send per batch at the failure: counted below
    provenance = Provenance(["aip", "dispatchers", "cli"])
    chosen = [FAILURES[name] for name in (args.failure or ["kill", "hang"])]
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as folder:
        async with asyncio.timeout(args.limit):
            runs = [await one_failure(args, failure, Path(folder)) for failure in chosen]
    figures: dict[str, Any] = {"runs": runs, "devices": args.devices, "concurrency": args.concurrency}
    provenance.finish(figures)
    provenance.print()
    print_figures(runs, args)
    figures["code"] = provenance.code
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--failure", choices=sorted(FAILURES), action="append", help="kill, hang (default: both)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--hold", type=float, default=0.2, help="seconds each command takes on the device")
    parser.add_argument("--before", type=float, default=8.0)
    parser.add_argument("--after", type=float, default=15.0)
    parser.add_argument("--limit", type=float, default=300.0, help="seconds the whole run may take")
    parser.add_argument("--quick", action="store_true", help="20 devices, 10 controllers, 4 s + 10 s")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--hubs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "device":
        asyncio.run(device_role(args.hubs, args.devices))
        return
    if args.quick:
        args.devices, args.concurrency, args.before, args.after = 20, 10, 4.0, 10.0
    print_json(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
