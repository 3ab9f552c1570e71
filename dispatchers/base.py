"""The dispatcher interface, and the helpers every transport shares.

A dispatcher is a transport in the httpx sense: callers hand it a batch and
get one ``Result`` per command back, whatever runs the commands.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence

from aip.budget import Budget, Deadline
from aip.failure import error_result as error_result  # every transport's failures: UFO's format
from aip.failure import failure_cause
from aip.messages import UFO_BATCH_TIMEOUT, Command, Result, ResultStatus

__all__ = [
    "DEFAULT_TIMEOUT",
    "BasicCommandDispatcher",
    "DuplicateCallIds",
    "assign_call_ids",
    "check_unique_call_ids",
    "error_result",
    "not_done_cause",
    "plural",
    "short_id",
    "skipped_result",
]

#: How long a batch that names no timeout may take: UFO's default.
DEFAULT_TIMEOUT = UFO_BATCH_TIMEOUT


def assign_call_ids(commands: Sequence[Command], namespace: str | None = None) -> list[Command]:
    """The commands, each with a call_id: its own, else a fresh one.

    With a ``namespace`` (a flow run's id), a fresh call_id is derived from it
    and the command's place in the batch: the same on every retry of that run
    (so stored Results are found, and a device recognises a repeat), different
    for every other run (so a schedule never reuses an earlier run's Results).
    Without one, it is random.
    """
    return [
        command if command.call_id else command.model_copy(update={"call_id": _fresh_call_id(namespace, index)})
        for index, command in enumerate(commands)
    ]


def _fresh_call_id(namespace: str | None, index: int) -> str:
    if namespace is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dispatch:{namespace}:{index}"))


class DuplicateCallIds(ValueError):
    """Two commands of one batch share a call_id: their Results could not be told apart."""


def check_unique_call_ids(commands: Sequence[Command]) -> None:
    """Raise ``DuplicateCallIds`` naming the call_ids given to more than one command of the batch."""
    counts = Counter(command.call_id for command in commands if command.call_id)
    repeated = sorted(call_id for call_id, count in counts.items() if count > 1)
    if repeated:
        raise DuplicateCallIds(f"call_ids must be unique within a batch; repeated: {', '.join(repeated)}")


def short_id(call_id: str | None) -> str:
    """A call_id short enough for a table or a task run name: short ids whole, uuids by prefix."""
    call_id = call_id or ""
    return call_id if len(call_id) <= 20 else call_id[:8]


def plural(count: int, noun: str) -> str:
    """``1 command``, ``3 commands``: every count a person reads."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def not_done_cause(command: Command, result: Result) -> str:
    """Why ``result`` is no success: a failure's cause (without the command it quotes), a skip's reason."""
    if result.status is ResultStatus.FAILURE:
        return failure_cause(command, result)
    return "" if result.status is ResultStatus.SUCCESS else result.error or ""


def skipped_result(command: Command, reason: str) -> Result:
    return Result(status=ResultStatus.SKIPPED, error=reason, namespace=command.namespace, call_id=command.call_id)


class BasicCommandDispatcher(ABC):
    """Runs a batch of commands and answers with exactly one Result each.

    Implementations keep the invariants of DESIGN.md: results in command
    order with matching call_ids, failures as Results (never exceptions), and
    an answer within ``timeout`` seconds.
    """

    #: The margins it keeps within a deadline (transports that wait on others set their own).
    budget: Budget = Budget()

    @abstractmethod
    async def execute_commands(self, commands: Sequence[Command], timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
        """Run ``commands`` and return their Results, within ``timeout`` seconds."""

    async def execute_command(self, command: Command, deadline: Deadline) -> Result:
        """Run one command by ``deadline``: a batch of one, unless a transport does better."""
        [result] = await self.execute_commands(
            assign_call_ids([command]), timeout=self.budget.handed_on(deadline.remaining())
        )
        return result

    def server_for(self, command: Command) -> str | None:
        """The server that runs (or would run) ``command``, when the transport can tell; for failure Results."""
        return command.namespace

    def naming_the_server(self, command: Command, result: Result) -> Result:
        """``result``, with its ``namespace`` filled in when it failed without one and the server is known."""
        if result.namespace or result.status is ResultStatus.SUCCESS:
            return result
        server = self.server_for(command)
        return result.model_copy(update={"namespace": server}) if server else result

    def generate_error_results(self, commands: Sequence[Command], error: BaseException | str) -> list[Result]:
        """One failure Result per command, all naming the same cause."""
        return [error_result(command, error) for command in commands]
