"""Small builders shared by the test modules (importable as ``helpers``: pytest puts tests/ on
sys.path, as for ``workers``)."""

from __future__ import annotations

from pathlib import Path

from rstmdb_storage import Instance


def order(instance_id: str, state: str = "pending", **fields: object) -> Instance:
    """An instance of the "order" machine, version 1."""
    return Instance(id=instance_id, machine="order", version=1, state=state, **fields)


def wal_bytes(data_dir: Path) -> bytes:
    """Every byte of every WAL segment, to show that something wrote nothing."""
    return b"".join(p.read_bytes() for p in sorted((data_dir / "wal").glob("*.wal")))
