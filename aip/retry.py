"""The retry rule of the batch being executed, for the executor on a device to apply.

The device (which knows nothing of dispatchers) sets it around each command
of a batch that carried one; a dispatcher that retries reads it, so a
``--retries`` given on the controller's side means the same on the device.
"""

from __future__ import annotations

from contextvars import ContextVar

from .messages import RetryRule

__all__ = ["requested_retry"]

requested_retry: ContextVar[RetryRule | None] = ContextVar("requested_retry", default=None)
