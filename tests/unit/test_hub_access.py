"""How a flow run reaches the hub (``flows.hub_access``): given in-process, else the environment; os.environ untouched.

The token must never be a flow parameter (the dashboard shows those) nor be
written to ``os.environ`` (it would outlive the run, and reach every child).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import HUB_VARIABLES
from hub_support import TOKEN, self_signed_certificate
from typer.testing import CliRunner

from aip.messages import Command, Result, ResultStatus
from cli.hub_client import flow_hub_access
from cli.main import app
from cli.up import analytics_off
from flows.hub_access import HubAccess, current_hub_access, hub_access


def test_from_environment_reads_the_three_variables_and_an_empty_one_is_unset() -> None:
    environ = {"DISPATCH_HUB": "ws://hub:8765", "DISPATCH_TOKEN": TOKEN, "DISPATCH_CAFILE": "/ca.pem"}
    assert HubAccess.from_environment(environ) == HubAccess("ws://hub:8765", TOKEN, "/ca.pem")
    assert HubAccess.from_environment({name: "" for name in HUB_VARIABLES}) == HubAccess()
    assert HubAccess.from_environment({}) == HubAccess()


def test_the_token_stays_out_of_the_repr() -> None:
    assert TOKEN not in repr(HubAccess("ws://hub:8765", TOKEN))


def test_what_is_given_wins_over_the_environment_for_that_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_HUB", "ws://worker-hub:8765")
    monkeypatch.setenv("DISPATCH_TOKEN", "worker-token-0123456789abcdef")
    monkeypatch.delenv("DISPATCH_CAFILE", raising=False)
    from_worker = HubAccess("ws://worker-hub:8765", "worker-token-0123456789abcdef")
    given, inner = HubAccess("ws://given:1", TOKEN), HubAccess(token="inner-token-0123456789abcdef")
    assert current_hub_access() == from_worker
    with hub_access(given):
        assert current_hub_access() == given
        with hub_access(inner):  # all of it: no field falls back to the environment
            assert current_hub_access() == inner
        assert current_hub_access() == given
    assert current_hub_access() == from_worker


async def test_what_is_given_reaches_a_task_of_this_context_not_another() -> None:
    async def seen() -> HubAccess:
        return current_hub_access()

    given = HubAccess("ws://given:1", TOKEN)
    with hub_access(given):
        inside = asyncio.create_task(seen())
    outside = asyncio.create_task(seen())
    assert await inside == given
    assert await outside != given


@pytest.mark.usefixtures("clean_environment")
def test_the_options_are_read_and_checked_without_touching_os_environ(tmp_path: Path) -> None:
    token_file, (cafile, _) = tmp_path / "token", self_signed_certificate(tmp_path)
    token_file.write_text(TOKEN + "\n")
    before = dict(os.environ)
    access = flow_hub_access("ws://127.0.0.1:8765", token_file, cafile)
    assert access == HubAccess("ws://127.0.0.1:8765", TOKEN, str(cafile.resolve()))
    assert dict(os.environ) == before


def test_the_environment_fills_in_what_the_options_leave_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISPATCH_HUB", "ws://from-env:8765")
    monkeypatch.setenv("DISPATCH_TOKEN", TOKEN)
    monkeypatch.setenv("DISPATCH_CAFILE", "/from-env/ca.pem")
    assert flow_hub_access(None, None, None) == HubAccess("ws://from-env:8765", TOKEN, "/from-env/ca.pem")


@pytest.mark.usefixtures("clean_environment")
def test_dispatch_run_on_a_device_hands_the_flow_its_token_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``dispatch run --device`` in this process, up to the flow run: the token arrives, os.environ is untouched."""
    import cli.batch_outcome
    import cli.batch_run
    import flows.batch

    seen: dict[str, Any] = {}

    async def flow_run(commands: list[Command], **options: Any) -> list[Result]:
        seen.update(access=current_hub_access(), options=options, environ=dict(os.environ))
        return [Result(status=ResultStatus.SUCCESS, call_id=command.call_id) for command in commands]

    def in_terminal(work: Any, stderr: Any) -> SimpleNamespace:
        asyncio.run(work())
        return SimpleNamespace(exit_code=0)

    monkeypatch.setattr(flows.batch, "run_batch_flow", flow_run)
    monkeypatch.setattr(cli.batch_run, "run_in_terminal", in_terminal)
    monkeypatch.setattr(cli.batch_outcome, "report", lambda *arguments: None)
    batch, token_file = tmp_path / "batch.json", tmp_path / "token"
    batch.write_text(json.dumps([{"tool_name": "echo", "parameters": {}}]))
    token_file.write_text(TOKEN)
    for name, value in analytics_off(os.environ).items():  # what `run` sets for Prefect, restored after the test
        monkeypatch.setenv(name, value)
    before = dict(os.environ)

    done = CliRunner().invoke(
        app, ["run", str(batch), "--device", "pc", "--hub", "ws://127.0.0.1:8765", "--token-file", str(token_file)]
    )

    assert done.exit_code == 0, done.output
    assert seen["access"] == HubAccess("ws://127.0.0.1:8765", TOKEN)
    assert TOKEN not in json.dumps(seen["options"], default=str), "the token became a flow parameter"
    assert seen["environ"] == before, "the run changed os.environ"
    assert dict(os.environ) == before
    assert current_hub_access() == HubAccess(), "what the run was given outlived it"
