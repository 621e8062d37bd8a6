"""A full disk (SPEC: StorageFullError), made real: the store on a small tmpfs mounted by the
test. Every write either is acknowledged or raises StorageFullError, nothing foreign crosses
the API, nothing acknowledged is lost, and writes go on once space returns."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import order

from rstmdb_storage import Storage, StorageConfig, StorageFullError


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(storage: Storage, acked: dict[str, int], first: int) -> StorageFullError:
    """Write until the disk is full; return the error that said so."""
    for i in range(first, first + 100_000):
        instance = order(f"o{i}", ctx={"pad": os.urandom(3000).hex()})
        try:
            acked[instance.id] = storage.put_instance(instance)
        except StorageFullError as exc:
            return exc
    raise AssertionError("the disk never filled")


@pytest.mark.parametrize("batches", [False, True])
def test_a_full_disk_is_storage_full_and_writes_resume_when_space_returns(
    small_disk: Path, batches: bool
) -> None:
    spare = small_disk / "spare"
    spare.write_bytes(bytes(2 << 20))  # given back once the store has filled the rest
    config = StorageConfig(
        data_dir=small_disk / "db",
        wal_segment_size=256 * 1024,
        snapshot_interval=0,
        compaction_enabled=False,
    )
    acked: dict[str, int] = {}
    with Storage.open(config) as storage:
        if batches:
            with pytest.raises(StorageFullError):
                for chunk in range(1000):
                    with storage.batch() as batch:
                        for i in range(20):
                            batch.put_instance(
                                order(f"b{chunk}-{i}", ctx={"pad": os.urandom(3000).hex()})
                            )
                    for i in range(20):
                        acked[f"b{chunk}-{i}"] = batch.seq
        else:
            assert "no space left" in str(fill(storage, acked, 0)).lower()
        assert acked, "nothing was written before the disk filled"
        spare.unlink()
        # Writes resume; every acknowledged write is there.
        storage.put_instance(order("after-the-disk-filled"))
        stored = {i.id: i.last_wal_offset for i in storage.iter_instances()}
        assert {k: stored.get(k) for k in acked} == acked
    with Storage.open(config) as storage:
        stored = {i.id: i.last_wal_offset for i in storage.iter_instances()}
        assert {k: stored.get(k) for k in acked} == acked
        assert "after-the-disk-filled" in stored
        assert storage.verify() == []
