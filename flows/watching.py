"""Who watches a batch run in this process: ``dispatch run``'s terminal display, told as it happens.

The dashboard learns of a batch from the API (task runs, artifacts, events);
a terminal sitting beside the flow learns from these calls, with no round
trip. The watcher travels in a ContextVar (flow parameters must be JSON) and
is called from the flow's event loop; it must return quickly and never raise
into the batch, so its errors are logged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from aip.messages import Command, Result
from tasks import CommandReport

__all__ = ["BatchWatcher", "Watch", "watching"]

logger = logging.getLogger("dispatchers")


class BatchWatcher(Protocol):
    def batch_started(self, flow_run_id: str, flow_run_name: str, commands: Sequence[Command]) -> None:
        """The flow run exists, with the batch's commands as it will run them (call_ids given)."""

    def command_started(self, index: int) -> None: ...

    def command_finished(self, index: int, result: Result, report: CommandReport | None) -> None:
        """``report`` is None for a command that never ran (skipped, interrupted before it started)."""

    def batch_finished(self, results: Sequence[Result], reports: Sequence[CommandReport | None]) -> None:
        """Every Result, in order, before the flow run records its final state."""


_current: ContextVar[BatchWatcher | None] = ContextVar("dispatch_batch_watcher", default=None)


@contextmanager
def watching(watcher: BatchWatcher) -> Iterator[None]:
    """Batches run inside this block (in this process) tell ``watcher`` how they go."""
    token = _current.set(watcher)
    try:
        yield
    finally:
        _current.reset(token)


class Watch:
    """The flow's side: calls the watcher in place, if there is one, and keeps its failures out of the batch."""

    def __init__(self) -> None:
        self.watcher = _current.get()

    def batch_started(self, flow_run_id: str, flow_run_name: str, commands: Sequence[Command]) -> None:
        self._tell("batch_started", flow_run_id, flow_run_name, commands)

    def command_started(self, index: int) -> None:
        self._tell("command_started", index)

    def command_finished(self, index: int, result: Result, report: CommandReport | None) -> None:
        self._tell("command_finished", index, result, report)

    def batch_finished(self, results: Sequence[Result], reports: Sequence[CommandReport | None]) -> None:
        self._tell("batch_finished", results, reports)

    def _tell(self, what: str, *arguments: object) -> None:
        if self.watcher is None:
            return
        try:
            getattr(self.watcher, what)(*arguments)
        except Exception:  # a display's bug must not cost the batch its Results
            logger.exception("the batch watcher failed on %s", what)
