"""Recovery from snapshots: a lost or damaged indexes/ rebuilt from the newest intact snapshot and
the WAL after it, falling back to an older snapshot; point-in-time restore; gaps named."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import order

from rstmdb_storage import (
    CorruptionError,
    InvalidInputError,
    RecoveryNeededError,
    Storage,
    StorageConfig,
    WalGapError,
)
from rstmdb_storage import engine as engine_module
from rstmdb_storage.wal.format import segment_name

PAD = "p" * 1500  # about 40 records fill a 64 KiB segment


def state_of(storage: Storage) -> dict[str, tuple[str, int]]:
    return {inst.id: (inst.state, inst.last_wal_offset) for inst in storage.iter_instances()}


def write(storage: Storage, first: int, count: int, history: dict[int, dict] | None = None) -> None:
    """Put or move instances ``o<i % 60>``; record the state after every write in *history*."""
    for i in range(first, first + count):
        seq = storage.put_instance(order(f"o{i % 60}", state=f"s{i}", ctx={"pad": PAD}))
        if history is not None:
            history[seq] = state_of(storage)


def lose_indexes(config: StorageConfig) -> None:
    shutil.rmtree(config.path / "indexes")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_lost_indexes_come_back_from_snapshot_and_wal_after_compaction(
    config: StorageConfig,
) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 200)
        snapshot = storage.create_snapshot()
        write(storage, 200, 150)
        storage.delete_instance("o7")
        result = storage.compact()
        assert result.snapshots_created == 1 and result.segments_deleted > 0
        assert storage.wal_segments()[0] > 1  # the WAL alone can no longer rebuild the store
        expected, applied = state_of(storage), storage.applied_seq
    lose_indexes(config)
    with Storage.open(config) as storage:
        assert state_of(storage) == expected
        assert storage.applied_seq == applied
        assert storage.put_instance(order("next")) == applied + 1
        assert storage.verify() == []
        assert snapshot.seq < storage.list_snapshots()[-1].seq


def test_a_corrupt_newest_snapshot_falls_back_to_the_one_before(
    config: StorageConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 100)
        storage.compact()
        write(storage, 100, 100)
        newest = storage.create_snapshot()
        write(storage, 200, 50)
        storage.compact()  # keeps two snapshots, and the WAL from the older one on
        expected = state_of(storage)
        newest = storage.list_snapshots()[-1]
    flip_byte(config.path / "snapshots" / f"{newest.name}.mdb", newest.size // 2)
    lose_indexes(config)
    with Storage.open(config) as storage:
        assert state_of(storage) == expected
        assert storage.verify() != []  # the damaged snapshot is reported, not hidden
    assert f"skipping snapshot {newest.name}" in caplog.text


def test_an_unreadable_lmdb_file_is_moved_aside_and_rebuilt(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 120)
        storage.compact()
        write(storage, 120, 30)
        expected = state_of(storage)
    data = config.path / "indexes" / "data.mdb"
    data.write_bytes(b"\x00" * 4096 * 4)
    with Storage.open(config) as storage:
        assert state_of(storage) == expected
    assert [p.name.split("-")[0] for p in data.parent.glob("data.mdb.broken-*")] == [
        "data.mdb.broken"
    ]


def test_rebuilding_reports_progress(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 100)
        storage.compact()
        write(storage, 100, 30)
    lose_indexes(config)
    steps: dict[str, tuple[int, int]] = {}
    with Storage.open(
        config, progress=lambda step, done, total: steps.update({step: (done, total)})
    ):
        pass
    assert set(steps) == {"checksum", "copy", "replay"}
    assert steps["copy"][0] == steps["copy"][1] > 0
    assert steps["replay"][0] == 30


def test_replay_commits_a_transaction_per_2000_changes_and_never_splits_a_record(
    config: StorageConfig,
) -> None:
    # LMDB holds a write transaction's dirty pages in memory until the commit: replay bounds
    # them by changes, not records (a batch record can hold tens of thousands of puts).
    with Storage.open(config) as storage:
        for size in (2500, 1000, 1000, 1000, 1000):
            with storage.batch() as batch:
                for i in range(size):
                    batch.put_instance(order(f"o{i}", state=f"s{size}"))
    lose_indexes(config)
    replayed: list[int] = []
    with Storage.open(
        config, progress=lambda step, done, total: replayed.append(done) if step == "replay" else 0
    ) as storage:
        assert storage.applied_seq == 5 and storage.count_instances() == 2500
        assert storage.verify() == []
    # after each transaction: 2,500 changes alone, then 2 records of 1,000 each (and a last,
    # empty one that finds the end)
    assert list(dict.fromkeys(replayed)) == [1, 3, 5]


def test_a_missing_segment_after_the_snapshot_is_a_gap_naming_the_sequences(
    config: StorageConfig,
) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 100)
        snapshot = storage.compact()
        write(storage, 100, 200)
        snapshot = storage.list_snapshots()[-1]
        segments = storage.wal_segments()
    needed = max(first for first in segments if first <= snapshot.seq + 1)
    following = segments[segments.index(needed) + 1]
    (config.path / "wal" / segment_name(needed)).unlink()
    lose_indexes(config)
    with pytest.raises(WalGapError, match=f"{snapshot.seq + 1}..{following - 1}"):
        Storage.open(config)


def test_without_snapshots_a_wal_that_starts_late_cannot_rebuild(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 100)
        storage.compact()
        first = storage.wal_segments()[0]
    for path in (config.path / "snapshots").glob("0*"):
        path.unlink()
    lose_indexes(config)
    with pytest.raises(WalGapError, match=f"sequences 1..{first - 1} are missing"):
        Storage.open(config)


def test_point_in_time_restore_equals_the_state_at_that_sequence(
    config: StorageConfig, tmp_path: Path
) -> None:
    history: dict[int, dict] = {}
    with Storage.open(config) as storage:
        write(storage, 0, 80, history)
        first_snapshot = storage.compact().snapshots_created and storage.list_snapshots()[0]
        write(storage, 80, 80, history)
        storage.create_snapshot()
        write(storage, 160, 40, history)
        applied = storage.applied_seq
    wanted = [first_snapshot.seq, first_snapshot.seq + 1, 123, 160, 161, applied - 1]
    for seq in wanted:
        target = tmp_path / f"restore-{seq}"
        assert Storage.restore(config.path, target, seq=seq) == seq
        with Storage.open(target) as restored:
            assert restored.applied_seq == seq
            assert state_of(restored) == history[seq]
            assert restored.verify() == []
            assert restored.put_instance(order("after")) == seq + 1
    latest = tmp_path / "restore-latest"
    assert Storage.restore(config.path, latest) == applied
    with Storage.open(latest) as restored:
        assert state_of(restored) == history[applied]


def test_restore_refuses_what_it_cannot_do(config: StorageConfig, tmp_path: Path) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 120)
        storage.compact()
        write(storage, 120, 10)
        oldest = storage.list_snapshots()[0].seq
        applied = storage.applied_seq
    with pytest.raises(InvalidInputError, match="not covered"):
        Storage.restore(config.path, tmp_path / "early", seq=oldest - 1)
    with pytest.raises(InvalidInputError, match="not covered"):
        Storage.restore(config.path, tmp_path / "future", seq=applied + 1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not empty"):
        Storage.restore(config.path, busy)
    assert [p.name for p in busy.iterdir()] == ["something"]
    assert not (tmp_path / "early").exists() or not any((tmp_path / "early").iterdir())


def _write_until_told(data_dir: str, stop, written) -> None:  # runs in another process
    config = StorageConfig(data_dir=data_dir, snapshot_interval=0, compaction_enabled=False)
    with Storage.open(config) as storage:
        i = 0
        while not stop.is_set():
            storage.put_instance(order(f"k{i % 40}", state=f"s{i}"))
            i += 1
            written.value = i


def test_a_snapshot_taken_while_another_process_writes_is_the_state_at_its_sequence(
    config: StorageConfig, tmp_path: Path
) -> None:
    with Storage.open(config) as storage:
        context = multiprocessing.get_context("spawn")
        stop, written = context.Event(), context.Value("q", 0)
        writer = context.Process(target=_write_until_told, args=(str(config.path), stop, written))
        writer.start()
        try:
            manifests, last = [], 0
            while len(manifests) < 5 and writer.is_alive():
                if written.value > last + 20:  # the writer has moved on since the last one
                    manifests.append(storage.create_snapshot())
                    last = written.value
        finally:
            stop.set()
            writer.join(timeout=60)
        assert writer.exitcode == 0 and len(manifests) == 5
        for manifest in manifests:
            # One writer on a fresh store: write i has sequence number i + 1.
            expected = {f"k{i % 40}": f"s{i}" for i in range(manifest.seq)}
            target = tmp_path / f"at-{manifest.seq}"
            Storage.restore(config.path, target, seq=manifest.seq)
            with Storage.open(target) as restored:
                got = {inst.id: inst.state for inst in restored.iter_instances()}
            assert got == expected
            assert len(expected) == manifest.instances


def test_restore_writes_only_inside_its_target(config: StorageConfig, tmp_path: Path) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 60)
        storage.compact()
    before = sorted(p.relative_to(config.path) for p in config.path.rglob("*"))
    target = tmp_path / "target"
    Storage.restore(config.path, target)
    after = sorted(p.relative_to(config.path) for p in config.path.rglob("*"))
    assert after == before
    assert all(str(p.resolve()).startswith(str(target.resolve())) for p in target.rglob("*"))


def test_corrupt_snapshot_only_is_reported_by_open_when_it_was_needed(
    config: StorageConfig,
) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 100)
        storage.compact()
        write(storage, 100, 5)
        only = storage.list_snapshots()[0]
    flip_byte(config.path / "snapshots" / f"{only.name}.mdb", 100)
    lose_indexes(config)
    with pytest.raises(CorruptionError, match="cannot be rebuilt"):
        Storage.open(config)


def test_restore_from_a_source_it_cannot_lock(
    config: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only backup (which nobody can compact) is restored without the snapshot lock."""
    with Storage.open(config) as storage:
        write(storage, 0, 60)
        storage.compact()
        expected = state_of(storage)
    real_open = os.open

    def read_only_lock_file(path, flags, *args):
        if str(path) == str(config.path / "snapshots" / "snapshot.lock"):  # the source's only
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_lock_file)
    Storage.restore(config.path, tmp_path / "copy")
    monkeypatch.undo()
    with Storage.open(tmp_path / "copy") as restored:
        assert state_of(restored) == expected


@pytest.mark.parametrize("loss", ["emptied", "deleted"])
def test_a_data_file_lost_to_a_power_cut_is_recovered_not_taken_for_a_new_store(
    config: StorageConfig, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Storage.open(config) as storage:
        write(storage, 0, 200)
        storage.compact()  # a snapshot, and the WAL before it deleted
        write(storage, 200, 50)
        assert storage.wal_segments()[0] > 1
        expected, applied = state_of(storage), storage.applied_seq
    data = config.path / "indexes" / "data.mdb"
    if loss == "emptied":
        data.write_bytes(b"")  # what an unsynced new file is after a power cut
    else:
        data.unlink()
    (config.path / "indexes" / "lock.mdb").unlink()
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-the-power-cut")
    assert Storage.repair_wal(config) is None  # nothing to cut; and no error about meta
    with Storage.open(config) as storage:
        assert storage.applied_seq == applied
        assert state_of(storage) == expected
        assert storage.verify() == []


_WRITE_THEN_DIE = """
import os, sys
from rstmdb_storage import Instance, Storage, StorageConfig
config = StorageConfig(data_dir=sys.argv[1], snapshot_interval=0, checkpoint_interval_ms=600000)
storage = Storage.open(config)
for i in range(100):
    storage.put_instance(Instance(id=f"o{i}", machine="m", version=1, state="flushed"))
storage.checkpoint()
for i in range(100, 150):  # committed to LMDB, never flushed: in the WAL only, durably
    storage.put_instance(Instance(id=f"o{i}", machine="m", version=1, state="unflushed"))
os._exit(0)  # the power goes: no close, no checkpoint
"""


@pytest.mark.parametrize("snapshot", [False, True])
def test_after_a_power_cut_an_unflushed_data_file_is_rebuilt_without_being_opened(
    config: StorageConfig, monkeypatch: pytest.MonkeyPatch, snapshot: bool
) -> None:
    if snapshot:
        with Storage.open(config) as storage:
            storage.put_instance(order("before"))
            storage.create_snapshot()
    subprocess.run([sys.executable, "-c", _WRITE_THEN_DIE, str(config.path)], check=True)
    data = config.path / "indexes" / "data.mdb"
    # The unflushed pages were lost; the meta pages name pages past the end of the file, as
    # after a real power cut: LMDB, mapping it, would die with SIGBUS on the first read.
    with open(data, "r+b") as f:
        f.truncate(3 * 4096)
    monkeypatch.setattr(engine_module, "boot_id", lambda: "after-the-power-cut")
    with pytest.raises(RecoveryNeededError, match="may be torn"):
        Storage.open(StorageConfig(data_dir=config.path, read_only=True))
    with Storage.open(config) as storage:
        states = {i.id: i.state for i in storage.iter_instances()}
        assert len(states) == 150 + snapshot and states["o149"] == "unflushed"
        assert storage.verify() == []
    assert list((config.path / "indexes").glob("data.mdb.broken-*")), "kept aside, not deleted"
    with Storage.open(config) as storage:  # and the next open trusts the rebuilt file
        assert storage.count_instances() == 150 + snapshot
