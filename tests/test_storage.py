"""The front door: puts, gets, deletes, batches, reopening, and bad input that writes nothing."""

from __future__ import annotations

import datetime
import errno
import multiprocessing
import os
import pickle
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import order, wal_bytes
from internals import flusher_pass, held_read

from rstmdb_storage import (
    ConfigError,
    FsyncPolicy,
    Instance,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidTypeError,
    RecordTooLargeError,
    Storage,
    StorageClosedError,
    StorageConfig,
    StorageError,
    StorageFailedError,
    opening,
)
from rstmdb_storage.fsutil import network_filesystem


def test_put_then_get_returns_what_was_stored(storage: Storage) -> None:
    inst = order("order-1", ctx={"total": 99.5, "items": [1, 2]}, metadata={"customer": "alice"})
    seq = storage.put_instance(inst)
    got = storage.get_instance("order-1")
    assert got is not None
    assert (got.machine, got.version, got.state) == ("order", 1, "pending")
    assert got.ctx == {"total": 99.5, "items": [1, 2]}
    assert got.metadata == {"customer": "alice"}
    assert got.last_wal_offset == seq
    assert got.created_at == got.updated_at and got.created_at > 1_600_000_000_000


def test_get_of_absent_id_is_none(storage: Storage) -> None:
    assert storage.get_instance("nobody") is None


@pytest.mark.parametrize("bad_id", ["", "a\x00b", "ü" * 200, "x" * 256])
def test_get_refuses_an_id_that_no_put_accepts(storage: Storage, bad_id: str) -> None:
    with pytest.raises(InvalidInputError):
        storage.put_instance(order(bad_id))
    with pytest.raises(InvalidInputError):
        storage.get_instance(bad_id)


def test_sequence_numbers_are_gap_free_and_increasing(storage: Storage) -> None:
    seqs = [storage.put_instance(order(f"o{i}")) for i in range(50)]
    assert seqs == list(range(1, 51))
    assert storage.applied_seq == 50
    assert [record.seq for record in storage.read_wal()] == seqs


def test_update_keeps_created_at_and_moves_updated_at(storage: Storage) -> None:
    storage.put_instance(order("o", created_at=1000, updated_at=1000))
    storage.put_instance(order("o", state="paid"))
    got = storage.get_instance("o")
    assert got is not None and got.state == "paid"
    assert got.created_at == 1000 and got.updated_at > 1000


def test_caller_timestamps_are_kept(storage: Storage) -> None:
    storage.put_instance(order("o", created_at=5, updated_at=7))
    got = storage.get_instance("o")
    assert got is not None and (got.created_at, got.updated_at) == (5, 7)


def test_delete_removes_and_absent_delete_raises_without_writing(storage: Storage) -> None:
    storage.put_instance(order("o"))
    seq = storage.delete_instance("o")
    assert storage.get_instance("o") is None
    with pytest.raises(InstanceNotFoundError, match="'o'"):
        storage.delete_instance("o")
    assert storage.applied_seq == seq


def test_batch_is_one_record_and_atomic(storage: Storage) -> None:
    storage.put_instance(order("old"))
    with storage.batch() as batch:
        for i in range(10):
            batch.put_instance(order(f"b{i}"))
        batch.delete_instance("old")
    assert batch.seq == 2 and storage.applied_seq == 2
    assert storage.count_instances() == 10
    assert all(storage.get_instance(f"b{i}").last_wal_offset == 2 for i in range(10))


def test_batch_with_an_absent_delete_writes_nothing(storage: Storage, data_dir: Path) -> None:
    before = wal_bytes(data_dir)
    with pytest.raises(InstanceNotFoundError), storage.batch() as batch:
        batch.put_instance(order("new"))
        batch.delete_instance("missing")
    assert storage.get_instance("new") is None
    assert storage.applied_seq == 0
    assert wal_bytes(data_dir) == before


def test_batch_may_delete_what_it_put(storage: Storage) -> None:
    with storage.batch() as batch:
        batch.put_instance(order("tmp"))
        batch.delete_instance("tmp")
    assert storage.get_instance("tmp") is None and batch.seq == 1


def test_batch_that_raises_writes_nothing(storage: Storage) -> None:
    with pytest.raises(RuntimeError), storage.batch() as batch:
        batch.put_instance(order("x"))
        raise RuntimeError("caller changed its mind")
    assert storage.get_instance("x") is None and storage.applied_seq == 0


def test_empty_batch_writes_nothing(storage: Storage) -> None:
    with storage.batch() as batch:
        pass
    assert batch.seq is None and storage.applied_seq == 0


def test_a_write_whose_sync_fails_is_never_visible(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes enter the LMDB transaction while the record is written to the device; a
    failed fdatasync aborts it, and the store refuses writes until reopened."""
    storage.put_instance(order("o"))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StorageFailedError, match="fdatasync"):
        storage.put_instance(order("o", state="paid"))
    with pytest.raises(StorageFailedError):
        storage.put_instance(order("p"))
    monkeypatch.undo()
    assert storage.get_instance("o").state == "pending"
    assert storage.get_instance("p") is None
    assert storage.applied_seq == 1


def test_reopen_keeps_everything_and_continues_the_sequence(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        for i in range(300):  # enough for several 64 KiB segments
            storage.put_instance(order(f"o{i}", ctx={"pad": "x" * 300}))
    assert len(list((config.path / "wal").glob("*.wal"))) > 1
    with Storage.open(config) as storage:
        assert storage.count_instances() == 300
        assert storage.put_instance(order("next")) == 301
        assert [r.seq for r in storage.read_wal(295)] == list(range(295, 302))


def test_two_storage_objects_in_one_process_share_the_environment(
    config: StorageConfig,
) -> None:
    with Storage.open(config) as first, Storage.open(config) as second:
        first.put_instance(order("a"))
        assert second.get_instance("a") is not None
        assert second.put_instance(order("b")) == 2


def test_read_wal_limit_and_window(storage: Storage) -> None:
    for i in range(10):
        storage.put_instance(order(f"o{i}"))
    assert [r.seq for r in storage.read_wal(4, limit=3)] == [4, 5, 6]
    assert list(storage.read_wal(11)) == []


def test_iter_instances_pages_through_everything(storage: Storage) -> None:
    with storage.batch() as batch:
        for i in range(1200):
            batch.put_instance(order(f"o{i:05d}"))
    ids = [inst.id for inst in storage.iter_instances()]
    assert ids == [f"o{i:05d}" for i in range(1200)]


def test_map_grows_by_itself(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, map_size=1024 * 1024)
    with Storage.open(config) as storage:
        for chunk in range(8):
            with storage.batch() as batch:
                for i in range(100):
                    batch.put_instance(order(f"o{chunk}-{i}", ctx={"pad": "x" * 2000}))
        assert storage.count_instances() == 800
    with Storage.open(config) as storage:
        assert storage.get_instance("o7-99").ctx == {"pad": "x" * 2000}


@pytest.fixture
def fine_thread_switching() -> Iterator[None]:
    """Threads switch every 10 µs instead of 5 ms, so that they interleave inside short calls
    (and busy readers do not starve a writer of the GIL)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.usefixtures("fine_thread_switching")
def test_reads_in_other_threads_go_on_while_the_map_grows(data_dir: Path) -> None:
    """LMDB remaps the file when the map grows, and py-lmdb invalidates every open
    transaction: the growth waits for reads in flight and holds new ones back, so a reader
    thread never fails and never sees a half-written state."""
    config = StorageConfig(data_dir=data_dir, map_size=1024 * 1024, snapshot_interval=0)
    failures: list[BaseException] = []
    done = threading.Event()
    with Storage.open(config) as storage:
        storage.put_instance(order("first", ctx={"n": 0}))

        def reader() -> None:
            try:
                while not done.is_set():  # short reads, each in a transaction of its own
                    assert storage.get_instance("first").ctx == {"n": 0}
                    assert storage.count_instances() >= 1
                    assert storage.applied_seq >= 1
            except BaseException as exc:  # reported by the test below
                failures.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for thread in readers:
            thread.start()
        try:
            for chunk in range(40):
                with storage.batch() as batch:
                    for i in range(40):
                        batch.put_instance(order(f"o{chunk:02d}-{i:02d}", ctx={"pad": "x" * 2000}))
        finally:
            done.set()
            for thread in readers:
                thread.join()
        grown = storage.stats()["map_size"]
    assert failures == []
    assert grown >= 4 * 1024 * 1024


def map_use(storage: Storage) -> float:
    """The fraction of the LMDB map in use."""
    stats = storage.stats()
    return stats["map_used"] / stats["map_size"]


def map_size(storage: Storage) -> int:
    return storage.stats()["map_size"]


#: the background thread makes a pass only when a test wakes it (no checkpoint is ever due)
ON_DEMAND_FLUSHER = {"checkpoint_interval_ms": 3_600_000}


def fill_map_to(storage: Storage, fraction: float) -> None:
    i = 0
    while map_use(storage) < fraction:
        storage.put_instance(order(f"o{i}", ctx={"pad": "x" * 2000}))
        i += 1


def test_the_flusher_grows_a_nearly_full_map_before_a_write_fails(data_dir: Path) -> None:
    config = StorageConfig(
        data_dir=data_dir, map_size=1024 * 1024, snapshot_interval=0, **ON_DEMAND_FLUSHER
    )
    with Storage.open(config) as storage:
        fill_map_to(storage, 0.8)
        before = map_size(storage)
        assert flusher_pass(storage)  # one pass of the flusher
        assert map_size(storage) == 2 * before and map_use(storage) < 0.5
        assert flusher_pass(storage)
        assert map_size(storage) == 2 * before  # not again while there is room


def test_a_store_grown_past_its_map_opens_with_room_and_is_not_remapped(data_dir: Path) -> None:
    """A store whose file has outgrown the configured map opens with the map the flusher
    would have grown to, so that its first pass does not remap the file (a remap drops every
    page the process had mapped: lookups then fault them all in again)."""
    config = StorageConfig(
        data_dir=data_dir, map_size=1024 * 1024, snapshot_interval=0, **ON_DEMAND_FLUSHER
    )
    with Storage.open(config) as storage:
        fill_map_to(storage, 0.8)
        assert flusher_pass(storage)
        assert flusher_pass(storage)
        fill_map_to(storage, 0.8)  # of the twice as large map
    file_size = (data_dir / "indexes" / "data.mdb").stat().st_size
    assert file_size >= 0.8 * 2 * 1024 * 1024
    with Storage.open(config) as storage:
        opened = map_size(storage)
        assert opened >= file_size / 0.8
        assert opened in (2**k * 1024 * 1024 for k in range(1, 8))  # doubled, as it grows
        assert flusher_pass(storage)
        assert map_size(storage) == opened
        assert storage.get_instance("o0") is not None


def test_an_early_map_growth_gives_way_to_a_long_read(data_dir: Path) -> None:
    """The map changes size only with no transaction open in the process; the flusher's early
    growth does not wait for a long read (a snapshot's copy) with every write of the process
    held back behind it: it gives up, and the next pass after the read grows the map."""
    config = StorageConfig(
        data_dir=data_dir, map_size=1024 * 1024, snapshot_interval=0, **ON_DEMAND_FLUSHER
    )
    with Storage.open(config) as storage:
        fill_map_to(storage, 0.8)
        before = map_size(storage)
        reading, release = threading.Event(), threading.Event()

        def long_read() -> None:
            with held_read(storage):
                reading.set()
                release.wait()

        reader = threading.Thread(target=long_read)
        reader.start()
        try:
            reading.wait()
            assert flusher_pass(storage)
            assert map_size(storage) == before
            assert storage.put_instance(order("meanwhile")) > 0  # writes go on
        finally:
            release.set()
            reader.join()
        assert flusher_pass(storage)
        assert map_size(storage) == 2 * before


def test_files_are_private_to_the_owner(storage: Storage, data_dir: Path) -> None:
    storage.put_instance(order("o"))
    for path in [data_dir, *data_dir.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {oct(mode)}"


def test_closed_storage_refuses_use(config: StorageConfig) -> None:
    storage = Storage.open(config)
    storage.close()
    storage.close()  # idempotent
    with pytest.raises(StorageClosedError):
        storage.put_instance(order("o"))


@pytest.mark.parametrize(
    "policy", [FsyncPolicy.every_n(3), FsyncPolicy.every_ms(5), FsyncPolicy.never()]
)
def test_every_fsync_policy_keeps_writes_across_reopen(data_dir: Path, policy: FsyncPolicy) -> None:
    config = StorageConfig(data_dir=data_dir, fsync_policy=policy)
    with Storage.open(config) as storage:
        for i in range(10):
            storage.put_instance(order(f"o{i}"))
    with Storage.open(config) as storage:
        assert storage.count_instances() == 10 and storage.applied_seq == 10


# --- bad input: a clear, typed error, and nothing written ---------------------------------------


BAD_INSTANCES = [
    (lambda: {"id": "x"}, InvalidTypeError),
    (lambda: order(""), InvalidInputError),
    (lambda: order(7), InvalidTypeError),
    (lambda: order("x" * 256), InvalidInputError),
    (lambda: order("a\x00b"), InvalidInputError),
    (lambda: Instance(id="x", machine="", version=1, state="s"), InvalidInputError),
    (lambda: Instance(id="x", machine="m", version=-1, state="s"), InvalidInputError),
    (lambda: Instance(id="x", machine="m", version=True, state="s"), InvalidTypeError),
    (lambda: Instance(id="x", machine="m", version=1, state=None), InvalidTypeError),
    (lambda: order("x", ctx=[1, 2]), InvalidTypeError),
    (lambda: order("x", ctx={"when": datetime.datetime.now()}), InvalidTypeError),
    (lambda: order("x", ctx={"s": {1, 2}}), InvalidTypeError),
    (lambda: order("x", ctx={1: "non-str key"}), InvalidTypeError),
    (lambda: order("x", ctx={"bad": "\ud800"}), InvalidInputError),
    (lambda: order("x", metadata={"k": [1]}), InvalidTypeError),
    (lambda: order("x", metadata={"k": float("nan")}), InvalidInputError),
    (lambda: order("x", status="gone"), InvalidInputError),
    (lambda: order("x", created_at="yesterday"), InvalidTypeError),
    (lambda: order("x", ctx={"big": "x" * (2 * 1024 * 1024)}), RecordTooLargeError),
]


@pytest.mark.parametrize(("make", "error"), BAD_INSTANCES)
def test_bad_input_raises_typed_error_and_writes_nothing(
    storage: Storage, data_dir: Path, make, error: type[Exception]
) -> None:
    before = wal_bytes(data_dir)
    with pytest.raises(error) as raised:
        storage.put_instance(make())
    assert isinstance(raised.value, StorageError)
    assert isinstance(raised.value, (TypeError, ValueError))
    with pytest.raises(error), storage.batch() as batch:
        batch.put_instance(order("fine"))
        batch.put_instance(make())
    assert storage.applied_seq == 0
    assert storage.count_instances() == 0
    assert wal_bytes(data_dir) == before


@pytest.mark.parametrize("bad_id", [None, 3, b"bytes", ""])
def test_get_with_a_bad_id_raises(storage: Storage, bad_id: object) -> None:
    with pytest.raises((InvalidTypeError, InvalidInputError)):
        storage.get_instance(bad_id)  # type: ignore[arg-type]


def test_deeply_nested_ctx_is_refused(storage: Storage) -> None:
    ctx: dict = {}
    inner = ctx
    for _ in range(100):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(InvalidInputError, match="nested"):
        storage.put_instance(order("deep", ctx=ctx))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("snapshot_interval", -1),
        ("max_wal_segments", 0),
        ("compaction_enabled", "yes"),
        ("wal_segment_size", 10),
        ("fsync_policy", "always"),
        ("fsync_policy", FsyncPolicy.every_n(0)),
        ("map_size", 0),
        ("max_instance_size", 10**12),
    ],
)
def test_bad_config_names_the_field(data_dir: Path, field: str, value: object) -> None:
    config = StorageConfig(data_dir=data_dir, **{field: value})
    with pytest.raises(ConfigError, match=field):
        Storage.open(config)
    assert not data_dir.exists()


def test_a_network_filesystem_is_recognised(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export /mnt/shared nfs4 rw 0 0\n"
        "//host/share /mnt/shared/smb cifs rw 0 0\n"
    )
    assert network_filesystem(Path("/mnt/shared/rstmdb"), str(mounts)) == "nfs4"
    assert network_filesystem(Path("/mnt/shared/smb/x"), str(mounts)) == "cifs"
    assert network_filesystem(Path("/mnt/sharedother"), str(mounts)) is None
    assert network_filesystem(Path("/var/lib/rstmdb"), str(mounts)) is None
    assert network_filesystem(tmp_path, str(tmp_path / "missing")) is None


def test_opening_on_a_network_filesystem_warns(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(opening, "network_filesystem", lambda path: "nfs")
    with Storage.open(data_dir):
        pass
    assert "network filesystem (nfs)" in caplog.text


def _count_in_child(storage: Storage) -> int:
    with storage:  # the child's own Storage, opened from the pickled configuration
        return storage.count_instances()


def test_a_storage_sent_to_a_spawn_pool_is_opened_there(data_dir: Path) -> None:
    with Storage.open(data_dir) as storage:
        storage.put_instance(order("o-1"))
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.apply(_count_in_child, (storage,)) == 1
        with pickle.loads(pickle.dumps(storage)) as again:  # here too: a second Storage
            assert again.config == storage.config and again.count_instances() == 1


def test_threads_checkpointing_at_once_all_succeed(storage: Storage) -> None:
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(100):
                storage.put_instance(order(f"{name}-{i % 5}"))
                storage.checkpoint()  # each records its flush outside LMDB
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert storage.checkpoint() == storage.applied_seq == 300
