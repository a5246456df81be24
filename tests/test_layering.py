"""pmxfs/core/ is pure: it must not import I/O, clocks, threads or the runtime layer.

The check walks every module under pmxfs/core/ with `ast`, so an import hidden inside a function
counts as well, and it also rejects use of the module-level random generator (`random.random()`,
`from random import randint`, ...): randomness must come in as an injected `random.Random`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "pmxfs" / "core"
FORBIDDEN_MODULES = {
    "trio", "socket", "os", "time", "threading", "sqlite3", "pyfuse3", "asyncio", "subprocess",
    "selectors", "signal", "multiprocessing", "shutil", "tempfile", "io", "pathlib", "datetime",
}
RANDOM_ALLOWED = {"Random"}


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in FORBIDDEN_MODULES:
                    found.append(f"{path.name}:{node.lineno}: import {alias.name}")
                if alias.name.startswith("pmxfs.runtime"):
                    found.append(f"{path.name}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            top = module.split(".")[0]
            if node.level == 0 and top in FORBIDDEN_MODULES:
                found.append(f"{path.name}:{node.lineno}: from {module} import ...")
            if "runtime" in module.split("."):
                found.append(f"{path.name}:{node.lineno}: from {module} import ...")
            if node.level == 0 and module == "random":
                for alias in node.names:
                    if alias.name not in RANDOM_ALLOWED:
                        found.append(f"{path.name}:{node.lineno}: from random import {alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr not in RANDOM_ALLOWED
        ):
            found.append(f"{path.name}:{node.lineno}: global generator random.{node.attr}")
    return found


def test_core_has_modules() -> None:
    assert core_modules(), "pmxfs/core/ has no modules"


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_is_pure(path: Path) -> None:
    assert violations(path) == []


def test_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom trio import sleep\nfrom ..runtime import node\n"
        "import random\nx = random.randint(1, 2)\nfrom random import choice\n"
        "def f():\n    import sqlite3\n"
    )
    found = violations(bad)
    assert len(found) == 6, found


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((CORE.parent / "runtime").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_runtime_does_not_import_the_commands(path: Path) -> None:
    """Layers: commands -> runtime -> core. A runtime module that needs something of a command
    shows that the something belongs in the runtime."""
    assert not {name for name in _imports_of(path)
                if name == "pmxfs.commands" or name.startswith("pmxfs.commands.")
                or name == "pmxfs.cli"}
