"""The pure parts of the security model: credentials and their file, what deployment parameters may say, inert text.

(A hub reading the credentials file is in ``tests/integration/test_hub.py``.)
"""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from rich.console import Console

from aip.credential_file import CredentialFile, editing, read_store, write_store
from aip.credentials import CredentialError, CredentialStore, Role, check_name
from aip.messages import Command
from cli.inert import escaped, inert
from dispatchers import error_result
from flows.trust import ParameterRefused, check_deployment_parameters, same_hub

# -- CredentialStore -----------------------------------------------------------------


def test_a_token_identifies_its_holder_and_only_its_digest_is_kept() -> None:
    store = CredentialStore()
    device = store.issue(Role.DEVICE, "lab-pc")
    controller = store.issue(Role.CONTROLLER, "ops", devices=("lab-*",))
    assert device.startswith("dsp_dev_") and controller.startswith("dsp_ctl_") and device != controller
    found = store.identify(device)
    assert found is not None and (found.role, found.name) == (Role.DEVICE, "lab-pc")
    ops = store.identify(controller)
    assert ops is not None and ops.may_use("lab-2") and not ops.may_use("other")
    assert not found.may_use("lab-pc"), "a device credential uses no device"
    assert store.identify(device + "x") is None and store.identify("") is None
    text = store.dumps()
    assert device not in text and controller not in text
    assert CredentialStore.loads(text).identify(device) == found


def test_one_credential_per_name_unless_replaced_and_a_replaced_token_stops_working() -> None:
    store = CredentialStore()
    old = store.issue(Role.DEVICE, "lab-pc")
    with pytest.raises(CredentialError, match="already has a credential"):
        store.issue(Role.DEVICE, "lab-pc")
    new = store.issue(Role.DEVICE, "lab-pc", replace_old=True)
    assert store.identify(old) is None and store.identify(new) is not None and len(store) == 1
    store.issue(Role.CONTROLLER, "lab-pc")  # another role, another namespace
    assert len(store) == 2


def test_revoking_removes_the_credential_and_is_current_notices() -> None:
    store = CredentialStore()
    token = store.issue(Role.CONTROLLER, "ops")
    identity = store.identify(token)
    assert identity is not None and store.is_current(identity)
    store.revoke(Role.CONTROLLER, "ops")
    assert store.identify(token) is None and not store.is_current(identity)
    with pytest.raises(CredentialError, match="no controller credential named 'ops'"):
        store.revoke(Role.CONTROLLER, "ops")


def test_changed_rights_make_an_identity_stale() -> None:
    store = CredentialStore()
    token = store.issue(Role.CONTROLLER, "ops", devices=("*",))
    before = store.identify(token)
    store.issue(Role.CONTROLLER, "ops", devices=("lab-*",), token=token, replace_old=True)
    assert before is not None and not store.is_current(before)


@pytest.mark.parametrize("name", ["[/]", "a b", "lab\x1b[2J", "", "-leading", "x" * 129, "é"])
def test_names_are_plain(name: str) -> None:
    with pytest.raises(CredentialError, match="1-128 characters"):
        check_name(name)


def test_a_short_or_shared_token_is_refused() -> None:
    store = CredentialStore()
    with pytest.raises(CredentialError, match="at least 24"):
        store.issue(Role.DEVICE, "a", token="short")
    store.issue(Role.DEVICE, "a", token="t" * 30)
    with pytest.raises(CredentialError, match="already in use"):
        store.issue(Role.DEVICE, "b", token="t" * 30)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "credentials": []}',
        '{"version": 1, "credentials": {}}',
        '{"version": 1, "credentials": [{"role": "admin", "name": "x", "sha256": "' + "0" * 64 + '"}]}',
        '{"version": 1, "credentials": [{"role": "device", "name": "x", "sha256": "nothex"}]}',
        '{"version": 1, "credentials": [{"role": "device", "name": "[/]", "sha256": "' + "0" * 64 + '"}]}',
    ],
)
def test_a_malformed_credentials_text_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(CredentialError):
        CredentialStore.loads(text)


# -- the file -------------------------------------------------------------------------


def test_the_file_is_written_whole_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "credentials.json"
    store = CredentialStore()
    token = store.issue(Role.DEVICE, "lab-pc")
    write_store(path, store)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_store(path).identify(token) is not None
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"], "a temporary file was left behind"
    assert len(read_store(tmp_path / "absent.json")) == 0


def test_a_watched_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    store = CredentialStore()
    first = store.issue(Role.DEVICE, "a")
    write_store(path, store)
    watched = CredentialFile(path)
    assert not watched.refresh()
    second = store.issue(Role.DEVICE, "b")
    write_store(path, store)
    assert watched.refresh() and watched.store.identify(second) is not None
    broken = {
        "not JSON": "{ broken",
        "must be a list of patterns": json.dumps(
            {"version": 1, "credentials": [{"role": "controller", "name": "c", "devices": 5}]}
        ),
        "gone or empty": "",
        "not JSON: maximum recursion": "[" * 100_000,
    }
    for reason, text in broken.items():
        path.write_text(text)
        with pytest.raises(CredentialError, match=reason.split(":")[0]):
            watched.refresh()
        assert watched.store.identify(first) is not None, f"{reason}: a typo locked everyone out"
    path.unlink()
    with pytest.raises(CredentialError, match="gone or empty"):
        watched.refresh()
    assert watched.store.identify(second) is not None


# -- deployment parameters ------------------------------------------------------------------


def test_deployment_parameters_name_files_inside_the_project_and_the_workers_hub(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    (tmp_path.parent / "outside.json").write_text("{}")
    link = tmp_path / "examples" / "link.json"
    link.symlink_to(tmp_path.parent / "outside.json")

    def check(**parameters: object) -> None:
        arguments: dict[str, object] = {"config": None, "batch_file": None, "hub": None} | parameters
        check_deployment_parameters(**arguments, project=tmp_path, worker_hub="ws://127.0.0.1:8765")  # type: ignore[arg-type]

    check(config="examples/mcp.json", batch_file="examples/batch.yaml", hub="WS://127.0.0.1:8765/")
    refused = {
        "inline servers": {"config": {"mcpServers": {"x": {"command": "sh"}}}},
        "a config above": {"config": "../outside.json"},
        "an absolute config": {"config": "/etc/passwd"},
        "a link out": {"config": "examples/link.json"},
        "a batch file elsewhere": {"batch_file": "/tmp/batch.yaml"},
        "another hub": {"hub": "ws://attacker.example:8765"},
        "another run's results": {"resume_from": "0b6f4d2e-0000-4000-8000-000000000000"},
        "a hidden folder": {"config": ".dispatch/credentials.json"},
        "a hidden file": {"batch_file": "examples/.secret.yaml"},
    }
    for what, parameters in refused.items():
        with pytest.raises(ParameterRefused):
            check(**parameters)
        print("refused:", what)
    with pytest.raises(ParameterRefused, match="DISPATCH_HUB"):
        check_deployment_parameters(config=None, batch_file=None, hub="ws://h:1", project=tmp_path, worker_hub=None)


def test_same_hub_compares_scheme_host_and_port() -> None:
    assert same_hub("ws://Hub:8765", "ws://hub:8765/ws")
    assert not same_hub("ws://hub:8765", "wss://hub:8765") and not same_hub("ws://hub:8765", "ws://hub:8766")


# -- inert text --------------------------------------------------------------------------------


def test_inert_text_carries_no_markup_and_no_escapes() -> None:
    hostile = "[/][bold]x[/] \x1b[2J\x1b]8;;http://evil\x1b\\y\x07 \u202etxt \x9b ok\ttab\nline"
    assert escaped(hostile) == (
        "[/][bold]x[/] \\x1b[2J\\x1b]8;;http://evil\\x1b\\y\\x07 \\u202etxt \\x9b ok\ttab\nline"
    )
    console = Console(width=200, force_terminal=True, color_system="truecolor", record=True)
    console.print(inert(hostile))
    assert "[/][bold]x[/]" in console.export_text()
    assert inert({"a": "\x1b"}).plain == json.dumps({"a": "\x1b"}) and "\x1b" not in inert(["\x1b"]).plain


def test_two_edits_at_once_take_turns_and_neither_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    inside, waiting = threading.Event(), threading.Event()

    def first() -> None:
        with editing(path) as store:
            store.issue(Role.DEVICE, "a")
            inside.set()
            waiting.wait(timeout=10)  # the second edit is blocked meanwhile

    def second() -> None:
        inside.wait(timeout=10)
        with editing(path) as store:
            store.issue(Role.DEVICE, "b")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    inside.wait(timeout=10)
    threads[1].join(timeout=0.5)
    assert threads[1].is_alive(), "the second edit did not wait for the first"
    waiting.set()
    for thread in threads:
        thread.join(timeout=10)
    assert {entry.identity.name for entry in read_store(path).entries()} == {"a", "b"}


def test_the_dashboard_summary_shows_what_devices_and_tools_wrote_as_literal_text() -> None:
    from flows.reporting import summary

    hostile = "![x](http://tracker.example/p.png) [click](javascript:alert(1)) <img src=x> | `code` **b**\nnext"
    command = Command(tool_name="tool|[x](y)", call_id="id`)[", parameters={})
    text = summary(f"batch-on-{hostile}", [command], [error_result(command, hostile)], [None], f"device {hostile}")
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<a " not in html and "<img" not in html and "<code>" not in html, html
    assert html.count("<strong>") == 1, html  # ours: "**0 of 1 commands succeeded**"
    assert html.count("<tr>") == 2 and html.count("<td>") == 4, html  # the header, and one row of four cells
    assert "![x](http://tracker.example/p.png)" in html, "the text itself is still there, as text"
