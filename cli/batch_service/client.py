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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from aip.messages import Command, Result
from dispatchers.base import error_result
from dispatchers.errors import CommandError
from flows.hub_access import HubAccess
from tasks.report import CommandReport

from ..batch_display import BatchDisplay, ConsoleLogHandler
from ..batch_outcome import INTERRUPTED, Outcome, outcome_of
from . import wire
from .place import ServicePlace, holds_lock, idle_seconds, peer_is_us

__all__ = [
    "ServiceDidNotStart",
    "ServiceFailed",
    "ServiceLost",
    "ServiceRefused",
    "connect",
    "connect_to",
    "run_through_service",
    "started_service",
]

#: Seconds a starting service has to open its socket (it imports Prefect and may start a temporary API first).
START_TIMEOUT = 120.0
#: Seconds a run waits for a stopping service to end before it starts another one.
RELEASE_WAIT = 30.0
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
    if not peer_is_us(connection):
        connection.close()
        raise ServiceDidNotStart(f"what listens at {path} runs as another user: it is not used")
    return connection


def started_service(place: ServicePlace, stderr: Console) -> socket.socket:
    """Start the place's service and connect to it once it listens (a Ctrl-C meanwhile leaves it starting)."""
    idle = idle_seconds(os.environ)
    stderr.print(
        f"starting the batch service (Prefect, once; later runs from here reuse it until it has been idle "
        f"{idle:g} s; `dispatch service stop` ends it)",
        highlight=False,
        soft_wrap=True,
    )
    # The log may quote a failing command's parameters: this user's alone, like the socket.
    with os.fdopen(os.open(place.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
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
                str(idle),
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
    """Send one ``run`` or ``resume`` request and drive the display until its ``done``.

    A service that goes away before the batch has started (it was stopping,
    it crashed) costs one more try on a new service, then ``ServiceDidNotStart``;
    one that goes away after leaves an ``Outcome`` whose unfinished commands
    failed ``ServiceLost`` (``Outcome.lost`` says why).
    """
    place = place or ServicePlace.here()
    request = wire.encode(kind, **fields, hub_access=wire.access_to_wire(access))
    if len(request) > wire.REQUEST_LIMIT:
        raise ServiceDidNotStart(f"the batch is over the {wire.REQUEST_LIMIT >> 20} MiB a batch service takes")
    for _ in range(2):
        connection = connect(place) or started_service(place, stderr)
        try:
            return _run_on(connection, request, place, stderr)
        except _NotStarted:
            _wait_released(place)
    raise ServiceDidNotStart(f"the batch service went away before the batch started (its log: {place.log})")


class _NotStarted(Exception):
    """The service went away before the batch's flow run existed: nothing ran, another service may take it."""


def _run_on(connection: socket.socket, request: bytes, place: ServicePlace, stderr: Console) -> Outcome:
    with contextlib.closing(connection):
        connection.settimeout(wire.ALIVE_INTERVAL * SILENCE_LIMIT)
        messages = _messages(connection, place)
        try:
            hello = next(messages, None)
            if hello is None:
                raise _NotStarted
            connection.sendall(request)
        except (OSError, ServiceFailed):
            raise _NotStarted from None
        display = BatchDisplay(stderr, live=stderr.is_terminal, dashboard=_text(hello.get("dashboard")))
        session = _Session(connection, display, stderr)
        try:
            with session.signals():
                return session.follow(messages)
        finally:
            display.close()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _wait_released(place: ServicePlace) -> None:
    """Until a stopping service has let go of its place (bounded: it may be stuck)."""
    deadline = time.monotonic() + RELEASE_WAIT
    while holds_lock(place.lock) and time.monotonic() < deadline:
        time.sleep(0.05)  # a process of another session ending has no event to wait on


class ServiceLost(CommandError):
    """The batch service went away while the batch ran: this command had no Result from it."""

    kind = "ServiceLost"


@dataclass
class _Session:
    connection: socket.socket
    display: BatchDisplay
    stderr: Console
    asked: bool = False
    commands: list[Command] = field(default_factory=list)
    results: dict[int, Result] = field(default_factory=dict)

    def follow(self, messages: Iterator[dict[str, Any]]) -> Outcome:
        logs = ConsoleLogHandler(self.stderr)
        reports: list[CommandReport | None] = []
        try:
            for message in messages:
                kind = message["type"]
                if kind == "stopping" and not self.commands:
                    raise _NotStarted
                if kind == "started":
                    self.commands = wire.commands_from_wire(message["commands"])
                    self.display.batch_started(
                        str(message["flow_run_id"]), str(message["flow_run_name"]), self.commands
                    )
                elif kind == "command_started":
                    self.display.command_started(self._index(message))
                elif kind == "command_finished":
                    index = self._index(message)
                    self.results[index] = Result.model_validate(message["result"])
                    self.display.command_finished(index, self.results[index], wire.report_from_wire(message["report"]))
                elif kind == "finished":
                    reports = [wire.report_from_wire(item) for item in message["reports"]]
                elif kind == "log":
                    logs.handle(_record(message))
                elif kind == "error" and self.commands:  # mid-batch: the Results so far, and why the rest are not
                    return self.lost(str(message["message"]))
                elif kind == "error":
                    raise ServiceRefused(str(message["message"]), usage=bool(message["usage"]))
                elif kind == "done":
                    commands = wire.commands_from_wire(message["commands"])
                    results = wire.results_from_wire(message["results"])
                    self.display.batch_finished(results, reports or [None] * len(results))
                    return outcome_of(self.display.commands or commands, results, self.display, self.asked)
            gone = "the batch service stopped before the batch ended"
        except (ServiceFailed, OSError) as error:
            gone = str(error)
        except (KeyError, TypeError, ValueError, IndexError) as error:  # ValidationError included
            gone = f"the batch service sent what is not a message of ours ({type(error).__name__})"
        if not self.commands:
            raise _NotStarted
        return self.lost(gone)

    def _index(self, message: dict[str, Any]) -> int:
        index = message["index"]
        if not isinstance(index, int) or not 0 <= index < len(self.commands):
            raise IndexError("a command index out of range")
        return index

    def lost(self, why: str) -> Outcome:
        """Every command has a Result: those the service sent, and ``ServiceLost`` failures for the others."""
        cause = ServiceLost(f"{why} while the batch ran; the command may have run")
        results = [self.results.get(i) or error_result(command, cause) for i, command in enumerate(self.commands)]
        for index, result in enumerate(results):
            if index not in self.results:
                self.display.command_finished(index, result, None)
        self.display.batch_finished(results, self.display.reports)
        found = outcome_of(self.commands, results, self.display, self.asked)
        found.lost = self.gone(why)
        return found

    def gone(self, why: str) -> str:
        """``why``, with the flow run it leaves unfinished."""
        run = self.display.flow_run_id
        return why + (f" (flow run {run})" if run else "")

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


def _record(message: dict[str, Any]) -> logging.LogRecord:
    """A warning of the run, as a record for the terminal's log handler (which prints it inert)."""
    levelno = message["levelno"] if isinstance(message.get("levelno"), int) else logging.WARNING
    record = logging.makeLogRecord({"name": str(message["name"]), "levelno": levelno, "msg": str(message["message"])})
    record.levelname = logging.getLevelName(levelno)
    return record


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
