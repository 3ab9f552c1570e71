"""Who holds which credential, and what each may do: the hub's list of identities, free of I/O.

Every device has a credential of its own, bound to its id: a connection that
presents it may register as that device and nothing else. Controllers (flow
runs, ``dispatch run``, ``dispatch devices``) have credentials of their own,
each with the devices it may use (``fnmatch`` patterns, ``*`` for all). A
device credential opens only the device endpoint, a controller's only the
controller endpoint.

Only a SHA-256 digest of each token is kept. That is enough for tokens we
generate (256 random bits: nothing to guess, so a slow password hash would
buy nothing and cost every connection); the digest also indexes the lookup,
so checking a token costs the same with one device or fifty thousand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

__all__ = [
    "FILE_VERSION",
    "NAME_PATTERN",
    "CredentialError",
    "CredentialStore",
    "Entry",
    "Identity",
    "Role",
    "check_name",
    "check_token",
    "digest",
    "new_token",
]

#: What a device id (or a controller name) may look like: printable, no spaces, no markup brackets.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
#: The format of the file, for a later change to recognise.
FILE_VERSION = 1


class Role(StrEnum):
    DEVICE = "device"  # opens /ws, registers as its one device id
    CONTROLLER = "controller"  # opens /controller, sends batches to the devices it may use


class CredentialError(ValueError):
    """A credential can't be issued, revoked or read; the message says why."""


def check_name(name: str, what: str = "a device id") -> str:
    """``name`` if it is a usable id: letters, digits and ``._:@+-``, at most 128 characters."""
    if not NAME_PATTERN.fullmatch(name):
        raise CredentialError(
            f"{what} must be 1-128 characters of letters, digits and ._:@+- (starting with a letter or digit), "
            f"not {name[:40]!r}"
        )
    return name


def check_token(token: str) -> None:
    """A token must fit in an HTTP header as a bearer credential: visible ASCII, no spaces."""
    if not all("!" <= character <= "~" for character in token):
        raise ValueError("a token may hold only visible ASCII characters (no spaces); try `openssl rand -hex 32`")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a connection is, as the hub knows it from the credential it presented.

    ``credential`` is the token's digest: two connections with the same one
    hold the same credential (only such a connection may replace a stale one).
    ``devices`` are the patterns of the devices a controller may use.
    """

    role: Role
    name: str
    credential: str = field(repr=False)
    devices: tuple[str, ...] = ()

    def may_use(self, device_id: str) -> bool:
        return self.role is Role.CONTROLLER and any(fnmatchcase(device_id, pattern) for pattern in self.devices)


@dataclass(frozen=True)
class Entry:
    """One credential as stored: its identity and when it was issued (never the token)."""

    identity: Identity
    created: str

    def to_json(self) -> dict[str, Any]:
        identity = self.identity
        entry: dict[str, Any] = {"role": identity.role.value, "name": identity.name, "sha256": identity.credential}
        if identity.role is Role.CONTROLLER:
            entry["devices"] = list(identity.devices)
        entry["created"] = self.created
        return entry

    @classmethod
    def from_json(cls, raw: Any) -> Entry:
        if not isinstance(raw, Mapping):
            raise CredentialError("each credential must be an object")
        patterns = raw.get("devices") or ()
        if not isinstance(patterns, list | tuple) or not all(isinstance(pattern, str) for pattern in patterns):
            raise CredentialError(f"the devices of {raw.get('name')!r} must be a list of patterns")
        try:
            role = Role(raw["role"])
            name = check_name(str(raw["name"]), "a name")
            credential = str(raw["sha256"])
        except (KeyError, ValueError) as error:
            raise CredentialError(f"a credential entry is malformed: {error}") from None
        devices = tuple(patterns) if role is Role.CONTROLLER else ()
        if not re.fullmatch(r"[0-9a-f]{64}", credential):
            raise CredentialError(f"the credential for {name!r} has no valid sha256")
        return cls(Identity(role, name, credential, devices), str(raw.get("created", "")))


def new_token(role: Role) -> str:
    """A fresh token; its prefix says what it is for (and lets secret scanners find a leaked one)."""
    return f"dsp_{'dev' if role is Role.DEVICE else 'ctl'}_{secrets.token_urlsafe(32)}"


class CredentialStore:
    """The credentials a hub accepts, by digest; one per device id and one per controller name."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._by_digest: dict[str, Entry] = {}
        #: The same entries by (role, name): a fleet's file of 50,000 devices loads in linear time, not quadratic.
        self._by_name: dict[tuple[Role, str], Entry] = {}
        for entry in entries:
            self._add(entry)

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, token: str) -> Identity | None:
        """The identity this token belongs to, or None."""
        key = digest(token)
        entry = self._by_digest.get(key)
        if entry is None or not hmac.compare_digest(entry.identity.credential, key):
            return None
        return entry.identity

    def entries(self) -> list[Entry]:
        return sorted(self._by_digest.values(), key=lambda entry: (entry.identity.role, entry.identity.name))

    def find(self, role: Role, name: str) -> Entry | None:
        return self._by_name.get((role, name))

    def issue(
        self,
        role: Role,
        name: str,
        *,
        devices: Iterable[str] = ("*",),
        token: str | None = None,
        replace_old: bool = False,
    ) -> str:
        """Add a credential for ``name`` and return its token (shown once; only its digest is kept).

        ``token`` admits one that already exists (a UFO device's configured
        key); by default a new random one is made.
        """
        check_name(name, "a device id" if role is Role.DEVICE else "a controller name")
        old = self.find(role, name)
        if old is not None and not replace_old:
            raise CredentialError(
                f"{role.value} {name!r} already has a credential: revoke it first, or pass --replace to issue a new one"
            )
        patterns = tuple(devices) if role is Role.CONTROLLER else ()
        if role is Role.CONTROLLER and not patterns:
            raise CredentialError("a controller needs at least one device pattern (* for all)")
        token = token if token is not None else new_token(role)
        try:
            check_token(token)
        except ValueError as error:
            raise CredentialError(str(error)) from None
        if len(token) < 24:
            raise CredentialError("a token must be at least 24 characters long")
        key = digest(token)
        if key in self._by_digest and self._by_digest[key] is not old:
            raise CredentialError("that token is already in use by another credential")
        if old is not None:
            self._remove(old)
        self._add(Entry(Identity(role, name, key, patterns), datetime.now(UTC).isoformat(timespec="seconds")))
        return token

    def revoke(self, role: Role, name: str) -> None:
        entry = self.find(role, name)
        if entry is None:
            raise CredentialError(f"no {role.value} credential named {name!r}")
        self._remove(entry)

    def is_current(self, identity: Identity) -> bool:
        """Whether ``identity`` still holds: its credential not revoked, its rights unchanged."""
        entry = self._by_digest.get(identity.credential)
        return entry is not None and entry.identity == identity

    def _add(self, entry: Entry) -> None:
        identity = entry.identity
        if identity.credential in self._by_digest:
            raise CredentialError(f"two credentials share one token ({identity.name!r})")
        if self.find(identity.role, identity.name) is not None:
            raise CredentialError(f"{identity.role.value} {identity.name!r} has two credentials")
        self._by_digest[identity.credential] = entry
        self._by_name[identity.role, identity.name] = entry

    def _remove(self, entry: Entry) -> None:
        del self._by_digest[entry.identity.credential]
        del self._by_name[entry.identity.role, entry.identity.name]

    # -- the file's text --------------------------------------------------------

    def dumps(self) -> str:
        entries = [entry.to_json() for entry in self.entries()]
        return json.dumps({"version": FILE_VERSION, "credentials": entries}, indent=2) + "\n"

    @classmethod
    def loads(cls, text: str) -> CredentialStore:
        try:
            data = json.loads(text) if text.strip() else {"version": FILE_VERSION, "credentials": []}
        except (ValueError, RecursionError) as error:
            raise CredentialError(f"not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            raise CredentialError(f'expected {{"version": {FILE_VERSION}, "credentials": [...]}}')
        raw = data.get("credentials")
        if not isinstance(raw, list):
            raise CredentialError('"credentials" must be a list')
        return cls(Entry.from_json(item) for item in raw)
