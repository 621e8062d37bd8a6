"""The scrub and healing: damage in LMDB (which keeps no page checksums) is found by a slice
of the background scrub, or a whole cycle on demand, before a read misses it; the store then
heals in place when no other process has it open, or else fail-stops and is healed by the
next open; either way with every acknowledged write.

A lost key is staged by deleting an instance and its index entries behind the store's back
(what a damaged branch page does to a lookup); a moved key by flipping bits of ``data.mdb``.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
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


def test_a_store_open_only_here_heals_in_place(config: StorageConfig) -> None:
    fill(config, 50)
    with Storage.open(config) as storage:
        storage.create_snapshot()
        storage.put_instance(order("after-snapshot"))
    lose_key(config, "o0007")
    with Storage.open(config) as storage:
        assert storage.scrub()
        assert storage.get_instance("o0007") is not None  # rebuilt while open
        assert storage.get_instance("after-snapshot") is not None
        storage.put_instance(order("after-heal"))
        health = storage.health()
        assert health["failed"] is None and health["scrub"]["heals"] == 1
        assert storage.verify() == [] and storage.scrub() == []
    assert list((config.path / "indexes").glob("data.mdb.broken-*")), "kept aside"
    with Storage.open(config) as storage:
        assert storage.get_instance("after-heal") is not None


def hold_open(data_dir: Path) -> subprocess.Popen[str]:
    """Another process with the store open (read-only), until its stdin closes."""
    code = (
        "import sys; from rstmdb_storage import Storage, StorageConfig; "
        f"s = Storage.open(StorageConfig(data_dir={str(data_dir)!r}, read_only=True)); "
        "print('open', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def test_damage_while_another_process_has_it_open_fail_stops_and_the_next_open_heals(
    config: StorageConfig,
) -> None:
    fill(config, 50)
    with Storage.open(config) as storage:
        storage.create_snapshot()
        storage.put_instance(order("after-snapshot"))
    lose_key(config, "o0007")
    other = hold_open(config.path)
    try:
        with Storage.open(config) as storage:
            assert storage.scrub()
            with pytest.raises(StorageFailedError, match="scrub"):
                storage.put_instance(order("refused"))
            health = storage.health()
            assert "scrub" in health["failed"] and health["scrub"]["heals"] == 0
            assert storage.get_instance("o0001") is not None  # reads go on
            with pytest.raises(RecoveryNeededError, match="untrusted"):
                Storage.open(StorageConfig(data_dir=config.data_dir, read_only=True))
    finally:
        other.communicate("")
    with Storage.open(config) as storage:
        assert storage.get_instance("o0007") is not None
        assert storage.get_instance("after-snapshot") is not None
        assert storage.get_instance("refused") is None
        assert storage.verify() == []
        assert storage.health()["failed"] is None
    assert list((config.path / "indexes").glob("data.mdb.broken-*")), "kept aside"


def test_the_background_scrub_finds_it_and_heals_by_itself(config: StorageConfig) -> None:
    fill(config, 20)  # no snapshot: healed from the whole WAL
    lose_key(config, "o0003")
    background = StorageConfig(
        data_dir=config.data_dir,
        wal_segment_size=config.wal_segment_size,
        scrub_interval_ms=1,
        checkpoint_interval_ms=5,
    )
    with Storage.open(background) as storage:
        assert wait_for_flusher(storage, lambda: storage.health()["scrub"]["heals"] >= 1)
        assert storage.get_instance("o0003") is not None
        health = storage.health()
        assert health["failed"] is None and health["background_thread"]
        assert "o0003" in health["scrub"]["findings"][0]
        storage.put_instance(order("after-heal"))
        assert storage.verify() == []


def lose_key_in_open_store(data_dir: str, instance_id: str) -> None:
    """Delete an instance from LMDB from another process, while the store is open (through
    LMDB's own locks), as a damaged page would lose it."""
    env = lmdb.open(str(Path(data_dir) / "indexes"), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(b"instances", txn=txn)
            assert txn.delete(instance_id.encode(), db=db)
    finally:
        env.close()


def test_reads_and_writes_during_a_heal_lose_nothing(config: StorageConfig) -> None:
    """A heal rebuilds the file under threads reading and writing: every read answers right
    or raises a StorageError, every acknowledged write is there after."""
    fill(config, 200)
    with Storage.open(config) as storage:
        storage.create_snapshot()
        stop = threading.Event()
        acked: list[str] = []
        wrong: list[object] = []

        def read() -> None:
            while not stop.is_set():
                for i in range(0, 200, 7):
                    if i == 7:
                        continue  # the one that is lost below
                    try:
                        if storage.get_instance(f"o{i:04d}") is None:
                            wrong.append(f"o{i:04d} missing")
                    except StorageError:
                        pass
                    except BaseException as exc:
                        wrong.append(exc)

        def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    storage.put_instance(order(f"new{n}"))
                    acked.append(f"new{n}")
                except StorageError:
                    pass
                except BaseException as exc:
                    wrong.append(exc)

        threads = [threading.Thread(target=read), threading.Thread(target=write)]
        for thread in threads:
            thread.start()
        try:
            code = (
                "import sys; sys.path.insert(0, 'tests'); "
                "from test_scrub import lose_key_in_open_store; "
                f"lose_key_in_open_store({str(config.path)!r}, 'o0007')"
            )
            subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
            assert storage.scrub()
            assert storage.health()["scrub"]["heals"] == 1
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert wrong == []
        assert acked, "writes went on"
        assert [key for key in acked if storage.get_instance(key) is None] == []
        assert storage.get_instance("o0007") is not None and storage.verify() == []


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
    something, and heals it; no flip makes a call raise anything but a StorageError."""
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
        # Found or not, every read is right now (a heal rebuilt what the scrub found).
        assert storage.health()["failed"] is None
        for key, n in expected.items():
            inst = storage.get_instance(key)
            assert inst is not None and inst.metadata == {"n": n}, f"bit {bit}: {key}"
