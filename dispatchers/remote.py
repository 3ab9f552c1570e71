"""Running commands on a remote device, through the hub.

A batch goes out as one AIP ``command`` frame addressed to the device, with
the time its sender still waits for it; the device's ``command_results`` (or
the hub's word that the device is gone) resolves the future kept for that
``response_id``. The results are checked against the commands before anyone
sees them: one per command, in order, with the command's call_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from aip.budget import Budget, Deadline
from aip.connect import HubRefused, HubUnavailable
from aip.controller import HubLink, LinkLost
from aip.failover import FailoverLink, controller_link
from aip.messages import (
    AgentContext,
    ClientMessage,
    ClientMessageType,
    Command,
    Result,
    RetryRule,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from aip.switchboard import Reason, now_iso

from .base import DEFAULT_TIMEOUT, BasicCommandDispatcher, assign_call_ids, error_result
from .errors import CommandError, CommandTimeout, ConnectionLost, ProtocolError, ServerUnavailable, describe
from .policy import RetryPolicy, observing_attempts
from .retry_conditions import Fact, transient, unsent

__all__ = ["DELIVER_AGAIN", "AccessDenied", "HubDropped", "WebSocketCommandDispatcher", "hub_dropped"]

logger = logging.getLogger("dispatchers.remote")


class AccessDenied(CommandError):
    """The hub refused our credential or Host, or our credential does not cover the device."""

    kind = "AccessDenied"

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class HubDropped(ConnectionLost):
    """The connection to the hub ended while a batch was out: it is sent again (same response_id) once back."""


#: A batch lost with the hub's connection: sent again, the same frame, once back (the device dedupes).
hub_dropped = Fact("hub_dropped", lambda failed: isinstance(failed.error, HubDropped))
#: Which failures a batch is delivered again after: what never got through, and what the hub lost.
DELIVER_AGAIN = hub_dropped | (transient & unsent)


class _Delivery:
    """One batch on its way: its response_id for every send, and whether any send reached the hub."""

    def __init__(self) -> None:
        self.response_id = str(uuid.uuid4())
        self.delivered = False

    def final(self, error: BaseException) -> BaseException:
        """The error to report: one that may hide a run on the device says so; one that cannot, says that."""
        if not isinstance(error, CommandError) or isinstance(error, AccessDenied):
            return error
        if self.delivered:
            return _Worded(error, "outcome unknown: the batch reached the hub, the device may have run these commands")
        return _Worded(error, "not run: the batch never reached the device")


class _Worded(CommandError):
    """``error``, with what it means for whether the commands ran."""

    def __init__(self, error: CommandError, meaning: str) -> None:
        super().__init__(f"{error}; {meaning}", sent=error.sent)
        self.kind = error.kind


class WebSocketCommandDispatcher(BasicCommandDispatcher):
    """Runs each batch on ``device``, reached through the hub behind ``protocol``.

    The agent context (``agent_name``, ``process_name``, ``root_name``,
    ``session_id``, ``task_name``: see ``aip.messages.AgentContext``) travels
    on every batch, as UFO's server sends it, and so does the retry policy,
    which our devices apply to each command (``Result.attempts`` says how
    many tries it took). A batch that could not be delivered (the device is
    not connected, the hub is restarting), or whose hub connection dropped
    while it was out, is sent again, the same frame, with backoff (capped at
    the retry policy's ``max_delay``) until the deadline, whatever its
    ``attempts``: the device answers what already ran from its memory. One
    lost with its device (the hub still up) fails at once: the device that
    comes back may be a new process that has forgotten what ran. A failure
    says ``outcome unknown`` once the batch had reached the hub, ``not run``
    when it never did.
    """

    def __init__(
        self,
        protocol: HubLink | FailoverLink | None,
        device: str,
        *,
        agent_name: str | None = None,
        process_name: str | None = None,
        root_name: str | None = None,
        session_id: str | None = None,
        task_name: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        budget: Budget = Budget(),
    ) -> None:
        if protocol is None:
            raise ValueError(
                "WebSocketCommandDispatcher needs a connection to the hub: pass a HubLink, "
                "or use `await WebSocketCommandDispatcher.connect(hub_url, device, token=...)`"
            )
        if not device:
            raise ValueError("WebSocketCommandDispatcher needs the id of the device to run commands on")
        self.protocol = protocol
        self.device = device
        self.context = AgentContext(
            agent_name=agent_name,
            process_name=process_name,
            root_name=root_name,
            session_id=session_id,
            task_name=task_name,
        )
        self.retry = retry
        self._rule = (retry, retry.to_rule())
        self.budget = budget
        #: Delivering a batch: as often as the deadline allows, spaced as the retries are.
        self.delivery = dataclasses.replace(retry, attempts=None, when=DELIVER_AGAIN)
        self.pending: dict[str, asyncio.Future[ClientMessage]] = {}
        self._cancels: set[asyncio.Task[None]] = set()
        protocol.attach(self._on_frame, self._on_hub_lost)

    def __repr__(self) -> str:
        return f"WebSocketCommandDispatcher({self.protocol!r}, device={self.device!r})"

    @classmethod
    async def connect(
        cls, hub_url: str, device: str, token: str | None = None, **options: Any
    ) -> WebSocketCommandDispatcher:
        """Connect to the hub now, with the controller credential ``token``; raises if it cannot be reached."""
        link = controller_link(hub_url, token)
        await link.open()
        return cls(link, device, **options)

    async def close(self) -> None:
        await self.protocol.close()
        self._on_hub_lost(HubUnavailable("the dispatcher was closed"))

    async def __aenter__(self) -> WebSocketCommandDispatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- answers from the hub ----------------------------------------------

    def _on_frame(self, message: ClientMessage) -> None:
        """A frame from the hub: the answer for the batch it names (results, or why there are none)."""
        future = self.pending.get(message.prev_response_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    def _on_hub_lost(self, error: Exception) -> None:
        """A hub connection ended: every batch it carried fails now, not at its deadline, and is sent again."""
        lost = error.batches if isinstance(error, LinkLost) else None  # None: the one hub, which carried all
        for response_id, future in self.pending.items():
            if not future.done() and (lost is None or response_id in lost):
                future.set_exception(HubDropped(str(error)))

    # -- batches -------------------------------------------------------------

    async def execute_commands(self, commands: Sequence[Command], timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
        batch = assign_call_ids(commands)
        try:
            deadline = Deadline.after(timeout)
        except ValueError as error:
            return self.generate_error_results(batch, error)
        if not batch:
            return []

        def log_retry(attempt: int, error: BaseException, delay: float) -> None:
            logger.warning(
                "batch of %d for device %r: attempt %d failed (%s); sending again in %.2fs",
                len(batch),
                self.device,
                attempt,
                describe(error),
                delay,
            )

        delivery = _Delivery()
        try:
            return await self.delivery.call(
                lambda: self._exchange(batch, deadline, delivery), deadline, on_retry=log_retry
            )
        except Exception as error:
            return self.generate_error_results(batch, delivery.final(error))

    async def _exchange(self, batch: list[Command], deadline: Deadline, delivery: _Delivery) -> list[Result]:
        """One round trip: send the batch, wait for its answer, check it."""
        if deadline.expired:
            raise CommandTimeout(deadline.seconds)
        response_id = delivery.response_id
        answer: asyncio.Future[ClientMessage] = asyncio.get_running_loop().create_future()
        self.pending[response_id] = answer
        message = ServerMessage(
            type=ServerMessageType.COMMAND,
            status=TaskStatus.CONTINUE,
            actions=batch,
            response_id=response_id,
            timestamp=now_iso(),
            target_id=self.device,
            timeout=self.budget.for_device(deadline.remaining(), self.protocol.latency),
            retry=self._retry_rule(),
            resent=delivery.delivered or None,
            **self.context.model_dump(),
        )
        try:
            async with asyncio.timeout(self.budget.awaiting_reply(deadline.remaining())):
                await self._send(message)
                delivery.delivered = True
                reply = await answer
        except TimeoutError:
            self._cancel_remote(response_id)
            raise CommandTimeout(deadline.seconds) from None
        except asyncio.CancelledError:
            self._cancel_remote(response_id)
            raise
        finally:
            del self.pending[response_id]
        results = self._checked(batch, reply)
        self._report_device_attempts(batch, results)
        return results

    def _retry_rule(self) -> RetryRule:
        """``self.retry`` as it travels, built once per policy rather than once per batch."""
        policy, rule = self._rule
        if policy is not self.retry:
            self._rule = (self.retry, rule := self.retry.to_rule())
        return rule

    def _report_device_attempts(self, batch: list[Command], results: list[Result]) -> None:
        """The tries the device made show where local ones do: the run's logs and the command's report."""
        observer = observing_attempts.get()
        for command, result in zip(batch, results, strict=True):
            attempts = result.attempts or 1  # what a device claims, bounded by what we asked
            attempts = attempts if self.retry.attempts is None else min(attempts, self.retry.attempts)
            if attempts > 1:
                logger.warning(
                    "%s[%s] took %d attempts on device %r (%s)",
                    command.tool_name,
                    command.call_id,
                    attempts,
                    self.device,
                    result.status.value,
                )
            if observer is not None and len(batch) == 1:
                observer.attempt(attempts)

    async def _send(self, message: ServerMessage) -> None:
        try:
            await self.protocol.send(message)
        except HubRefused as error:
            raise AccessDenied(str(error)) from None
        except HubUnavailable as error:
            raise ServerUnavailable(str(error)) from None

    def _cancel_remote(self, response_id: str) -> None:
        """Tell the device nobody waits for this batch any more (best effort, in the background)."""
        cancel = ServerMessage(
            type=ServerMessageType.TASK_END, status=TaskStatus.FAILED, response_id=response_id, timestamp=now_iso()
        )

        async def send() -> None:
            with contextlib.suppress(HubUnavailable):  # the hub cancels a gone controller's batches itself
                await self.protocol.send(cancel)

        task = asyncio.ensure_future(send())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    def _checked(self, batch: list[Command], reply: ClientMessage) -> list[Result]:
        if reply.type is ClientMessageType.ERROR:
            raise self._failure(reply)
        if reply.type is not ClientMessageType.COMMAND_RESULTS:
            raise ProtocolError(f"the device answered with a {reply.type.value!r} frame", transient=False)
        results = list(reply.action_results or [])
        by_call_id: dict[str | None, Result] = {}
        for result in results:
            by_call_id.setdefault(result.call_id, result)
        checked = []
        for index, command in enumerate(batch):
            in_place = results[index] if index < len(results) else None
            found = in_place if in_place is not None and in_place.call_id == command.call_id else None
            found = found or by_call_id.get(command.call_id)
            checked.append(found or error_result(command, "ProtocolError: the device sent no result for this command"))
        if len(results) != len(batch):
            logger.warning("device %r answered %d commands with %d results", self.device, len(batch), len(results))
        return checked

    def _failure(self, reply: ClientMessage) -> CommandError:
        metadata = reply.metadata or {}
        error = reply.error or "no reason given"
        match metadata.get("reason"):
            case Reason.DEVICE_UNAVAILABLE | Reason.DEVICE_BUSY:
                return ServerUnavailable(error)
            case Reason.DEVICE_LOST:
                return ConnectionLost(error)
            case Reason.REJECTED:
                return ProtocolError(f"the hub rejected the batch: {error}", transient=False)
            case Reason.FORBIDDEN:
                return AccessDenied(error)
            case _:
                return ProtocolError(f"the device reported: {error}", transient=False)
