"""AIP, the agent interaction protocol: wire models shared with Microsoft UFO.

This package is the bottom layer. It knows pydantic (and, for the remote path,
websockets) and nothing above it, so a device that only executes commands can
import it without paying for MCP or Prefect.
"""
