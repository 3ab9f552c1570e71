"""The hub's credentials on disk: read, written atomically with mode 0600, and watched for changes.

``dispatch credentials`` edits the file; a running hub notices the change
within a second (``CredentialFile.refresh``) and closes the connections whose
credential was revoked, so revoking needs no restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .credentials import CredentialError, CredentialStore

__all__ = ["DEFAULT_PATH", "CredentialFile", "editing", "read_store", "write_store"]

#: Where ``dispatch serve``, ``dispatch up`` and ``dispatch credentials`` look by default.
DEFAULT_PATH = Path(".dispatch") / "credentials.json"


def read_store(path: Path) -> CredentialStore:
    """The credentials in ``path`` (an empty store when the file does not exist yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CredentialStore()
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialError(f"{path}: can't read it: {error}") from None
    try:
        return CredentialStore.loads(text)
    except CredentialError as error:
        raise CredentialError(f"{path}: {error}") from None


def write_store(path: Path, store: CredentialStore) -> None:
    """Replace ``path`` with ``store`` in one step (a hub reading it never sees half a file), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)  # created 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(store.dumps())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def editing(path: Path) -> Iterator[CredentialStore]:
    """The store in ``path``, written back when the block ends without error.

    Two ``dispatch credentials`` at once take turns (a lock beside the file),
    so neither loses the other's change.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = read_store(path)
        yield store
        write_store(path, store)


class CredentialFile:
    """A credentials file and the store last read from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._current_stamp()
        self.store = read_store(path)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def refresh(self) -> bool:
        """Read the file again if it changed since; True if the store changed.

        A file that is gone, empty, unreadable or malformed keeps the last
        good store (and raises, for the caller to log): an editor's truncate
        or a typo must not lock everyone out, nor let anyone in.
        """
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        if stamp is None or stamp[2] == 0:
            raise CredentialError(f"{self.path} is gone or empty")
        self.store = read_store(self.path)
        return True
