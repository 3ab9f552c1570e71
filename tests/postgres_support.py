"""A real PostgreSQL server for tests: its own cluster in a temporary folder, on 127.0.0.1, gone afterwards.

The operations tests run Prefect's server on PostgreSQL as an operator with
many workers would. The cluster is made with the installed ``initdb`` and run
with ``pg_ctl`` (Debian's ``postgresql`` package: ``/usr/lib/postgresql/*/bin``,
or whatever is on ``PATH``), never the system's own cluster. PostgreSQL refuses
to run as root, so under root it runs as the ``postgres`` user the package
creates, with a folder that user owns. It listens on a free loopback port
only (no Unix socket), asks for a password over TCP (scram-sha-256), and
skips fsync: a throwaway cluster, quick to set up, that a crash may lose.

Not installed is a failure, with what to install: never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _free_port

#: How long each of initdb, pg_ctl start and pg_ctl stop may take.
STEP_TIMEOUT = 60.0
#: The PostgreSQL role and database the tests get.
ROLE, DATABASE = "dispatch", "prefect"
INSTALL_HINT = (
    "PostgreSQL is needed by the operations tests and was not found: install Debian's package "
    "(apt-get install --no-install-recommends postgresql; .ci/run does it), or put initdb and pg_ctl on PATH"
)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    password: str
    log: Path

    @property
    def url(self) -> str:
        """What Prefect's server takes as its database (``PREFECT_SERVER_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://{ROLE}:{self.password}@{self.host}:{self.port}/{DATABASE}"

    def fetch(self, query: str) -> list[tuple[object, ...]]:
        """The rows of ``query``, asked of the database directly (not through Prefect)."""
        import asyncpg

        async def ask() -> list[tuple[object, ...]]:
            connection = await asyncpg.connect(
                host=self.host, port=self.port, user=ROLE, password=self.password, database=DATABASE, timeout=10
            )
            try:
                return [tuple(row) for row in await connection.fetch(query, timeout=30)]
            finally:
                await connection.close(timeout=10)

        return asyncio.run(ask())


def postgres_bin() -> Path:
    """The folder of the installed ``initdb`` and ``pg_ctl``: on PATH, else the newest of Debian's."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if not debian:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return debian[-1].parent


def run_as() -> tuple[list[str], int | None]:
    """The prefix that runs a command as the cluster's owner, and that owner's uid if it is not us."""
    if os.geteuid() != 0:
        return [], None
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"running as root, and there is no 'postgres' user to run PostgreSQL as. {INSTALL_HINT}")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running as root, and there is no runuser to run PostgreSQL as the 'postgres' user")
    return [runuser, "-u", "postgres", "--"], owner.pw_uid


def step(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(f"PostgreSQL: {what} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server with an empty database ``prefect`` owned by the role ``dispatch``; removed afterwards.

    The folder is under /tmp, not pytest's: pytest's folders are private to
    the user running the tests, and under root the server runs as another.
    """
    bin_dir = postgres_bin()
    prefix, owner = run_as()
    folder = Path(tempfile.mkdtemp(prefix="dispatch-pg-", dir="/tmp"))
    data, log, password_file = folder / "data", folder / "server.log", folder / "password"
    password = secrets.token_urlsafe(24)
    password_file.write_text(password + "\n")
    if owner is not None:
        for path in (folder, password_file):
            os.chown(path, owner, -1)
    started = False
    try:
        step(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                ROLE,
                "--pwfile",
                str(password_file),
                "--auth-host",
                "scram-sha-256",
                "--auth-local",
                "peer",
                "--encoding",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        password_file.unlink()
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
        options += " -c synchronous_commit=off -c full_page_writes=off"
        # The log goes to a file the server's user may write: the folder it owns.
        start = [*prefix, str(bin_dir / "pg_ctl"), "start", "--pgdata", str(data), "--log", str(log)]
        step([*start, "--wait", "--timeout", str(int(STEP_TIMEOUT)), "-o", options], "pg_ctl start")
        started = True
        server = Postgres("127.0.0.1", port, password, log)
        create_database(server)
        yield server
    finally:
        if started:
            stop = [*prefix, str(bin_dir / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "immediate"]
            step([*stop, "--wait", "--timeout", str(int(STEP_TIMEOUT))], "pg_ctl stop")
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: Postgres) -> None:
    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(
            host=server.host, port=server.port, user=ROLE, password=server.password, database="postgres", timeout=10
        )
        try:
            await connection.execute(f"CREATE DATABASE {DATABASE}", timeout=30)
        finally:
            await connection.close(timeout=10)

    asyncio.run(create())
