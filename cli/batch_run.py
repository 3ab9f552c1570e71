"""A batch run from the terminal (``dispatch run``, ``dispatch resume``): Ctrl-C loses nothing, the run can be found.

The first Ctrl-C (SIGINT or SIGTERM, to the process or its whole group, with
or without job control) interrupts the batch: running commands are cancelled
and fail ``Interrupted``, finished ones keep their Results, the flow run ends
Cancelled in Prefect, the table is printed, the exit code is 130. The second
quits at once. The temporary Prefect server, when there is one, runs in a
session of its own (``cli.embedded_api``), so it outlives the first Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    PREFECT_UI_URL,
    get_current_settings,
)
from rich.console import Console

from aip.messages import Command, Result
from dispatchers import ServerPool
from dispatchers.interrupt import Interruption, interruptible
from flows.batch import FlowRunNotFound
from flows.batch_file import BatchFileError
from flows.watching import watching

from . import embedded_api
from .batch_display import BatchDisplay, ConsoleLogHandler
from .batch_outcome import INTERRUPTED, Outcome, outcome_of

#: Seconds within which a repeated SIGTERM counts as the same one.
REPEAT_WINDOW = 0.5
#: Seconds a configured Prefect API has to answer its health check before the run is refused.
API_CHECK_TIMEOUT = 5.0


def run_in_terminal(work: Callable[[], Awaitable[tuple[list[Command], list[Result]]]], stderr: Console) -> Outcome:
    """Run ``work`` (a batch flow run in this process) with the display and Ctrl-C handling of the terminal.

    A Ctrl-C before the batch starts (while the temporary server starts)
    raises ``KeyboardInterrupt``, even in a process started with SIGINT ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _log_through(stderr)
    embedded = embedded_api.needed()
    if embedded:
        stderr.print(
            "starting a temporary Prefect server (6-10 s; set PREFECT_API_URL to record runs on a running one)",
            highlight=False,
            soft_wrap=True,
        )
        _start_unless_interrupted()
    else:
        check_api_answers()
    display = BatchDisplay(stderr, live=stderr.is_terminal, dashboard=None if embedded else PREFECT_UI_URL.value())

    async def supervised() -> tuple[list[Command], list[Result], bool]:
        with interruptible() as interruption, watching(display):
            interrupt = _on_signals(interruption, display, stderr)
            # Prefect takes SIGTERM over for each flow run (to crash it on a runner's cancel); in the
            # terminal it is ours again once the run exists, and Prefect restores ours when the run ends.
            loop = asyncio.get_running_loop()
            display.on_started = partial(loop.add_signal_handler, signal.SIGTERM, interrupt, signal.SIGTERM)
            async with ServerPool():  # every flow run of this batch run shares its MCP servers; they stop here
                commands, results = await work()
            return commands, results, interruption.asked

    try:
        commands, results, asked = asyncio.run(supervised())
    finally:
        display.close()
    return outcome_of(display.commands or commands, results, display, asked)


def _start_unless_interrupted() -> None:
    """Start the temporary server; a Ctrl-C meanwhile stops it and raises ``KeyboardInterrupt``.

    The Ctrl-C may land anywhere in Prefect's start, even inside pydantic's
    serializer, which wraps it in an error of its own: what tells an
    interruption is that one was asked, not the exception that came out.
    """
    asked = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal asked
        asked = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        embedded_api.start()
    except BaseException:
        if asked:
            embedded_api.stop_now()
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _on_signals(interruption: Interruption, display: BatchDisplay, stderr: Console) -> Callable[[int], None]:
    """SIGINT, SIGTERM and SIGHUP interrupt the batch; another one quits on the spot. Returns the handler.

    A SIGTERM right after a SIGTERM counts once: Prefect's own SIGTERM
    handler (see ``run_in_terminal``) sends the signal on again.
    """
    loop = asyncio.get_running_loop()
    first: tuple[int, float] | None = None

    def interrupt(signum: int) -> None:
        nonlocal first
        now = time.monotonic()
        if first is not None:
            if signum == first[0] == signal.SIGTERM and now - first[1] < REPEAT_WINDOW:
                return
            display.close()
            stderr.print(
                "interrupted again: quitting without waiting for the batch (its flow run stays Running)",
                highlight=False,
            )
            embedded_api.stop_now()
            sys.stderr.flush()
            os._exit(INTERRUPTED)
        first = (signum, now)
        interruption.interrupt()
        stderr.print(
            "interrupted: stopping the running commands (Ctrl-C again to quit at once)", highlight=False, soft_wrap=True
        )

    # SIGINT too when a shell started us with it ignored; SIGHUP: the terminal closed, the server must not outlive it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, interrupt, signum)
    return interrupt


def _log_through(console: Console) -> None:
    """Warnings and errors go through ``console`` (above the live display), Prefect's console handler goes.

    Prefect's per-task lines ("Finished in state ...") repeat what the
    display shows; they still reach the dashboard (the API handler).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (PrefectConsoleHandler, ConsoleLogHandler)):
            root.removeHandler(handler)
    root.addHandler(ConsoleLogHandler(console))


#: The errors that end a batch before it ran, each said as ``refusal`` words it.
REFUSED = (FlowRunNotFound, BatchFileError)


def refusal(error: Exception) -> tuple[bool, str]:
    """How the terminal words an error that ended a batch before it ran: (a usage error?, the message).

    The same in-process and through the batch service, which sends it over.
    """
    if isinstance(error, FlowRunNotFound):  # dispatch resume
        return True, str(error) if error.where_known else f"{error} {where_runs_are_kept()}"
    return not isinstance(error, APIUnreachable), str(error)


def where_runs_are_kept() -> str:
    """Where a run was looked for, and where else it might be, for a message that starts "no flow run X"."""
    if embedded_api.needed():
        return (
            f"in the database of the temporary Prefect servers ({get_current_settings().home}); "
            "for a run recorded on a running server (dispatch up), set PREFECT_API_URL"
        )
    return f"on the Prefect API at {PREFECT_API_URL.value()}"


def check_api_answers() -> None:
    """A configured API that is down fails the command at once, not after a minute of retries.

    Any HTTP answer will do (a refusal is for Prefect's client to word); TLS
    as Prefect's client would verify it.
    """
    url = PREFECT_API_URL.value()
    if not url:  # no API and no temporary servers allowed: Prefect says so itself
        return
    verify: bool | str = True
    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        verify = False
    elif PREFECT_API_SSL_CERT_FILE.value():
        verify = str(PREFECT_API_SSL_CERT_FILE.value())
    try:
        httpx.get(f"{url}/health", timeout=API_CHECK_TIMEOUT, verify=verify)
    except httpx.HTTPError as error:
        raise APIUnreachable(
            f"the Prefect API at {url} does not answer ({type(error).__name__}): start that server "
            "(dispatch up), or unset PREFECT_API_URL to run on a temporary one"
        ) from None


class APIUnreachable(RuntimeError):
    """PREFECT_API_URL names a server that is not there."""
