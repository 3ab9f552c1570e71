"""The batch service: a process that keeps Prefect, its API and the MCP servers warm between ``dispatch run``s.

A one-shot ``dispatch run`` spends seconds importing Prefect and starting a
temporary API for a batch that takes milliseconds. Prefect's own long-lived
executors don't help here: a served flow or a worker starts a process per
flow run (``bench/deployment.py``: seconds each), and background task workers
run task runs outside any flow run. So the first ``dispatch run`` starts this
service (``server``) in a session of its own and sends it the batch; later
runs from the same place (same environment, working directory, Python and
code: ``place``) send theirs to it over a Unix socket only this user can
reach (``client``, ``wire``). Each batch is still a flow run of its own, with
one task run per command, run by the same ``run_batch_flow`` as in-process.
The service stops after an idle period (``$DISPATCH_SERVICE_IDLE`` seconds),
on ``dispatch service stop``, or with its parent session's machine;
``DISPATCH_SERVICE=off`` runs every batch in the ``dispatch`` process itself.
"""
