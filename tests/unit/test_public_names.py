"""Every library module says its public names (``__all__``), and says all of them: read from the source.

A module's public surface is what it defines without a leading underscore,
and what it re-exports (``from x import name as name``, or an imported name
it lists); its ``__all__`` lists exactly those, so a name added, renamed or
removed shows here before it surprises an importer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

LIBRARY = ["aip", "dispatchers", "tasks", "flows"]
#: Module-level names that are plumbing, not surface.
PLUMBING = {"logger", "T", "Peer"}


def _modules() -> list[Path]:
    return [path for layer in LIBRARY for path in sorted((ROOT / layer).glob("*.py")) if path.name != "__init__.py"]


def _defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            is_type_variable = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "TypeVar"
            names.update(t.id for t in node.targets if isinstance(t, ast.Name) and not is_type_variable)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names if alias.asname == alias.name)
    return {name for name in names if not name.startswith("_") and name not in PLUMBING}


def _declared(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(element) for element in node.value.elts]  # type: ignore[attr-defined]
    return None


def _imported(tree: ast.Module) -> set[str]:
    return {
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_all_lists_exactly_the_public_names(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    declared = _declared(tree)
    assert declared is not None, f"{path.relative_to(ROOT)} has no __all__"
    assert len(declared) == len(set(declared)), "a name listed twice"
    missing = _defined(tree) - set(declared)
    assert not missing, f"public but not in __all__: {sorted(missing)}"
    unknown = set(declared) - _defined(tree) - _imported(tree)
    assert not unknown, f"in __all__ but neither defined nor re-exported: {sorted(unknown)}"
