"""``dispatch up``: the command around ``cli.up``'s stack; one line per step started, Ctrl-C stops all."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from .inert import inert
from .terminal import fail_usage, say_error, say_warning, stderr
from .up import Backing, StackError, running_stack


def up(
    port: Annotated[int, typer.Option(help="Port of the Prefect server", min=1, max=65535)] = 4200,
    pool: Annotated[str, typer.Option(help="Name of the process work pool")] = "dispatch",
    hub_port: Annotated[int, typer.Option(help="Port of the hub", min=1, max=65535)] = 8765,
    no_hub: Annotated[bool, typer.Option("--no-hub", help="Don't start the hub")] = False,
    project: Annotated[Path, typer.Option(help="Folder holding prefect.yaml")] = Path("."),
    database: Annotated[
        str | None,
        typer.Option(
            help="The Prefect server's database: postgresql+asyncpg://USER:PASSWORD@HOST:PORT/NAME "
            "(default: SQLite in PREFECT_HOME). Seen in `ps` by this machine's users: a password is better "
            "kept in PREFECT_SERVER_DATABASE_CONNECTION_URL",
            show_default=False,
        ),
    ] = None,
    results: Annotated[
        str | None,
        typer.Option(
            help="Slug of the storage block the workers store Results in (block-type/name, such as "
            "local-file-system/shared), so that a retry on any worker finds them (default: PREFECT_HOME/storage)",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="How many workers to start", min=1, max=64)] = 1,
    limit: Annotated[
        int | None,
        typer.Option(help="At most this many flow runs at once per worker (default: no limit)", min=1),
    ] = None,
) -> None:
    """Prefect server, process work pool and workers, our deployments, and the hub; Ctrl-C stops all."""
    project = project.resolve()
    if not (project / "prefect.yaml").is_file():
        fail_usage(f"no prefect.yaml in {project}: run this from the repository root, or pass --project")
    try:
        backing = Backing(database=database, results=results, workers=workers, limit=limit)
    except StackError as error:
        fail_usage(str(error))

    def say(message: str) -> None:
        stderr.print(Text.assemble(("\u2713", "green"), " ", inert(message)), highlight=False)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us with it ignored
        signal.signal(signum, interrupt)
    code = 0
    try:
        with running_stack(project, port, pool, None if no_hub else hub_port, say, backing, say_warning) as stack:
            stderr.print(
                f"up: open http://127.0.0.1:{port} (it asks for the contents of .dispatch/prefect-auth); "
                "Ctrl-C stops everything. For prefect and dispatch commands in another shell:\n"
                f"  export PREFECT_API_URL=http://127.0.0.1:{port}/api "
                'PREFECT_API_AUTH_STRING="$(cat .dispatch/prefect-auth)"',
                highlight=False,
                soft_wrap=True,
            )
            while (dead := stack.died()) is None:
                time.sleep(0.5)
            say_error(f"{dead} exited on its own (see .dispatch/logs/{dead}.log)")
            code = 1
    except StackError as error:
        say_error(str(error))
        code = 1
    except KeyboardInterrupt:
        stderr.print("stopped", highlight=False)
    raise typer.Exit(code)
