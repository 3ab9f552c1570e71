"""Real hubs and devices for tests: in-process, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aip.access import AccessPolicy
from aip.device import Backoff, DeviceClient
from aip.hub import Hub, HubSettings
from dispatchers import InMemoryCommandDispatcher
from dispatchers.memory import Tool

TOKEN = "test-token-0123456789abcdef"
#: Fast reconnects, so tests that break connections wait milliseconds, not seconds.
QUICK_BACKOFF = Backoff(initial=0.05, maximum=0.2)


@contextlib.asynccontextmanager
async def running_hub(token: str = TOKEN, **settings: Any) -> AsyncIterator[Hub]:
    """A hub on a free loopback port; ``settings`` override ``HubSettings`` fields."""
    async with Hub(AccessPolicy(token), HubSettings(port=0, **settings)) as hub:
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
    token: str = TOKEN,
    **options: Any,
) -> AsyncIterator[DeviceClient]:
    """A registered in-process device whose tools are Python functions; stopped cleanly on exit."""
    executor = InMemoryCommandDispatcher(tools if tools is not None else echo_tools())
    options.setdefault("backoff", QUICK_BACKOFF)
    async with serving(DeviceClient(hub.url, device_id, executor, token=token, **options)) as client:
        yield client


@contextlib.asynccontextmanager
async def serving(client: DeviceClient, patience: float = 10) -> AsyncIterator[DeviceClient]:
    """Run a DeviceClient until the block ends; entered once it is registered."""
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
