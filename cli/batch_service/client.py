"""``dispatch run`` through the batch service: connect (starting it if there is none), send, show, report.

This side never imports Prefect: a run through a warm service costs the
CLI's own start and the batch's flow run, not Prefect's import. What the
terminal shows is what the in-process run shows, driven by the service's
messages instead of the flow's watcher; Ctrl-C asks the service to interrupt
the batch (its Results kept, its flow run Cancelled), a second one quits at
once and the service interrupts the batch when it sees us gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from aip.messages import Command, Result
from dispatchers.interrupt import was_interrupted
from flows.hub_access import HubAccess

from ..batch_display import BatchDisplay, ConsoleLogHandler
from ..batch_outcome import INTERRUPTED, Outcome
from . import wire
from .place import ServicePlace, holds_lock, idle_seconds

__all__ = [
    "ServiceDidNotStart",
    "ServiceFailed",
    "ServiceRefused",
    "connect",
    "connect_to",
    "run_through_service",
    "started_service",
]

#: Seconds a starting service has to open its socket (it imports Prefect and may start a temporary API first).
START_TIMEOUT = 120.0
#: Silent ``ALIVE_INTERVAL``s after which the service counts as gone.
SILENCE_LIMIT = 10


class ServiceFailed(RuntimeError):
    """The service could not be started or reached, or it went away mid-batch."""


class ServiceDidNotStart(ServiceFailed):
    """No batch was sent: running it in-process instead loses nothing."""


class ServiceRefused(RuntimeError):
    """The service refused the request as ``dispatch run`` would have (``usage``: a mistake of the user's)."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def connect(place: ServicePlace) -> socket.socket | None:
    """A connection to the place's service, or None when none is listening."""
    return connect_to(place.socket)


def connect_to(path: Path) -> socket.socket | None:
    """A connection to the service listening at ``path``, or None."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        connection.close()
        return None
    except OSError as error:
        connection.close()
        raise ServiceDidNotStart(f"cannot reach the batch service at {path}: {error}") from None
    return connection


def started_service(place: ServicePlace, stderr: Console) -> socket.socket:
    """Start the place's service and connect to it once it listens (a Ctrl-C meanwhile leaves it starting)."""
    stderr.print(
        f"starting the batch service (Prefect, once; later runs from here reuse it until it has been idle "
        f"{idle_seconds(os.environ):g} s; `dispatch service stop` ends it)",
        highlight=False,
        soft_wrap=True,
    )
    with open(place.log, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli.batch_service.server",
                "--socket",
                str(place.socket),
                "--lock",
                str(place.lock),
                "--idle",
                str(idle_seconds(os.environ)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # a Ctrl-C in this terminal is for the batch, not the service
        )
    deadline = time.monotonic() + START_TIMEOUT
    pause = 0.01
    while time.monotonic() < deadline:
        connection = connect(place)
        if connection is not None:
            return connection
        if process.poll() is not None and not holds_lock(place.lock):  # ours ended and no other one is starting
            break
        time.sleep(pause)  # a socket appearing has no event to wait on
        pause = min(pause * 2, 0.1)
    raise ServiceDidNotStart(f"the batch service did not start (its log: {place.log}){_last_line(place)}")


def run_through_service(
    kind: str, fields: dict[str, Any], access: HubAccess, stderr: Console, place: ServicePlace | None = None
) -> Outcome:
    """Send one ``run`` or ``resume`` request and drive the display until its ``done``."""
    place = place or ServicePlace.here()
    connection = connect(place) or started_service(place, stderr)
    with contextlib.closing(connection):
        connection.settimeout(wire.ALIVE_INTERVAL * SILENCE_LIMIT)
        messages = _messages(connection, place)
        hello = next(messages, None)
        if hello is None:
            raise ServiceFailed(f"the batch service closed the connection (its log: {place.log})")
        display = BatchDisplay(stderr, live=stderr.is_terminal, dashboard=hello.get("dashboard"))
        session = _Session(connection, display, stderr)
        connection.sendall(wire.encode(kind, **fields, hub_access=wire.access_to_wire(access)))
        try:
            with session.signals():
                return session.follow(messages)
        finally:
            display.close()


@dataclass
class _Session:
    connection: socket.socket
    display: BatchDisplay
    stderr: Console
    asked: bool = False

    def follow(self, messages: Iterator[dict[str, Any]]) -> Outcome:
        logs = ConsoleLogHandler(self.stderr)
        reports: list[Any] = []
        for message in messages:
            kind = message["type"]
            if kind == "started":
                commands = wire.commands_from_wire(message["commands"])
                self.display.batch_started(message["flow_run_id"], message["flow_run_name"], commands)
            elif kind == "command_started":
                self.display.command_started(int(message["index"]))
            elif kind == "command_finished":
                result = Result.model_validate(message["result"])
                self.display.command_finished(int(message["index"]), result, wire.report_from_wire(message["report"]))
            elif kind == "finished":
                reports = [wire.report_from_wire(item) for item in message["reports"]]
            elif kind == "log":
                record = logging.makeLogRecord(
                    {"name": message["name"], "levelno": message["levelno"], "msg": message["message"]}
                )
                record.levelname = logging.getLevelName(record.levelno)
                logs.handle(record)
            elif kind == "error":
                raise ServiceRefused(str(message["message"]), usage=bool(message["usage"]))
            elif kind == "done":
                commands = wire.commands_from_wire(message["commands"])
                results = wire.results_from_wire(message["results"])
                self.display.batch_finished(results, reports or [None] * len(results))
                return self.outcome(commands, results)
        raise ServiceFailed(self.gone("stopped before the batch ended"))

    def outcome(self, commands: list[Command], results: list[Result]) -> Outcome:
        commands = self.display.commands or commands
        # A Ctrl-C after the last Result interrupted nothing: the run's outcome is its Results'.
        interrupted = self.asked and any(was_interrupted(c, r) for c, r in zip(commands, results, strict=False))
        return Outcome(commands, results, self.display, interrupted)

    def gone(self, what: str) -> str:
        run = self.display.flow_run_id
        return f"the batch service {what}" + (f" (flow run {run})" if run else "")

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP interrupt the batch; another one quits on the spot."""

        def interrupt(signum: int, frame: FrameType | None) -> None:
            if self.asked:
                self.display.close()
                self.stderr.print(
                    "interrupted again: quitting without waiting for the batch (the service interrupts it)",
                    highlight=False,
                )
                sys.stderr.flush()
                os._exit(INTERRUPTED)
            self.asked = True
            with contextlib.suppress(OSError):
                self.connection.sendall(wire.encode("interrupt"))
            self.stderr.print(
                "interrupted: stopping the running commands (Ctrl-C again to quit at once)",
                highlight=False,
                soft_wrap=True,
            )

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {signum: signal.signal(signum, interrupt) for signum in handled}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _messages(connection: socket.socket, place: ServicePlace) -> Iterator[dict[str, Any]]:
    """The service's messages, one per line; a silence past the limit or a broken line is the service gone."""
    stream = connection.makefile("rb")
    try:
        while True:
            try:
                line = stream.readline()
            except TimeoutError:
                raise ServiceFailed(f"the batch service stopped answering (its log: {place.log})") from None
            if not line:
                return
            try:
                message = wire.decode(line)
            except wire.WireError as error:
                raise ServiceFailed(f"the batch service sent {error} (its log: {place.log})") from None
            if message["type"] != "alive":
                yield message
    finally:
        stream.close()


def _last_line(place: ServicePlace) -> str:
    with contextlib.suppress(OSError):
        lines = place.log.read_text(errors="replace").strip().splitlines()
        if lines:
            return f": {lines[-1][:300]}"
    return ""
