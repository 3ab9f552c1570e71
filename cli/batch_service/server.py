"""The batch service process: batches from ``dispatch run`` as flow runs here, Prefect and MCP servers kept warm.

    python -m cli.batch_service.server --socket PATH --lock PATH --idle SECONDS

Started by ``cli.batch_service.client`` in a session of its own, with the
environment and working directory of the ``dispatch run`` that needed it. It
holds ``--lock`` for its whole life, so two runs starting at once make one
service (the second exits at once). Each connection carries one request; a
batch runs as ``run_batch_flow`` does in-process, watched by a forwarder
instead of the display, interrupted when its client asks or goes away. No
batch for ``--idle`` seconds, SIGTERM or a ``stop`` request: it stops, its
running batches interrupted (each ends with its Results), its MCP servers
and its temporary Prefect server with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from cli.main import exit_at_once
from cli.up import quiet_prefect_defaults

from . import wire
from .place import code_fingerprint, peer_is_us, sweep

logger = logging.getLogger("dispatch.service")

#: Bytes of log a service writes in its life (warnings only: a few per failing batch).
LOG_LIMIT = 16 * 1024 * 1024
#: Tries, and seconds between them, at taking a lock that someone holds.
LOCK_TRIES = 5
LOCK_PAUSE = 0.02
#: Seconds between two looks, while idle, at whether our code was replaced.
SUPERSEDED_CHECK = 30.0
#: Seconds after which a service stops at its next idle moment, however busy it has been.
LIFETIME = 6 * 3600.0
#: Seconds a stopping service gives its batches to end, and then its connections to close once cut.
SHUTDOWN_WAIT = 30.0
#: Seconds a client has to send its request once connected.
REQUEST_WAIT = 30.0
#: Seconds the last messages to a client may take to be read before the connection is cut.
DRAIN_WAIT = 60.0
#: Bytes waiting for a client that reads nothing, beyond which it is cut off.
WRITE_LIMIT = 256 * 1024 * 1024
#: Where a run's warnings go: the connection of the client whose run logged them.
_client: ContextVar[Callable[[bytes], None] | None] = ContextVar("dispatch_service_client", default=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--idle", type=float, required=True)
    options = parser.parse_args(argv)
    if _take(options.lock) is None:
        return  # another service holds this place; the client connects to it
    sweep(options.lock.parent, keep=options.lock.stem)
    if not sys.stderr.isatty():
        os.ftruncate(sys.stderr.fileno(), 0)  # one life's log at a time
    quiet_prefect_defaults()
    from cli import embedded_api  # imports Prefect, which configures logging

    _log_warnings()

    embedded = embedded_api.needed()
    if embedded:
        embedded_api.start()  # stopped by its atexit handler, or with us (it dies with its parent)
    try:
        asyncio.run(Service(options.socket, options.idle, embedded).serve())
    finally:
        with contextlib.suppress(OSError):
            options.socket.unlink()
    # The lock goes with the process (never before: `dispatch service stop` waits for it to mean "ended").
    exit_at_once(0)


def _log_warnings() -> None:
    """Warnings and errors to our log (stderr) and to the client whose run logged them; Prefect's console goes.

    Prefect's console handler would write every task's lines into the log,
    growing it with each batch.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, PrefectConsoleHandler):
            root.removeHandler(handler)
    to_log = _BoundedLog()
    to_log.setLevel(logging.WARNING)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_log)
    root.addHandler(_ForwardedLogs())


class _BoundedLog(logging.StreamHandler):  # type: ignore[type-arg]
    """Our log on stderr (a file), up to ``LOG_LIMIT`` bytes for the life of the service, then one last line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.written = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.written > LOG_LIMIT:
            return
        self.written += len(self.format(record)) + 1
        if self.written > LOG_LIMIT:
            record = logging.makeLogRecord({"name": logger.name, "levelno": logging.WARNING, "msg": "log full"})
            record.levelname = "WARNING"
        super().emit(record)


def _take(path: Path) -> IO[bytes] | None:
    """The place's lock, held until the process ends; None when another service holds it.

    Others look at the lock by taking it for an instant (``holds_lock``), so a
    refusal is asked again a few times; and the file locked must still be the
    one at the path (a sweep may have removed it meanwhile).
    """
    for _ in range(LOCK_TRIES):
        handle = open(path, "ab")  # noqa: SIM115 - held for the life of the process, released by its end
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            time.sleep(LOCK_PAUSE)  # another process's instant: nothing to wait on
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            handle.close()
            continue
        os.utime(path)  # a lock in use is never a sweep's to remove
        _held.append(handle)
        return handle
    return None


#: The lock's file, open for the life of the process.
_held: list[IO[bytes]] = []


class Service:
    def __init__(self, path: Path, idle: float, embedded: bool) -> None:
        self.path = path
        self.idle = idle
        self.embedded = embedded
        #: Connections open, each its handler's task with its writer: activity from the moment of accept.
        self.connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: The handlers running a batch.
        self.running: set[asyncio.Task[None]] = set()
        self.interruptions: set[Any] = set()
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.code = code_fingerprint()
        self.started = time.monotonic()

    async def serve(self) -> None:
        from dispatchers import ServerPool

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.stop)
        async with ServerPool():  # MCP servers shared by every batch this service runs, stopped at its end
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a dead service's socket: we hold the lock, it is ours to replace
            server = await asyncio.start_unix_server(self.connected, self.path, limit=wire.REQUEST_LIMIT)
            os.chmod(self.path, 0o600)
            try:
                await self.until_idle_or_stopped()
            finally:
                server.close()
                with contextlib.suppress(OSError):
                    self.path.unlink()
                await self.close_connections()

    async def close_connections(self) -> None:
        """Batches interrupted (each ends with its Results), then connections that still hang on are cut.

        A client that stops reading (suspended, its pipe full) must not keep
        the service, its servers and its memory alive for good.
        """
        deadline = time.monotonic() + SHUTDOWN_WAIT
        while self.connections and time.monotonic() < deadline:
            for interruption in list(self.interruptions):
                interruption.interrupt()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
        for writer in self.connections.values():
            writer.transport.abort()
        if self.connections:
            await asyncio.wait(self.connections, timeout=SHUTDOWN_WAIT)

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()

    async def until_idle_or_stopped(self) -> None:
        """Until a stop, ``idle`` seconds without a batch, our code replaced, or ``LIFETIME`` served.

        A service whose code was replaced would never be reached again; the
        lifetime bounds whatever a long life accumulates (caches, fragments).
        """
        idle_since = time.monotonic()
        while not self.stopping.is_set():
            self.changed.clear()
            if self.connections:
                await self.changed.wait()
                idle_since = time.monotonic()
                continue
            left = idle_since + self.idle - time.monotonic()
            if left <= 0:
                logger.info("no batch for %gs: stopping", self.idle)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, SUPERSEDED_CHECK))
            if self.connections:
                continue
            if code_fingerprint() != self.code:
                logger.info("our code was changed or upgraded: stopping (the next run starts a new service)")
                return
            if time.monotonic() - self.started > LIFETIME:
                logger.info("served for %gs: stopping (the next run starts a fresh service)", LIFETIME)
                return

    async def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections[task] = writer
        self.changed.set()
        try:
            if not _same_user(writer):
                return
            writer.write(wire.encode("hello", pid=os.getpid(), dashboard=self.dashboard()))
            try:
                request = wire.decode(await asyncio.wait_for(reader.readline(), REQUEST_WAIT))
            except (ValueError, TimeoutError) as error:  # over the limit, not our message, too slow
                writer.write(
                    wire.encode("error", usage=False, message=f"the batch service refused the request: {error}")
                )
                return
            kind = request["type"]
            if kind == "status":
                writer.write(wire.encode("status", pid=os.getpid(), running=len(self.running), idle=self.idle))
            elif kind == "stop":
                self.stop()
                writer.write(wire.encode("stopping", running=len(self.running)))
            elif kind in ("run", "resume") and self.stopping.is_set():
                writer.write(wire.encode("stopping", running=len(self.running)))  # the client asks another one
            elif kind in ("run", "resume"):
                self.running.add(task)
                await self.run(request, reader, writer)
            else:
                writer.write(wire.encode("error", usage=False, message=f"unknown request {kind!r}"))
        except ConnectionError as error:
            logger.warning("a client went away: %s", error)
        finally:
            await _drained(writer)
            self.running.discard(task)
            del self.connections[task]
            self.changed.set()
            writer.close()

    def dashboard(self) -> str | None:
        from prefect.settings import PREFECT_UI_URL

        return None if self.embedded else PREFECT_UI_URL.value()

    async def run(self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One batch, as ``dispatch run`` would run it in-process; its messages to the client as they happen."""
        from dispatchers.interrupt import interruptible
        from flows.hub_access import hub_access
        from flows.watching import watching

        send = _sender(writer)
        try:
            access = wire.access_from_wire(request.get("hub_access", {}))
        except wire.WireError as error:
            send(_refusal(error))
            return
        # The batch's task copies the context as set here, for the whole batch; the block may end at once.
        with (
            interruptible() as interruption,
            watching(_Forwarder(send, self.take_back_sigterm)),
            hub_access(access),
            _forwarding(send),
        ):
            batch = asyncio.create_task(self.batch(request))
        self.interruptions.add(interruption)
        listening = asyncio.create_task(_listen(reader, interruption.interrupt))
        alive = asyncio.create_task(_keep_alive(send))
        try:
            await asyncio.wait({batch})
        finally:
            self.interruptions.discard(interruption)
            listening.cancel()
            alive.cancel()
        send(batch.result())

    async def batch(self, request: dict[str, Any]) -> bytes:
        """The ``done`` message of a batch, or the ``error`` its client shows as ``dispatch run`` would."""
        from prefect.exceptions import TerminationSignal

        from cli.batch_run import REFUSED, APIUnreachable, check_api_answers, refusal
        from flows.batch import resume_batch_flow, run_batch_flow

        try:
            if not self.embedded:
                await asyncio.to_thread(check_api_answers)
            if request["type"] == "run":
                commands = wire.commands_from_wire(request["commands"])
                options = request["options"]
                if not isinstance(options, dict):
                    raise wire.WireError("options are an object")
                results = await run_batch_flow(commands, **options)
            else:
                commands, results = await resume_batch_flow(str(request["flow_run_id"]))
        except (*REFUSED, APIUnreachable) as error:
            usage, message = refusal(error)
            return wire.encode("error", usage=usage, message=message)
        except (wire.WireError, KeyError) as error:
            return wire.encode("error", usage=True, message=str(error))
        except TerminationSignal:  # Prefect's SIGTERM bridge, installed while a flow run starts: a stop, meant for us
            self.stop()
            return wire.encode("error", usage=False, message="the batch service was stopped (SIGTERM)")
        except Exception as error:
            logger.exception("a batch failed in the service")
            return wire.encode("error", usage=False, message=f"the batch service failed: {error!r}")
        return wire.encode("done", commands=wire.commands_to_wire(commands), results=wire.results_to_wire(results))

    def take_back_sigterm(self) -> None:
        """Prefect takes SIGTERM over for each flow run (to crash it on a runner's cancel): here it stops us."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stop)


def _refusal(error: Exception) -> bytes:
    return wire.encode("error", usage=False, message=f"the batch service refused the request: {error}")


def _sender(writer: asyncio.StreamWriter) -> Callable[[bytes], None]:
    """Write without waiting: the watcher must return at once; a client gone is no error of the batch's.

    A client that reads nothing while ``WRITE_LIMIT`` bytes wait for it is
    cut off: the batch then ends as if it had gone (``_listen``).
    """

    def send(message: bytes) -> None:
        if writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > WRITE_LIMIT:
            logger.warning("a client read nothing of %d bytes sent to it: cut off", WRITE_LIMIT)
            writer.transport.abort()
            return
        writer.write(message)

    return send


async def _drained(writer: asyncio.StreamWriter) -> None:
    """The last messages delivered, or the connection cut after ``DRAIN_WAIT``: nobody waits on a reader for good."""
    try:
        await asyncio.wait_for(writer.drain(), DRAIN_WAIT)
    except TimeoutError:
        writer.transport.abort()
    except ConnectionError:
        pass


async def _listen(reader: asyncio.StreamReader, interrupt: Callable[[], None]) -> None:
    """The client's ``interrupt``, or its going away (a second Ctrl-C, a kill): the batch ends now, Results kept."""
    while True:
        try:
            line = await reader.readline()
        except (ValueError, ConnectionError):
            line = b""
        if not line:
            interrupt()
            return
        with contextlib.suppress(wire.WireError):
            if wire.decode(line)["type"] == "interrupt":
                interrupt()


async def _keep_alive(send: Callable[[bytes], None]) -> None:
    while True:
        await asyncio.sleep(wire.ALIVE_INTERVAL)
        send(wire.encode("alive"))


class _Forwarder:
    """The terminal's ``BatchWatcher``, at the other end of the socket."""

    def __init__(self, send: Callable[[bytes], None], on_started: Callable[[], None]) -> None:
        self.send = send
        self.on_started = on_started

    def batch_started(self, flow_run_id: str, flow_run_name: str, commands: Any) -> None:
        self.on_started()
        self.send(
            wire.encode(
                "started",
                flow_run_id=flow_run_id,
                flow_run_name=flow_run_name,
                commands=wire.commands_to_wire(commands),
            )
        )

    def command_started(self, index: int) -> None:
        self.send(wire.encode("command_started", index=index))

    def command_finished(self, index: int, result: Any, report: Any) -> None:
        self.send(
            wire.encode(
                "command_finished",
                index=index,
                result=result.model_dump(mode="json"),
                report=wire.report_to_wire(report),
            )
        )

    def batch_finished(self, results: Any, reports: Any) -> None:
        self.send(wire.encode("finished", reports=[wire.report_to_wire(report) for report in reports]))


class _ForwardedLogs(logging.Handler):
    """A run's warnings and errors, sent to its client's terminal (as ``dispatch run`` prints them in-process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from cli.batch_display import shown_in_terminal

        send = _client.get()
        if send is None or not shown_in_terminal(record):
            return
        message = record.getMessage()
        if record.exc_info:  # as the terminal's own handler would print it in-process
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        try:
            send(wire.encode("log", name=record.name, levelno=record.levelno, message=message))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _forwarding(send: Callable[[bytes], None]) -> Iterator[None]:
    token = _client.set(send)
    try:
        yield
    finally:
        _client.reset(token)


def _same_user(writer: asyncio.StreamWriter) -> bool:
    connection = writer.get_extra_info("socket")
    if connection is not None and not peer_is_us(connection):
        logger.warning("refused a connection from another user")
        return False
    return True


if __name__ == "__main__":
    main()
