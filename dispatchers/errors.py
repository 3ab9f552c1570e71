"""Why a command failed, and whether trying again could help.

Every failure inside a dispatcher is one of these exceptions until the batch
engine turns it into a failure ``Result``; nothing escapes to the caller. Two
facts decide a retry: ``transient`` (the same call may succeed later) and
``sent`` (the call may have reached the tool, so repeating it could repeat a
side effect).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError


class CommandError(Exception):
    """A command failed for a reason we can name."""

    #: The name the error text starts with, e.g. "TimeoutError: ...".
    kind = "CommandError"
    transient = False

    def __init__(self, message: str, *, sent: bool = True, servers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.sent = sent
        #: Servers whose start (under way, or due) could change the answer.
        self.servers = servers


class UnknownTool(CommandError):
    kind = "UnknownTool"


class AmbiguousTool(CommandError):
    kind = "AmbiguousTool"


class InvalidParameters(CommandError):
    kind = "InvalidParameters"

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class ToolReportedError(CommandError):
    """The tool ran and said it failed (MCP ``isError``)."""

    kind = "ToolError"


class ServerUnavailable(CommandError):
    """The server that should run the command is not running; nothing was sent."""

    kind = "ServerUnavailable"
    transient = True

    def __init__(self, message: str, *, servers: tuple[str, ...] = ()) -> None:
        super().__init__(message, sent=False, servers=servers)


class ServerStopped(CommandError):
    """The server was stopped on purpose (its manager closed): it will not come back."""

    kind = "ServerUnavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


class ConnectionLost(CommandError):
    """The server went away while the call was in flight."""

    kind = "ConnectionLost"
    transient = True


class ProtocolError(CommandError):
    """The server answered the call with a JSON-RPC error."""

    kind = "ProtocolError"

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class CommandTimeout(CommandError, TimeoutError):
    """No result within the time the command was given."""

    kind = "TimeoutError"
    transient = True

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no result within {_seconds(seconds)}s")


class AttemptTimeout(CommandError):
    """One attempt took longer than the retry policy allows; the command may have time for another."""

    kind = "TimeoutError"
    transient = True

    def __init__(self, seconds: float) -> None:
        super().__init__(f"an attempt gave no result within {_seconds(seconds)}s")


def _seconds(seconds: float) -> float:
    """A budget as people wrote it: a deadline passed on (29.9987s left of 30) reads 30.0."""
    return float(round(seconds, 1) if seconds >= 1 else round(seconds, 3))


def validation_message(error: ValidationError) -> str:
    """``where: what`` for the first problem pydantic found."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"{where}: {first['msg']}"


def describe(error: BaseException) -> str:
    """One line naming the cause, never empty: ``"Kind: message"``."""
    kind = error.kind if isinstance(error, CommandError) else type(error).__name__
    message = str(error).strip() or repr(error)
    return f"{kind}: {message}"


def candidates_text(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "none"
