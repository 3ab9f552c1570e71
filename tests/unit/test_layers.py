"""Layering, read from the source: what each layer may import (aip <- dispatchers <- tasks <- flows <- cli).

Static checks of every module's import statements, functions included; what
an import pulls in at run time is checked in fresh interpreters by
``tests/system/test_imports.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

LAYERS = ["aip", "dispatchers", "tasks", "flows", "cli"]


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
