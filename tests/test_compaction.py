"""Compaction and automatic snapshots: what goes, what must stay, and who does it."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import lmdb
import pytest
from helpers import order
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from internals import join_maintenance, wait_for_flusher

from rstmdb_storage import ConfigError, InvalidInputError, Storage, StorageConfig
from rstmdb_storage.codec import seal, unseal
from rstmdb_storage.compaction import plan_compaction
from rstmdb_storage.snapshots import SnapshotManifest

PAD = "p" * 1500  # about 40 records fill a 64 KiB segment


def write(storage: Storage, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        storage.put_instance(order(f"o{i % 50}", state=f"s{i}", ctx={"pad": PAD}))


def records_from(storage: Storage, seq: int) -> list[int]:
    return [record.seq for record in storage.read_wal(from_seq=seq)]


def wait_for(storage: Storage, condition) -> None:
    """Wait for background passes until *condition* holds (no fixed sleep), then for the
    snapshot or compaction they started to finish."""
    assert wait_for_flusher(storage, condition, timeout=60)
    join_maintenance(storage)


def test_compact_snapshots_then_deletes_what_the_snapshot_covers(storage: Storage) -> None:
    write(storage, 200)
    segments = storage.wal_segments()
    wal_dir = storage.config.path / "wal"
    sizes = {first: (wal_dir / f"{first:020d}.wal").stat().st_size for first in segments}
    result = storage.compact()
    left = storage.wal_segments()
    assert result.snapshots_created == 1 and result.segments_deleted == len(segments) - len(left)
    assert result.bytes_reclaimed == sum(sizes[first] for first in segments if first not in left)
    assert left[0] <= 201 and len(left) >= 1
    assert records_from(storage, left[0]) == list(range(left[0], 201))
    again = storage.compact()  # nothing changed: no snapshot, nothing to delete
    assert (again.snapshots_created, again.segments_deleted, again.bytes_reclaimed) == (0, 0, 0)


def test_compaction_keeps_snapshots_kept_and_the_wal_from_the_oldest(data_dir: Path) -> None:
    config = StorageConfig(
        data_dir=data_dir,
        wal_segment_size=64 * 1024,
        snapshot_interval=0,
        compaction_enabled=False,
        snapshots_kept=2,
    )
    with Storage.open(config) as storage:
        taken = []
        for round_ in range(4):
            write(storage, 90, start=round_ * 90)
            result = storage.compact()
            taken.append(storage.applied_seq)
            assert result.snapshots_deleted == (1 if round_ >= 2 else 0)
        assert [m.seq for m in storage.list_snapshots()] == taken[-2:]
        oldest = taken[-2]
        assert storage.wal_segments()[0] <= oldest + 1
        assert records_from(storage, oldest + 1) == list(range(oldest + 1, taken[-1] + 1))
        assert storage.verify() == []


def test_a_wal_hold_keeps_records_until_released(storage: Storage) -> None:
    write(storage, 100)
    storage.hold_wal("shipper", 10)
    storage.compact()
    assert storage.wal_holds() == {"shipper": 10}
    assert records_from(storage, 10)[0] == 10
    assert storage.release_wal("shipper") is True
    assert storage.release_wal("shipper") is False
    write(storage, 10, start=100)
    assert storage.compact().segments_deleted > 0
    assert storage.wal_segments()[0] > 10
    with pytest.raises(InvalidInputError):
        storage.hold_wal("bad", -1)


def test_automatic_snapshots_every_interval_count_changes_inside_batches(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, snapshot_interval=100, compaction_enabled=False)
    with Storage.open(config) as storage:
        with storage.batch() as batch:
            for i in range(99):
                batch.put_instance(order(f"b{i}"))
        assert storage.list_snapshots() == []
        storage.delete_instance("b0")  # the 100th change
        wait_for(storage, lambda: len(storage.list_snapshots()) == 1)
        assert storage.list_snapshots()[0].seq == storage.applied_seq == 2


def as_format_1(data_dir: Path) -> None:
    """Rewrite the meta table of the (closed) store in *data_dir* as format 1 kept it: the
    change count under ``change_count``, the applied tail without it (see store/meta.py)."""
    with lmdb.open(str(data_dir / "indexes"), max_dbs=16) as env:
        meta = env.open_db(b"meta")
        with env.begin(write=True, db=meta) as txn:
            tail = unseal(b"wal_tail", txn.get(b"wal_tail"), "meta")
            assert len(tail) == 32  # segment, offset, next_seq, change count
            txn.put(b"wal_tail", seal(b"wal_tail", tail[:24]))
            txn.put(b"change_count", seal(b"change_count", tail[24:]))
            txn.put(b"format_version", seal(b"format_version", struct.pack("<I", 1)))


def meta_values(data_dir: Path) -> dict[bytes, bytes]:
    with lmdb.open(str(data_dir / "indexes"), max_dbs=16, readonly=True) as env:
        meta = env.open_db(b"meta")
        with env.begin(db=meta) as txn:
            return {key: unseal(key, raw, "meta") for key, raw in txn.cursor()}


def test_a_format_1_store_keeps_counting_its_changes_and_is_converted_by_a_write(
    data_dir: Path,
) -> None:
    config = StorageConfig(data_dir=data_dir, snapshot_interval=100, compaction_enabled=False)
    with Storage.open(config) as storage, storage.batch() as batch:
        for i in range(99):
            batch.put_instance(order(f"b{i}"))
    as_format_1(data_dir)
    with Storage.open(config) as storage:
        assert storage.verify() == []
        assert storage.list_snapshots() == []
        storage.delete_instance("b0")  # the 100th change: counted on from format 1's count
        wait_for(storage, lambda: len(storage.list_snapshots()) == 1)
        assert storage.list_snapshots()[0].seq == storage.applied_seq == 2
    values = meta_values(data_dir)
    assert b"change_count" not in values
    assert values[b"format_version"] == struct.pack("<I", 2)
    assert values[b"wal_tail"][24:] == struct.pack("<Q", 100)


def test_automatic_compaction_when_the_wal_outgrows_max_wal_segments(data_dir: Path) -> None:
    config = StorageConfig(
        data_dir=data_dir,
        wal_segment_size=64 * 1024,
        snapshot_interval=0,
        max_wal_segments=3,
        checkpoint_interval_ms=10,
    )
    with Storage.open(config) as storage:
        write(storage, 200)  # about five segments
        wait_for(storage, lambda: storage.list_snapshots() and len(storage.wal_segments()) <= 3)
        snapshot = storage.list_snapshots()[-1]
        assert records_from(storage, snapshot.seq + 1) == list(
            range(snapshot.seq + 1, storage.applied_seq + 1)
        )


def test_compaction_disabled_keeps_every_segment(data_dir: Path) -> None:
    config = StorageConfig(
        data_dir=data_dir,
        wal_segment_size=64 * 1024,
        snapshot_interval=50,
        max_wal_segments=2,
        compaction_enabled=False,
    )
    with Storage.open(config) as storage:
        write(storage, 200)
        wait_for(storage, lambda: len(storage.list_snapshots()) >= 1)
        assert storage.wal_segments()[0] == 1
        assert records_from(storage, 1) == list(range(1, 201))


def test_snapshots_kept_must_be_positive(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="snapshots_kept"):
        Storage.open(StorageConfig(data_dir=data_dir, snapshots_kept=0))


def manifest(seq: int) -> SnapshotManifest:
    return SnapshotManifest(seq=seq, size=0, crc32c=0, instances=0, created_at_ms=0, store_id=b"")


@given(
    bounds=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    snapshot_at=st.lists(st.integers(0, 400), max_size=6, unique=True),
    kept=st.integers(1, 4),
    holds=st.lists(st.integers(1, 400), max_size=2),
)
def test_the_plan_never_deletes_a_record_a_kept_snapshot_or_hold_needs(
    bounds: list[int], snapshot_at: list[int], kept: int, holds: list[int]
) -> None:
    firsts = [1]
    for length in bounds:
        firsts.append(firsts[-1] + length)  # segment i holds firsts[i] .. firsts[i + 1] - 1
    applied = firsts[-1] - 1
    snapshots = [manifest(seq) for seq in sorted(s for s in snapshot_at if s <= applied)]
    planned = plan_compaction(firsts, snapshots, kept, holds)
    left = [first for first in firsts if first not in planned.segments]
    assert left and left[-1] == firsts[-1]  # the segment being appended to always stays
    assert left == firsts[len(firsts) - len(left) :]  # only a prefix goes
    kept_snapshots = [m for m in snapshots if m not in planned.snapshots]
    assert len(kept_snapshots) == min(kept, len(snapshots))
    needed = [m.seq + 1 for m in kept_snapshots] + holds
    if not snapshots:
        assert left == firsts
    for seq in needed:
        if seq <= applied:
            assert left[0] <= seq  # the record is still in a segment present


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(1, 80)),
            st.tuples(st.just("snapshot"), st.just(0)),
            st.tuples(st.just("compact"), st.just(0)),
        ),
        min_size=1,
        max_size=10,
    ),
    segment_kib=st.sampled_from([64, 96, 128]),
    kept=st.integers(1, 3),
)
def test_after_any_compaction_every_kept_snapshot_can_be_replayed_forward(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, int]],
    segment_kib: int,
    kept: int,
) -> None:
    config = StorageConfig(
        data_dir=tmp_path_factory.mktemp("store"),
        wal_segment_size=segment_kib * 1024,
        snapshot_interval=0,
        compaction_enabled=False,
        snapshots_kept=kept,
    )
    written = 0
    with Storage.open(config) as storage:
        for action, count in steps:
            if action == "write":
                write(storage, count, start=written)
                written += count
            elif action == "snapshot":
                storage.create_snapshot()
            else:
                storage.compact()
            applied = storage.applied_seq
            for snapshot in storage.list_snapshots():
                assert records_from(storage, snapshot.seq + 1) == list(
                    range(snapshot.seq + 1, applied + 1)
                )
        assert storage.verify() == []
        expected = list(storage.iter_instances())
    shutil.rmtree(config.path / "indexes")  # the newest snapshot plus the WAL rebuild it
    with Storage.open(config) as storage:
        assert list(storage.iter_instances()) == expected
