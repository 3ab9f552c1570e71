"""Where a batch service lives, and which one a ``dispatch run`` may use.

A service runs batches with the environment, working directory, Python and
code it was started with: MCP servers inherit them, relative paths in a
config resolve against them, Prefect reads its settings from them. So a run
may only use a service started from the same place, and each place has its
own socket, named by a digest of all of it. The directory holding the
sockets is this user's alone (mode 0700, owned by us, not a symlink): the
socket is the service's only door, and whoever reaches it runs programs as us.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ServicePlace",
    "UnsafeDirectory",
    "code_fingerprint",
    "enabled",
    "holds_lock",
    "idle_seconds",
    "peer_is_us",
    "place_key",
    "runtime_directory",
    "sweep",
]

#: Variables that differ between two shells of the same user without changing what a batch does.
VOLATILE = frozenset(
    {"_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES", "PS1", "PS2", "PROMPT_COMMAND", "TERM_SESSION_ID", "WINDOWID"}
)
#: The packages whose code the service runs; a change to any of their files means a new service.
PACKAGES = ("aip", "dispatchers", "tasks", "flows", "cli")
#: Where packages are installed: such a directory's mtime moves when one is added, upgraded or removed.
INSTALL_DIRECTORIES = frozenset({"site-packages", "dist-packages"})
#: Bytes of a socket directory's path that leave room for a socket's name (``sun_path`` holds 107).
SOCKET_DIRECTORY_LIMIT = 107 - len("/0123456789abcdef01234567.sock")
#: Seconds after which a dead service's lock and log are removed by the next service starting.
STALE_AFTER = 86400.0
#: Seconds a service waits for its next batch before it stops, unless $DISPATCH_SERVICE_IDLE says otherwise.
DEFAULT_IDLE = 900.0


class UnsafeDirectory(RuntimeError):
    """The directory for the service's socket could be reached by another user."""


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether ``dispatch run`` sends its batch to a service (the default) or runs it itself."""
    return environ.get("DISPATCH_SERVICE", "").strip().lower() not in ("off", "0", "no", "false")


def idle_seconds(environ: Mapping[str, str]) -> float:
    """$DISPATCH_SERVICE_IDLE, else the default; a value that is not a positive number is refused."""
    text = environ.get("DISPATCH_SERVICE_IDLE", "").strip()
    if not text:
        return DEFAULT_IDLE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"DISPATCH_SERVICE_IDLE must be a positive number of seconds, not {text!r}")
    return value


def runtime_directory(environ: Mapping[str, str]) -> Path:
    """$XDG_RUNTIME_DIR/command-dispatcher, else /tmp/command-dispatcher-UID; made private, checked private.

    A socket's path has room for 107 bytes: a runtime directory too deep to
    hold ours is passed over for /tmp.
    """
    base = environ.get("XDG_RUNTIME_DIR")
    path = Path(base, "command-dispatcher") if base else Path("/tmp", f"command-dispatcher-{os.getuid()}")
    if len(bytes(path)) > SOCKET_DIRECTORY_LIMIT:
        path = Path("/tmp", f"command-dispatcher-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as error:
        raise UnsafeDirectory(f"cannot make {path} for the batch service: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UnsafeDirectory(
            f"{path} is not a directory of this user's alone (mode 0700): it is not used for the batch service"
        )
    return path


@dataclass(frozen=True)
class ServicePlace:
    """The files of the service for one place: its socket, its lock (held while it lives) and its log."""

    directory: Path
    key: str

    @classmethod
    def here(cls, environ: Mapping[str, str] | None = None) -> ServicePlace:
        environ = os.environ if environ is None else environ
        return cls(runtime_directory(environ), place_key(environ, Path.cwd()))

    @property
    def socket(self) -> Path:
        return self.directory / f"{self.key}.sock"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.key}.lock"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.key}.log"


def place_key(environ: Mapping[str, str], cwd: Path) -> str:
    """A digest of what a batch's behaviour depends on beyond its own file (short enough for a socket's path)."""
    settled = {name: value for name, value in environ.items() if name not in VOLATILE and not _ours(name)}
    place = {
        "environment": sorted(settled.items()),
        "cwd": str(cwd),
        "python": sys.executable,
        "code": code_fingerprint(),
        "prefect": [_stamp(path) for path in prefect_setting_files(environ, cwd)],
    }
    return hashlib.sha256(json.dumps(place).encode()).hexdigest()[:24]


def prefect_setting_files(environ: Mapping[str, str], cwd: Path) -> list[Path]:
    """The files Prefect reads its settings from besides the environment: a profile switch or a login changes one."""
    home = Path(environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    profiles = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    return [profiles, cwd / "prefect.toml", cwd / "pyproject.toml", cwd / ".env"]


def _ours(name: str) -> bool:
    """The service's own settings: a service started with another idle period still serves the place."""
    return name.startswith("DISPATCH_SERVICE")


def code_fingerprint() -> list[Any]:
    """Size and modification time of every source file of ours and of each directory packages are installed in.

    An edit of ours, or a package installed, upgraded or removed, changes it:
    a service started before runs code that is no longer there.
    """
    root = Path(__file__).resolve().parents[2]
    files = sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))
    ours = [(str(path.relative_to(root)), *_stamp(path)) for path in files]
    return [ours, [_stamp(Path(entry)) for entry in sys.path if Path(entry).name in INSTALL_DIRECTORIES]]


def _stamp(path: Path) -> tuple[int, int]:
    """Size and mtime; (0, 0) for what is not there. A directory's mtime moves when a package is installed in it."""
    try:
        info = path.stat()
    except OSError:
        return (0, 0)
    return (info.st_size, info.st_mtime_ns)


def holds_lock(lock: Path) -> bool:
    """Whether a service holds this lock (lives, or is starting): it lets go when its process ends."""
    try:
        with open(lock, "ab") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            return False
    except OSError:
        return False


def sweep(directory: Path, keep: str, older_than: float = STALE_AFTER) -> None:
    """Remove the locks and logs of services long ended: each place's code or environment change leaves a pair."""
    cutoff = time.time() - older_than
    for lock in directory.glob("*.lock"):
        if lock.stem == keep or holds_lock(lock):
            continue
        for path in (lock, lock.with_suffix(".log")):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def peer_is_us(connection: socket.socket) -> bool:
    """Whether the other end of a Unix socket runs as this user (SO_PEERCRED: Linux; elsewhere the 0700 directory).

    Both ends ask: the service, before it runs what it is sent; the terminal,
    before it sends a hub token to whatever listens at the socket's path.
    """
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return bool(uid == os.getuid())
