"""What a batch shows in the dashboard besides its runs: artifacts and the batch event.

A progress artifact moves while the batch runs; when it ends, a table with
one row per command (status, attempts, time, error) and a markdown summary.
Artifacts are API round trips (~10 ms each), so progress is written in the
background at most once a second, never once per command, and created only
once a batch has run a second; the artifacts of a finished batch (the
progress bar's last word, the table, the summary) are written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from aip.messages import Command, Result, ResultStatus
from dispatchers import not_done_cause, plural
from tasks import BatchContext, CommandReport
from tasks.events import DispatchEvent, clip, emit_batch_event

__all__ = ["CELL_LIMIT", "PROGRESS_INTERVAL", "Progress", "emit_batch_finished", "publish_results", "summary"]

#: Characters of a result or error shown per cell of the results table.
CELL_LIMIT = 200
#: Seconds between two writes of the progress artifact.
PROGRESS_INTERVAL = 1.0
#: What markdown would read as syntax (links, images, HTML, emphasis, tables, code), escaped in the summary.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~&:])")


class Progress:
    """A progress artifact for a batch of ``total`` commands, written in the background.

    Created only once the batch has run an interval, then written at most
    once an interval, when it moved: a batch that ends sooner gets its bar
    from ``finish``, at 100 %, in the same moment as its results.
    """

    def __init__(self, total: int, interval: float = PROGRESS_INTERVAL) -> None:
        self.total = total
        self.done = 0
        self.interval = interval
        self._moved = False
        self._closing = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._artifact: UUID | None = None

    async def __aenter__(self) -> Progress:
        self._writer = asyncio.create_task(self._write())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        if self._writer is not None:
            # The writer ends at once unless a round trip is in flight (creating the artifact, an update).
            await asyncio.wait({self._writer}, timeout=5)
            self._writer.cancel()
        if exc[0] is not None:  # the batch broke off: the bar says how far it got
            await self._last_word()

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def advance(self, index: int, result: Result) -> None:
        """A ``run_batch`` result listener."""
        self.done += 1
        self._moved = True

    async def finish(self) -> None:
        """The last word of a batch that ran to its end: the bar at 100 % (created now if it has none yet)."""
        self.done = max(self.done, self.total)
        await self._last_word()

    async def _last_word(self) -> None:
        with contextlib.suppress(Exception):  # the results table says the rest
            await self._put()

    async def _put(self) -> None:
        """Create the artifact at the current figure, or bring it to it."""
        if self._artifact is None:
            self._artifact = await acreate_progress_artifact(
                self.percent, description=f"Commands finished, of {self.total}."
            )
        else:
            await aupdate_progress_artifact(self._artifact, self.percent)

    async def _write(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)
            if self._closing.is_set():
                return
            if self._artifact is not None and not self._moved:
                continue
            self._moved = False
            try:
                await self._put()
            except Exception as error:
                if self._artifact is None:  # no progress bar is no reason not to run the batch
                    get_run_logger().warning("no progress artifact: %s", error)
                    return
                # A missed update is made good by the next one.


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return clip(text, CELL_LIMIT)


def _markdown_text(value: str) -> str:
    """``value`` as literal text in markdown: a tool's output or a device id must not become a link or an image."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", " ".join(value.split()))


def _cause(command: Command, result: Result) -> str:
    return _cell(not_done_cause(command, result))


async def publish_results(
    title: str,
    commands: Sequence[Command],
    results: Sequence[Result],
    reports: Sequence[CommandReport | None],
    where: str,
) -> None:
    """The ``batch-results`` table and the ``batch-summary`` markdown of a finished batch."""
    rows = []
    for command, result, report in zip(commands, results, reports, strict=True):
        rows.append(
            {
                "call_id": result.call_id,
                "tool": command.tool_name,
                "server": result.namespace,
                "status": result.status.value,
                "attempts": "reused" if report and report.reused else (report.attempts if report else 0),
                "seconds": round(report.seconds, 3) if report else None,
                "result": _cell(result.result) if result.status is ResultStatus.SUCCESS else "",
                "error": _cause(command, result),
            }
        )
    # Two round trips at once: neither needs the other.
    await asyncio.gather(
        acreate_table_artifact(table=rows, key="batch-results", description="One row per command, in batch order."),
        acreate_markdown_artifact(summary(title, commands, results, reports, where), key="batch-summary"),
    )


def summary(
    title: str,
    commands: Sequence[Command],
    results: Sequence[Result],
    reports: Sequence[CommandReport | None],
    where: str,
) -> str:
    counts = {status: sum(result.status is status for result in results) for status in ResultStatus}
    reused = sum(bool(report and report.reused) for report in reports)
    lines = [
        f"# {_markdown_text(title)}",
        "",
        f"**{counts[ResultStatus.SUCCESS]} of {plural(len(results), 'command')} succeeded** on {_markdown_text(where)}"
        + (f", {reused} of them reused from the run this one resumes" if reused else "")
        + ".",
        f"Failed: {counts[ResultStatus.FAILURE]}. Skipped: {counts[ResultStatus.SKIPPED]}.",
    ]
    problems = [
        (command, result)
        for command, result in zip(commands, results, strict=True)
        if result.status is not ResultStatus.SUCCESS
    ]
    if problems:
        lines += ["", "| call_id | tool | status | cause |", "|---|---|---|---|"]
        for command, result in problems:
            cells = (result.call_id or "", command.tool_name, result.status.value, _cause(command, result))
            lines.append("| " + " | ".join(_markdown_text(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def emit_batch_finished(
    batch: BatchContext, results: Sequence[Result], reports: Sequence[CommandReport | None]
) -> None:
    """The ``dispatch.batch.finished`` event: how many commands ended how, and how many were reused."""
    counts = {status.value: sum(result.status is status for result in results) for status in ResultStatus}
    reused = sum(bool(report and report.reused) for report in reports)
    emit_batch_event(DispatchEvent.BATCH_FINISHED, batch, {"total": len(results), **counts, "reused": reused})
