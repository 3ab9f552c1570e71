"""The ``dispatch.*`` Prefect events, for automations: their names, resources and payloads, in one place.

Three places emit them, each saying only which event and what it carries:
the command task (``dispatch.command.*``), the batch flow
(``dispatch.batch.finished``) and the hub (``dispatch.device.*``). A batch's
events share its labels (``dispatch.batch``, ``dispatch.flow_run``,
``dispatch.device``) and name its flow run as related, so that one automation
can match a batch's commands and its end alike.

An event is telemetry: it must never change a Result, nor stop the hub. Its
text comes from tools and devices, and an error can be megabytes long, which
Prefect refuses with an exception (``EventTooLarge``) that would fail the
command's task with it in place of the tool's own error. So every string in a
payload is cut to ``TEXT_LIMIT`` characters, and an event Prefect still
refuses is logged and dropped.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event

if TYPE_CHECKING:
    from aip.messages import Command
    from aip.switchboard import Device

    from .command import BatchContext

__all__ = ["TEXT_LIMIT", "DispatchEvent", "clip", "emit_batch_event", "emit_command_event", "emit_device_event"]

#: Characters of any one string of a payload: a tool's error begins with what an automation matches on.
TEXT_LIMIT = 4000
#: Characters of a resource id quoted in the warning about an event Prefect refused.
_QUOTED_ID_CHARS = 200

logger = logging.getLogger("dispatchers")


class DispatchEvent(StrEnum):
    """Every event we emit; the resource each one concerns is the second part of its name."""

    COMMAND_RETRYING = "dispatch.command.retrying"
    COMMAND_SUCCEEDED = "dispatch.command.succeeded"
    COMMAND_FAILED = "dispatch.command.failed"
    BATCH_FINISHED = "dispatch.batch.finished"
    DEVICE_CONNECTED = "dispatch.device.connected"
    DEVICE_LOST = "dispatch.device.lost"


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, its last one an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def emit_command_event(event: DispatchEvent, command: Command, batch: BatchContext, payload: dict[str, Any]) -> None:
    """A ``dispatch.command.*`` event: the command by call_id and tool, with its batch's labels."""
    resource = {
        "prefect.resource.id": f"dispatch.command.{command.call_id}",
        "prefect.resource.name": command.tool_name,
        "dispatch.call_id": command.call_id or "",
        "dispatch.tool": command.tool_name,
    }
    _emit(event, resource | _batch_labels(batch), payload, _flow_run(batch))


def emit_batch_event(event: DispatchEvent, batch: BatchContext, payload: dict[str, Any]) -> None:
    """A ``dispatch.batch.*`` event: the batch by the flow run executing it, with its labels."""
    resource = {"prefect.resource.id": f"dispatch.batch.{batch.flow_run_id}"}
    _emit(event, resource | _batch_labels(batch), payload, _flow_run(batch))


def emit_device_event(event: DispatchEvent, device: Device, payload: dict[str, Any]) -> None:
    """A ``dispatch.device.*`` event: the device by id, with its kind and platform (bounded at registration)."""
    described = device.describe()
    resource = {
        "prefect.resource.id": f"dispatch.device.{device.id}",
        "prefect.resource.name": device.id,
        "dispatch.device": device.id,
        "dispatch.device.kind": described["kind"],
        "dispatch.device.platform": str(described["platform"] or ""),
    }
    _emit(event, resource, payload)


def _batch_labels(batch: BatchContext) -> dict[str, str]:
    """What every event of one batch carries: the batch (its namespace), its flow run, and its device if remote."""
    labels = {"dispatch.batch": batch.namespace, "dispatch.flow_run": batch.flow_run_id}
    if batch.device:
        labels["dispatch.device"] = batch.device
    return labels


def _flow_run(batch: BatchContext) -> list[dict[str, str]]:
    """The batch's flow run as a related resource: the dashboard links the event to it."""
    return [{"prefect.resource.id": f"prefect.flow-run.{batch.flow_run_id}", "prefect.resource.role": "flow-run"}]


def _bounded(value: Any) -> Any:
    """``value`` with every string in it (a payload's values, the items of its lists) cut to ``TEXT_LIMIT``."""
    if isinstance(value, str):
        return clip(value, TEXT_LIMIT)
    if isinstance(value, list):
        return [_bounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _bounded(item) for key, item in value.items()}
    return value


def _emit(
    event: DispatchEvent, resource: dict[str, str], payload: dict[str, Any], related: list[dict[str, str]] | None = None
) -> None:
    """Queue the event (Prefect sends it in the background, and logs its own failures); never raise.

    An event is the dashboard's extra: it must never cost a command its Result.
    """
    try:
        emit_event(event.value, resource=resource, related=related, payload=_bounded(payload))
    except Exception as error:  # EventTooLarge (a batch's own labels can be too long), or any bug of the client
        logger.warning(
            "event %s for %s not sent: %s", event.value, clip(resource["prefect.resource.id"], _QUOTED_ID_CHARS), error
        )
