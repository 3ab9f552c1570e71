"""Routing rules over fake server views, parameter checks, and reading mcp.json."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mcp.types import Tool, ToolAnnotations

from aip.messages import Command
from dispatchers import CommandRouter, ConfigError, load_config
from dispatchers.errors import AmbiguousTool, InvalidParameters, ServerUnavailable, UnknownTool
from dispatchers.mcp_config import HttpServer, StdioServer
from dispatchers.parameters import check_parameters
from dispatchers.router import tool_type_problem

OBJECT = {"type": "object"}


def tool(name: str, schema: dict[str, Any] | None = None, **annotations: Any) -> Tool:
    return Tool(
        name=name,
        input_schema=schema or OBJECT,
        annotations=ToolAnnotations(**annotations) if annotations else None,
    )


@dataclass
class FakeServer:
    """What the router sees of a server: its tools, whether it is up, its categories, why it is down."""

    tools: dict[str, Tool] = field(default_factory=dict)
    available: bool = True
    categories: tuple[str, ...] = ()
    error: str | None = None


def server(
    *names: str, available: bool = True, categories: tuple[str, ...] = (), error: str | None = None
) -> FakeServer:
    return FakeServer({name: tool(name) for name in names}, available, categories, error)


@pytest.fixture
def router() -> CommandRouter:
    return CommandRouter(
        {
            "files": server("read_file", "write_file", "list_dir", "search"),
            "web": server("fetch", "search"),
            "clock": server("get_time"),
        }
    )


def route(router: CommandRouter, tool_name: str, **fields: Any) -> tuple[str, str]:
    found = router.route(Command(tool_name=tool_name, **fields))
    return found.server, found.tool.name


# --- the rules -----------------------------------------------------------------------------------------------


def test_a_unique_tool_name_finds_its_server(router: CommandRouter) -> None:
    assert route(router, "fetch") == ("web", "fetch")
    assert route(router, "read_file") == ("files", "read_file")
    assert route(router, "get_time") == ("clock", "get_time")


def test_the_route_carries_the_tool_with_its_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "number"}}}
    router = CommandRouter({"math": FakeServer({"add": tool("add", schema)})})
    found = router.route(Command(tool_name="add"))
    assert found.tool.input_schema == schema


def test_namespace_picks_the_server(router: CommandRouter) -> None:
    assert route(router, "search", namespace="web") == ("web", "search")
    assert route(router, "search", namespace="files") == ("files", "search")


def test_namespace_wins_over_tool_type(router: CommandRouter) -> None:
    assert route(router, "search", namespace="web", tool_type="files") == ("web", "search")
    assert route(router, "search", namespace="web", tool_type="action") == ("web", "search")


def test_a_qualified_name_picks_the_server(router: CommandRouter) -> None:
    assert route(router, "web.search") == ("web", "search")
    assert route(router, "files.search") == ("files", "search")


def test_a_dotted_name_that_is_not_a_server_is_a_tool_name() -> None:
    router = CommandRouter({"a": server("x.y")})
    assert route(router, "x.y") == ("a", "x.y")


def test_tool_type_naming_a_server_picks_it(router: CommandRouter) -> None:
    assert route(router, "search", tool_type="web") == ("web", "search")
    assert route(router, "search", tool_type="files") == ("files", "search")


def test_tool_type_naming_a_server_without_the_tool_is_unknown(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="fetch", tool_type="files"))
    assert "'files'" in str(caught.value)
    assert "'fetch'" in str(caught.value)


def test_a_tool_type_that_is_neither_a_category_nor_a_server_is_refused_with_a_suggestion(
    router: CommandRouter,
) -> None:
    """Not read as the empty tool_type: a typo must not widen the choice to every server."""
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="fetch", tool_type="wbe"))
    assert str(caught.value) == (
        "tool_type 'wbe' is neither action, data_collection nor a server of the config "
        "(did you mean 'web'?); servers: clock, files, web"
    )
    assert caught.value.sent is False
    assert not caught.value.transient


def test_a_misspelt_category_suggests_the_category(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool, match="did you mean 'data_collection'"):
        router.route(Command(tool_name="fetch", tool_type="data_colection"))


def test_an_unknown_tool_type_is_refused_whatever_else_picks_the_server(router: CommandRouter) -> None:
    for command in (
        Command(tool_name="search", namespace="web", tool_type="nosuch"),
        Command(tool_name="web.search", tool_type="nosuch"),
    ):
        with pytest.raises(UnknownTool, match="tool_type 'nosuch' is neither"):
            router.route(command)


def test_an_unknown_tool_type_is_permanent_even_while_servers_are_down() -> None:
    """Servers yet to list their tools can't make a tool_type valid: only the config's names can."""
    router = CommandRouter({"down": server(available=False, error="not up yet")})
    with pytest.raises(UnknownTool, match="tool_type 'nosuch'") as caught:
        router.route(Command(tool_name="anything", tool_type="nosuch"))
    assert not caught.value.transient
    assert caught.value.servers == ()


def test_tool_type_problem_accepts_the_empty_tool_type_the_categories_and_the_servers() -> None:
    for tool_type in ("", "action", "data_collection", "files"):
        assert tool_type_problem(tool_type, ["files"]) is None
    assert tool_type_problem("File", ["files"]) is not None  # names are case-sensitive, as in mcp.json
    assert (
        tool_type_problem("x", []) == "'x' is neither action, data_collection nor a server of the config; servers: none"
    )


@pytest.fixture
def categorised() -> CommandRouter:
    return CommandRouter(
        {
            "reader": server("lookup", "status", categories=("data_collection",)),
            "writer": server("status", "write", categories=("action",)),
            "both": server("anything"),
        }
    )


def test_tool_type_as_a_category_picks_among_its_servers(categorised: CommandRouter) -> None:
    assert route(categorised, "status", tool_type="data_collection") == ("reader", "status")
    assert route(categorised, "status", tool_type="action") == ("writer", "status")


def test_servers_without_categories_serve_both(categorised: CommandRouter) -> None:
    assert route(categorised, "anything", tool_type="data_collection") == ("both", "anything")
    assert route(categorised, "anything", tool_type="action") == ("both", "anything")


def test_a_category_does_not_reach_servers_of_the_other_category(categorised: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        categorised.route(Command(tool_name="write", tool_type="data_collection"))
    message = str(caught.value)
    assert "'write'" in message
    assert "writer" in message
    assert caught.value.sent is False


def test_without_tool_type_a_name_on_two_servers_is_ambiguous(categorised: CommandRouter) -> None:
    with pytest.raises(AmbiguousTool) as caught:
        categorised.route(Command(tool_name="status"))
    assert "reader.status" in str(caught.value)
    assert "writer.status" in str(caught.value)


def test_an_ambiguous_tool_names_every_candidate() -> None:
    router = CommandRouter({name: server("search", "other") for name in ("zeta", "alpha", "mid")})
    with pytest.raises(AmbiguousTool) as caught:
        router.route(Command(tool_name="search"))
    message = str(caught.value)
    for candidate in ("alpha.search", "mid.search", "zeta.search"):
        assert candidate in message
    assert caught.value.sent is False
    assert not caught.value.transient


def test_ambiguity_within_a_category_names_the_candidates() -> None:
    router = CommandRouter(
        {
            "r1": server("scan", categories=("data_collection",)),
            "r2": server("scan"),
            "w": server("scan", categories=("action",)),
        }
    )
    with pytest.raises(AmbiguousTool) as caught:
        router.route(Command(tool_name="scan", tool_type="data_collection"))
    message = str(caught.value)
    assert "r1.scan" in message
    assert "r2.scan" in message
    assert "w.scan" not in message


def test_an_unknown_tool_suggests_close_names(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="read_fiel"))
    message = str(caught.value)
    assert "did you mean" in message
    assert "'read_file'" in message
    assert caught.value.sent is False
    assert not caught.value.transient


def test_an_unknown_tool_on_a_named_server_suggests_its_tools(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="web.fetchh"))
    message = str(caught.value)
    assert "'web'" in message
    assert "did you mean 'fetch'" in message


def test_an_unknown_tool_without_close_names_lists_the_servers(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="zzzzzzzz"))
    message = str(caught.value)
    assert "did you mean" not in message
    for name in ("files", "web", "clock"):
        assert name in message


def test_an_unknown_namespace_lists_the_servers(router: CommandRouter) -> None:
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="search", namespace="webb"))
    message = str(caught.value)
    assert "'webb'" in message
    assert "clock, files, web" in message


def test_a_down_server_named_by_namespace_is_unavailable() -> None:
    router = CommandRouter({"up": server("a"), "down": server(available=False, error="it crashed")})
    with pytest.raises(ServerUnavailable) as caught:
        router.route(Command(tool_name="anything", namespace="down"))
    assert "'down'" in str(caught.value)
    assert "it crashed" in str(caught.value)
    assert caught.value.transient
    assert caught.value.sent is False


def test_a_tool_no_known_server_offers_while_some_never_listed_theirs_is_transient() -> None:
    """The server that has not listed its tools may offer it once it is up: worth a retry, not a verdict."""
    router = CommandRouter({"up": server("add"), "down": server(available=False, error="exited with code 3")})
    with pytest.raises(ServerUnavailable) as caught:
        router.route(Command(tool_name="ad"))
    assert "'down'" in str(caught.value)
    assert "exited with code 3" in str(caught.value)
    assert "have not listed their tools yet" in str(caught.value)
    assert "did you mean 'add'?" in str(caught.value)
    assert caught.value.servers == ("down",)  # whose start could change the answer
    assert caught.value.transient
    assert caught.value.sent is False
    # The live server still answers.
    assert route(router, "add") == ("up", "add")


def test_a_server_starting_for_the_first_time_makes_an_unknown_tool_transient_too() -> None:
    """No error yet (its first start is under way): still not a verdict, and the text says why."""
    router = CommandRouter({"up": server("add"), "new": server(available=False)})
    with pytest.raises(ServerUnavailable) as caught:
        router.route(Command(tool_name="subtract"))
    assert "'new': not up yet" in str(caught.value)
    assert caught.value.servers == ("new",)
    assert caught.value.transient


def test_unlisted_servers_of_a_category_make_an_unknown_tool_transient() -> None:
    router = CommandRouter(
        {
            "reads": server("get", categories=("data_collection",)),
            "writes": server(available=False, categories=("action",), error="crashed"),
        }
    )
    with pytest.raises(ServerUnavailable) as caught:
        router.route(Command(tool_name="put", tool_type="action"))
    assert "among action servers" in str(caught.value)
    assert caught.value.servers == ("writes",)
    # An unlisted server of the other category cannot change the answer: still permanent.
    with pytest.raises(UnknownTool) as unknown:
        router.route(Command(tool_name="put", tool_type="data_collection"))
    assert not unknown.value.transient
    assert unknown.value.servers == ()


def test_a_tool_no_server_offers_when_every_server_listed_its_tools_is_unknown() -> None:
    """Servers that are down but listed their tools before are known: nothing to wait for."""
    router = CommandRouter({"up": server("add"), "flappy": server("mul", available=False, error="exited")})
    with pytest.raises(UnknownTool) as caught:
        router.route(Command(tool_name="ad"))
    assert not caught.value.transient
    assert caught.value.sent is False
    assert caught.value.servers == ()
    assert "did you mean 'add'?" in str(caught.value)


def test_a_down_server_that_listed_the_tool_is_still_the_route() -> None:
    """Its tools are known from its last start: the call itself restarts it."""
    router = CommandRouter({"flappy": server("t", available=False, error="exited")})
    assert route(router, "t") == ("flappy", "t")
    assert route(router, "t", namespace="flappy") == ("flappy", "t")


def test_the_router_sees_changes_in_the_server_view() -> None:
    views = {"a": server(available=False, error="starting")}
    router = CommandRouter(views)
    with pytest.raises(ServerUnavailable) as caught:
        router.route(Command(tool_name="t"))
    assert caught.value.servers == ("a",)
    views["a"].tools["t"] = tool("t")
    views["a"].available = True
    assert route(router, "t") == ("a", "t")


# --- parameters --------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "number"},
        "b": {"type": "number"},
        "point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        "mode": {"enum": ["fast", "slow"]},
    },
    "required": ["a", "b"],
}


def test_valid_parameters_pass() -> None:
    check_parameters(SCHEMA, {"a": 1, "b": 2.5})
    check_parameters(SCHEMA, {"a": 1, "b": 2, "point": {"x": 3}, "mode": "fast"})


def test_a_wrongly_typed_parameter_is_named() -> None:
    with pytest.raises(InvalidParameters) as caught:
        check_parameters(SCHEMA, {"a": "one", "b": 2})
    assert "parameter 'a'" in str(caught.value)
    assert "number" in str(caught.value)
    assert caught.value.sent is False
    assert not caught.value.transient


def test_a_missing_parameter_is_named() -> None:
    with pytest.raises(InvalidParameters) as caught:
        check_parameters(SCHEMA, {"a": 1})
    assert "'b'" in str(caught.value)
    assert "required" in str(caught.value)


def test_a_nested_wrong_parameter_is_named_by_its_path() -> None:
    with pytest.raises(InvalidParameters) as caught:
        check_parameters(SCHEMA, {"a": 1, "b": 2, "point": {"x": "left"}})
    assert "parameter 'point.x'" in str(caught.value)


def test_a_value_outside_an_enum_is_named() -> None:
    with pytest.raises(InvalidParameters) as caught:
        check_parameters(SCHEMA, {"a": 1, "b": 2, "mode": "warp"})
    assert "parameter 'mode'" in str(caught.value)
    assert "'warp'" in str(caught.value)


def test_additional_properties_false_names_the_extra_field() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    with pytest.raises(InvalidParameters) as caught:
        check_parameters(schema, {"a": "x", "unexpected": 1})
    assert "'unexpected'" in str(caught.value)


def test_the_same_schema_object_checks_different_parameters() -> None:
    """Validators are cached by schema: the cache must not remember parameters."""
    check_parameters(SCHEMA, {"a": 1, "b": 1})
    with pytest.raises(InvalidParameters):
        check_parameters(SCHEMA, {"a": 1, "b": "1"})
    check_parameters(SCHEMA, {"a": 2, "b": 2})


# --- mcp.json ---------------------------------------------------------------------------------------------


def write_config(folder: Path, data: Any, name: str = "mcp.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_a_claude_desktop_config_loads(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "mcpServers": {
                "filesystem": {
                    "command": "npx",
                    "args": ["-y", "@modelcontextprotocol/server-filesystem", "/Users/me/Desktop"],
                },
                "github": {
                    "command": "docker",
                    "args": ["run", "-i", "--rm", "ghcr.io/github/github-mcp-server"],
                    "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "token"},
                },
            },
            "globalShortcut": "Ctrl+Space",
        },
    )

    specs = load_config(path)

    assert list(specs) == ["filesystem", "github"]
    filesystem = specs["filesystem"]
    assert isinstance(filesystem, StdioServer)
    assert filesystem.command == "npx"
    assert filesystem.args == ("-y", "@modelcontextprotocol/server-filesystem", "/Users/me/Desktop")
    assert filesystem.category == ()
    github = specs["github"]
    assert isinstance(github, StdioServer)
    assert github.env == {"GITHUB_PERSONAL_ACCESS_TOKEN": "token"}


def test_stdio_and_url_servers(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "mcpServers": {
                "local": {"command": "python", "args": ["server.py"], "category": "action"},
                "remote": {
                    "url": "http://127.0.0.1:8765/mcp",
                    "headers": {"Authorization": "Bearer abc"},
                    "category": ["data_collection"],
                },
            }
        },
    )

    specs = load_config(path)

    local, remote = specs["local"], specs["remote"]
    assert isinstance(local, StdioServer)
    assert local.category == ("action",)
    assert isinstance(remote, HttpServer)
    assert remote.url == "http://127.0.0.1:8765/mcp"
    assert remote.headers == {"Authorization": "Bearer abc"}
    assert remote.category == ("data_collection",)


def test_a_parsed_dict_loads_too() -> None:
    specs = load_config({"mcpServers": {"s": {"command": "run-me"}}})
    assert isinstance(specs["s"], StdioServer)
    assert specs["s"].command == "run-me"


def test_variables_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_TEST_TOKEN", "s3cret")
    monkeypatch.setenv("DISPATCH_TEST_HOST", "127.0.0.1")
    monkeypatch.delenv("DISPATCH_TEST_UNSET", raising=False)
    path = write_config(
        tmp_path,
        {
            "mcpServers": {
                "s": {
                    "command": "tool",
                    "args": [
                        "--token=${DISPATCH_TEST_TOKEN}",
                        "${DISPATCH_TEST_UNSET:-fallback}",
                        "${DISPATCH_TEST_UNSET:-}",
                    ],
                    "env": {"TOKEN": "${DISPATCH_TEST_TOKEN}", "LEVEL": "${DISPATCH_TEST_UNSET:-info}"},
                },
                "h": {"url": "http://${DISPATCH_TEST_HOST}:9000/mcp", "headers": {"X-Key": "${DISPATCH_TEST_TOKEN}"}},
            }
        },
    )

    specs = load_config(path)

    stdio, http = specs["s"], specs["h"]
    assert isinstance(stdio, StdioServer)
    assert stdio.args == ("--token=s3cret", "fallback", "")
    assert stdio.env == {"TOKEN": "s3cret", "LEVEL": "info"}
    assert isinstance(http, HttpServer)
    assert http.url == "http://127.0.0.1:9000/mcp"
    assert http.headers == {"X-Key": "s3cret"}


def test_a_set_variable_wins_over_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCH_TEST_LEVEL", "debug")
    specs = load_config({"mcpServers": {"s": {"command": "x", "args": ["${DISPATCH_TEST_LEVEL:-info}"]}}})
    assert specs["s"].args == ("debug",)  # type: ignore[union-attr]


def test_an_empty_variable_takes_the_default_like_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """``${VAR:-default}`` means "VAR unless unset *or empty*" in sh, bash and docker compose."""
    monkeypatch.setenv("DISPATCH_TEST_EMPTY", "")
    specs = load_config({"mcpServers": {"s": {"command": "x", "args": ["${DISPATCH_TEST_EMPTY:-info}"]}}})
    assert specs["s"].args == ("info",)  # type: ignore[union-attr]


def test_dispatch_python_defaults_to_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPATCH_PYTHON", raising=False)
    specs = load_config({"mcpServers": {"s": {"command": "${DISPATCH_PYTHON}", "args": ["server.py"]}}})
    assert specs["s"].command == sys.executable  # type: ignore[union-attr]


def test_a_missing_variable_is_an_error_naming_it_and_the_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISPATCH_TEST_MISSING", raising=False)
    path = write_config(
        tmp_path, {"mcpServers": {"gh": {"command": "x", "env": {"TOKEN": "${DISPATCH_TEST_MISSING}"}}}}
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert "DISPATCH_TEST_MISSING" in message
    assert str(path) in message
    assert "mcpServers.gh" in message


def test_a_relative_cwd_is_resolved_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project" / "config"
    path = write_config(
        folder,
        {
            "mcpServers": {
                "rel": {"command": "x", "cwd": "servers/one"},
                "abs": {"command": "x", "cwd": str(tmp_path / "elsewhere")},
                "none": {"command": "x"},
            }
        },
    )
    monkeypatch.chdir(tmp_path)  # the process's cwd must not matter

    specs = load_config(path)

    assert Path(specs["rel"].cwd) == folder / "servers" / "one"  # type: ignore[union-attr,arg-type]
    assert Path(specs["abs"].cwd) == tmp_path / "elsewhere"  # type: ignore[union-attr,arg-type]
    assert Path(specs["none"].cwd) == folder  # type: ignore[union-attr,arg-type]


def test_a_relative_config_path_resolves_cwd_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "conf", {"mcpServers": {"rel": {"command": "x", "cwd": "data"}}})
    monkeypatch.chdir(tmp_path)

    specs = load_config(Path("conf") / "mcp.json")

    assert Path(specs["rel"].cwd) == (tmp_path / "conf" / "data").resolve()  # type: ignore[union-attr,arg-type]
    assert os.path.isabs(specs["rel"].cwd or "")  # type: ignore[union-attr]


def test_disabled_servers_are_skipped(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "mcpServers": {
                "on": {"command": "x"},
                "off": {"command": "y", "disabled": True},
                "explicit": {"command": "z", "disabled": False},
            }
        },
    )
    assert sorted(load_config(path)) == ["explicit", "on"]


def test_bad_json_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '{\n  "mcpServers": {\n    "a": {"command": "x",}\n  }\n}')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(path) in message
    assert "line 3" in message
    assert "column" in message


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mcp.json"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "no such file" in str(caught.value)


def test_a_server_without_command_or_url_names_the_file_and_the_server(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"mcpServers": {"good": {"command": "x"}, "broken": {"args": ["a"]}}})

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert str(path) in message
    assert "mcpServers.broken" in message
    assert '"command"' in message
    assert '"url"' in message


@pytest.mark.parametrize(
    ("servers", "place"),
    [
        ({"s": {"command": ""}}, "mcpServers.s.command"),
        ({"s": {"url": "ftp://example.invalid/mcp"}}, "mcpServers.s.url"),
        ({"s": {"command": "x", "category": "sometimes"}}, "mcpServers.s.category"),
        ({"s": {"command": "x", "args": "not a list"}}, "mcpServers.s.args"),
        ({"s": "python server.py"}, "mcpServers.s"),
        ({"a.b": {"command": "x"}}, "'a.b'"),
    ],
    ids=["empty-command", "bad-url", "bad-category", "args-not-list", "server-not-object", "dotted-name"],
)
def test_an_invalid_server_names_the_file_and_the_place(tmp_path: Path, servers: dict[str, Any], place: str) -> None:
    path = write_config(tmp_path, {"mcpServers": servers})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert place in str(caught.value)


@pytest.mark.parametrize("data", [{"servers": {}}, [], {"mcpServers": []}, {"mcpServers": "x"}])
def test_a_config_without_an_mcp_servers_object_is_an_error(tmp_path: Path, data: Any) -> None:
    path = write_config(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "mcpServers" in str(caught.value)


def test_the_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import EXAMPLES

    monkeypatch.delenv("DISPATCH_PYTHON", raising=False)
    specs = load_config(EXAMPLES / "mcp.json")
    assert set(specs) == {"demo", "time"}
    demo = specs["demo"]
    assert isinstance(demo, StdioServer)
    assert demo.command == sys.executable
    assert Path(demo.cwd or "") == EXAMPLES
    assert specs["time"].category == ("data_collection",)
