"""The temporary Prefect API of a ``dispatch run`` without ``PREFECT_API_URL``, shielded from Ctrl-C.

Prefect starts its temporary server as a child in the terminal's process
group, so the Ctrl-C meant for the batch kills the server first and the
flow run can no longer record how it ended (it stays Running, and every
later API call retries for a minute). This starts the same server
(``SubprocessASGIServer``, the instance Prefect's clients and background
threads look up) in a session of its own: it outlives the Ctrl-C, records
the end, and is stopped by us on the way out without waiting for it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer


def _shielded_server() -> SubprocessASGIServer:
    """Prefect's temporary server, started in a new session (the only change: ``start_new_session``).

    Its module imports Prefect's whole server (seconds): only a run that
    needs the temporary server pays for it, not one with ``PREFECT_API_URL``.
    """
    from prefect.server.api.server import SubprocessASGIServer

    class ShieldedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            return _uvicorn_in_a_session_of_its_own(self.port)

    return ShieldedServer()


def _uvicorn_in_a_session_of_its_own(port: int | None) -> subprocess.Popen[Any]:
    import prefect

    environment = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(prefect.__file__).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # stdout carries nothing but the Results
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def _die_with_parent() -> None:
    """In the child, Linux only: SIGTERM when we die, however we die (kill -9, out of memory).

    Out of our session, nothing else would stop it: it would keep its port
    and the database.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


#: prctl(2) option: the signal a child gets when its parent thread ends.
PR_SET_PDEATHSIG = 1


def needed() -> bool:
    """Whether runs here would use a temporary server: no API configured, temporary servers allowed."""
    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


def start() -> None:
    """Start the temporary server now (6-10 s), as the one Prefect's clients will use."""
    server = _shielded_server()
    server.start()
    atexit.register(_stop_without_waiting, server)  # runs before Prefect's own stop, which would wait


def stop_now() -> None:
    """The second Ctrl-C: the server goes too, nothing waits."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    if server is not None:
        _stop_without_waiting(server)


def _stop_without_waiting(server: SubprocessASGIServer) -> None:
    """SIGTERM and go: the run's end is recorded by now, the server finishes on its own."""
    if server.server_process is not None:
        server.server_process.terminate()
        server.server_process = None
