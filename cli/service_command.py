"""``dispatch service status|stop``: the batch services that this user's ``dispatch run``s started."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dispatchers import plural

from .batch_service import wire
from .batch_service.client import ServiceFailed, connect_to
from .batch_service.place import ServicePlace, UnsafeDirectory, holds_lock, runtime_directory
from .terminal import say_error, stdout

service_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The batch services that keep Prefect warm between `dispatch run`s (one per directory and environment).",
)

#: Seconds a stopping service has to finish its batches and let go of its lock.
STOP_TIMEOUT = 30.0


@service_app.command()
def status() -> None:
    """List this user's batch services; exit 1 if none serves this directory and environment."""
    here, sockets = _sockets()
    serving_here = False
    for path in sockets:
        answer = _ask(path, "status")
        if answer is None:
            continue
        mine = path == here.socket
        serving_here |= mine
        stdout.print(
            f"pid {answer['pid']}: {plural(answer['running'], 'flow run')} running, "
            f"stops after {answer['idle']:g} s idle{'  (this directory and environment)' if mine else ''}",
            highlight=False,
            soft_wrap=True,
        )
    if not serving_here:
        stdout.print(
            "no batch service for this directory and environment: the next `dispatch run` starts one", soft_wrap=True
        )
        raise typer.Exit(1)


@service_app.command()
def stop(
    every: Annotated[bool, typer.Option("--all", help="Stop every batch service of this user")] = False,
) -> None:
    """Stop the batch service of this directory and environment (running batches end, interrupted, first)."""
    here, sockets = _sockets()
    stopped, failed = 0, False
    for path in sockets if every else [here.socket]:
        answer = _ask(path, "stop")
        if answer is None:
            continue
        if not _wait_gone(path.with_suffix(".lock")):
            say_error(
                f"the batch service (pid {answer['pid']}) is still stopping after {STOP_TIMEOUT:g} s "
                f"(a client that reads nothing is cut off after a while; its log: {path.with_suffix('.log')})"
            )
            failed = True
            continue
        stdout.print(f"stopped the batch service (pid {answer['pid']})", highlight=False)
        stopped += 1
    if failed:
        raise typer.Exit(1)
    if not stopped:
        stdout.print("no batch service was running" + ("" if every else " for this directory and environment"))


def _sockets() -> tuple[ServicePlace, list[Path]]:
    try:
        here = ServicePlace.here()
        return here, sorted(runtime_directory(os.environ).glob("*.sock"))
    except UnsafeDirectory as error:
        say_error(str(error))
        raise typer.Exit(1) from None


def _ask(path: Path, kind: str) -> dict[str, Any] | None:
    """The service's answer to ``kind``, or None if no service listens there (a dead one's socket is removed)."""
    try:
        connection = connect_to(path)
        if connection is None:
            if not holds_lock(path.with_suffix(".lock")):  # a starting service has its lock before its socket
                with contextlib.suppress(OSError):
                    path.unlink()
            return None
        with connection, connection.makefile("rb") as stream:
            connection.settimeout(STOP_TIMEOUT)
            hello = wire.decode(stream.readline())
            connection.sendall(wire.encode(kind))
            return hello | wire.decode(stream.readline())
    except (OSError, ServiceFailed, wire.WireError) as error:
        say_error(f"the batch service at {path} did not answer: {error}")
        return None


def _wait_gone(lock: Path) -> bool:
    """Whether the service's process has ended (its MCP servers and temporary Prefect server with it) in time."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while holds_lock(lock):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # a process of another session ending has no event to wait on
    return True
