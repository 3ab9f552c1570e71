"""Dispatchers: run a batch of commands, answer one Result each.

``BasicCommandDispatcher`` is the interface; ``LocalCommandDispatcher`` runs
commands on local MCP servers, ``WebSocketCommandDispatcher`` on a remote
device through the hub, ``InMemoryCommandDispatcher`` on Python functions
(tests, fault injection). Nothing here imports Prefect: a machine
that only executes commands never pays for it.

The names below are resolved lazily (PEP 562): importing ``dispatchers`` or one
of its light submodules (``dispatchers.policy``) does not import every
submodule, so in particular not MCP. Each name is imported from its submodule
on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy_names import lazy_names

if TYPE_CHECKING:
    from .base import (
        DEFAULT_TIMEOUT,
        BasicCommandDispatcher,
        DuplicateCallIds,
        assign_call_ids,
        check_unique_call_ids,
        error_result,
        not_done_cause,
        plural,
        short_id,
    )
    from .batch import BatchPolicy, ExecutionMode, run_batch
    from .concurrency import ConcurrencyLimits
    from .local import LocalCommandDispatcher
    from .managed_server import ManagedServer, ServerState
    from .mcp_config import ConfigError, load_config
    from .mcp_manager import MCPServerManager
    from .memory import InMemoryCommandDispatcher
    from .policy import AttemptObserver, RetryPolicy, observing_attempts
    from .remote import WebSocketCommandDispatcher
    from .router import CommandRouter
    from .server_pool import ServerPool, ensure_server_pool, shared_manager
    from .tool_call import ToolCallDispatcher

# Each exported name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "DEFAULT_TIMEOUT": "base",
    "BasicCommandDispatcher": "base",
    "error_result": "base",
    "not_done_cause": "base",
    "plural": "base",
    "short_id": "base",
    "assign_call_ids": "base",
    "check_unique_call_ids": "base",
    "DuplicateCallIds": "base",
    "BatchPolicy": "batch",
    "ExecutionMode": "batch",
    "run_batch": "batch",
    "ConcurrencyLimits": "concurrency",
    "LocalCommandDispatcher": "local",
    "ManagedServer": "managed_server",
    "ServerState": "managed_server",
    "ConfigError": "mcp_config",
    "load_config": "mcp_config",
    "MCPServerManager": "mcp_manager",
    "InMemoryCommandDispatcher": "memory",
    "AttemptObserver": "policy",
    "RetryPolicy": "policy",
    "observing_attempts": "policy",
    "WebSocketCommandDispatcher": "remote",
    "CommandRouter": "router",
    "ServerPool": "server_pool",
    "ensure_server_pool": "server_pool",
    "shared_manager": "server_pool",
    "ToolCallDispatcher": "tool_call",
}

__all__ = [
    "DEFAULT_TIMEOUT",
    "AttemptObserver",
    "BasicCommandDispatcher",
    "BatchPolicy",
    "CommandRouter",
    "ConcurrencyLimits",
    "ConfigError",
    "DuplicateCallIds",
    "ExecutionMode",
    "InMemoryCommandDispatcher",
    "LocalCommandDispatcher",
    "MCPServerManager",
    "ManagedServer",
    "RetryPolicy",
    "ServerPool",
    "ServerState",
    "ToolCallDispatcher",
    "WebSocketCommandDispatcher",
    "assign_call_ids",
    "check_unique_call_ids",
    "ensure_server_pool",
    "error_result",
    "load_config",
    "not_done_cause",
    "observing_attempts",
    "plural",
    "run_batch",
    "shared_manager",
    "short_id",
]


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
