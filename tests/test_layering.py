"""Imports run one way: each module imports only modules below it in LAYERS."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import rstmdb_storage

PACKAGE = Path(rstmdb_storage.__file__).parent

# Bottom first. A module may import anything in its own layer or a lower one.
LAYERS = [
    {"errors", "config", "failpoints"},
    {"fsutil", "model", "jsonable", "thread_group"},
    {"codec"},
    {"changes"},
    {
        "wal.format",
        "wal.encoder",
        "wal.decoder",
        "wal.segment",
        "wal.repair",
        "wal.log",
        "wal.reader",
        "wal",
    },
    {"wal.group_commit"},
    {"store", "store.locks", "store.meta", "store.env", "store.indexes"},
    {"apply", "snapshots", "compaction"},
    {"engine"},
    {"verify", "query"},
    {"replay", "recovery", "scrub"},
    {
        "replication",
        "replication.objects",
        "replication.layout",
        "replication.lease",
        "replication.bucket_restore",
    },
    {"maintenance", "inspection"},
    {"writes", "replication.shipping", "replication.following", "opening", "lookups"},
    {"storage"},
    {"__init__"},
    {"cli.common"},
    {"cli.inspect", "cli.change", "cli.replicate"},
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
            if node.module is None:  # from . import a, b: the modules a and b
                found.update(".".join([*base, alias.name]) for alias in node.names)
                continue
            target = ".".join([*base, *node.module.split(".")])
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


#: no module is longer than this (about 600 lines: one concern each, read in one sitting)
MAX_MODULE_LINES = 620


def test_no_module_is_too_long_to_read_in_one_sitting() -> None:
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_the_rooms_do_not_import_the_front_door() -> None:
    rooms = ["engine", "opening", "writes", "replay", "maintenance", "query", "recovery"]
    for name in rooms:
        path = PACKAGE / f"{name}.py"
        assert "storage" not in _imported(path, name), f"{name} imports storage.py"


def test_the_readme_says_where_every_module_is() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_/]+(?:\.py)?)`", section))
    missing = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        top = relative.parts[0]
        if (path.name == "__init__.py" and len(relative.parts) == 1) or path.name == "__main__.py":
            continue
        folder = f"{top}/" if len(relative.parts) > 1 else None
        if str(relative) not in named and path.name not in named and folder not in named:
            missing.append(str(relative))
    assert missing == []
