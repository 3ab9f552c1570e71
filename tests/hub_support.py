"""Real hubs and devices for tests: in-process, over real sockets on 127.0.0.1.

Credentials are real too: every hub here holds a ``CredentialStore`` with the
controller credential ``TOKEN`` (every device), and each device gets its own
credential, bound to its id, from ``device_token`` (issued into the hub's store
on first use; the token is derived from the id so a test can name it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aip.access import AccessPolicy
from aip.backoff import Backoff
from aip.credential_file import write_store
from aip.credentials import CredentialStore, Role
from aip.device import DeviceClient
from aip.hub import Hub, HubSettings
from dispatchers import InMemoryCommandDispatcher
from dispatchers.memory import Tool

#: The controller credential every test hub accepts, for every device.
TOKEN = "test-controller-token-0123456789abcdef"
#: The name the hub knows that controller by.
CONTROLLER = "tests"
#: Fast reconnects, so tests that break connections wait milliseconds, not seconds.
QUICK_BACKOFF = Backoff(initial=0.05, maximum=0.2)


def token_for_device(device_id: str) -> str:
    """The token ``device_token`` issues for ``device_id`` (visible ASCII, derived from the id)."""
    return f"test-device-token-{device_id}-0123456789"


def credentials_with(devices: Iterable[str] = ()) -> CredentialStore:
    """A store with the controller ``TOKEN`` and a credential for each of ``devices``."""
    store = CredentialStore()
    store.issue(Role.CONTROLLER, CONTROLLER, token=TOKEN)
    for device_id in devices:
        store.issue(Role.DEVICE, device_id, token=token_for_device(device_id))
    return store


def write_credentials(path: Path, devices: Iterable[str] = ()) -> Path:
    """``credentials_with(devices)`` as a credentials file, for a hub in another process."""
    write_store(path, credentials_with(devices))
    return path


def device_token(hub: Hub, device_id: str) -> str:
    """The credential of ``device_id`` on ``hub``, issued now if it has none yet."""
    store = hub.access.credentials
    if store.find(Role.DEVICE, device_id) is None:
        store.issue(Role.DEVICE, device_id, token=token_for_device(device_id))
    return token_for_device(device_id)


@contextlib.asynccontextmanager
async def running_hub(credentials: CredentialStore | None = None, **settings: Any) -> AsyncIterator[Hub]:
    """A hub on a free loopback port; ``settings`` override ``HubSettings`` fields."""
    access = AccessPolicy(credentials if credentials is not None else credentials_with())
    async with Hub(access, HubSettings(port=0, **settings)) as hub:
        yield hub


def echo_tools() -> dict[str, Tool]:
    """``echo`` returns its parameters; ``sleep`` waits ``seconds``; ``fail`` raises."""

    async def sleep(command: Any) -> float:
        seconds = float((command.parameters or {}).get("seconds", 1))
        await asyncio.sleep(seconds)
        return seconds

    def fail(command: Any) -> None:
        raise RuntimeError("the tool failed on purpose")

    return {"echo": lambda command: command.parameters, "sleep": sleep, "fail": fail}


@contextlib.asynccontextmanager
async def running_device(
    hub: Hub,
    device_id: str = "lab-pc",
    tools: Mapping[str, Tool] | None = None,
    *,
    token: str | None = None,
    **options: Any,
) -> AsyncIterator[DeviceClient]:
    """A registered in-process device whose tools are Python functions; stopped cleanly on exit.

    Its credential is its own (``device_token``) unless ``token`` says otherwise.
    """
    executor = InMemoryCommandDispatcher(tools if tools is not None else echo_tools())
    options.setdefault("backoff", QUICK_BACKOFF)
    token = token if token is not None else device_token(hub, device_id)
    async with serving(DeviceClient(hub.url, device_id, executor, token=token, **options)) as client:
        yield client


class Runnable(Protocol):
    """A device to run in a test: ours, or the UFO-style one."""

    registered: asyncio.Event

    async def run(self, stop: asyncio.Event) -> None: ...


Device = TypeVar("Device", bound=Runnable)


@contextlib.asynccontextmanager
async def serving(client: Device, patience: float = 10) -> AsyncIterator[Device]:
    """Run a device until the block ends; entered once it is registered."""
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        async with asyncio.timeout(patience):
            await client.registered.wait()
        yield client
    finally:
        stop.set()
        async with asyncio.timeout(patience):
            await task


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dispatch test hub")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "hub.pem", directory / "hub.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
