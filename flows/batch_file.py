"""Batch files: a list of commands, or an object with the commands and how to run them.

```yaml
config: mcp.json          # optional, relative to this file, and inside its folder
timeout: 30               # seconds for the whole batch
mode: parallel            # or sequential (the default)
stop_on_failure: false
retries: 2                # retries after the first attempt, for transient failures
max_concurrency: 8        # commands at once, in parallel mode
agent_context:            # for a stock UFO device (ignored locally): which agent's MCP servers run the batch
  agent_name: HostAgent
  process_name: explorer.exe
commands:
  - {tool_name: add, parameters: {a: 1, b: 2}}
```

A person writes it, so an unknown key (``paramters:``, ``timout:``) is
refused with the closest name, where the wire's ``Command`` ignores it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from aip.messages import AgentContext, Command
from dispatchers.base import DuplicateCallIds, check_unique_call_ids
from dispatchers.batch import ExecutionMode
from dispatchers.errors import validation_message

from .run_settings import Concurrency, Retries, Seconds

__all__ = ["BatchFile", "BatchFileError", "check_tool_types", "load_batch"]


class BatchFileError(ValueError):
    """The batch file can't be used; the message says what is wrong and where."""


class _CommandAsWritten(Command):
    """A command as a batch file writes it: an unknown key is a typo to report.

    ``Command`` ignores unknown keys, as the wire requires (a peer may send
    more than we know); a person's ``paramters:`` must not be dropped silently
    and the call then fail for want of its parameters.
    """

    model_config = ConfigDict(extra="forbid")


def _no_unknown_keys(value: Any) -> Any:
    """``value`` as it came, once it passes as a ``_CommandAsWritten``: ``BatchFile.commands`` stay ``Command``."""
    if not isinstance(value, Command):
        _CommandAsWritten.model_validate(value)
    return value


class BatchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    commands: list[Annotated[Command, BeforeValidator(_no_unknown_keys)]] = Field(min_length=1)
    config: str | None = None
    # The run settings it may set (``RunSettings`` says what each is, and its default).
    timeout: Seconds | None = None
    mode: ExecutionMode | None = None
    stop_on_failure: bool | None = None
    retries: Retries | None = None
    max_concurrency: Concurrency | None = None
    agent_context: AgentContext | None = None
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file it was read from (``load_batch``), for messages about it; None when built in code."""
        return self._source


def load_batch(path: str | Path) -> BatchFile:
    """Read a JSON or YAML batch file; its ``config`` is resolved against its folder, and must stay in it.

    A batch file is data (it may come from an agent or a parameter); the
    config it names starts programs, so it can only be one kept beside it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BatchFileError(f"{path}: can't read it: {error}") from None
    data = _parse(path, text)
    if isinstance(data, list):
        data = {"commands": data}
    if not isinstance(data, dict):
        raise BatchFileError(f"{path}: expected a list of commands or an object with 'commands'")
    try:
        batch = BatchFile.model_validate(data)
    except ValidationError as error:
        raise BatchFileError(f"{path}: {validation_message(error, BatchFile)}") from None
    batch._source = str(path)
    try:
        check_unique_call_ids(batch.commands)
    except DuplicateCallIds as error:
        raise BatchFileError(f"{path}: {error}") from None
    if batch.config is not None:
        folder = path.parent.resolve()
        config = (folder / batch.config).resolve()
        if not config.is_relative_to(folder):
            raise BatchFileError(
                f"{path}: config {batch.config!r} is outside the batch file's folder: "
                "name an mcp.json beside the batch file, or pass --config"
            )
        batch.config = str(config)
    return batch


def check_tool_types(batch: BatchFile, servers: Iterable[str]) -> None:
    """Refuse a command whose ``tool_type`` is neither "", a category nor one of ``servers`` (a config's).

    The router would refuse it too, but only when the batch runs, after
    the commands before it may have had their effects; a local run checks
    the whole file first, once its config is known.
    """
    from dispatchers.router import tool_type_problem  # MCP's types: here, not for every run that reads a batch file

    names = list(servers)
    for index, command in enumerate(batch.commands):
        problem = tool_type_problem(command.tool_type, names)
        if problem is not None:
            where = f"{batch.source}: " if batch.source else ""
            raise BatchFileError(f"{where}commands.{index}.tool_type: {problem}")


def _parse(path: Path, text: str) -> Any:
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise BatchFileError(f"{path}: line {error.lineno} column {error.colno}: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise BatchFileError(f"{path}: {where}{getattr(error, 'problem', None) or error}") from None
