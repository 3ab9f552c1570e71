"""How a batch run from the terminal ended, and how it is reported: the same whether it ran here or in the service."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from aip.messages import Command, Result, ResultStatus
from dispatchers.interrupt import was_interrupted

from .batch_display import BatchDisplay, results_table

__all__ = ["INTERRUPTED", "Outcome", "outcome_of", "report"]

#: The exit code of a run stopped by Ctrl-C, as a shell reports a SIGINT.
INTERRUPTED = 130


@dataclass
class Outcome:
    commands: list[Command]
    results: list[Result]
    display: BatchDisplay
    interrupted: bool
    #: Why some Results are the terminal's own (the batch service went away mid-batch), else None.
    lost: str | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        return 0 if all(result.status is ResultStatus.SUCCESS for result in self.results) else 1


def outcome_of(commands: list[Command], results: list[Result], display: BatchDisplay, asked: bool) -> Outcome:
    """The outcome of a batch run whose Ctrl-C was ``asked`` (or not)."""
    # A Ctrl-C after the last Result interrupted nothing: the run's outcome is its Results'.
    interrupted = asked and any(was_interrupted(c, r) for c, r in zip(commands, results, strict=False))
    return Outcome(commands, results, display, interrupted)


def report(outcome: Outcome, stdout: Console, stderr: Console, json_output: bool) -> None:
    """The Results on stdout (a table, or exactly the JSON array); how to find the run again on stderr."""
    if json_output:
        sys.stdout.write(json.dumps([result.model_dump(mode="json") for result in outcome.results]) + "\n")
        sys.stdout.flush()
    else:
        stdout.print(results_table(outcome.commands, outcome.results, outcome.display.reports))
    run_id = outcome.display.flow_run_id
    if outcome.exit_code and run_id:
        stderr.print(
            Text.assemble(
                "to run again only the commands that did not succeed: ", (f"dispatch resume {run_id}", "bold")
            ),
            highlight=False,
            soft_wrap=True,
        )
