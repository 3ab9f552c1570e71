"""A ``prefect.yaml`` build step: the command a process worker starts a deployment's flow runs with.

Left to choose, Prefect 3.9's process worker starts a supervisor process
that prepares a "workspace" and then starts ``python -m prefect.engine``:
two Python processes importing Prefect (about 1 s each on 2 cores) before
the flow's first line. Given a command, it starts the engine at once. The
interpreter is the one running ``prefect deploy``, the project's own (it
has Prefect and this project), on the machine whose checkout the pull step
already names (``{{ $PWD }}``); its workers run flows from that checkout.
"""

from __future__ import annotations

import sys

from prefect.utilities.processutils import command_to_string

__all__ = ["engine_command"]


def engine_command() -> dict[str, str]:
    """``{"command": "<this interpreter> -m prefect.engine"}``: ``command: "{{ engine.command }}"`` in job_variables."""
    return {"command": command_to_string([sys.executable, "-m", "prefect.engine"])}
