"""How a flow run reaches the hub: its URL, this machine's token and the CA to trust, never flow parameters.

Flow parameters are shown in the dashboard and stored with the run, so the
token travels beside them, in-process: ``dispatch run`` (or any caller in
this process) sets a ``HubAccess`` around the run with ``hub_access``. A
deployment's worker sets none and uses its own environment, ``$DISPATCH_HUB``,
``$DISPATCH_TOKEN`` and ``$DISPATCH_CAFILE``, which
``HubAccess.from_environment`` is the one reader of. Nothing writes
``os.environ``: what one run was given can't leak into the next run, nor into
a child process.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["HubAccess", "current_hub_access", "hub_access"]


@dataclass(frozen=True)
class HubAccess:
    """The hub's URL (``ws://HOST:PORT``), the token to present and a CA file for a ``wss://`` hub; any may be unset."""

    hub: str | None = None
    token: str | None = field(default=None, repr=False)  # out of logs and tracebacks
    cafile: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> HubAccess:
        """``$DISPATCH_HUB``, ``$DISPATCH_TOKEN``, ``$DISPATCH_CAFILE``; an empty value counts as unset."""
        return cls(
            hub=environ.get("DISPATCH_HUB") or None,
            token=environ.get("DISPATCH_TOKEN") or None,
            cafile=environ.get("DISPATCH_CAFILE") or None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context trusting ``cafile``; None for the system's CAs (or a ``ws://`` hub)."""
        return ssl.create_default_context(cafile=self.cafile) if self.cafile else None


_given: ContextVar[HubAccess | None] = ContextVar("hub_access", default=None)


@contextmanager
def hub_access(access: HubAccess) -> Iterator[None]:
    """Flow runs started in this context (this task and those it creates) reach the hub with ``access``."""
    reset = _given.set(access)
    try:
        yield
    finally:
        _given.reset(reset)


def current_hub_access() -> HubAccess:
    """The ``HubAccess`` set with ``hub_access``, else this process's environment (a deployment's worker)."""
    given = _given.get()
    return given if given is not None else HubAccess.from_environment(os.environ)
