"""What a deployment run's parameters may say: data, never a program to start or a place to send a credential.

Whoever can create a run of a deployment (the dashboard, the API, an
automation) picks its parameters, and the worker runs them with its own
environment: its MCP servers, its ``$DISPATCH_TOKEN``. So in a deployment run

* ``config`` is the path of an mcp.json inside the project (the worker's
  working directory, which ``prefect.yaml`` sets): never inline servers, never
  a file elsewhere on disk. Only files the operator wrote are read, so only
  they can start programs or expand ``${VAR}``;
* ``batch_file`` is a path inside the project too (and the config a batch file
  names stays in the batch file's folder: ``load_batch``);
* ``hub`` is absent or the hub the worker was configured with
  (``$DISPATCH_HUB``): the worker's credential goes nowhere else;
* ``resume_from`` is absent: a run resumes only itself (Prefect's retry), so
  no run can store Results under another run's keys for it to reuse.

Paths under a hidden folder (``.venv``, ``.dispatch``, ``.git``) are refused
too: they are the machine's, not configs the operator wrote for runs.

An in-process run (``dispatch run``, ``run_batch_flow``) is started by its
caller's own code, which already holds everything these rules protect, so its
values are taken as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ParameterRefused", "check_deployment_parameters", "inside_project", "same_hub"]


class ParameterRefused(ValueError):
    """A deployment run's parameter names something it may not; the message says what and why."""


def check_deployment_parameters(
    *,
    config: str | dict[str, Any] | None,
    batch_file: str | None,
    hub: str | None,
    resume_from: str | None = None,
    project: Path,
    worker_hub: str | None,
) -> None:
    """Raise ``ParameterRefused`` unless every parameter of this deployment run is plain data."""
    if isinstance(config, dict):
        raise ParameterRefused(
            "a deployment run's config must name an mcp.json in the project, not carry server definitions: "
            "the servers a worker starts are the operator's to choose"
        )
    if config is not None:
        inside_project(project, config, "config")
    if batch_file is not None:
        inside_project(project, batch_file, "batch_file")
    if resume_from is not None:
        raise ParameterRefused(
            "a deployment run cannot resume another run: retry that run instead (the dashboard's Retry)"
        )
    if hub is not None and (worker_hub is None or not same_hub(hub, worker_hub)):
        raise ParameterRefused(
            "a deployment run may only use the hub its worker was configured with ($DISPATCH_HUB): "
            "leave the hub parameter out"
        )


def inside_project(project: Path, path: str, what: str) -> Path:
    """``path`` (relative to ``project``) resolved, if it stays inside ``project``; links followed."""
    root = project.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ParameterRefused(f"{what} {path!r} is outside the project ({root}): name a file inside it")
    if any(part.startswith(".") for part in resolved.relative_to(root).parts):
        raise ParameterRefused(f"{what} {path!r} is in a hidden folder of the project: name a file the operator wrote")
    return resolved


def same_hub(a: str, b: str) -> bool:
    """Whether two hub URLs name the same hub (scheme, host and port; paths and case aside)."""
    first, second = urlsplit(a.strip()), urlsplit(b.strip())
    return (first.scheme.lower(), first.netloc.lower()) == (second.scheme.lower(), second.netloc.lower())
