"""What the commands print besides their output: stdout for results alone, one-line errors and warnings on stderr.

Every message may quote a batch file, a device or a hub, so it is printed
``inert``: markup and escape sequences in it show as text.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from .inert import inert

stdout = Console()
stderr = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width of a pipe


def say_error(message: str) -> None:
    """One line on stderr; ``message`` may quote a batch file or a device, so it is printed inert."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", inert(message)), highlight=False, soft_wrap=True)


def say_warning(message: str) -> None:
    stderr.print(Text.assemble(("warning:", "bold yellow"), " ", inert(message)), highlight=False)


def fail_usage(message: str) -> NoReturn:
    """Bad usage, a bad batch file or config: the ``error:`` line, and exit code 2, before anything runs."""
    say_error(message)
    raise typer.Exit(2)
