"""What ``dispatch run`` and its batch service say to each other: one JSON object per line, on a Unix socket.

The client sends one request (``run``, ``resume``, ``status`` or ``stop``),
then perhaps ``interrupt``; the service answers ``hello``, then the batch's
progress as the terminal's watcher would see it in-process (``started``,
``command_started``, ``command_finished``, ``finished``), warnings to show
(``log``), ``alive`` every few seconds, and last ``done`` or ``error``.
Nothing here does I/O: both ends frame and parse with these functions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from aip.messages import Command, Result
from flows.hub_access import HubAccess
from tasks.report import CommandReport

__all__ = [
    "ALIVE_INTERVAL",
    "REQUEST_LIMIT",
    "WireError",
    "access_from_wire",
    "access_to_wire",
    "commands_from_wire",
    "commands_to_wire",
    "decode",
    "encode",
    "report_from_wire",
    "report_to_wire",
    "results_from_wire",
    "results_to_wire",
]

#: Seconds between the service's ``alive`` messages while a batch runs; a client hearing nothing for
#: several of them knows the service is gone, whatever the batch's own timeout.
ALIVE_INTERVAL = 2.0
#: Bytes of one message the service reads: a batch file's commands, with room to spare.
REQUEST_LIMIT = 64 * 1024 * 1024


class WireError(ValueError):
    """A line that is not one of our messages."""


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as error:
        raise WireError(f"not JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("not a message (a JSON object with a 'type')")
    return message


def commands_to_wire(commands: Sequence[Command]) -> list[dict[str, Any]]:
    return [command.model_dump(mode="json") for command in commands]


def commands_from_wire(items: Any) -> list[Command]:
    return [Command.model_validate(item) for item in _listed(items)]


def results_to_wire(results: Sequence[Result]) -> list[dict[str, Any]]:
    return [result.model_dump(mode="json") for result in results]


def results_from_wire(items: Any) -> list[Result]:
    return [Result.model_validate(item) for item in _listed(items)]


def report_to_wire(report: CommandReport | None) -> dict[str, Any] | None:
    return None if report is None else dataclasses.asdict(report)


def report_from_wire(item: Any) -> CommandReport | None:
    if item is None:
        return None
    if not isinstance(item, dict):
        raise WireError("a report is an object")
    return CommandReport(**{field.name: item[field.name] for field in dataclasses.fields(CommandReport)})


def access_to_wire(access: HubAccess) -> dict[str, str | None]:
    return {"hub": access.hub, "token": access.token, "cafile": access.cafile}


def access_from_wire(item: Any) -> HubAccess:
    if not isinstance(item, dict) or not all(isinstance(item.get(name), (str, type(None))) for name in item):
        raise WireError("hub access is an object of strings")
    return HubAccess(hub=item.get("hub"), token=item.get("token"), cafile=item.get("cafile"))


def _listed(items: Any) -> list[Any]:
    if not isinstance(items, list):
        raise WireError("expected a list")
    return items
