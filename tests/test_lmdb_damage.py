"""Damage LMDB itself notices (broken page structure; it has no page checksums) surfaces as the
store's own typed errors, never as an ``lmdb.*`` exception: reads raise
IndexesCorruptionError, verify() reports it, and the CLI says it in one line. Damage only the
store's CRCs can see, in the meta value every write reads back, is refused as well."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import order

from rstmdb_storage import CorruptionError, IndexesCorruptionError, Storage, StorageConfig
from rstmdb_storage.cli import main

PAGE = 4096
P_BRANCH, P_OVERFLOW = 0x01, 0x04
FLAGS_AT = 10  # in LMDB's page header: the page number (8 bytes), padding (2), the flags (2)


@pytest.fixture
def broken_branches(data_dir: Path) -> Path:
    """A store whose B-tree branch pages claim to be overflow pages."""
    with Storage.open(data_dir) as storage, storage.batch() as batch:
        for n in range(3000):  # enough for branch pages in the instance table
            batch.put_instance(order(f"order-{n:05d}", ctx={"pad": "x" * 50}))
    data_file = data_dir / "indexes" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    changed = 0
    for offset in range(2 * PAGE, len(data), PAGE):  # after the two meta pages
        if struct.unpack_from("<H", data, offset + FLAGS_AT)[0] == P_BRANCH:
            struct.pack_into("<H", data, offset + FLAGS_AT, P_OVERFLOW)
            changed += 1
    assert changed > 0
    data_file.write_bytes(bytes(data))
    return data_dir


@pytest.mark.parametrize("read_only", [False, True])
def test_reads_raise_a_typed_error(broken_branches: Path, read_only: bool) -> None:
    with Storage.open(StorageConfig(data_dir=broken_branches, read_only=read_only)) as storage:
        with pytest.raises(IndexesCorruptionError, match=r"LMDB reports .*MDB_CORRUPTED"):
            storage.get_instance("order-01500")
        with pytest.raises(IndexesCorruptionError):
            list(storage.iter_instances())
        findings = storage.verify()
        assert findings and "MDB_CORRUPTED" in findings[0].problem


def test_the_cli_reports_it_in_one_line(broken_branches: Path) -> None:
    result = CliRunner().invoke(main, ["get", str(broken_branches), "order-01500"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = CliRunner().invoke(main, ["verify", str(broken_branches)])
    assert result.exit_code == 1 and "MDB_CORRUPTED" in result.stdout


def test_a_damaged_meta_tail_is_refused_by_a_running_writer(data_dir: Path) -> None:
    """A writer reads the applied tail back on every write and knows the bytes it stored
    last; a tail damaged in ``data.mdb`` under it is refused with a typed error (not taken for
    the value it remembers), the write stores nothing, and closing (whose checkpoint reads
    the tail too) refuses as well, after releasing the files."""
    storage = Storage.open(data_dir)
    for n in range(3):
        storage.put_instance(order(f"order-{n}"))
    data_file = data_dir / "indexes" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    key = b"wal_tail"
    at, damaged = data.find(key), 0
    while at >= 0:  # every copy LMDB's copy-on-write left: the live one is among them
        data[at + len(key) + 10] ^= 0x01  # a bit of the value's payload (past its CRC)
        damaged += 1
        at = data.find(key, at + 1)
    assert damaged
    data_file.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=r"meta\[b'wal_tail'\]: CRC32C mismatch"):
        storage.put_instance(order("order-after"))
    assert storage.get_instance("order-after") is None
    assert storage.get_instance("order-2") is not None
    with pytest.raises(CorruptionError, match=r"wal_tail"):
        storage.close()
    storage.close()  # closed: nothing left to do
