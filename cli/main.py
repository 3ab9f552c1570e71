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
import importlib
import importlib.metadata
import os
import sys
from typing import Annotated, Any, NoReturn

import typer

from .terminal import say_error, stdout

#: Each command, in the order ``dispatch --help`` lists them: its module and the function or sub-app there.
COMMANDS = {
    "run": ("run_command", "run"),
    "resume": ("run_command", "resume"),
    "up": ("up_command", "up"),
    "serve": ("serve_command", "serve"),
    "device": ("device_command", "device"),
    "devices": ("devices_command", "devices"),
    "tools": ("tools_command", "tools"),
    "service": ("service_command", "service_app"),
    "credentials": ("credentials_command", "credentials_app"),
}


def build_app(only: str | None = None) -> typer.Typer:
    """The command line, with every command or ``only`` one: a run imports none of the others' modules.

    ``dispatch run`` would otherwise pay for importing what ``device`` and
    ``serve`` need (MCP, the device client) before it sends its batch.
    """
    built = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        rich_markup_mode=None,  # plain help: no "<bool>" beside flags, nothing read as markup
        help="Run agent commands on MCP servers, here or on remote devices, as Prefect flows.",
    )
    built.callback()(global_options)
    for name, (module, attribute) in COMMANDS.items():
        if only is not None and name != only:
            continue
        target = getattr(importlib.import_module(f".{module}", __package__), attribute)
        if isinstance(target, typer.Typer):
            built.add_typer(target, name=name)
        else:
            built.command()(target)
    return built


def __getattr__(name: str) -> Any:
    """``app``: every command (tests and ``python -m cli.main`` use it; ``main`` builds only what it runs)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()["app"] = build_app()
    return value


def main() -> None:
    """The ``dispatch`` command: usage errors read like every other error, one ``error:`` line, exit 2."""
    try:
        asked = sys.argv[1] if len(sys.argv) > 1 else None
        code = build_app(asked if asked in COMMANDS else None)(standalone_mode=False)
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


def global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Run agent commands on MCP servers, here or on remote devices, as Prefect flows."""


if __name__ == "__main__":
    main()
