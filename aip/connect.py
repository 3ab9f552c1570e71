"""Opening a client connection to the hub: its URL, the token, and what a refusal means."""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .credentials import check_token

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HUBS",
    "CredentialRefused",
    "HubRefused",
    "HubUnavailable",
    "endpoint",
    "first_latency",
    "hub_urls",
    "open_connection",
    "safe_url",
]

#: The most hubs one address may name: each is a connection a device keeps open.
MAX_HUBS = 16

#: UFO's own frame limit: screenshots travel as base64 inside results.
DEFAULT_MAX_MESSAGE_BYTES = 100 * 2**20

# As on the hub: websockets logs request headers (the token) at DEBUG.
_wire_logger = logging.getLogger("aip.client.wire")
_wire_logger.setLevel(logging.WARNING)


class HubUnavailable(ConnectionError):
    """The hub could not be reached, or the connection to it ended; trying later may work."""


class HubRefused(HubUnavailable):
    """The hub turned the connection down (a wrong token, a Host or Origin it does not accept)."""


class CredentialRefused(HubRefused):
    """The hub does not know this credential, or revoked it: trying again with it cannot work."""


def endpoint(hub_url: str, path: str) -> str:
    """``ws://host:port`` (or the same with any path) -> ``ws://host:port/<path>``.

    A credential in the URL (``?token=``, ``user:password@``) is refused: URLs
    end up in flow-run parameters, logs and process lists. The credential goes
    in ``$DISPATCH_TOKEN`` or a token file; ``token_in_query`` puts it in the
    query on the wire for a UFO server, without it ever being part of the URL.
    """
    try:
        parts = urlsplit(hub_url)
        query = parse_qs(parts.query, keep_blank_values=True)
    except ValueError:
        raise ValueError("a hub URL looks like ws://HOST:PORT or wss://HOST:PORT") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"a hub URL looks like ws://HOST:PORT or wss://HOST:PORT, not {safe_url(hub_url)!r}")
    if "token" in query or parts.username is not None or parts.password is not None:
        raise ValueError(
            "the hub URL carries a credential: remove it, and pass the token in $DISPATCH_TOKEN or --token-file "
            "(a URL is shown in logs, process lists and the Prefect dashboard)"
        )
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def hub_urls(hub_url: str, path: str) -> list[str]:
    """The ``endpoint`` of each hub that ``hub_url`` names: one URL, or several separated by commas.

    Several hubs serve one fleet: a device dials every one of them, a
    controller uses whichever answers (``aip.failover``). One string keeps
    every place a hub is named (``--hub``, ``$DISPATCH_HUB``, a flow
    parameter) as it was; a repeated hub counts once.
    """
    named = [part.strip() for part in hub_url.split(",") if part.strip()]
    if not named:
        raise ValueError("a hub URL looks like ws://HOST:PORT or wss://HOST:PORT (several: separated by commas)")
    if len(named) > MAX_HUBS:
        raise ValueError(f"{len(named)} hubs named: at most {MAX_HUBS}")
    return list(dict.fromkeys(endpoint(url, path) for url in named))


async def open_connection(
    url: str,
    token: str | None,
    *,
    open_timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ssl_context: ssl.SSLContext | None = None,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float = 10.0,
    token_in_query: bool = False,
    create_connection: type[ClientConnection] | None = None,
) -> ClientConnection:
    """Connect with ``Authorization: Bearer <token>``; a failure is a ``HubUnavailable`` that says why.

    With ``token_in_query`` the token also goes as ``?token=``, as a UFO
    server wants it (added here, so it never sits in a command line).
    """
    if token:
        check_token(token)
        if token_in_query:
            url += ("&" if urlsplit(url).query else "?") + urlencode({"token": token})
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await connect(
            url,
            additional_headers=headers,
            open_timeout=open_timeout,
            max_size=max_message_bytes,
            # No permessage-deflate: the hub would inflate and deflate every frame it forwards on its one
            # event loop (a 256 KiB result took 14x longer), and each connection would hold ~40 KiB of
            # zlib state, to save a quarter of the bytes of base64 screenshots. A UFO peer that offers
            # it simply gets an uncompressed connection.
            compression=None,
            # wss:// with no context of ours: check the hub against the system's trusted CAs.
            ssl=(ssl_context or ssl.create_default_context()) if url.startswith("wss:") else None,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            create_connection=create_connection,
            logger=_wire_logger,
        )
    except InvalidStatus as error:
        status = error.response.status_code
        body = error.response.body.decode(errors="replace").strip() if error.response.body else ""
        # 503: a hub that is full (or a proxy whose hub is down) may take us later; every other refusal stands.
        refused = CredentialRefused if status == 401 else HubUnavailable if status == 503 else HubRefused
        raise refused(f"the hub at {safe_url(url)} refused the connection: HTTP {status} {body}".strip()) from None
    except InvalidURI as error:
        raise ValueError(str(error)) from None
    except (OSError, TimeoutError, InvalidHandshake) as error:
        raise HubUnavailable(f"cannot reach the hub at {safe_url(url)}: {error or type(error).__name__}") from None


async def first_latency(connection: ClientConnection, timeout: float = 5.0) -> float:
    """One ping round trip now, in seconds (0.0 if it can't be had).

    websockets measures latency only with its keepalive pings, the first of
    which comes 20 s after connecting; deadlines need an estimate from the start.
    """
    try:
        pong = await connection.ping()
        async with asyncio.timeout(timeout):
            return float(await pong)
    except (ConnectionClosed, TimeoutError):
        return 0.0


def safe_url(url: str) -> str:
    """The URL without its query (where a UFO-style ``?token=`` would be) and without user info."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<malformed URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
