"""``dispatch up``: the whole local stack in one command, stopped cleanly with Ctrl-C.

Each step is a plain Prefect (or dispatch) command run as a child process,
the same ones the README lists for people who run Prefect their own way:

1. ``prefect server start`` on 127.0.0.1 (SQLite, or the database given), awaited until healthy;
2. ``prefect work-pool create <pool> --type process`` (kept if it exists);
3. ``prefect --no-prompt deploy --all`` from the folder holding prefect.yaml;
4. ``prefect worker start --pool <pool>``, once per worker asked for;
5. ``dispatch serve``, the hub for remote devices.

The database's URL (``--database``, or Prefect's own setting in the
environment) reaches the server alone, and its password no message: workers,
flow runs and the hub talk to the API, never to the database. A results
storage block (``--results``) is named to the workers, so that a run retried on
any of them finds the Results its first attempt stored.

Closed by default: the work pool's job template lets a flow run override
nothing but its name and labels (no command, environment or working
directory of its choosing), the Prefect API requires the basic-auth secret kept in
``.dispatch/prefect-auth`` (made on first start, mode 0600, handed to every
child), allows cross-origin requests only from its own dashboard, and checks
the Host header (``cli.prefect_server``: a browser page can't reach it by DNS
rebinding). The worker reaches the hub with a controller credential of its
own (``.dispatch/worker.token``); devices get theirs from ``dispatch
credentials add-device``, in the same ``.dispatch/credentials.json``.

Every child runs in its own process group, so stopping it stops whatever it
started; a child that ignores SIGTERM is killed after a grace period.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aip.credential_file import DEFAULT_PATH, editing
from aip.credentials import Role

#: The controller credential ``dispatch up`` issues for its worker.
WORKER_CONTROLLER = "dispatch-up-worker"

#: Server-side settings from ``prefect-notes.md``: batch the recorders' writes
#: (a tenth of the server's CPU per task run, no "database is locked" under load).
SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    # A whole number: Prefect 3.9.1 truncates it to int, and 0 makes the recorder a busy loop.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5",
}
#: Seconds a child gets to stop after SIGTERM before it is killed.
STOP_GRACE = 10.0
#: The databases Prefect's server can use: it needs an async driver.
DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")
#: How Prefect 3.9's settings of the server's database begin (its URL, and the pieces a URL may leave to them:
#: host, user, password, ...), under their own names and the older aliases. The server's alone.
DATABASE_SETTINGS = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")
#: The database URL's setting, and the alias Prefect reads only when that one is unset.
DATABASE_URL, DATABASE_URL_ALIAS = "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"
#: The default results storage block of Prefect 3.9 (``block-type/name``), and its older alias.
RESULTS_BLOCK, RESULTS_BLOCK_ALIAS = "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK"
#: A block's slug as Prefect names them: lowercase letters, digits and dashes on either side.
BLOCK_SLUG = re.compile(r"[a-z0-9-]+/[a-z0-9-]+")


class StackError(RuntimeError):
    """A step of ``dispatch up`` failed; the message says which and why."""


@dataclass(frozen=True)
class Backing:
    """What the stack runs on, beyond this machine's defaults (SQLite, one worker, results in ``PREFECT_HOME``).

    ``database``: the server's database URL; ``results``: the slug of the
    storage block every worker stores Results in; ``workers``: how many
    ``prefect worker start`` to run; ``limit``: at most that many flow runs
    at once per worker (Prefect's ``--limit``; None: no limit).
    """

    database: str | None = None
    results: str | None = None
    workers: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.database is not None:
            checked_database(self.database)
        if self.results is not None and not BLOCK_SLUG.fullmatch(self.results):
            raise StackError(
                "--results takes a storage block's slug, block-type/name in lowercase letters, digits and dashes "
                "(such as local-file-system/shared)"
            )
        if self.workers < 1 or (self.limit is not None and self.limit < 1):
            raise StackError("--workers and --limit take a whole number of at least 1")


def masked(url: str) -> str:
    """``url`` with its password, if it has one, as ``***``: what a message or a log may show of it.

    In the user part (``user:password@host``) or the query (``?password=...``);
    a URL that does not parse shows its scheme alone.
    """
    if "://" not in url:  # not a URL: perhaps a password given by mistake
        return "***"
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # such as an IPv6 host without its closing bracket
        return url.split("://", 1)[0] + "://***"
    hidden = parts
    if password:
        user, _, host = parts.netloc.rpartition("@")
        hidden = hidden._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    if "password" in parts.query.lower():
        hidden = hidden._replace(query="***")
    return url if hidden == parts else hidden.geturl()


def checked_database(url: str) -> str:
    """``url`` if it names a database Prefect's server can use; a ``StackError`` (the URL masked) if not."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in DATABASE_SCHEMES or any(character.isspace() for character in url):
        raise StackError(
            f"--database {masked(url)}: not a database URL Prefect's server can use; it takes "
            + " or ".join(f"{name}://..." for name in DATABASE_SCHEMES)
        )
    return url


@dataclass
class Stack:
    """The children started so far, stopped in reverse order."""

    log_dir: Path
    say: Callable[[str], None]
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.children.append((name, process))
        return process

    def died(self) -> str | None:
        """The name of a child that exited on its own, if any."""
        return next((name for name, process in self.children if process.poll() is not None), None)

    def stop(self, before_server: Callable[[], None] | None = None) -> None:
        """Stop every child: the worker and hub first, then ``before_server()``, then the server.

        Ctrl-C and SIGTERM are ignored meanwhile: a second one must not leave
        half the stack running.
        """
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            servers = [child for child in self.children if child[0] == "server"]
            _stop_groups([child for child in reversed(self.children) if child not in servers], self.say)
            if before_server is not None and any(process.poll() is None for _, process in servers):
                try:
                    before_server()
                except Exception as error:  # the server may be gone already; nothing more to tidy then
                    self.say(f"could not tidy up the runs left behind: {error}")
            _stop_groups(servers, self.say)
            self.children.clear()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _stop_groups(children: Sequence[tuple[str, subprocess.Popen[bytes]]], say: Callable[[str], None]) -> None:
    """SIGTERM each child's process group, SIGKILL what is still there after the grace, and reap them."""
    for _, process in children:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for name, process in children:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        # Whatever is left of the group (the leader, or children it started) goes now.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        say(f"stopped {name}")


def crash_unfinished_runs(api_url: str, auth: str, pool: str) -> int:
    """Mark Crashed the runs of ``pool`` that the stopped worker left unfinished.

    Nothing else would: they would show Running for ever and keep holding
    their deployment's concurrency slot, so a deployment with a limit (the
    scheduled example) would never run again.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    unfinished = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
    settings = {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message="dispatch up stopped its worker while it ran"))
    return len(runs)


def locked_job_template() -> dict[str, Any]:
    """Prefect's process pool template with nothing a flow run may override but its name and labels.

    A stock process pool lets whoever creates a run set its ``command``,
    ``env`` and ``working_dir``: a program to start, a ``$DISPATCH_HUB`` to
    send the worker's credential to, a folder whose mcp.json to trust. Here
    they are fixed: the engine under the worker's interpreter, the worker's
    environment and folder.
    """
    from prefect.workers.process import ProcessWorker

    from flows.deploy_steps import engine_command

    template = ProcessWorker.get_default_base_job_template()
    for name in ("command", "env", "working_dir"):
        # Absent, not fixed: Prefect merges a run's env into a fixed one; an absent key keeps its default
        # (the worker's environment, the folder prefect.yaml's pull step chooses); the command is set below.
        template["job_configuration"].pop(name, None)
        template["variables"]["properties"].pop(name, None)
    # Fixed as a value, not a variable: the engine at once, without the workspace supervisor Prefect starts
    # otherwise (a second interpreter importing Prefect per run; see flows.deploy_steps).
    template["job_configuration"]["command"] = engine_command()["command"]
    template["job_configuration"]["stream_output"] = True
    return template


def run_step(argv: Sequence[str], env: dict[str, str], cwd: Path, what: str, timeout: float = 180) -> None:
    done = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise StackError(f"{what} failed ({' '.join(argv[:3])} ...):\n" + "\n".join(tail))


def wait_healthy(api_url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise StackError("the Prefect server exited at start (see its log)")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise StackError(f"the Prefect server was not healthy within {timeout:g}s")


def port_is_free(port: int) -> bool:
    """Whether a server of the stack could listen on 127.0.0.1:``port`` now.

    Probed the way they bind: uvicorn and asyncio's ``create_server`` set
    SO_REUSEADDR on Unix, so the TIME-WAIT sockets a stack just stopped leaves
    behind for a minute don't hold the port for them (a plain bind would say
    it is taken), while a live listener still does.
    """
    with socket.socket() as probe:
        if os.name == "posix" and sys.platform != "cygwin":  # as asyncio decides: on Windows it means another thing
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; a ``StackError`` if ``process`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{what} exited at start (is port {port} taken? see its log)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise StackError(f"{what} was not listening on port {port} within {timeout:g}s")


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in ``path``, made with ``make()`` and written there (mode 0600, never wider) if there is none."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(make() + "\n")
    os.chmod(path, 0o600)
    return path.read_text(encoding="utf-8").strip()


def prefect_auth(project: Path) -> str:
    """The Prefect API's basic-auth string (``user:secret``), kept in ``.dispatch/prefect-auth``."""
    return kept_secret(project / ".dispatch" / "prefect-auth", lambda: f"dispatch:{secrets.token_urlsafe(32)}")


def worker_credential(project: Path) -> str:
    """The worker's controller token for the hub, issued into the project's credentials file once.

    Kept in ``.dispatch/worker.token``; issued again if the file or the credential was removed.
    """
    token_path = project / ".dispatch" / "worker.token"
    with editing(project / DEFAULT_PATH) as store:
        kept = token_path.read_text().strip() if token_path.exists() else ""
        identity = store.identify(kept) if kept else None
        if identity is not None and identity.name == WORKER_CONTROLLER:
            return kept
        token_path.unlink(missing_ok=True)
        token = store.issue(Role.CONTROLLER, WORKER_CONTROLLER, replace_old=True)
        kept_secret(token_path, lambda: token)
        return token


def analytics_off(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings that keep Prefect from tracking, or from saying it tracks, unless the user asked for tracking.

    Both are needed: ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` silences the
    server only, while the notice Prefect prints at its first import in a
    terminal ("Prefect collects anonymous usage data ...") checks
    ``DO_NOT_TRACK`` alone. An empty value counts as unset.
    """
    return {
        "DO_NOT_TRACK": environ.get("DO_NOT_TRACK") or "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": environ.get("PREFECT_SERVER_ANALYTICS_ENABLED") or "false",
    }


def quiet_prefect_defaults() -> None:
    """No telemetry from this process, nor the notice about it, unless the user asked for it (``analytics_off``).

    Written to this process's own environment, which is where Prefect looks
    for them (``DO_NOT_TRACK`` nowhere else); call it before Prefect is imported.
    """
    os.environ.update(analytics_off(os.environ))


def child_environment(environ: Mapping[str, str], project: Path, port: int, auth: str) -> dict[str, str]:
    """What every child of the stack but the server runs with: ``environ`` and the stack's settings.

    The user's tuning is kept; the database's settings are not (``server_environment``).
    """
    api_url = f"http://127.0.0.1:{port}/api"
    dashboard = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    return {
        **{name: value for name, value in environ.items() if not name.startswith(DATABASE_SETTINGS)},
        "PWD": str(project),  # prefect.yaml's {{ $PWD }}: where the worker runs flows from
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_API_AUTH_STRING": auth,
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": ",".join(dashboard),
        **analytics_off(environ),
        "PREFECT_WORKER_QUERY_SECONDS": environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        **{name: environ.get(name, value) for name, value in SERVER_TUNING.items()},
    }


def server_environment(environ: Mapping[str, str], children: Mapping[str, str], database: str | None) -> dict[str, str]:
    """The server's environment: the other children's, the database's settings of ``environ``, and ``database``.

    Given, ``database`` is set under the setting's own name, which Prefect reads
    before the alias: a URL left in the user's environment can't override it.
    """
    env = {**children, **{name: value for name, value in environ.items() if name.startswith(DATABASE_SETTINGS)}}
    if database is not None:
        env[DATABASE_URL] = database
    return env


def worker_environment(children: Mapping[str, str], results: str | None) -> dict[str, str]:
    """A worker's environment (and so its flow runs'): the children's, with the results block if one is named."""
    if results is None:
        return dict(children)
    env = {name: value for name, value in children.items() if name != RESULTS_BLOCK_ALIAS}
    return env | {RESULTS_BLOCK: results}


def server_database(environ: Mapping[str, str], database: str | None) -> str | None:
    """The server's database URL, masked, if it was given here or in the environment (None: Prefect's SQLite)."""
    given = database or environ.get(DATABASE_URL) or environ.get(DATABASE_URL_ALIAS)
    return masked(given) if given else None


def block_exists(api_url: str, auth: str, slug: str) -> bool:
    """Whether the server has the block ``slug``: runs that can't find their storage fail, so the operator is told."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    block_type, name = slug.split("/", 1)
    settings = {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        try:
            client.read_block_document_by_name(name, block_type, include_secrets=False)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def running_stack(
    project: Path,
    port: int,
    pool: str,
    hub_port: int | None,
    say: Callable[[str], None],
    backing: Backing = Backing(),
    warn: Callable[[str], None] | None = None,
) -> Iterator[Stack]:
    """Start everything; yield the stack; stop everything, whatever happens.

    This process is quieted too, first: it imports Prefect itself (the job
    template, the tidy-up on stop) with the user's terminal as its stderr,
    which is where Prefect's notice would appear.
    """
    quiet_prefect_defaults()
    bin_dir = Path(sys.executable).parent
    prefect = str(bin_dir / "prefect") if (bin_dir / "prefect").exists() else "prefect"
    api_url = f"http://127.0.0.1:{port}/api"
    log_dir = project / ".dispatch" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    auth = prefect_auth(project)
    env = child_environment(os.environ, project, port, auth)
    for what, taken in (("Prefect server", port), ("hub", hub_port)):
        if taken is not None and not port_is_free(taken):
            raise StackError(f"port {taken} (for the {what}) is in use: is another stack up? pick another port")
    stack = Stack(log_dir, say)
    try:
        started = time.monotonic()
        server_command = [sys.executable, "-m", "cli.prefect_server", "--host", "127.0.0.1", "--port", str(port)]
        server_env = server_environment(os.environ, env, backing.database)
        server = stack.start("server", server_command, server_env, project)
        database = server_database(os.environ, backing.database)
        try:
            wait_healthy(api_url, server, timeout=120)
        except StackError as error:
            raise StackError(f"{error}; its database: {database}" if database else str(error)) from None
        on = f"{database}, " if database else ""
        say(f"Prefect server at http://127.0.0.1:{port} ({on}{time.monotonic() - started:.1f} s)")
        template = project / ".dispatch" / "job-template.json"
        template.write_text(json.dumps(locked_job_template(), indent=2))
        create_pool = [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"]
        run_step(
            [*create_pool, "--base-job-template", str(template)],
            env,
            project,
            "creating the work pool",
        )
        say(f"work pool {pool!r} (process)")
        run_step([prefect, "--no-prompt", "deploy", "--all"], env, project, "deploying prefect.yaml")
        say("deployments from prefect.yaml")
        if hub_port is not None:
            env["DISPATCH_TOKEN"] = worker_credential(project)  # the worker's: no other process gets it
            env["DISPATCH_HUB"] = f"ws://127.0.0.1:{hub_port}"
            dispatch = [sys.executable, "-m", "cli.main"]
            hub_command = [*dispatch, "serve", "--port", str(hub_port), "--credentials", str(project / DEFAULT_PATH)]
            hub = stack.start("hub", hub_command, env, project)
            wait_listening(hub_port, hub, "the hub", timeout=30)
            say(f"hub at ws://127.0.0.1:{hub_port} (credentials: {project / DEFAULT_PATH})")
        if backing.results is not None and not block_exists(api_url, auth, backing.results):
            (warn or say)(
                f"no results storage block {backing.results!r} on this server yet: "
                "the workers' runs can't store their Results until it is made"
            )
        worker_env = worker_environment(env, backing.results)
        limit = [] if backing.limit is None else ["--limit", str(backing.limit)]
        for number in range(1, backing.workers + 1):
            # Named in the dashboard (and in their events) by pool and number; logged as worker.log if alone.
            worker = [prefect, "worker", "start", "--pool", pool, "--name", f"{pool}-worker-{number}", *limit]
            stack.start("worker" if backing.workers == 1 else f"worker-{number}", worker, worker_env, project)
        workers = "worker" if backing.workers == 1 else f"{backing.workers} workers"
        results = f", Results in {backing.results}" if backing.results else ""
        say(f"{workers} on pool {pool!r}{results}; logs in {log_dir}")
        yield stack
    finally:

        def tidy_up() -> None:
            if crashed := crash_unfinished_runs(api_url, auth, pool):
                say(f"marked {crashed} unfinished flow runs Crashed")

        stack.stop(before_server=tidy_up)
