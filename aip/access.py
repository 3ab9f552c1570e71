"""Who may open a connection to the hub: token, Host and Origin rules, free of I/O.

The token travels as ``Authorization: Bearer ...`` or, for UFO clients,
as ``?token=...``; it is compared in constant time and never logged. The
Host header must name this hub (a web page cannot reach it by rebinding a
DNS name to 127.0.0.1), and a browser's Origin must be one the operator allowed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

#: Host names every hub answers to: the loopback names.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def check_token(token: str) -> None:
    """A token must fit in an HTTP header as a bearer credential: visible ASCII, no spaces."""
    if not all("!" <= character <= "~" for character in token):
        raise ValueError("a token may hold only visible ASCII characters (no spaces); try `openssl rand -hex 32`")


def host_name(host_header: str) -> str:
    """``example.org:8765`` -> ``example.org``; ``[::1]:8765`` -> ``::1``."""
    host_header = host_header.strip().lower()
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True)
class AccessPolicy:
    """The hub's door: a token, the host names it answers to, the browser origins it accepts.

    ``repr`` never shows the token.
    """

    token: str
    hosts: frozenset[str] = LOOPBACK_NAMES
    origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the hub needs a token: set DISPATCH_TOKEN or pass --token-file")
        check_token(self.token)

    def __repr__(self) -> str:
        return f"AccessPolicy(token=<hidden>, hosts={sorted(self.hosts)}, origins={list(self.origins)})"

    @classmethod
    def for_host(
        cls, token: str, bind_host: str, extra_hosts: Iterable[str] = (), origins: Iterable[str] = ()
    ) -> AccessPolicy:
        """The loopback names, the bound address (unless it is a wildcard) and ``extra_hosts``."""
        hosts = set(LOOPBACK_NAMES) | {name.lower() for name in extra_hosts}
        if bind_host not in ("", "0.0.0.0", "::"):
            hosts.add(host_name(bind_host))
        return cls(token=token, hosts=frozenset(hosts), origins=tuple(origins))

    def refusal(self, path: str, host: str | None, authorization: str | None) -> tuple[int, str] | None:
        """``(status, reason)`` when a request for ``path`` with these headers must be refused, else None."""
        if host is None or host_name(host) not in self.hosts:
            return 403, "Host not allowed"
        if not self.token_matches(path, authorization):
            return 401, "missing or wrong token"
        return None

    def token_matches(self, path: str, authorization: str | None) -> bool:
        offered: str | None = None
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                offered = credentials.strip()
        if offered is None:
            offered = next(iter(parse_qs(urlsplit(path).query).get("token", [])), None)
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())
