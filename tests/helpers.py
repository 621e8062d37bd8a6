"""Small builders shared by the test modules (importable as ``helpers``: pytest puts tests/ on
sys.path, as for ``workers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rstmdb_storage import Instance

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).with_name("workers.py")


def order(instance_id: str, state: str = "pending", **fields: object) -> Instance:
    """An instance of the "order" machine, version 1."""
    return Instance(id=instance_id, machine="order", version=1, state=state, **fields)


def wal_bytes(data_dir: Path) -> bytes:
    """Every byte of every WAL segment, to show that something wrote nothing."""
    return b"".join(p.read_bytes() for p in sorted((data_dir / "wal").glob("*.wal")))


def start_worker(*args: object, stderr: Any = None, stdin: Any = None) -> subprocess.Popen[str]:
    """``python tests/workers.py ARGS...`` with this checkout importable, its stdout a pipe
    of text lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen(
        [sys.executable, str(WORKERS), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
