"""Devices coming and going, as Prefect events (for automations), when the hub knows a Prefect API.

Imported only then: the hub itself never needs Prefect.
"""

from __future__ import annotations

from aip.switchboard import Device
from tasks.events import DispatchEvent, emit_device_event


class PrefectHubEvents:
    """A ``HubObserver`` that emits ``dispatch.device.connected`` and ``dispatch.device.lost``."""

    def device_connected(self, device: Device) -> None:
        tools = [tool.get("name") for tool in device.describe()["tools"] if isinstance(tool, dict)]
        emit_device_event(DispatchEvent.DEVICE_CONNECTED, device, {"tools": tools})

    def device_lost(self, device: Device, why: str, failed_batches: int) -> None:
        emit_device_event(DispatchEvent.DEVICE_LOST, device, {"reason": why, "failed_batches": failed_batches})
