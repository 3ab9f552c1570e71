"""The garbage collector told what a process that runs batches keeps until it ends.

Before its first command such a process holds some 350,000 objects that
the collector tracks (Prefect, pydantic, MCP, their modules, settings and
clients), and CPython's full collection walks every one of them. A
100-command batch allocates enough to set one off every batch or two:
0.2-1 s each on a machine of 2 shared cores, in the middle of the batch
(``bench/flow_costs.py``). Those objects live as long as the process, so the
first batch run moves them out of the collector's sight (``gc.freeze``, as
CPython advises for long-lived processes); what the batches make is
collected as before. Cheap (no collection runs), and done once: a later
freeze would also keep whatever cycles the batches since left behind.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_the_furniture"]

_done = False


def freeze_the_furniture() -> None:
    """Exclude every object that exists now from future collections; once per process."""
    global _done
    if not _done:
        gc.freeze()
        _done = True
