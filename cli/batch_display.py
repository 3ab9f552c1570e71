"""What ``dispatch run`` shows on stderr while a batch runs, and the table of Results after.

On a terminal, a live display (commands done of total, failures so far, the
running ones with their elapsed time) with each failure printed above it as
it happens; elsewhere (a pipe, a CI log), one plain line per finished
command. stdout carries nothing but the Results. Everything shown that came
from outside (tool names, call_ids, causes) goes through ``inert``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aip.messages import Command, Result, ResultStatus
from dispatchers import not_done_cause, plural, short_id
from tasks import CommandReport

from .inert import inert

#: Characters of a cause or result shown in a cell; the Result itself keeps all of it.
CELL_LIMIT = 400
#: Running commands listed by name in the live display.
RUNNING_SHOWN = 5

OUTCOME_WORDS = {ResultStatus.SUCCESS: "succeeded", ResultStatus.FAILURE: "failed", ResultStatus.SKIPPED: "skipped"}
STATUS_STYLES = {ResultStatus.SUCCESS: "green", ResultStatus.FAILURE: "red", ResultStatus.SKIPPED: "yellow"}


def one_line(value: object, limit: int = CELL_LIMIT) -> str:
    """``value`` as text on one line (whitespace runs made one space), cut at ``limit`` characters."""
    text = " ".join((value if isinstance(value, str) else json.dumps(value, default=str)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_outcome(command: Command, result: Result) -> str:
    """A success's result, or the cause alone of a failure (the Result keeps UFO's full text)."""
    return one_line(result.result if result.status is ResultStatus.SUCCESS else not_done_cause(command, result))


def attempts_text(result: Result, report: CommandReport | None) -> str:
    if report is not None and report.reused:
        return "reused"
    attempts = result.attempts or (report.attempts if report else 0)
    return str(attempts) if attempts else "-"


def label(command: Command) -> Text:
    return inert(f"{command.tool_name}[{short_id(command.call_id)}]")


class BatchDisplay:
    """A ``flows.watching.BatchWatcher`` for the terminal; keeps the reports the results table shows."""

    def __init__(
        self,
        console: Console,
        *,
        live: bool,
        dashboard: str | None = None,
    ) -> None:
        self.console = console
        #: Called once the flow run exists (from inside it).
        self.on_started: Callable[[], None] | None = None
        self.live = live
        #: The dashboard's base URL when a server with a UI records the runs.
        self.dashboard = dashboard
        self.flow_run_id: str | None = None
        self.commands: list[Command] = []
        self.reports: list[CommandReport | None] = []
        self.done = 0
        self.failed = 0
        self._running: dict[int, float] = {}
        self._live: Live | None = None

    # --- BatchWatcher ---------------------------------------------------------------------------------------------

    def batch_started(self, flow_run_id: str, flow_run_name: str, commands: Sequence[Command]) -> None:
        self.flow_run_id = flow_run_id
        self.commands = list(commands)
        self.reports = [None] * len(commands)
        line = Text.assemble("flow run ", inert(flow_run_name), " ", (flow_run_id, "bold"))
        if self.dashboard:
            line.append_text(Text.assemble(" · ", inert(f"{self.dashboard}/runs/flow-run/{flow_run_id}")))
        self.console.print(line, highlight=False, soft_wrap=True)
        if self.on_started is not None:
            self.on_started()
        if self.live:
            self._live = Live(console=self.console, refresh_per_second=4, transient=True, get_renderable=self._status)
            self._live.start()

    def command_started(self, index: int) -> None:
        self._running[index] = time.monotonic()

    def command_finished(self, index: int, result: Result, report: CommandReport | None) -> None:
        started = self._running.pop(index, None)
        self.reports[index] = report
        self.done += 1
        self.failed += result.status is ResultStatus.FAILURE
        if self.live and result.status is ResultStatus.SUCCESS:
            return  # the live counts say it; failures stay on screen, above the display
        command = self.commands[index]
        seconds = report.seconds if report else (time.monotonic() - started if started else 0.0)
        self.console.print(
            Text.assemble(
                f"{self.done}/{len(self.commands)} ",
                label(command),
                " ",
                inert(result.status.value, STATUS_STYLES.get(result.status, "")),
                f" {seconds:.2f}s",
                *((" ", inert(shown_outcome(command, result))) if result.status is not ResultStatus.SUCCESS else ()),
            ),
            highlight=False,
            soft_wrap=True,
        )

    def batch_finished(self, results: Sequence[Result], reports: Sequence[CommandReport | None]) -> None:
        self.reports = list(reports)
        self.close()

    # ---------------------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """The live display goes (its last lines would only repeat the table)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _status(self) -> RenderableType:
        now = time.monotonic()
        counts = Text.assemble(
            f"{self.done}/{len(self.commands)} done",
            (f" · {self.failed} failed", "red") if self.failed else "",
            f" · {len(self._running)} running" if self._running else "",
        )
        running = sorted(self._running.items(), key=lambda item: item[1])
        lines = [
            Text.assemble("  ", label(self.commands[index]), f" {now - since:.1f}s")
            for index, since in running[:RUNNING_SHOWN]
        ]
        if len(running) > RUNNING_SHOWN:
            lines.append(Text(f"  and {len(running) - RUNNING_SHOWN} more"))
        return Group(counts, *lines)


#: Prefect's lines that the display already shows, as a status or the table.
REPEATED = ("Finished in state", "Beginning flow run", "Created task run", "Executing")


def shown_in_terminal(record: logging.LogRecord) -> bool:
    """Whether a log line belongs on the terminal: not one the display already shows."""
    ours = record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
    return not (ours and str(record.msg).startswith(REPEATED))


class ConsoleLogHandler(logging.Handler):
    """Warnings on the display's console (above a live display, never through it), each line inert."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return shown_in_terminal(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:  # continuation lines indented: a tool's stderr quoted in a warning can't pass for our own lines
            self.console.print(inert(self.format(record).replace("\n", "\n    ")), highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def results_table(
    commands: Sequence[Command], results: Sequence[Result], reports: Sequence[CommandReport | None]
) -> Table:
    """One row per command: call_id, tool, server, status, attempts, seconds, and the result or the cause."""
    counts = [
        f"{sum(result.status is status for result in results)} {OUTCOME_WORDS[status]}"
        for status in ResultStatus
        if any(result.status is status for result in results)
    ]
    table = Table(
        title=f"{plural(len(results), 'result')}: {', '.join(counts)}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("call_id", no_wrap=True)
    table.add_column("tool", no_wrap=True, overflow="ellipsis", max_width=16)
    table.add_column("server", no_wrap=True, overflow="ellipsis", max_width=10)
    table.add_column("status", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("secs", justify="right", no_wrap=True)
    table.add_column("result / cause", min_width=24)
    padded = list(reports) + [None] * (len(results) - len(reports))
    for command, result, report in zip(commands, results, padded, strict=True):
        outcome = inert(shown_outcome(command, result))
        if result.status is ResultStatus.SUCCESS:  # a result is a preview, a cause must be read whole
            outcome.no_wrap, outcome.overflow = True, "ellipsis"
        else:
            outcome.overflow = "fold"
        table.add_row(
            inert(short_id(result.call_id)),
            inert(command.tool_name),
            inert(result.namespace or ""),
            inert(result.status.value, STATUS_STYLES.get(result.status, "")),
            attempts_text(result, report),
            f"{report.seconds:.2f}" if report is not None and not report.reused else "-",
            outcome,
        )
    return table
