"""The device client: dial in to a hub, register, execute the batches it sends.

It speaks AIP as a UFO device does (register, heartbeats, command /
command_results), so it works against our hub and against a UFO server.
What it adds: it always answers (an executor that raises still produces
failure Results), it keeps heartbeating while a batch runs, it stops a batch
when the hub says nobody waits for it any more (and still answers for it), it
runs a batch's commands one after the other through its call memory, so a
batch sent again after a hub restart gets what ran from memory and runs only
what never started, it starts nothing new for a batch whose connection or
controller is gone, it applies the batch's retry rule, and it reconnects
with capped, jittered backoff until it is stopped or its credential refused.

The executor is anything with the dispatcher interface (``execute_commands``);
this module knows nothing of MCP or Prefect, so a device starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import socket
import ssl
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .access import DEVICE_PATH
from .backoff import Backoff
from .budget import Budget
from .call_memory import CallMemory
from .connect import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CredentialRefused,
    HubRefused,
    HubUnavailable,
    endpoint,
    first_latency,
    open_connection,
    safe_url,
)
from .failure import error_result
from .messages import (
    ClientMessage,
    ClientMessageType,
    CloseCode,
    Command,
    Result,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from .registration import DISPATCH_METADATA
from .retry import requested_retry
from .switchboard import now_iso

logger = logging.getLogger("aip.device")

#: Replies longer than this go out in fragments of this size, so heartbeats and
#: pongs still get through while a screenshot crawls up a slow link.
FRAGMENT_CHARS = 2**18
#: Where a frame too odd to parse (nested thousands deep) still names its batch.
_RESPONSE_ID = re.compile(r'"response_id"\s*:\s*"([^"\\]{1,200})"')


class DeviceReplaced(HubUnavailable):
    """Another connection holds this id, or took it: another machine may be using the same credential."""


class Executor(Protocol):
    """What runs the commands: any dispatcher (``dispatchers.BasicCommandDispatcher``)."""

    async def execute_commands(self, commands: Sequence[Command], timeout: float = ...) -> list[Result]: ...


def system_info(device_id: str) -> dict[str, Any]:
    """UFO's ``metadata.system_info`` for this machine."""
    return {
        "device_id": device_id,
        "platform": sys.platform,
        "os_version": platform.version(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "supported_features": ["mcp"],
        "platform_type": "computer",
        "schema_version": "1.0",
        "custom_metadata": {},
    }


class DeviceClient:
    """One device: its id, its executor, and the connection it keeps to the hub.

    ``tools`` is asked at each registration for the tools to announce
    (``[{"name", "server", "description"}, ...]``).
    """

    def __init__(
        self,
        hub_url: str,
        device_id: str,
        executor: Executor,
        *,
        token: str | None = None,
        tools: Callable[[], list[dict[str, Any]]] = list,
        heartbeat_interval: float = 10.0,
        backoff: Backoff = Backoff(),
        budget: Budget = Budget(),
        memory: CallMemory | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        token_in_query: bool = False,
    ) -> None:
        if not device_id:
            raise ValueError("a device needs an id")
        self.url = endpoint(hub_url, DEVICE_PATH)
        self.device_id = device_id
        self.executor = executor
        self.token = token
        self.tools = tools
        self.heartbeat_interval = heartbeat_interval
        self.backoff = backoff
        self.budget = budget
        self.memory = memory if memory is not None else CallMemory()
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.token_in_query = token_in_query
        #: Set while registered with the hub; cleared when the connection ends.
        self.registered = asyncio.Event()
        self.registrations = 0
        #: The run of each batch by response_id (the newest, when a batch was delivered again).
        self._batches: dict[str, _BatchRun] = {}
        #: Every run not finished yet, orphaned ones included.
        self._runs: set[_BatchRun] = set()
        self._chores: set[asyncio.Future[None]] = set()
        self._first_latency = 0.0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Stay connected (reconnecting as needed) until ``stop`` is set; answer every batch before leaving."""
        stop = stop or asyncio.Event()
        failures = 0
        last_failure: str | None = None
        registrations = self.registrations
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                session = asyncio.ensure_future(self._connect_and_serve())
                await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done():
                    await self._stop_batches("the device is shutting down")  # answered while still connected
                    session.cancel()
                    await asyncio.wait({session})
                    break
                error = session.exception()
                if _permanent(error):  # a revoked credential, a token or URL that can never work
                    assert error is not None
                    raise error
                if _failure_text(error) != last_failure:  # once per state change, not once per retry
                    level = logging.ERROR if isinstance(error, HubRefused | DeviceReplaced) else logging.WARNING
                    logger.log(level, "device %r: %s", self.device_id, error)
                    last_failure = _failure_text(error)
                # A connection that got as far as registering was a success: back off from scratch;
                # unless another device took our id, which would make two devices evict each other forever.
                if self.registrations > registrations:
                    failures, last_failure = 0, None
                else:
                    failures += 1
                registrations = self.registrations
                if stop.is_set():
                    break
                delay = self.backoff.maximum if isinstance(error, DeviceReplaced) else self.backoff.delay(failures)
                logger.debug("device %r reconnecting in %.1fs", self.device_id, delay)
                await asyncio.wait({stopping}, timeout=delay)
        finally:
            stopping.cancel()
            await self._stop_batches("the device is shutting down")

    async def _connect_and_serve(self) -> None:
        connection = await open_connection(
            self.url,
            self.token,
            max_message_bytes=self.max_message_bytes,
            ssl_context=self.ssl_context,
            token_in_query=self.token_in_query,
        )
        try:
            await self._register(connection)
            heartbeat = asyncio.create_task(self._heartbeat(connection))
            try:
                async for frame in connection:
                    self._receive(connection, frame)
            finally:
                heartbeat.cancel()
        except ConnectionClosed as closed:
            if closed.rcvd is not None and closed.rcvd.code == CloseCode.REVOKED:
                raise CredentialRefused(f"the hub revoked this device's credential ({closed.rcvd.reason})") from None
            if closed.rcvd is not None and closed.rcvd.code == CloseCode.REPLACED:
                raise DeviceReplaced(
                    f"another connection registered as {self.device_id!r} and replaced this one; "
                    "if two machines use the same --id, give each its own"
                ) from None
            raise HubUnavailable(f"the connection to the hub closed: {closed}") from None
        finally:
            self.registered.clear()
            self._orphan_batches_of(connection)
            await connection.close()
        raise HubUnavailable("the hub closed the connection")

    async def _register(self, connection: ClientConnection) -> None:
        register = ClientMessage(
            type=ClientMessageType.REGISTER,
            status=TaskStatus.OK,
            client_id=self.device_id,
            timestamp=now_iso(),
            metadata={
                "system_info": system_info(self.device_id),
                "registration_time": now_iso(),
                "platform": sys.platform,
                DISPATCH_METADATA: {"tools": self.tools()},
            },
        )
        await connection.send(register.model_dump_json())
        async with asyncio.timeout(30):
            reply = await connection.recv()
        try:
            answer = ServerMessage.model_validate_json(reply)
        except ValidationError as error:  # a hub (or a proxy) that garbles its answer may do better next time
            problem = error.errors()[0]["msg"]
            raise HubUnavailable(f"the hub answered register with a malformed frame: {problem}") from None
        if answer.type is ServerMessageType.ERROR:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await connection.wait_closed()
            if connection.close_code == CloseCode.DUPLICATE:
                raise DeviceReplaced(f"the hub refused the registration: {answer.error}")
            raise HubRefused(f"the hub refused the registration: {answer.error}")
        self._first_latency = await first_latency(connection)
        self.registrations += 1
        self.registered.set()
        logger.info("device %r registered with %s", self.device_id, safe_url(self.url))

    async def _heartbeat(self, connection: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            beat = ClientMessage(
                type=ClientMessageType.HEARTBEAT, status=TaskStatus.OK, client_id=self.device_id, timestamp=now_iso()
            )
            await connection.send(beat.model_dump_json())

    def _receive(self, connection: ClientConnection, frame: str | bytes) -> None:
        try:
            message = ServerMessage.model_validate_json(frame)
        except ValueError as error:
            logger.warning("device %r: a malformed frame from the hub: %s", self.device_id, error)
            self._complain(connection, frame, f"malformed frame: {error}")
            return
        match message.type:
            case ServerMessageType.COMMAND:
                response_id = message.response_id or str(uuid.uuid4())
                current = self._batches.get(response_id)
                if current is None or current.orphaned:  # new, or sent again after its connection was lost
                    self._start(connection, message, response_id)
            case ServerMessageType.TASK_END:
                run = self._batches.get(message.response_id or "")
                why = message.error or "the hub ended this batch"
                if run is not None and message.status is TaskStatus.FAILED:
                    run.cancel(why)  # nobody waits for it: stop what runs too
                elif run is not None:
                    run.orphan(why)  # its controller may send it again: what runs finishes into memory
            case ServerMessageType.ERROR:
                logger.warning("device %r: the hub reported: %s", self.device_id, message.error)
            case _:
                pass  # heartbeats and anything a UFO server may add: nothing to do

    def _complain(self, connection: ClientConnection, frame: str | bytes, error: str) -> None:
        """Answer a frame we could not read with an error, so a batch in it fails now rather than at its deadline."""
        try:
            response_id = json.loads(frame).get("response_id")
        except (ValueError, AttributeError, RecursionError):
            found = _RESPONSE_ID.search(frame if isinstance(frame, str) else frame.decode(errors="replace"))
            response_id = found.group(1) if found else None
        if not isinstance(response_id, str):
            return  # nothing anyone waits on can be named
        reply = ClientMessage(
            type=ClientMessageType.ERROR,
            status=TaskStatus.ERROR,
            client_id=self.device_id,
            prev_response_id=response_id,
            error=error,
            timestamp=now_iso(),
        )

        async def send() -> None:
            with contextlib.suppress(ConnectionClosed):
                await connection.send(reply.model_dump_json())

        task = asyncio.ensure_future(send())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _start(self, connection: ClientConnection, message: ServerMessage, response_id: str) -> None:
        run = _BatchRun(connection)
        run.task = asyncio.create_task(self._run_batch(run, message, response_id))
        self._batches[response_id] = run
        self._runs.add(run)

        def finished(_: object) -> None:
            self._runs.discard(run)
            if self._batches.get(response_id) is run:
                del self._batches[response_id]

        run.task.add_done_callback(finished)

    def _orphan_batches_of(self, connection: ClientConnection) -> None:
        """The connection is gone: its batches start nothing new (the controller will send them again)."""
        for run in self._runs:
            if run.connection is connection:
                run.orphan("the connection to the hub was lost")

    async def _stop_batches(self, why: str) -> None:
        for run in list(self._runs):
            run.cancel(why)
        if self._runs:
            await asyncio.wait({run.task for run in self._runs if run.task is not None}, timeout=5)

    async def _run_batch(self, run: _BatchRun, message: ServerMessage, response_id: str) -> None:
        """Run the commands one after the other, as UFO's device does; answer unless the batch was orphaned.

        Each command goes through the call memory, so a batch delivered again
        gets what already ran from memory, joins the command still running,
        and runs only what never started.
        """
        connection = run.connection
        commands = list(message.actions or [])
        timeout = self.budget.on_device(message.timeout, connection.latency or self._first_latency)
        loop = asyncio.get_running_loop()
        expires = loop.time() + timeout
        executor = self.executor
        controller = message.controller_id or ""

        async def execute(fresh: list[Command]) -> list[Result]:
            rule = requested_retry.set(message.retry)  # the controller's --retries, for the executor to apply
            try:
                return await executor.execute_commands(fresh, self.budget.handed_on(expires - loop.time()))
            finally:
                requested_retry.reset(rule)

        results: list[Result] = []
        try:
            for command in commands:
                if run.orphaned is not None:
                    results += _failures([command], f"ServerUnavailable: not run: {run.orphaned}")
                    continue
                results += await self.memory.execute(
                    [command], execute, _failures, controller=controller, delivery=response_id
                )
        except asyncio.CancelledError:
            if run.cancelled is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            results += _failures(commands[len(results) :], f"Cancelled: {run.cancelled}")
        except Exception as error:  # the executor broke: answer anyway
            logger.exception("device %r: the executor failed on batch %s", self.device_id, response_id)
            results += _failures(commands[len(results) :], error)
        if run.orphaned is not None and run.cancelled is None:
            logger.info(
                "device %r: batch %s orphaned (%s); its results stay in memory",
                self.device_id,
                response_id,
                run.orphaned,
            )
            return
        reply = ClientMessage(
            type=ClientMessageType.COMMAND_RESULTS,
            status=TaskStatus.CONTINUE,
            client_id=self.device_id,
            session_id=message.session_id,
            prev_response_id=response_id,
            action_results=results,
            request_id=str(uuid.uuid4()),
            timestamp=now_iso(),
        )
        try:
            text = reply.model_dump_json()
        except (
            ValueError,
            RecursionError,
        ):  # a tool's result that JSON can't carry: that command fails, the others stand
            sendable = [_sendable(command, result) for command, result in zip(commands, results, strict=True)]
            text = reply.model_copy(update={"action_results": sendable}).model_dump_json()
        try:
            await connection.send(_fragments(text))
        except ConnectionClosed:
            # The results stay in memory: a controller that sends the batch again gets them.
            logger.info("device %r: the connection closed before batch %s was answered", self.device_id, response_id)


@dataclass(eq=False)
class _BatchRun:
    """One run of a batch on the connection that delivered it."""

    connection: ClientConnection
    task: asyncio.Task[None] | None = None
    #: Why it starts no new command (its connection or its controller is gone), once it does not.
    orphaned: str | None = None
    #: Why it was stopped outright (nobody waits for it), once it was.
    cancelled: str | None = None

    def orphan(self, why: str) -> None:
        self.orphaned = self.orphaned or why

    def cancel(self, why: str) -> None:
        if self.task is not None and not self.task.done() and self.cancelled is None:
            self.cancelled = why
            self.task.cancel()


def _permanent(error: BaseException | None) -> bool:
    """Whether a connection failure can never be cured by trying again: then the device stops."""
    if isinstance(error, CredentialRefused):
        return True
    # Our own token or URL that can never work (checked before any byte is sent); not a peer's garbled frame.
    return isinstance(error, ValueError) and not isinstance(error, ValidationError)


def _failure_text(error: BaseException | None) -> str:
    """A failure's kind and text: the device logs when this changes, not at every retry."""
    return f"{type(error).__name__}: {error}"


def _failures(commands: Sequence[Command], cause: BaseException | str) -> list[Result]:
    return [error_result(command, cause) for command in commands]


def _sendable(command: Command, result: Result) -> Result:
    """``result`` if it serialises, else a failure Result that says why."""
    try:
        result.model_dump_json()
    except (ValueError, RecursionError) as error:
        cause = f"ProtocolError: the result could not be sent as JSON ({error})"
        return error_result(command, cause)
    return result


def _fragments(text: str) -> str | list[str]:
    """The text whole, or in fragments of ``FRAGMENT_CHARS`` (one message all the same)."""
    if len(text) <= FRAGMENT_CHARS:
        return text
    return [text[start : start + FRAGMENT_CHARS] for start in range(0, len(text), FRAGMENT_CHARS)]
