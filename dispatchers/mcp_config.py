"""Reading ``mcp.json``: the Claude Desktop convention, plus our extensions per server.

``{"mcpServers": {"name": {"command", "args", "env", "cwd"} | {"url", "headers"}}}``.
Our extensions, which other MCP clients ignore:

- ``"category"``: ``"data_collection"`` (read-only) or ``"action"`` (has side
  effects), or a list of both; the ``tool_type`` categories the server serves
  (all when absent).
- ``"max_actions"``: at most how many ``action`` commands run on the server at
  once (default 1); ``null`` for no limit.
- ``"max_data_collection"``: the same for ``data_collection`` commands
  (default: no limit).
- ``"disabled": true`` leaves a server out.

Strings may use ``${VAR}`` (or ``${VAR:-default}``) from the environment;
``${DISPATCH_PYTHON}`` is the interpreter running the dispatcher, so a config
can start Python servers in the same environment without knowing its path.
A relative ``cwd`` is taken from the config file's folder, which is also the
default working directory of a stdio server.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aip.messages import ToolType

from .errors import validation_message

__all__ = ["ConfigError", "HttpServer", "ServerSpec", "StdioServer", "load_config"]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The config can't be used; the message says what is wrong and where."""


class _ServerBase(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    #: The categories this server serves; empty means every category.
    category: tuple[ToolType, ...] = ()
    disabled: bool = False
    #: At most how many ``action`` commands run at once on this server; ``null`` for no limit.
    max_actions: int | None = Field(default=None, ge=1)
    #: At most how many ``data_collection`` commands run at once on this server; ``null`` for no limit.
    max_data_collection: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _category_as_tuple(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("category"), str):
            return {**data, "category": (data["category"],)}
        return data

    @field_validator("max_actions", "max_data_collection", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read true as 1
            raise ValueError("expected a whole number of at least 1, or null for no limit")
        return value

    def concurrency_limits(self) -> dict[str, int | None]:
        """The limits this entry sets, by category (``action``, ``data_collection``): only those it names.

        A key that is absent leaves the limit to the manager; ``null`` means no limit.
        """
        keys = {ToolType.ACTION: "max_actions", ToolType.DATA_COLLECTION: "max_data_collection"}
        return {category: getattr(self, key) for category, key in keys.items() if key in self.model_fields_set}


class StdioServer(_ServerBase):
    command: str = Field(min_length=1)
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None

    def describe(self) -> str:
        return " ".join([self.command, *self.args])


class HttpServer(_ServerBase):
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)

    def describe(self) -> str:
        return self.url


ServerSpec = StdioServer | HttpServer


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, ServerSpec]:
    """The enabled servers of an ``mcp.json`` file or of an already parsed dict."""
    if isinstance(source, Mapping):
        where, base, data = "config", Path.cwd(), dict(source)
    else:
        path = Path(source)
        where, base = str(path), path.resolve().parent
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{where}: can't read it: {error}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: line {error.lineno} column {error.colno}: {error.msg}") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ConfigError(f'{where}: expected an object with "mcpServers": {{name: server, ...}}')
    specs: dict[str, ServerSpec] = {}
    for name, raw in servers.items():
        if not name or "." in name:
            raise ConfigError(f"{where}: server name {name!r} must be non-empty and contain no '.'")
        if isinstance(raw, dict) and raw.get("disabled") is True:
            continue  # not even expanded: a disabled server may name variables that are unset
        specs[name] = _parse_server(f"{where}: mcpServers.{name}", raw, base)
    return specs


def _parse_server(where: str, raw: Any, base: Path) -> ServerSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object, got {type(raw).__name__}")
    expanded = _expand(raw, where)
    model: type[StdioServer] | type[HttpServer]
    if "command" in expanded:
        model = StdioServer
    elif "url" in expanded:
        model = HttpServer
    else:
        raise ConfigError(f'{where}: needs "command" (a stdio server) or "url" (a streamable HTTP server)')
    try:
        spec = model.model_validate(expanded)
    except ValidationError as error:
        raise ConfigError(f"{where}.{validation_message(error)}") from None
    if isinstance(spec, StdioServer):
        cwd = base / spec.cwd if spec.cwd else base
        spec = spec.model_copy(update={"cwd": str(cwd)})
    return spec


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: _lookup(match, where), value)
    if isinstance(value, list):
        return [_expand(item, where) for item in value]
    if isinstance(value, dict):
        return {key: _expand(item, f"{where}.{key}") for key, item in value.items()}
    return value


def _lookup(match: re.Match[str], where: str) -> str:
    name, default = match.group(1), match.group(2)
    if name == "DISPATCH_PYTHON" and name not in os.environ:
        return sys.executable
    value = os.environ.get(name)
    if not value and default is not None:  # like the shell's ":-": unset or empty
        value = default
    if value is None:
        raise ConfigError(
            f"{where}: ${{{name}}} is not set in the environment (write ${{{name}:-default}} for a default)"
        )
    return value
