"""The AIP wire models, field for field as Microsoft UFO sends and parses them.

Compatibility rules (see ``shared/aip-wire.md``):

* unknown keys are ignored and missing optional keys allowed, as UFO parses;
* every UFO field is serialised, unset ones as ``null``, as UFO sends;
* our extensions (``namespace`` and ``timeout`` on a command, ``target_id``,
  ``timeout`` and ``controller_id`` on a server message) are optional and left out of the JSON
  while unset, so a frame we parse re-serialises to an equal object and a UFO
  peer never sees a key it did not send.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_CONTEXT_CHARS",
    "TOOL_TYPES",
    "UFO_BATCH_TIMEOUT",
    "AgentContext",
    "ClientMessage",
    "ClientMessageType",
    "ClientType",
    "CloseCode",
    "Command",
    "Result",
    "ResultStatus",
    "RetryRule",
    "ServerMessage",
    "ServerMessageType",
    "TaskStatus",
    "ToolType",
    "WireModel",
    "extension",
]

#: UFO's default batch timeout, in seconds: how long a batch that names none is waited for.
UFO_BATCH_TIMEOUT = 6000.0


class ToolType(StrEnum):
    """The kinds of command a UFO peer knows; locally a ``tool_type`` may also name an MCP server."""

    ACTION = "action"  # has side effects
    DATA_COLLECTION = "data_collection"  # read-only


#: Every ``ToolType``, for a membership test of a plain string (``value in ToolType`` needs Python 3.12).
TOOL_TYPES: tuple[ToolType, ...] = tuple(ToolType)


class CloseCode(IntEnum):
    """WebSocket close codes of our hub and device (RFC 6455, and the private range 4000-4999)."""

    NORMAL = 1000
    UNSUPPORTED = 1003
    POLICY = 1008
    REPLACED = 4000
    TOO_SLOW = 4002
    REVOKED = 4003
    DUPLICATE = 4004


class ResultStatus(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    NONE = "none"


class TaskStatus(StrEnum):
    CONTINUE = "continue"
    COMPLETED = "completed"
    FAILED = "failed"
    OK = "ok"
    ERROR = "error"


class ClientType(StrEnum):
    DEVICE = "device"
    CONSTELLATION = "constellation"


class ClientMessageType(StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    COMMAND_RESULTS = "command_results"
    ERROR = "error"
    REGISTER = "register"
    TASK_END = "task_end"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class ServerMessageType(StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    TASK_END = "task_end"
    COMMAND = "command"
    ERROR = "error"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


def _is_none(value: Any) -> bool:
    return value is None


def extension(**constraints: Any) -> Any:
    """An optional field UFO does not know: absent from the JSON (and the repr) while it is None."""
    return Field(default=None, exclude_if=_is_none, **constraints)


class WireModel(BaseModel):
    """Base of every frame model: lenient on input, UFO-shaped on output."""

    model_config = ConfigDict(extra="ignore")

    def __repr_args__(self) -> Any:
        # Keep str()/repr() UFO-shaped too: error texts embed str(command).
        fields = type(self).model_fields
        for name, value in super().__repr_args__():
            if not (value is None and name is not None and fields[name].exclude_if is not None):
                yield name, value


class Command(WireModel):
    """One tool call: what to run, with which parameters, under which id.

    ``tool_type`` is ``action`` (has side effects) or ``data_collection``
    (read-only) for a UFO peer; locally it may also name an MCP server, and
    the empty default leaves the choice of server to the tool's name.
    ``namespace`` pins the server; ``timeout`` bounds this command in seconds.
    """

    tool_name: str
    parameters: dict[str, Any] | None = Field(default_factory=dict)
    tool_type: str = ""
    call_id: str | None = None
    namespace: str | None = extension()
    timeout: float | None = extension(gt=0, allow_inf_nan=False)


class Result(WireModel):
    """The outcome of one command; ``call_id`` echoes the command's.

    Extension: ``attempts`` is how many tries the device made (set by our
    devices when the batch carried a retry rule).
    """

    status: ResultStatus
    error: str | None = None
    result: Any = None
    namespace: str | None = None
    call_id: str | None = None
    attempts: int | None = extension(ge=1)


class RetryRule(BaseModel):
    """The batch's retry policy as it travels to a device (``dispatchers.RetryPolicy`` on either end)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # No upper bounds: any RetryPolicy travels; the batch's deadline bounds the tries on the device.
    attempts: int = Field(ge=1)
    initial_delay: float = Field(ge=0, allow_inf_nan=False)
    max_delay: float = Field(ge=0, allow_inf_nan=False)
    jitter: float = Field(ge=0, allow_inf_nan=False)  # a fraction of each delay (aip.backoff.Backoff)
    retry_tool_errors: bool = False


#: The longest agent, process, root, session or task name a batch may carry.
MAX_CONTEXT_CHARS = 256


class AgentContext(BaseModel):
    """Whose batch this is, as UFO's server says with every command frame.

    A stock UFO device picks the MCP servers of a batch by ``agent_name``
    (a key of its ``mcp.yaml``: ``HostAgent``, ``AppAgent``, ...) and
    ``root_name`` (else that agent's ``default`` entry), and refuses a batch
    without an agent name, never answering it. ``process_name`` names the
    application the agent controls; ``session_id`` and ``task_name`` say which
    session and task the batch belongs to. Our own devices ignore them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_name: str | None = Field(default=None, max_length=MAX_CONTEXT_CHARS)
    process_name: str | None = Field(default=None, max_length=MAX_CONTEXT_CHARS)
    root_name: str | None = Field(default=None, max_length=MAX_CONTEXT_CHARS)
    session_id: str | None = Field(default=None, max_length=MAX_CONTEXT_CHARS)
    task_name: str | None = Field(default=None, max_length=MAX_CONTEXT_CHARS)


class ServerMessage(WireModel):
    """A frame from a server (hub) to a client (device).

    Extensions: ``target_id`` addresses a controller's frame to a device (the
    hub removes it before forwarding); ``timeout`` is how many seconds the
    sender still waits for this batch, so the device can stop work nobody
    waits for (seconds rather than a timestamp: no clock is shared);
    ``controller_id`` is set by the hub, from the sender's credential, on the
    batches it forwards to our own devices, so each controller has a call
    memory of its own; ``retry`` is the batch's retry policy, which our
    devices apply to each of its commands; ``resent`` marks a batch sent again
    after the hub connection dropped with it out (the hub never forwards such
    a batch to a UFO device, which keeps no memory of what ran).
    """

    type: ServerMessageType
    status: TaskStatus
    user_request: str | None = None
    agent_name: str | None = None
    process_name: str | None = None
    root_name: str | None = None
    actions: list[Command] | None = None
    messages: list[Any] | None = None
    error: str | None = None
    session_id: str | None = None
    task_name: str | None = None
    timestamp: str | None = None
    response_id: str | None = None
    result: Any = None
    target_id: str | None = extension()
    timeout: float | None = extension(gt=0, allow_inf_nan=False)
    controller_id: str | None = extension()
    retry: RetryRule | None = extension()
    resent: bool | None = extension()


class ClientMessage(WireModel):
    """A frame from a client (device) to a server (hub)."""

    type: ClientMessageType
    status: TaskStatus
    client_type: ClientType = ClientType.DEVICE
    session_id: str | None = None
    task_name: str | None = None
    client_id: str | None = None
    target_id: str | None = None
    request: str | None = None
    action_results: list[Result] | None = None
    timestamp: str | None = None
    request_id: str | None = None
    prev_response_id: str | None = None
    error: str | None = None
    metadata: dict[str, Any] | None = None
