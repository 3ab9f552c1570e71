"""``dispatch up``: the command around ``cli.up``'s stack; one line per step started, Ctrl-C stops all."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from .inert import inert
from .terminal import fail_usage, say_error, stderr
from .up import StackError, running_stack


def up(
    port: Annotated[int, typer.Option(help="Port of the Prefect server", min=1, max=65535)] = 4200,
    pool: Annotated[str, typer.Option(help="Name of the process work pool")] = "dispatch",
    hub_port: Annotated[int, typer.Option(help="Port of the hub", min=1, max=65535)] = 8765,
    no_hub: Annotated[bool, typer.Option("--no-hub", help="Don't start the hub")] = False,
    project: Annotated[Path, typer.Option(help="Folder holding prefect.yaml")] = Path("."),
) -> None:
    """Prefect server, process work pool and worker, our deployments, and the hub; Ctrl-C stops all."""
    project = project.resolve()
    if not (project / "prefect.yaml").is_file():
        fail_usage(f"no prefect.yaml in {project}: run this from the repository root, or pass --project")

    def say(message: str) -> None:
        stderr.print(Text.assemble(("\u2713", "green"), " ", inert(message)), highlight=False)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us with it ignored
        signal.signal(signum, interrupt)
    code = 0
    try:
        with running_stack(project, port, pool, None if no_hub else hub_port, say) as stack:
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
