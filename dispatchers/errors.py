"""Why a command failed, and whether trying again could help.

Every failure inside a dispatcher is one of these exceptions until the batch
engine turns it into a failure ``Result``; nothing escapes to the caller. Two
facts decide a retry: ``transient`` (the same call may succeed later) and
``sent`` (the call may have reached the tool, so repeating it could repeat a
side effect).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from aip.failure import describe as describe  # the cause every failure Result names: the wire's format

__all__ = [
    "AmbiguousTool",
    "AttemptTimeout",
    "CommandError",
    "CommandTimeout",
    "ConnectionLost",
    "InvalidParameters",
    "ProtocolError",
    "ServerStopped",
    "ServerUnavailable",
    "ToolReportedError",
    "UnknownTool",
    "candidates_text",
    "describe",
    "did_you_mean",
    "validation_message",
]


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


def validation_message(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """``where: what`` for the first problem pydantic found.

    An unknown key reads ``unknown key``, with the closest field name of the
    model at that place (``model`` is the one validated): a typo such as
    ``paramters`` should point at its fix, where pydantic only says "Extra
    inputs are not permitted".
    """
    first = error.errors()[0]
    loc = first["loc"]
    where = ".".join(str(part) for part in loc) or "(top level)"
    if first["type"] != "extra_forbidden" or not loc:
        return f"{where}: {first['msg']}"
    keys = _keys_at(model, loc[:-1]) if model is not None else []
    hint = did_you_mean(str(loc[-1]), keys) or (f"; known keys: {candidates_text(keys)}" if keys else "")
    return f"{where}: unknown key{hint}"


def _keys_at(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The keys accepted at ``path`` inside ``model`` (field names, or their aliases); none if no model is there."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int):
            continue  # an item of a list or tuple: the model of its items
        field = current.model_fields.get(part) if current is not None else None
        current = _model_in(field.annotation) if field is not None else None
    if current is None:
        return []
    return [info.alias or name for name, info in current.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds: itself, or inside ``list[...]``, ``X | None``, ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the options close to ``name`` (difflib), else ``""``: a typo names its fix."""
    close = difflib.get_close_matches(name, [str(option) for option in options], n=3)  # a StrEnum as its value
    return f" (did you mean {', '.join(repr(option) for option in close)}?)" if close else ""


def candidates_text(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(listed) if listed else "none"
