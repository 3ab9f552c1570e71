"""Reaching a hub from the command line: its URL, this machine's token and the CA, checked before anything runs.

A bad value is a usage error (exit 2) naming the option, and a token is
never echoed. ``flow_hub_access`` hands a batch's flow run what it needs
in-process (``flows.hub_access``): never as flow parameters, which the
dashboard shows, nor through ``os.environ``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from aip.access import CONTROLLER_PATH
from aip.connect import hub_urls
from aip.credentials import check_token
from flows.hub_access import HubAccess

from .terminal import fail_usage


def checked_hub(hub: str) -> None:
    """Usable hub URLs (one, or several comma-separated), no credential in them (they are stored with the flow run)."""
    try:
        hub_urls(hub, CONTROLLER_PATH)
    except ValueError as error:
        fail_usage(f"--hub: {error}")


def flow_hub_access(hub: str | None, token_file: Path | None, cafile: Path | None) -> HubAccess:
    """What the flow run in this process reaches the hub with: the options, else the environment; checked now."""
    environment = HubAccess.from_environment(os.environ)
    token = read_token(token_file)
    client_ssl(cafile)  # checked now, used by the flow run
    return HubAccess(
        hub=hub or environment.hub,
        token=token,
        cafile=str(cafile.resolve()) if cafile is not None else environment.cafile,
    )


def read_token(token_file: Path | None) -> str | None:
    """--token-file, else $DISPATCH_TOKEN; never echoed anywhere."""
    if token_file is None:
        token = HubAccess.from_environment(os.environ).token
        return checked_token(token) if token else None
    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        fail_usage(f"can't read the token file: {error}")
    if not token:
        fail_usage(f"{token_file} is empty")
    return checked_token(token)


def checked_token(token: str) -> str:
    try:
        check_token(token)
    except ValueError as error:
        fail_usage(f"unusable token: {error}")
    return token


def client_ssl(cafile: Path | None) -> ssl.SSLContext | None:
    """The TLS context trusting ``--cafile`` (None: the system's CAs); a file that won't load is a usage error."""
    if cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as error:
        fail_usage(f"can't load {cafile}: {error}")
