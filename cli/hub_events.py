"""Devices coming and going, as Prefect events (for automations), when the hub knows a Prefect API.

Imported only then: the hub itself never needs Prefect.
"""

from __future__ import annotations

from prefect.events import emit_event

from aip.switchboard import Device


def device_resource(device: Device) -> dict[str, str]:
    described = device.describe()
    return {
        "prefect.resource.id": f"dispatch.device.{device.id}",
        "prefect.resource.name": device.id,
        "dispatch.device": device.id,
        "dispatch.device.kind": described["kind"],
        "dispatch.device.platform": str(described["platform"] or ""),
    }


class PrefectHubEvents:
    """A ``HubObserver`` that emits ``dispatch.device.connected`` and ``dispatch.device.lost``."""

    def device_connected(self, device: Device) -> None:
        tools = [tool.get("name") for tool in device.describe()["tools"] if isinstance(tool, dict)]
        emit_event("dispatch.device.connected", resource=device_resource(device), payload={"tools": tools})

    def device_lost(self, device: Device, why: str, failed_batches: int) -> None:
        payload = {"reason": why, "failed_batches": failed_batches}
        emit_event("dispatch.device.lost", resource=device_resource(device), payload=payload)
