"""``dispatch``: run batches of commands, list the tools of MCP servers, run the hub and devices.

The commands live one module each, registered here in the order ``dispatch
--help`` lists them: ``run_command`` (run, resume), ``up_command``,
``serve_command`` (the hub), ``device_command``, ``devices_command``,
``tools_command``, ``credentials_command``. What several share:
``options`` (the option types), ``hub_client`` (reaching a hub),
``terminal`` (stdout, and the ``error:``/``warning:`` lines).

Exit codes: 0 every command succeeded, 1 some command failed (or, for
``tools``, some server is down; for ``devices``, the hub is unreachable),
2 bad usage, a bad batch file or a bad config, 130 interrupted (``run``,
``resume``). With ``--json`` stdout carries exactly the JSON document; logs go
to stderr. Only ``run``, ``resume`` and ``up`` import Prefect: ``device`` and
``serve`` start without it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import os
import sys
from typing import Annotated, NoReturn

import typer

from .credentials_command import credentials_app
from .device_command import device
from .devices_command import devices
from .run_command import resume, run
from .serve_command import serve
from .terminal import say_error, stdout
from .tools_command import tools
from .up_command import up

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no "<bool>" beside flags, nothing read as markup
    help="Run agent commands on MCP servers, here or on remote devices, as Prefect flows.",
)
for command in (run, resume, up, serve, device, devices, tools):
    app.command()(command)
app.add_typer(credentials_app, name="credentials")


def main() -> None:
    """The ``dispatch`` command: usage errors read like every other error, one ``error:`` line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C before a command took over the signal
        code = 130
    except typer.TyperException as error:  # click's errors, as typer vendors them
        message, context = error.format_message(), getattr(error, "ctx", None)
        if context is not None and message == context.get_help():  # a bare `dispatch`: the help, as asked
            sys.stderr.write(message + "\n")
        else:
            say_error(message + (f" (see `{context.command_path} --help`)" if context is not None else ""))
        code = getattr(error, "exit_code", 2)
    exit_at_once(code if isinstance(code, int) else 0)


def exit_at_once(code: int) -> NoReturn:
    """Exit once the exit handlers have run, without tearing the interpreter down.

    Tearing down the modules Prefect loads takes most of a second after the
    last Result is printed, and nothing needs it: stdout and stderr are
    flushed here, and the exit handlers (Prefect's log and event workers
    sending what they hold, the temporary server's stop) run first, as at a
    normal exit.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a stream already closed
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"dispatch {importlib.metadata.version('command-dispatcher')}", highlight=False)
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Run agent commands on MCP servers, here or on remote devices, as Prefect flows."""


if __name__ == "__main__":
    main()
