"""The scrub and healing: damage in LMDB (which keeps no page checksums) is found by a slice
of the background scrub, or a whole cycle on demand, before a read misses it; the store then
fail-stops, and the next open rebuilds ``indexes/`` with every acknowledged write.

A lost key is staged by deleting an instance and its index entries behind the store's back
(what a damaged branch page does to a lookup); a moved key by flipping bits of ``data.mdb``.
"""

from __future__ import annotations

import contextlib
import random
import threading
from pathlib import Path

import lmdb
import pytest
from helpers import order
from internals import wait_for_flusher

from rstmdb_storage import (
    ConflictError,
    InstanceNotFoundError,
    RecoveryNeededError,
    Storage,
    StorageConfig,
    StorageError,
    StorageFailedError,
)
from rstmdb_storage.store.indexes import entries_of


def fill(config: StorageConfig, count: int) -> None:
    with Storage.open(config) as storage, storage.batch() as batch:
        for i in range(count):
            batch.put_instance(order(f"o{i:04d}", metadata={"n": i}))


def lose_key(config: StorageConfig, instance_id: str) -> None:
    """Delete *instance_id* and its index entries from LMDB, as if a page had lost them."""
    with Storage.open(config) as storage:
        inst = storage.get_instance(instance_id)
    assert inst is not None
    env = lmdb.open(str(config.path / "indexes"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            for db, key in entries_of(inst):
                assert txn.delete(key, db=env.open_db(db, txn=txn))
            assert txn.delete(instance_id.encode(), db=env.open_db(b"instances", txn=txn))
    finally:
        env.close()


def test_a_lost_key_is_found_by_the_wal_cross_check(config: StorageConfig) -> None:
    fill(config, 50)
    lose_key(config, "o0007")
    with Storage.open(config) as storage:
        assert storage.get_instance("o0007") is None  # the silent miss
        (finding,) = storage.verify()
        assert finding.where == "instances[b'o0007']"
        assert finding.problem.startswith("missing: WAL record 1 put it")
        assert [str(f) for f in storage.scrub()] == [str(finding)]


def test_damage_found_by_the_scrub_fail_stops_and_the_next_open_heals(
    config: StorageConfig,
) -> None:
    fill(config, 50)
    with Storage.open(config) as storage:
        storage.create_snapshot()
        storage.put_instance(order("after-snapshot"))
    lose_key(config, "o0007")
    with Storage.open(config) as storage:
        assert storage.scrub()
        with pytest.raises(StorageFailedError, match="scrub"):
            storage.put_instance(order("refused"))
        health = storage.health()
        assert "scrub" in health["failed"] and health["scrub"]["findings"]
        assert storage.get_instance("o0001") is not None  # reads go on
        with pytest.raises(RecoveryNeededError, match="untrusted"):
            Storage.open(StorageConfig(data_dir=config.data_dir, read_only=True))
    with Storage.open(config) as storage:
        assert storage.get_instance("o0007") is not None
        assert storage.get_instance("after-snapshot") is not None
        assert storage.get_instance("refused") is None
        assert storage.verify() == []
        assert storage.health()["failed"] is None
    assert list((config.path / "indexes").glob("data.mdb.broken-*")), "kept aside"


def test_the_background_scrub_finds_it_by_itself(config: StorageConfig) -> None:
    fill(config, 20)
    lose_key(config, "o0003")
    background = StorageConfig(
        data_dir=config.data_dir,
        wal_segment_size=config.wal_segment_size,
        scrub_interval_ms=1,
        checkpoint_interval_ms=5,
    )
    with Storage.open(background) as storage:
        assert wait_for_flusher(storage, lambda: storage.health()["failed"] is not None)
        health = storage.health()
        assert "o0003" in health["failed"] and health["scrub"]["slices"] >= 1
        assert health["background_thread"] is False  # it stopped with the store
    with Storage.open(config) as storage:
        assert storage.get_instance("o0003") is not None and storage.verify() == []


def test_a_sound_store_under_writes_gives_no_findings(config: StorageConfig) -> None:
    """Slices meet writes between them: none of those may be taken for damage (puts,
    transitions, conditional and idempotent writes, deletes, batches, snapshots, compaction)."""
    busy = StorageConfig(
        data_dir=config.data_dir,
        wal_segment_size=config.wal_segment_size,
        snapshot_interval=300,
        max_wal_segments=2,
        scrub_interval_ms=1,
        checkpoint_interval_ms=2,
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    with Storage.open(busy) as storage:

        def write() -> None:
            rng = random.Random(7)
            try:
                n = 0
                while not stop.is_set():
                    n += 1
                    key = f"w{rng.randrange(300)}"
                    choice = rng.randrange(5)
                    # absent, or in another state: refused conditions are part of the load
                    with contextlib.suppress(ConflictError, InstanceNotFoundError):
                        if choice == 0:
                            storage.delete_instance(key)
                        elif choice == 1:
                            storage.transition(key, "pending", "paid", idempotency_key=f"k{n}")
                        elif choice == 2:
                            with storage.batch() as batch:
                                batch.put_instance(order(key, metadata={"n": n}))
                                batch.delete_instance(f"w{rng.randrange(300)}")
                        else:
                            storage.put_instance(order(key, ctx={"n": n}))
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for _ in range(15):
                assert storage.scrub() == []
        finally:
            stop.set()
            writer.join()
        assert errors == []
        assert storage.health()["failed"] is None
        assert storage.health()["scrub"]["cycles"] >= 15
        assert storage.verify() == []


FLIP_TRIALS = 40


@pytest.mark.parametrize("seed", range(FLIP_TRIALS))
def test_a_flipped_bit_that_changes_a_read_is_found_by_the_scrub(tmp_path: Path, seed: int) -> None:
    """A bit flipped anywhere in ``data.mdb`` past its meta pages: when any read of the
    stored instances then differs (a miss, a wrong value, a typed error), the scrub finds
    something; no flip makes a call raise anything but a StorageError."""
    data_dir = tmp_path / "data"
    config = StorageConfig(data_dir=data_dir, snapshot_interval=0, compaction_enabled=False)
    expected = {f"o{i:04d}": i for i in range(400)}
    with Storage.open(config) as storage, storage.batch() as batch:
        for key, n in expected.items():
            batch.put_instance(order(key, metadata={"n": n}, ctx={"pad": "x" * (n % 40)}))
    data_file = data_dir / "indexes" / "data.mdb"
    data = bytearray(data_file.read_bytes())
    rng = random.Random(seed)
    bit = rng.randrange(2 * 4096 * 8, len(data) * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    data_file.write_bytes(bytes(data))
    try:
        storage = Storage.open(config)
    except StorageError:
        return  # refused at open, typed: nothing served from it
    with storage:
        differs = False
        for key, n in expected.items():
            try:
                inst = storage.get_instance(key)
                differs |= inst is None or inst.metadata != {"n": n}
            except StorageError:
                differs = True
        try:
            listed = {inst.id for inst in storage.iter_instances()}
            differs |= listed != set(expected)
        except StorageError:
            differs = True
        found = storage.scrub()
        assert found or not differs, f"bit {bit}: reads differ and the scrub found nothing"
