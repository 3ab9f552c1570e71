"""``dispatch serve``: the hub, until stopped; devices connect at /ws, flow runs at /controller.

Everything that can be wrong with its files or options (no credentials
file, half a TLS pair) is a usage error before it listens; listening beyond
this machine without TLS is allowed, and warned about.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import ssl
from pathlib import Path
from typing import Annotated

import typer

from aip.access import AccessPolicy
from aip.credential_file import DEFAULT_PATH, CredentialFile
from aip.credentials import CredentialError
from aip.hub import Hub, HubSettings, descriptor_room

from .options import CredentialsOption
from .service import log_to_stderr, run_until_signalled
from .terminal import fail_usage


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback is reachable from outside")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port)", min=0, max=65535)] = 8765,
    credentials: CredentialsOption = DEFAULT_PATH,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Another host name clients may use (repeatable)")
    ] = None,
    allow_origin: Annotated[
        list[str] | None, typer.Option("--allow-origin", help="A browser Origin to accept (repeatable)")
    ] = None,
    max_message_mib: Annotated[float, typer.Option(help="Largest frame accepted, in MiB", min=0.001)] = 100.0,
    ping_interval: Annotated[
        float, typer.Option(help="Seconds between the WebSocket pings that tell live connections from dead", min=0.1)
    ] = 20.0,
    ping_timeout: Annotated[
        float,
        typer.Option(help="Seconds a connection has to answer a ping before it counts as gone", min=0.1),
    ] = 20.0,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve wss://")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM) for --certfile")] = None,
) -> None:
    """Run the hub: devices connect at /ws, flow runs (controllers) at /controller, each with its own credential."""
    if not credentials.is_file():
        fail_usage(
            f"no credentials file at {credentials}: issue some with `dispatch credentials add-device ID` "
            "and `dispatch credentials add-controller NAME` (or pass --credentials)"
        )
    try:
        credential_file = CredentialFile(credentials)
    except CredentialError as error:
        fail_usage(str(error))
    if (certfile is None) != (keyfile is None):
        fail_usage("--certfile and --keyfile go together")
    context = None
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as error:
            fail_usage(f"can't load the certificate: {error}")
    access = AccessPolicy.for_host(credential_file.store, host, allow_host or (), allow_origin or ())
    settings = HubSettings(
        host=host,
        port=port,
        max_message_bytes=int(max_message_mib * 2**20),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    log_to_stderr()
    descriptors = raise_descriptor_limit()
    logging.getLogger("aip.hub").info(
        "this process may open %d descriptors: the hub takes up to %d connections and answers more 503 "
        "(raise the hard limit, ulimit -Hn, for more)",
        descriptors,
        descriptor_room(),
    )
    if listens_in_clear(host, tls=context is not None):
        logging.getLogger("aip.hub").warning(
            "listening on %s WITHOUT TLS: every credential and batch crosses the network in clear text; "
            "serve wss:// with --certfile/--keyfile unless this network is yours alone",
            host,
        )
    observer = None
    if os.environ.get("PREFECT_API_URL"):  # a Prefect server to tell: devices coming and going become events
        from cli.hub_events import PrefectHubEvents

        observer = PrefectHubEvents()

    async def serve_until(stop: asyncio.Event) -> None:
        async with Hub(access, settings, context, observer, credential_file):
            await stop.wait()

    try:
        run_until_signalled(serve_until)
    except OSError as error:
        fail_usage(f"can't listen on {host}:{port}: {error}")


def raise_descriptor_limit() -> int:
    """Let this process open as many descriptors as its hard limit allows; the limit now.

    Each connection is a descriptor, and a shell's soft limit is often 1,024:
    a hub left at it refuses its 1,000th device. The hard limit is the
    administrator's; the soft one is ours to raise up to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def listens_in_clear(host: str, tls: bool) -> bool:
    """Whether a server on ``host`` is reachable beyond this machine without TLS (a name may resolve anywhere)."""
    if tls or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
