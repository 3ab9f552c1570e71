"""Dispatchers: run a batch of commands, answer one Result each.

``BasicCommandDispatcher`` is the interface; ``LocalCommandDispatcher`` runs
commands on local MCP servers, ``WebSocketCommandDispatcher`` on a remote
device through the hub, ``InMemoryCommandDispatcher`` on Python functions
(tests, fault injection). Nothing here imports Prefect: a machine
that only executes commands never pays for it.
"""

from .base import DEFAULT_TIMEOUT, BasicCommandDispatcher, error_result, failure_cause, plural, short_id, with_call_id
from .batch import BatchPolicy, ExecutionMode, run_batch
from .concurrency import ConcurrencyLimits
from .local import LocalCommandDispatcher
from .mcp_config import ConfigError, load_config
from .mcp_servers import MCPServerManager, close_shared_managers, shared_manager
from .memory import InMemoryCommandDispatcher
from .policy import AttemptObserver, Deadline, RetryPolicy, observing_attempts
from .remote import WebSocketCommandDispatcher
from .router import CommandRouter
from .tool_call import ToolCallDispatcher

__all__ = [
    "DEFAULT_TIMEOUT",
    "AttemptObserver",
    "BasicCommandDispatcher",
    "BatchPolicy",
    "CommandRouter",
    "ConcurrencyLimits",
    "ConfigError",
    "Deadline",
    "ExecutionMode",
    "InMemoryCommandDispatcher",
    "LocalCommandDispatcher",
    "MCPServerManager",
    "RetryPolicy",
    "ToolCallDispatcher",
    "WebSocketCommandDispatcher",
    "close_shared_managers",
    "error_result",
    "failure_cause",
    "load_config",
    "observing_attempts",
    "plural",
    "run_batch",
    "shared_manager",
    "short_id",
    "with_call_id",
]
