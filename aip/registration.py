"""What the hub keeps of a device's registration: a bounded, well-typed profile, free of I/O.

A device describes itself in ``metadata`` (UFO's ``system_info``, our own
``dispatch.tools``). The hub is shown this by every device and keeps it for as
long as the device is connected, and hands it to any controller that lists
devices: so it keeps only the fields it shows, as short strings, and refuses a
registration frame that is larger than any real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DISPATCH_METADATA",
    "MAX_DESCRIPTION_CHARS",
    "MAX_NAME_CHARS",
    "MAX_REGISTRATION_BYTES",
    "MAX_TOOLS",
    "SYSTEM_FIELDS",
    "Profile",
    "Tool",
]

#: The largest register frame accepted (a real one is 1-20 KiB; 500 tools with descriptions fit).
MAX_REGISTRATION_BYTES = 256 * 2**10
#: At most this many tools are kept (and listed) per device.
MAX_TOOLS = 500
#: Each string the hub keeps (a tool's name, its server, a system_info value) is cut to this many characters.
MAX_NAME_CHARS = 128
#: A tool's description is cut to this many characters (the listing shows its first line).
MAX_DESCRIPTION_CHARS = 200
#: The ``system_info`` fields kept: those UFO's devices send.
SYSTEM_FIELDS = (
    "device_id",
    "platform",
    "os_version",
    "cpu_count",
    "memory_total_gb",
    "hostname",
    "ip_address",
    "platform_type",
    "schema_version",
)
#: The registration metadata key under which our own device client describes
#: itself (its tools); its presence says the device understands cancels.
DISPATCH_METADATA = "dispatch"


def _short(value: Any, limit: int = MAX_NAME_CHARS) -> str | None:
    """A string of at most ``limit`` characters, or None for anything that is not a scalar."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)[:limit]


@dataclass(frozen=True)
class Tool:
    name: str
    server: str
    description: str

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "server": self.server, "description": self.description}


@dataclass(frozen=True)
class Profile:
    """A device as the hub shows it: ours or UFO's, its platform, its system, its tools."""

    speaks_dispatch: bool = False
    platform: str | None = None
    system_info: tuple[tuple[str, str], ...] | None = None
    tools: tuple[Tool, ...] = ()

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> Profile:
        metadata = metadata or {}
        raw_system = metadata.get("system_info")
        system = None
        if isinstance(raw_system, dict):
            system = tuple((key, text) for key in SYSTEM_FIELDS if (text := _short(raw_system.get(key))) is not None)
        dispatch = metadata.get(DISPATCH_METADATA)
        tools: list[Tool] = []
        raw_tools = dispatch.get("tools") if isinstance(dispatch, dict) else None
        for raw in raw_tools if isinstance(raw_tools, list) else ():
            if len(tools) == MAX_TOOLS:
                break
            if isinstance(raw, dict) and (name := _short(raw.get("name"))):
                server = _short(raw.get("server")) or ""
                description = _short(raw.get("description"), MAX_DESCRIPTION_CHARS) or ""
                tools.append(Tool(name, server, description))
        platform = _short(metadata.get("platform")) or dict(system or ()).get("platform")
        return cls(isinstance(dispatch, dict), platform, system, tuple(tools))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "dispatch" if self.speaks_dispatch else "ufo",
            "platform": self.platform,
            "system_info": dict(self.system_info) if self.system_info is not None else None,
            "tools": [tool.describe() for tool in self.tools],
        }
