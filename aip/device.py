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

What each frame means, and what to send, start, stop or wait for, is decided
by ``aip.device_session.DeviceSession``, which does no I/O; this module is
the asyncio loop around it: the connection, the heartbeat timer, one task
per batch, and the executor and call memory those tasks run commands through.

The executor is anything with the dispatcher interface (``execute_commands``);
this module knows nothing of MCP or Prefect, so a device starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .access import DEVICE_PATH
from .backoff import Backoff
from .budget import Budget, Deadline
from .call_memory import CallMemory, Run
from .connect import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HubUnavailable,
    endpoint,
    first_latency,
    hub_urls,
    open_connection,
    safe_url,
)
from .device_session import (
    FRAGMENT_CHARS,
    RECONNECT_BACKOFF,
    Batch,
    CancelBatch,
    DeviceAction,
    DeviceReplaced,
    DeviceSession,
    GiveUp,
    InHand,
    Log,
    Reconnect,
    StartBatch,
    Transmit,
    system_info,
)
from .failure import error_result
from .messages import Command, Result
from .retry import requested_retry

__all__ = [
    "FRAGMENT_CHARS",
    "NOT_STARTED_IN_TIME",
    "REFUSED_RETRY",
    "DeviceClient",
    "DeviceReplaced",
    "Executor",
    "RunsOne",
    "device_clients",
    "serve_hubs",
    "system_info",
]

logger = logging.getLogger("aip.device")

#: Seconds a device serving other hubs waits before dialling again a hub that refused it.
REFUSED_RETRY = 60.0
#: The failure of a command the batch reached once its time was up.
NOT_STARTED_IN_TIME = "TimeoutError: not run: the batch's time was up before it could start"


class _NotStarted(Exception):
    """A run's refusal to start, once the batch's time is up: raised before anything starts, so that
    the call memory, which answers first what it holds of the call, remembers nothing of it."""


class Executor(Protocol):
    """What runs the commands: any dispatcher (``dispatchers.BasicCommandDispatcher``).

    A dispatcher also runs one command by a deadline (``execute_command(command,
    deadline)``, where its retries and per-command timeout live); the device
    uses it when the executor has it (``RunsOne``), and a batch of one
    through ``execute_commands`` when it has not.
    """

    async def execute_commands(self, commands: Sequence[Command], timeout: float = ...) -> list[Result]: ...


#: A dispatcher's ``execute_command``: one command, its Result by the deadline.
RunsOne = Callable[[Command, Deadline], Awaitable[Result]]


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
        backoff: Backoff = RECONNECT_BACKOFF,
        budget: Budget = Budget(),
        memory: CallMemory | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        token_in_query: bool = False,
        in_hand: InHand = InHand(),
    ) -> None:
        if not device_id:
            raise ValueError("a device needs an id")
        if "," in hub_url:
            raise ValueError("a DeviceClient dials one hub: device_clients() makes one for each hub of a fleet")
        self.url = endpoint(hub_url, DEVICE_PATH)
        self.device_id = device_id
        self.executor = executor
        self.token = token
        self.tools = tools
        self.heartbeat_interval = heartbeat_interval
        self.memory = memory if memory is not None else CallMemory()
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        self.token_in_query = token_in_query
        # FRAGMENT_CHARS is read now, not bound at import: setting aip.device.FRAGMENT_CHARS tunes later clients.
        self.session: DeviceSession[ClientConnection] = DeviceSession(
            device_id, budget=budget, backoff=backoff, fragment_chars=FRAGMENT_CHARS, in_hand=in_hand
        )
        #: Set while registered with the hub; cleared when the connection ends.
        self.registered = asyncio.Event()
        #: The task of every batch run not finished yet.
        self._tasks: dict[Batch[ClientConnection], asyncio.Task[None]] = {}
        self._chores: set[asyncio.Future[None]] = set()
        self._first_latency = 0.0
        #: The same device's clients for the other hubs of its fleet (``device_clients``): a cancel reaches them too.
        self.siblings: list[DeviceClient] = []

    @property
    def registrations(self) -> int:
        """How many times the hub accepted this device."""
        return self.session.registrations

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Stay connected (reconnecting as needed) until ``stop`` is set; answer every batch before leaving."""
        stop = stop or asyncio.Event()
        stopping = asyncio.ensure_future(stop.wait())
        attempt: asyncio.Future[None] | None = None
        try:
            while not stop.is_set():
                attempt = asyncio.ensure_future(self._connect_and_serve())
                await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not attempt.done():
                    await self._stop_batches("the device is shutting down")  # answered while still connected
                    attempt.cancel()
                    await asyncio.wait({attempt})
                    break
                delay = 0.0
                for decision in self.session.attempt_ended(attempt.exception()):
                    match decision:
                        case GiveUp(error):  # a revoked credential, a token or URL that can never work
                            raise error
                        case Log():
                            _log(decision)
                        case Reconnect():
                            delay = decision.delay
                if stop.is_set():
                    break
                logger.debug("device %r reconnecting in %.1fs", self.device_id, delay)
                await asyncio.wait({stopping}, timeout=delay)
        finally:
            stopping.cancel()
            await self._stop_batches("the device is shutting down")
            if attempt is not None and not attempt.done():  # run() itself cancelled: its connection goes with it
                attempt.cancel()
                await asyncio.wait({attempt})

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
            raise self.session.closed(closed) from None
        finally:
            self.registered.clear()
            self.session.lost(connection)
            await connection.close()
        raise self.session.closed(None)

    async def _register(self, connection: ClientConnection) -> None:
        await connection.send(self.session.register(self.tools()))
        async with asyncio.timeout(30):
            reply = await connection.recv()
        refusal = self.session.registration_answer(reply)
        if refusal is not None:
            with contextlib.suppress(TimeoutError):  # the close that follows says which refusal it is
                async with asyncio.timeout(5):
                    await connection.wait_closed()
            raise refusal.failure(connection.close_code)
        self._first_latency = await first_latency(connection)
        self.session.registered()
        self.registered.set()
        logger.info("device %r registered with %s", self.device_id, safe_url(self.url))

    async def _heartbeat(self, connection: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await connection.send(self.session.heartbeat())

    def _receive(self, connection: ClientConnection, frame: str | bytes) -> None:
        latency = connection.latency or self._first_latency
        now = asyncio.get_running_loop().time()
        self._carry_out(self.session.receive(connection, frame, now=now, latency=latency))

    def _carry_out(self, actions: list[DeviceAction[ClientConnection]]) -> None:
        """Do what the session decided, without waiting: the connection's frames keep being read meanwhile."""
        for action in actions:
            match action:
                case Transmit():
                    self._chore(_deliver(action))
                case StartBatch(batch):
                    task = asyncio.create_task(self._run_batch(batch))
                    self._tasks[batch] = task
                    task.add_done_callback(functools.partial(self._finished, batch))
                case CancelBatch(batch):
                    if (running := self._tasks.get(batch)) is not None:
                        running.cancel()
                    for sibling in self.siblings:
                        sibling._cancel_copies(batch.response_id, batch.controller, batch.cancelled or "cancelled")
                case Log():
                    _log(action)

    def _cancel_copies(self, response_id: str, controller: str, why: str) -> None:
        for action in self.session.cancel_copies(response_id, controller, why):
            if isinstance(action, CancelBatch) and (running := self._tasks.get(action.batch)) is not None:
                running.cancel()  # not passed on again: the client that heard the cancel tells every sibling

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, holding on to it until it is done (asyncio keeps only weak ones)."""
        task = asyncio.ensure_future(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _finished(self, batch: Batch[ClientConnection], _: object) -> None:
        del self._tasks[batch]
        self.session.finished(batch)

    async def _stop_batches(self, why: str) -> None:
        self._carry_out(self.session.shutdown(why))
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=5)

    async def _run_commands(self, batch: Batch[ClientConnection], results: list[Result]) -> None:
        """The batch's commands in order, each Result appended to ``results`` as soon as it exists."""
        commands, memory, budget = batch.commands, self.memory, self.session.budget
        controller, delivery = batch.controller, batch.response_id
        try:
            # Before the batch's time, when the watch gives up; a batch whose work starts late starts nothing.
            seconds = budget.for_commands(batch.expires_at - asyncio.get_running_loop().time())
            deadline = Deadline(expires_at=time.monotonic() + seconds, seconds=budget.handed_on(seconds))
            run = self._runner(deadline)
            for command in commands:
                if batch.orphaned is not None:
                    results.append(error_result(command, f"ServerUnavailable: not run: {batch.orphaned}"))
                    continue
                try:
                    results.append(await memory.call(command, run, controller, delivery))
                except _NotStarted:  # what memory holds of it (a Result, a run to join) answered first
                    results.append(error_result(command, NOT_STARTED_IN_TIME))
        except Exception as error:  # the executor broke: answer anyway
            logger.exception("device %r: the executor failed on batch %s", self.device_id, batch.response_id)
            results += _failures(commands[len(results) :], error)

    def _runner(self, batch_deadline: Deadline) -> Run:
        """How a batch whose commands have until ``batch_deadline`` runs one of them.

        A dispatcher runs it through its own ``execute_command``, awaited in
        the batch's task: no batch of one around each command (a task, a
        timer, a future of its own), and one deadline for the whole batch, as
        a batch engine sets one (a timeout names the batch's time; only a
        command with a timeout of its own gets one more). Any other executor
        gets a batch of one.
        """
        budget, executor = self.session.budget, self.executor
        one: RunsOne | None = getattr(executor, "execute_command", None)
        if one is None:

            async def in_a_batch_of_one(command: Command) -> Result:
                if batch_deadline.expired:
                    raise _NotStarted
                results = await executor.execute_commands([command], budget.handed_on(batch_deadline.remaining()))
                if len(results) != 1:
                    raise RuntimeError(f"the executor returned {len(results)} results for 1 command")
                return results[0]

            return in_a_batch_of_one

        async def by_itself(command: Command) -> Result:
            if batch_deadline.expired:
                raise _NotStarted
            if not command.call_id:  # named, as a batch engine names it, so that its Result says which it is
                command = command.model_copy(update={"call_id": str(uuid.uuid4())})
            deadline = batch_deadline.within(command.timeout)
            try:
                result = await one(command, deadline)
            except Exception as error:  # as a batch engine would: this command fails, the next one runs
                return error_result(command, error)
            if result.call_id != command.call_id:
                return error_result(command, f"the result came back for call_id {result.call_id!r}")
            return result

        return by_itself

    async def _run_batch(self, batch: Batch[ClientConnection]) -> None:
        """Run the commands one after the other, as UFO's device does; answer unless the batch was orphaned.

        Each command goes through the call memory as the batch reaches it, so
        a batch delivered again gets what already ran from memory, joins the
        command still running, and runs only what never started; and each
        Result is remembered as soon as it exists, so a delivery after a
        connection lost mid-batch finds every command that finished.

        The commands run in a task of their own, watched here until the
        batch's time is up: a tool that ignores being stopped cannot hold the
        answer past it, and what finished by then is answered (the rest fails
        as timed out) rather than lost with the whole reply.
        """
        commands = batch.commands
        results: list[Result] = []
        rule = requested_retry.set(batch.retry)  # the controller's --retries, for the executor to apply
        try:
            work = asyncio.ensure_future(self._run_commands(batch, results))  # the rule travels in its context
        finally:
            requested_retry.reset(rule)
        try:
            await _until_done_or(work, batch.expires_at)  # the commands' own time ended before it
        except asyncio.CancelledError:
            work.cancel()
            if batch.cancelled is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            results = results + _failures(commands[len(results) :], f"Cancelled: {batch.cancelled}")
        else:
            if not work.done():
                work.cancel()
                logger.warning(
                    "device %r: batch %r ran past its time; answering the commands not done as timed out",
                    self.device_id,
                    batch.response_id,
                )
                cause = "TimeoutError: no result by the batch's deadline (the tool did not stop when told)"
                rest = commands[len(results) :]  # the first is the one the work is in; the others never started
                results = results + _failures(rest[:1], cause) + _failures(rest[1:], NOT_STARTED_IN_TIME)
            elif work.cancelled():
                results = results + _failures(commands[len(results) :], "Cancelled: the command was cancelled")
        answer = self.session.answer(batch, results)
        if isinstance(answer, Log):
            _log(answer)
            return
        try:
            await _send(answer)
        except ConnectionClosed:
            # The results stay in memory: a controller that sends the batch again gets them.
            logger.info(
                "device %r: the connection closed before batch %s was answered", self.device_id, batch.response_id
            )


def device_clients(
    hub_url: str, device_id: str, executor: Executor, *, memory: CallMemory | None = None, **options: Any
) -> list[DeviceClient]:
    """One client for each hub ``hub_url`` names (``ws://a,ws://b``), all sharing one call memory.

    A device dials every hub of its fleet, so any hub can reach it and a hub
    that dies cuts nothing off. A batch a controller sends again through
    another hub, after losing the first, is the same call in the shared
    memory: what ran is answered, what is running is joined, nothing runs twice.
    """
    shared = memory if memory is not None else CallMemory()
    clients = [
        DeviceClient(url, device_id, executor, memory=shared, **options) for url in hub_urls(hub_url, DEVICE_PATH)
    ]
    for client in clients:
        client.siblings = [other for other in clients if other is not client]
    return clients


async def serve_hubs(clients: Sequence[DeviceClient], stop: asyncio.Event | None = None) -> None:
    """Run every client (one device on several hubs) until ``stop`` is set.

    A hub that refuses the device (its credential, say: that hub's copy of
    the credentials file may lag the others') is logged and dialled again
    every ``REFUSED_RETRY`` seconds while another hub accepts the device;
    when every hub refuses, the refusal is raised. However it ends, every
    client stops in order, its batches answered.
    """
    stop = stop or asyncio.Event()
    ending = asyncio.Event()  # the clients' own stop: set by ``stop``, or by a failure
    refusing: dict[DeviceClient, HubUnavailable] = {}

    async def serve(client: DeviceClient) -> None:
        while not ending.is_set():
            refusing.pop(client, None)
            try:
                await client.run(ending)
                return
            except HubUnavailable as refused:  # what DeviceClient.run gives up on: a refusal
                refusing[client] = refused
                if len(refusing) == len(clients):
                    raise
                logger.error(
                    "device %r: %s; serving the other hubs, dialling this one again in %gs",
                    client.device_id,
                    refused,
                    REFUSED_RETRY,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REFUSED_RETRY):
                        await ending.wait()

    async def until_stopped() -> None:
        await stop.wait()
        ending.set()

    runs = [asyncio.ensure_future(serve(client)) for client in clients]
    watcher = asyncio.ensure_future(until_stopped())
    try:
        await asyncio.gather(*runs)  # the first failure, the other clients still running
    finally:
        ending.set()
        watcher.cancel()
        await asyncio.wait(runs)


async def _send(action: Transmit[ClientConnection]) -> None:
    await action.peer.send(action.parts[0] if len(action.parts) == 1 else action.parts)


async def _deliver(action: Transmit[ClientConnection]) -> None:
    """Transmit, if the connection is still there: a frame for a connection gone has nobody to tell."""
    with contextlib.suppress(ConnectionClosed):
        await _send(action)


async def _until_done_or(work: asyncio.Future[None], when: float) -> None:
    """Wait for ``work`` until ``when`` on the loop's clock, never cancelling it.

    ``asyncio.wait({work}, timeout=...)`` for one future, without the sets,
    checks and partials it builds for many: a batch of one pays it per command.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_at(when, wake)
    work.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        work.remove_done_callback(wake)


def _log(entry: Log) -> None:
    logger.log(entry.level, "%s", entry.message)


def _failures(commands: Sequence[Command], cause: BaseException | str) -> list[Result]:
    return [error_result(command, cause) for command in commands]
