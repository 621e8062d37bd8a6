"""Opening after trouble: checkpoints, a reboot with unflushed LMDB commits, a lost indexes/."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import lmdb
import pytest
from crc32c import crc32c
from internals import (
    append_raw_records,
    checkpointed_seq,
    shift_wal_sync_clock,
    wait_for_flusher,
    wal_has_unsynced,
)

from rstmdb_storage import (
    CorruptionError,
    FsyncPolicy,
    Instance,
    Storage,
    StorageConfig,
    StorageError,
    failpoints,
)
from rstmdb_storage.changes import PutInstance
from rstmdb_storage.engine import probe_wal
from rstmdb_storage.store.meta import Checkpoint, Meta


def order(instance_id: str, state: str = "pending") -> Instance:
    return Instance(id=instance_id, machine="order", version=1, state=state, ctx={"pad": "p" * 200})


def fill(config: StorageConfig, count: int) -> None:
    with Storage.open(config) as storage:
        for i in range(count):
            storage.put_instance(order(f"o{i}"))


def rewrite_lmdb(config: StorageConfig, change) -> None:
    """Edit the LMDB environment behind the store's back, as damage or a reboot would."""
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            change(env, txn)
    finally:
        env.close()


def pretend_reboot_before_checkpoint(env, txn) -> None:
    Meta(env.open_db(b"meta", txn=txn)).write_checkpoint(txn, Checkpoint(0, "another-boot"))


def flip_a_value(env, txn) -> None:
    db = env.open_db(b"instances", txn=txn)
    value = bytearray(txn.get(b"o3", db=db))
    value[-1] ^= 0x01
    txn.put(b"o3", bytes(value), db=db)


def read_lmdb(config: StorageConfig, read):
    """``read(env, txn)`` on the LMDB environment of a closed store."""
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16, readonly=True)
    try:
        with env.begin() as txn:
            return read(env, txn)
    finally:
        env.close()


def recorded_checkpoint(env, txn) -> Checkpoint:
    return Meta(env.open_db(b"meta", txn=txn, create=False)).checkpoint(txn)


def test_checkpoint_flushes_and_records_the_applied_sequence(storage: Storage) -> None:
    for i in range(3):
        storage.put_instance(order(f"o{i}"))
    assert storage.checkpoint() == 3
    assert checkpointed_seq(storage) == 3


def test_the_background_flusher_checkpoints_after_writes(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, checkpoint_interval_ms=5)
    with Storage.open(config) as storage:
        for i in range(30):
            storage.put_instance(order(f"o{i}"))
        assert wait_for_flusher(storage, lambda: checkpointed_seq(storage) == 30, timeout=30)


def test_every_ms_policy_syncs_without_waiting_for_another_write(data_dir: Path) -> None:
    config = StorageConfig(
        data_dir=data_dir, fsync_policy=FsyncPolicy.every_ms(20), checkpoint_interval_ms=3_600_000
    )
    with Storage.open(config) as storage:
        failpoints.enable("checkpoint.after_wal_sync", "off")  # counts checkpoints
        try:
            shift_wal_sync_clock(storage, 3600)  # the write below is not due for a sync itself
            storage.put_instance(order("o0"))
            assert wal_has_unsynced(storage)
            shift_wal_sync_clock(storage, -7200)  # now it is due: the flusher must sync it
            assert wait_for_flusher(storage, lambda: not wal_has_unsynced(storage), timeout=30)
            assert failpoints.hits("checkpoint.after_wal_sync") == 0  # no checkpoint did it
        finally:
            failpoints.disable()


def test_close_records_a_checkpoint_of_everything(config: StorageConfig) -> None:
    fill(config, 5)
    checkpoint = read_lmdb(config, recorded_checkpoint)
    assert checkpoint.applied_seq == 5
    assert checkpoint.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_reboot_with_unflushed_commits_checks_lmdb_and_opens_when_sound(
    config: StorageConfig,
) -> None:
    fill(config, 10)
    rewrite_lmdb(config, pretend_reboot_before_checkpoint)
    with Storage.open(config) as storage:
        assert storage.count_instances() == 10 and storage.verify() == []


def test_reboot_with_unflushed_commits_rebuilds_a_damaged_lmdb(config: StorageConfig) -> None:
    fill(config, 10)
    with Storage.open(config) as storage:
        expected = list(storage.iter_instances())
    rewrite_lmdb(config, flip_a_value)
    rewrite_lmdb(config, pretend_reboot_before_checkpoint)
    with Storage.open(config) as storage:
        assert list(storage.iter_instances()) == expected
        assert storage.verify() == []
    kept = [p.name for p in (config.path / "indexes").iterdir() if ".broken-" in p.name]
    assert len(kept) == 1 and kept[0].startswith("data.mdb.broken-")  # moved aside, not deleted


def test_a_damaged_lmdb_is_not_replaced_while_another_user_has_it_open(
    config: StorageConfig,
) -> None:
    fill(config, 10)
    rewrite_lmdb(config, flip_a_value)
    rewrite_lmdb(config, pretend_reboot_before_checkpoint)
    fd = os.open(config.path / "indexes" / "users.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what every process with the store open holds
        for _ in range(2):  # a failed open must not checkpoint the damage into looking sound
            with pytest.raises(CorruptionError, match="another process has it open") as raised:
                Storage.open(config)
            assert "o3" in str(raised.value)
    finally:
        os.close(fd)


def test_damage_without_a_reboot_is_found_on_read_and_by_verify(config: StorageConfig) -> None:
    fill(config, 10)
    rewrite_lmdb(config, flip_a_value)
    with Storage.open(config) as storage:
        with pytest.raises(CorruptionError, match="o3"):
            storage.get_instance("o3")
        assert [f.where for f in storage.verify()] == ["instances[b'o3']"]


def test_lost_indexes_are_rebuilt_from_the_wal(config: StorageConfig) -> None:
    fill(config, 400)  # several segments
    with Storage.open(config) as storage:
        storage.delete_instance("o7")
        expected = {inst.id: inst for inst in storage.iter_instances()}
    shutil.rmtree(config.path / "indexes")
    with Storage.open(config) as storage:
        assert {inst.id: inst for inst in storage.iter_instances()} == expected
        assert storage.put_instance(order("next")) == 402


def test_wal_file_descriptors_do_not_pile_up(data_dir: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    config = StorageConfig(
        data_dir=data_dir, wal_segment_size=64 * 1024, fsync_policy=FsyncPolicy.never()
    )
    with Storage.open(config) as storage:
        for i in range(50):
            storage.put_instance(order(f"warm{i}"))
        before = open_fds()
        for i in range(1500):  # many 64 KiB segments
            storage.put_instance(order(f"o{i}"))
        assert len(storage.wal_segments()) > 5
        assert open_fds() <= before + 1


def test_verify_reports_stored_fields_a_write_would_refuse(config: StorageConfig) -> None:
    fill(config, 3)

    def write_wrong_types(env, txn) -> None:
        from rstmdb_storage.codec import cbor_dumps, encode_instance_value

        body = cbor_dumps([5, "x", None, [1], 7, "zzz", 3], "test")  # valid CBOR, wrong types
        db = env.open_db(b"instances", txn=txn)
        txn.put(b"o1", encode_instance_value(b"o1", 1, 1, 1, body), db=db)

    rewrite_lmdb(config, write_wrong_types)
    with Storage.open(config) as storage:
        findings = storage.verify()
    assert {f.where for f in findings} == {"instances[b'o1']"}
    assert "not valid" in findings[0].problem
    # and the WAL, which put it at a later sequence than the forged value claims, agrees
    assert [f.problem for f in findings[1:]] == [
        "stored as written at sequence 1, but WAL record 2 put it after that"
    ]


def test_an_unreadable_lmdb_file_is_a_corruption_error_naming_it(data_dir: Path) -> None:
    (data_dir / "indexes").mkdir(parents=True)
    (data_dir / "indexes" / "data.mdb").write_bytes(b"not lmdb" * 4096)
    with pytest.raises(CorruptionError, match="not a readable LMDB environment") as raised:
        Storage.open(data_dir)
    assert raised.value.path == str(data_dir / "indexes")


def test_a_data_dir_that_is_a_file_is_a_storage_error(tmp_path: Path) -> None:
    from rstmdb_storage import StorageError

    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="creating the data directory"):
        Storage.open(tmp_path / "file")


def append_unapplied(config: StorageConfig, ids: list[str]) -> list[tuple[int, int]]:
    """Append records to the WAL that LMDB never applies (as if the machine lost power between
    appending and applying them); return (seq, offset) of each."""
    with Storage.open(config) as storage:
        size = storage.config.max_instance_size
        records = [[PutInstance.of(order(i), None, None, size)] for i in ids]
        return append_raw_records(storage, records, timestamp_ms=1)


def record_offset(config: StorageConfig, seq: int) -> int:
    """Where WAL record *seq* of a closed store starts in its segment."""
    wal = probe_wal(config)
    try:
        (record,) = wal.records(seq, seq)
        return record.offset
    finally:
        wal.close()


def flip_payload_byte(config: StorageConfig, offset: int) -> None:
    path = sorted((config.path / "wal").glob("*.wal"))[-1]
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0xFF  # inside the payload: the CRC no longer matches
    path.write_bytes(bytes(data))


def test_repair_cuts_a_torn_record_that_intact_unapplied_ones_follow(
    config: StorageConfig,
) -> None:
    fill(config, 5)
    placed = append_unapplied(config, ["late-1", "late-2", "late-3"])
    flip_payload_byte(config, placed[0][1])
    with pytest.raises(CorruptionError, match="damage inside the log"):
        Storage.open(config)
    repair = Storage.repair_wal(config)
    assert repair is not None and repair.offset == placed[0][1]
    assert Path(repair.copy_path).exists()
    assert Storage.repair_wal(config) is None  # nothing left to cut
    with Storage.open(config) as storage:
        assert storage.applied_seq == 5 and storage.get_instance("late-3") is None
        assert storage.put_instance(order("next")) == 6
        assert storage.verify() == []


def test_repair_refuses_damage_in_what_lmdb_applied(config: StorageConfig) -> None:
    fill(config, 5)
    flip_payload_byte(config, record_offset(config, 5))
    path = sorted((config.path / "wal").glob("*.wal"))[-1]
    before = path.read_bytes()
    with pytest.raises(CorruptionError, match="LMDB has applied sequence 5"):
        Storage.repair_wal(config)
    assert path.read_bytes() == before


def test_repair_refuses_while_the_store_is_open(storage: Storage) -> None:
    with pytest.raises(StorageError, match="is open"):
        Storage.repair_wal(storage.config)


def test_verify_finds_bytes_after_a_stored_body(config: StorageConfig) -> None:
    """A value with a valid CRC but bytes after its CBOR body: the store never writes one, so
    verify() reports it (reads do not look: the CRC shows the bytes are the ones written)."""
    fill(config, 3)

    def append_a_byte(env, txn) -> None:
        db = env.open_db(b"instances", txn=txn)
        tail = txn.get(b"o1", db=db)[4:] + b"\x00"
        txn.put(b"o1", crc32c(tail, crc32c(b"o1")).to_bytes(4, "little") + tail, db=db)

    rewrite_lmdb(config, append_a_byte)
    with Storage.open(config) as storage:
        findings = storage.verify()
        assert [(f.where, f.problem.split(": ")[-1]) for f in findings] == [
            ("instances[b'o1']", "bytes follow the CBOR value")
        ]
