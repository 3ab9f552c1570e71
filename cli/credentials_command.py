"""``dispatch credentials``: issue, list and revoke the credentials in a hub's file (hashes only, mode 0600).

A token is shown once, when issued (on stdout, or into a new file only its
owner can read), and kept nowhere; a running hub notices a revocation
within a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from aip.credential_file import DEFAULT_PATH, editing, read_store
from aip.credentials import CredentialError, CredentialStore, Role
from dispatchers import plural

from .inert import inert
from .options import CredentialsOption
from .terminal import fail_usage, stderr, stdout

credentials_app = typer.Typer(
    no_args_is_help=True,
    help="Issue, list and revoke the credentials a hub accepts (one per device, one per controller).",
)

ReplaceOption = Annotated[
    bool, typer.Option("--replace", help="Issue a new credential in place of the existing one (which stops working)")
]
TokenOutOption = Annotated[
    Path | None, typer.Option("--token-file", help="Write the token to this file (mode 0600) instead of stdout")
]


@credentials_app.command("add-device")
def add_device(
    device_id: Annotated[str, typer.Argument(help="The device's id (dispatch device --id, or a UFO client_id)")],
    credentials: CredentialsOption = DEFAULT_PATH,
    replace: ReplaceOption = False,
    token_file: TokenOutOption = None,
) -> None:
    """Issue a device's credential: it opens /ws and registers as this id only."""
    issue_credential(credentials, Role.DEVICE, device_id, ("*",), replace, token_file)


@credentials_app.command("add-controller")
def add_controller(
    name: Annotated[str, typer.Argument(help="A name for who holds it (a worker, an operator, an agent)")],
    device: Annotated[
        list[str] | None,
        typer.Option("--device", help="A device id or pattern (lab-*) it may use and list; repeatable (default: all)"),
    ] = None,
    credentials: CredentialsOption = DEFAULT_PATH,
    replace: ReplaceOption = False,
    token_file: TokenOutOption = None,
) -> None:
    """Issue a controller's credential: it opens /controller, for the devices it names only."""
    issue_credential(credentials, Role.CONTROLLER, name, tuple(device or ("*",)), replace, token_file)


@credentials_app.command("list")
def list_credentials(
    credentials: CredentialsOption = DEFAULT_PATH,
    json_output: Annotated[bool, typer.Option("--json", help="Print the credentials as JSON (no secrets)")] = False,
) -> None:
    """The credentials a hub with this file accepts: role, name, the devices a controller may use."""
    entries = [entry.to_json() for entry in checked_store(credentials).entries()]
    for entry in entries:
        entry["sha256"] = entry["sha256"][:12]  # enough to tell two apart; no use to anyone else
    if json_output:
        sys.stdout.write(json.dumps(entries) + "\n")
        return
    table = Table(title=f"{plural(len(entries), 'credential')} in {credentials}", title_justify="left")
    for column in ("role", "name", "may use", "issued", "sha256"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        may_use = ", ".join(entry.get("devices", [])) if entry["role"] == Role.CONTROLLER else "itself"
        table.add_row(
            *(inert(value) for value in (entry["role"], entry["name"], may_use, entry["created"], entry["sha256"]))
        )
    stdout.print(table)


@credentials_app.command("revoke-device")
def revoke_device(
    device_id: Annotated[str, typer.Argument(help="The device whose credential stops working")],
    credentials: CredentialsOption = DEFAULT_PATH,
) -> None:
    """Revoke a device's credential; a running hub closes its connection within a second."""
    revoke_credential(credentials, Role.DEVICE, device_id)


@credentials_app.command("revoke-controller")
def revoke_controller(
    name: Annotated[str, typer.Argument(help="The controller whose credential stops working")],
    credentials: CredentialsOption = DEFAULT_PATH,
) -> None:
    """Revoke a controller's credential; a running hub closes its connections within a second."""
    revoke_credential(credentials, Role.CONTROLLER, name)


def checked_store(path: Path) -> CredentialStore:
    try:
        return read_store(path)
    except CredentialError as error:
        fail_usage(str(error))


def issue_credential(
    path: Path, role: Role, name: str, devices: tuple[str, ...], replace: bool, token_file: Path | None
) -> None:
    """Add the credential to the file; the token goes to stdout (or ``token_file``), once, and is kept nowhere."""
    try:
        with editing(path) as store:
            token = store.issue(role, name, devices=devices, replace_old=replace)
            if token_file is not None:
                write_secret(token_file, token)
    except CredentialError as error:
        fail_usage(str(error))
    where = str(token_file) if token_file is not None else "stdout"
    stderr.print(
        Text.assemble(f"issued a {role.value} credential for ", inert(repr(name)), f" in {path}; its token: {where}"),
        highlight=False,
    )
    if token_file is None:
        sys.stdout.write(token + "\n")


def revoke_credential(path: Path, role: Role, name: str) -> None:
    try:
        with editing(path) as store:
            store.revoke(role, name)
    except CredentialError as error:
        fail_usage(str(error))
    stderr.print(Text.assemble(f"revoked the {role.value} credential of ", inert(repr(name))), highlight=False)


def write_secret(path: Path, secret: str) -> None:
    """``secret`` into a new file only its owner can read (an existing file is refused, never overwritten)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        fail_usage(f"can't create {path}: {error.strerror}")
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(secret + "\n")
