"""Imports run one way: each module imports only modules below it in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

import rstmdb_storage

PACKAGE = Path(rstmdb_storage.__file__).parent

# Bottom first. A module may import anything in its own layer or a lower one.
LAYERS = [
    {"errors", "config", "failpoints"},
    {"fsutil", "model", "jsonable"},
    {"codec"},
    {"wal.format", "wal.encoder", "wal.decoder", "wal.segment", "wal.repair", "wal.log", "wal"},
    {"wal.group_commit"},
    {"store", "store.meta", "store.env", "store.indexes"},
    {"apply", "verify", "snapshots", "query"},
    {"recovery", "compaction"},
    {"storage"},
    {"__init__"},
    {"cli.common"},
    {"cli.inspect", "cli.change"},
    {"cli"},
    {"__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"module {name} is in no layer; add it to LAYERS")


def _imported(path: Path, name: str) -> set[str]:
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(target or "__init__")
    return found


def test_imports_run_one_way() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        for target in _imported(path, name):
            if _layer(target) > _layer(name):
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_nothing_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.split(".")[0] not in ("cli", "__main__"):
            imported = {target.split(".")[0] for target in _imported(path, name)}
            assert "cli" not in imported, path
