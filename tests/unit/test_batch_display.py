"""What a batch looks like in the terminal (``cli.batch_display``): the results table and the plain progress lines.

Rendered in this process with a recording ``rich`` console; what ``dispatch``
itself prints is in ``tests/system/test_cli_terminal.py``.
"""

from __future__ import annotations

import re

from rich.console import Console

from aip.messages import Command, Result, ResultStatus
from cli.batch_display import BatchDisplay, results_table
from dispatchers import error_result
from tasks import CommandReport

#: An escape sequence or any other control character a terminal would act on.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# -- the table ------------------------------------------------------------------------------------------------------


def rendered(width: int, commands: list[Command], results: list[Result], reports: list[CommandReport | None]) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(results_table(commands, results, reports))
    return console.export_text()


def test_the_table_fits_80_columns_and_shows_a_hostile_cause_literally() -> None:
    commands = [Command(tool_name="add", call_id="first"), Command(tool_name="fail", call_id="x" * 36)]
    cause = "ToolError: line one\nline [bold]two[/] \x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\ " + "z" * 300
    results = [
        Result(
            status=ResultStatus.SUCCESS, result={"result": 3.0, "long": "y" * 200}, namespace="demo", call_id="first"
        ),
        error_result(commands[1], cause).model_copy(update={"namespace": "demo"}),
    ]
    reports: list[CommandReport | None] = [CommandReport("first", 1, 0.5), CommandReport("x", 3, 12.25)]

    text = rendered(80, commands, results, reports)

    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert not CONTROL.search(text.replace("\n", "")), "a control character reached the terminal"
    assert "\\x1b]8;;http://evil" in text  # written out, never obeyed
    flat = "".join(text.split())
    assert "ToolError:lineoneline[bold]two[/]" in flat
    assert "Erroroccurred" not in flat  # the cause alone
    assert "z" * 250 in flat  # a cause is shown whole (up to its limit), folded over lines
    header = text.splitlines()[1]
    assert header.split() == ["call_id", "tool", "server", "status", "tries", "secs", "result", "/", "cause"]
    row = next(line for line in text.splitlines() if line.startswith("xxxxxxxx"))
    assert row.split()[:6] == ["xxxxxxxx", "fail", "demo", "failure", "3", "12.25"]
    assert text.splitlines()[0].startswith("2 results: 1 succeeded, 1 failed")


def test_the_plain_progress_lines_name_each_command_once_with_its_cause() -> None:
    console = Console(width=80, record=True, force_terminal=False, color_system=None)
    display = BatchDisplay(console, live=False)
    commands = [Command(tool_name="add", call_id="a"), Command(tool_name="fail", call_id="b")]
    display.batch_started("0b7e6f5e-0000-4000-8000-000000000000", "batch-2-commands-0b7e6f5e", commands)
    display.command_started(0)
    display.command_finished(0, Result(status=ResultStatus.SUCCESS, result=1, call_id="a"), CommandReport("a", 1, 0.25))
    display.command_finished(1, error_result(commands[1], "ToolError: [red]no[/]\nreally"), None)
    display.batch_finished([], [CommandReport("a", 1, 0.25), None])

    assert console.export_text().splitlines() == [
        "flow run batch-2-commands-0b7e6f5e 0b7e6f5e-0000-4000-8000-000000000000",
        "1/2 add[a] success 0.25s",
        "2/2 fail[b] failure 0.00s ToolError: [red]no[/] really",
    ]
