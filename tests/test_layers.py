"""The house's one-way dependencies: cli -> engine -> model, data -> config (the ground floor)."""

from __future__ import annotations

import ast
from pathlib import Path

import omnifuse_cli

PACKAGE = Path(omnifuse_cli.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every omnifuse_cli module a file imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("omnifuse_cli")}


def _floor_imports(floor: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): _imports(p) for p in (PACKAGE / floor).rglob("*.py")}


def test_config_is_the_ground_floor():
    imported = _imports(PACKAGE / "config.py")
    assert {n for n in imported if not n.startswith("omnifuse_cli.errors")} == set()
    assert not (PACKAGE / "engine" / "config.py").exists()


def test_data_and_model_stand_on_config_not_on_engine_or_cli():
    for floor in ("data", "model"):
        for file, names in _floor_imports(floor).items():
            above = {
                n
                for n in names
                if n.startswith(("omnifuse_cli.engine", "omnifuse_cli.cli", "omnifuse_cli.report"))
            }
            assert not above, f"{floor}/{file} imports {sorted(above)}"


def test_engine_never_imports_the_cli():
    for file, names in _floor_imports("engine").items():
        assert not {n for n in names if n.startswith("omnifuse_cli.cli")}, file
