"""Import contracts: what each layer may import, and the lazy ``dispatchers`` exports.

The layers are aip <- dispatchers <- tasks <- flows <- cli. Each runtime check
runs in a fresh interpreter, so modules other tests imported cannot hide (or
fake) what one import pulls in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LAYERS = ["aip", "dispatchers", "tasks", "flows", "cli"]
TIMEOUT = 60


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repository root; answer its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _top_packages_after(module: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after importing ``module`` alone."""
    out = _run(
        f"import json, sys\nimport {module}\nprint(json.dumps(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    )
    return set(json.loads(out.splitlines()[-1]))


def test_every_export_resolves() -> None:
    code = """
import json, sys
import dispatchers
missing = [name for name in dispatchers.__all__ if getattr(dispatchers, name, None) is None]
listed = set(dir(dispatchers))
print(json.dumps({
    "count": len(dispatchers.__all__),
    "unique": len(set(dispatchers.__all__)),
    "missing": missing,
    "undirred": [name for name in dispatchers.__all__ if name not in listed],
}))
"""
    found = json.loads(_run(code).splitlines()[-1])
    assert found["count"] == found["unique"]
    assert found["missing"] == []
    assert found["undirred"] == []


def test_star_import() -> None:
    code = """
import json
namespace = {}
exec("from dispatchers import *", namespace)
import dispatchers
print(json.dumps([name for name in dispatchers.__all__ if namespace.get(name) is not getattr(dispatchers, name)]))
"""
    assert json.loads(_run(code).splitlines()[-1]) == []


def test_unknown_name_is_an_attribute_error() -> None:
    _run(
        "import dispatchers\n"
        "try:\n    dispatchers.NoSuchName\n"
        "except AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )


def test_importing_dispatchers_is_lazy() -> None:
    # The package itself and its light submodules pull in neither MCP nor Prefect.
    for module in ("dispatchers", "dispatchers.policy"):
        loaded = _top_packages_after(module)
        assert "mcp" not in loaded, module
        assert "prefect" not in loaded, module


@pytest.mark.parametrize("module", ["aip.hub", "aip.switchboard", "aip.messages"])
def test_hub_side_imports_neither_mcp_nor_prefect(module: str) -> None:
    loaded = _top_packages_after(module)
    assert "mcp" not in loaded
    assert "prefect" not in loaded


@pytest.mark.parametrize("module", ["aip.device", "dispatchers", "dispatchers.local"])
def test_device_side_imports_no_prefect(module: str) -> None:
    assert "prefect" not in _top_packages_after(module)


def test_cli_main_imports_no_prefect() -> None:
    # What ``dispatch device --help`` (or ``dispatch hub``) loads before any command runs.
    assert "prefect" not in _top_packages_after("cli.main")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in it (functions included), as absolute names."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _sources(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_layer_imports_a_layer_above_it(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    files = _sources(layer)
    assert files
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in files
        for line, name in _imported_modules(path)
        if name.split(".")[0] in above
    ]
    assert wrong == []


@pytest.mark.parametrize("layer", ["aip", "dispatchers"])
def test_bottom_layers_never_import_prefect(layer: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _sources(layer)
        for line, name in _imported_modules(path)
        if name.split(".")[0] == "prefect"
    ]
    assert wrong == []


def test_aip_never_imports_mcp() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _sources("aip")
        for line, name in _imported_modules(path)
        if name.split(".")[0] == "mcp"
    ]
    assert wrong == []
