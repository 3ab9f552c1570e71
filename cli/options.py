"""The options several commands share, declared once so that each reads (and is documented) alike.

``--hub``, ``--token-file`` and ``--cafile`` are how ``run``, ``resume``,
``device`` and ``devices`` reach a hub (their values are checked in
``cli.hub_client``); ``--credentials`` is the hub's file for ``serve`` and
``credentials``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dispatchers import ConfigError, load_config

from .terminal import fail_usage

TokenFileOption = Annotated[
    Path | None,
    typer.Option("--token-file", help="File holding this machine's credential for the hub (default: $DISPATCH_TOKEN)"),
]
CredentialsOption = Annotated[
    Path,
    typer.Option(
        "--credentials", help="The hub's credentials file (hashes only; mode 0600)", envvar="DISPATCH_CREDENTIALS"
    ),
]
HubOption = Annotated[
    str | None,
    typer.Option(
        "--hub",
        help="Hub URL, ws://HOST:PORT; several hubs of one fleet: comma-separated (default: $DISPATCH_HUB)",
        envvar="DISPATCH_HUB",
    ),
]
CaFileOption = Annotated[
    Path | None, typer.Option("--cafile", help="CA certificate to trust for a wss:// hub with its own certificate")
]


def checked_config(path: Path) -> Any:
    """The MCP servers of a ``--config`` (``run``, ``device``, ``tools``); a bad one is a usage error."""
    try:
        return load_config(path)
    except ConfigError as error:
        fail_usage(str(error))
