"""Who may open a connection to the hub: credential, endpoint, Host and Origin rules, free of I/O.

The token travels as ``Authorization: Bearer ...`` or, for UFO clients,
as ``?token=...``; it is looked up by digest in the hub's ``CredentialStore``
and never logged. Each credential opens one endpoint: a device's ``/ws``, a
controller's ``/controller``. The Host header must name this hub (a web page
cannot reach it by rebinding a DNS name to 127.0.0.1), and a browser's Origin
must be one the operator allowed. A malformed request is a 400, never a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .credentials import CredentialStore, Identity, Role

__all__ = ["CONTROLLER_PATH", "DEVICE_PATH", "ENDPOINTS", "LOOPBACK_NAMES", "AccessPolicy", "Refusal", "host_name"]

#: Where devices connect (as UFO's devices do) and where controllers connect.
DEVICE_PATH = "/ws"
CONTROLLER_PATH = "/controller"
#: Which role each endpoint is for.
ENDPOINTS = {DEVICE_PATH: Role.DEVICE, CONTROLLER_PATH: Role.CONTROLLER}
#: Host names every hub answers to: the loopback names.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(host_header: str) -> str:
    """``example.org:8765`` -> ``example.org``; ``[::1]:8765`` -> ``::1``."""
    host_header = host_header.strip().lower()
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer instead of a WebSocket: the status and a reason that names no secret."""

    status: int
    reason: str


@dataclass(frozen=True)
class AccessPolicy:
    """The hub's door: the credentials it accepts, the host names it answers to, the origins it allows."""

    credentials: CredentialStore
    hosts: frozenset[str] = LOOPBACK_NAMES
    origins: tuple[str, ...] = ()

    def __repr__(self) -> str:
        hosts, origins = sorted(self.hosts), list(self.origins)
        return f"AccessPolicy({len(self.credentials)} credentials, hosts={hosts}, origins={origins})"

    @classmethod
    def for_host(
        cls, credentials: CredentialStore, bind_host: str, extra_hosts: Iterable[str] = (), origins: Iterable[str] = ()
    ) -> AccessPolicy:
        """The loopback names, the bound address (unless it is a wildcard) and ``extra_hosts``."""
        hosts = set(LOOPBACK_NAMES) | {name.lower() for name in extra_hosts}
        if bind_host not in ("", "0.0.0.0", "::"):
            hosts.add(host_name(bind_host))
        return cls(credentials=credentials, hosts=frozenset(hosts), origins=tuple(origins))

    def admit(
        self, target: str, hosts: Sequence[str], authorizations: Sequence[str], origins: Sequence[str] = ()
    ) -> Identity | Refusal:
        """Who a request for ``target`` (path and query) is, given all its Host, Authorization and Origin headers.

        No Origin is a client that is not a browser; a browser page must come from an allowed origin.
        """
        try:
            parts = urlsplit(target)
            query = parse_qs(parts.query)
        except ValueError:
            return Refusal(400, "malformed request path")
        role = ENDPOINTS.get(parts.path)
        if role is None:
            return Refusal(404, f"not found: devices connect at {DEVICE_PATH}, controllers at {CONTROLLER_PATH}")
        if len(hosts) != 1 or len(authorizations) > 1 or len(origins) > 1 or len(query.get("token", [])) > 1:
            return Refusal(400, "exactly one Host header, and at most one credential and one Origin, please")
        if host_name(hosts[0]) not in self.hosts:
            return Refusal(403, "Host not allowed")
        if origins and origins[0] not in self.origins:
            return Refusal(403, "Origin not allowed")
        offered = _offered_token(authorizations, query)
        identity = self.credentials.identify(offered) if offered else None
        if identity is None:
            return Refusal(401, "missing or unknown credential")
        if identity.role is not role:
            return Refusal(403, f"a {identity.role.value} credential does not open {parts.path}")
        return identity


def _offered_token(authorizations: Sequence[str], query: dict[str, list[str]]) -> str | None:
    """A bearer credential, else the query's ``token`` (as UFO clients send it, behind a proxy's own auth too)."""
    for authorization in authorizations:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip()
    return next(iter(query.get("token", [])), None)
