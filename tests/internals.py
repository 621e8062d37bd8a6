"""The one place tests reach behind ``Storage``'s public API (importable as ``internals``, like
``helpers``).

Tests use public calls and failpoints (:mod:`rstmdb_storage.failpoints`) wherever those do the
job. What is left here stages situations no public call can: group commit without contention,
a WAL record a crashed writer left unapplied, a read transaction held open, a pass of the
background thread on demand. Each helper says why in its docstring; if the engine's layout
changes, this module is the one to follow it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from rstmdb_storage import Storage, writes
from rstmdb_storage.changes import Change, encode_changes
from rstmdb_storage.store import env as lmdb_env
from rstmdb_storage.wal import group_commit

# --- group commit ---------------------------------------------------------------------------


def force_group_commit(
    storage: Storage,
    monkeypatch: pytest.MonkeyPatch | None = None,
    when: Callable[[], bool] = lambda: True,
) -> None:
    """Make durable writes take group commit's three steps whenever *when()* is true: the store
    groups only while it sees writer processes contend, which no public call can ask for."""
    if monkeypatch is None:
        storage._engine.grouping = when  # type: ignore[method-assign]
    else:
        monkeypatch.setattr(storage._engine, "grouping", when)


def start_contention(storage: Storage) -> None:
    """Open group commit's window as a contended write does (contention then keeps it open):
    no public call opens it."""
    storage._engine.note_contention()


def append_grouped_only(
    storage: Storage, changes: list[Change], idempotency_key: str | None = None
) -> int:
    """Step 1 of a grouped write and no more, as a writer paused between appending and syncing
    (conditions and the key judged, the record appended, not synced, not applied); return its
    sequence number. A public write always runs all three steps."""
    engine = storage._engine
    payload = encode_changes(changes, storage.config.max_record_size)
    env = engine.writable()
    with env.write_mutex:
        return writes._append_grouped(engine, env, changes, payload, idempotency_key)


# --- the WAL --------------------------------------------------------------------------------


def append_raw_records(
    storage: Storage, records: list[list[Change]], timestamp_ms: int | None = None
) -> list[tuple[int, int]]:
    """Append *records* (each a list of changes) to the WAL and sync them, judging nothing and
    applying nothing, as a writer killed between its sync and its commit leaves them; return
    (seq, offset) of each. Every public write applies what it appends."""
    engine = storage._engine
    env = engine.writable()
    when = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    placed = []
    with env.write_mutex:
        txn = env.begin_write()  # LMDB's write lock: no other writer meanwhile
        try:
            tail = engine.meta.tail(txn)
            for changes in records:
                placed.append((tail.next_seq, tail.offset))
                payload = encode_changes(changes, storage.config.max_record_size)
                tail = engine.wal.append(tail, when, payload)
            engine.wal.sync()
        finally:
            txn.abort()  # the writer dies before applying them
    return placed


def append_raw_payloads(storage: Storage, payloads: list[bytes]) -> list[tuple[int, int]]:
    """Like :func:`append_raw_records`, with payloads given as bytes (a hostile record that
    passes its CRC: what no public write can produce)."""
    engine = storage._engine
    env = engine.writable()
    when = time.time_ns() // 1_000_000
    placed = []
    with env.write_mutex:
        txn = env.begin_write()
        try:
            tail = engine.meta.tail(txn)
            for payload in payloads:
                placed.append((tail.next_seq, tail.offset))
                tail = engine.wal.append(tail, when, payload)
            engine.wal.sync()
        finally:
            txn.abort()
    return placed


def shift_wal_sync_clock(storage: Storage, seconds: float) -> None:
    """Move the time of the WAL's last sync by *seconds* (later: a sync is not due; earlier:
    it is): ``FsyncPolicy.every_ms`` reads a clock no public call sets."""
    storage._engine.wal._last_sync += seconds


def wal_has_unsynced(storage: Storage) -> bool:
    """Whether this process appended WAL records it has not synced yet: no public call (nor
    ``stats()``) tells."""
    return storage._engine.wal.has_unsynced


def checkpointed_seq(storage: Storage) -> int:
    """The applied sequence number of the last recorded checkpoint: ``checkpoint()`` returns it
    when it makes one, but nothing public reads what the background thread recorded."""
    engine = storage._engine
    return engine.read(engine.meta.checkpoint).applied_seq


# --- LMDB transactions ----------------------------------------------------------------------


def raw_read_transaction(storage: Storage) -> lmdb.Transaction:
    """A bare LMDB read transaction, holding a reader slot until aborted (and not adopting a
    full reader table by clearing it, as the store's reads do): every public read is short."""
    return storage._engine.env.env.begin()


@contextlib.contextmanager
def held_read(storage: Storage) -> Iterator[Any]:
    """The store's own read transaction, held open for the block (as a snapshot's copy holds
    one; a change of the map size waits for it): every public read is short."""
    with storage._engine.live().read() as txn:
        yield txn


@contextlib.contextmanager
def held_write_transaction(storage: Storage) -> Iterator[Any]:
    """A write transaction entered the way the store enters one (the write mutex, then LMDB's
    write lock), held for the block: every public write commits at once."""
    env = storage._engine.live()
    with env.write_mutex, env.begin_write() as txn:
        yield txn


# --- the background thread ------------------------------------------------------------------


def wait_for_flusher(storage: Storage, condition: Callable[[], Any], timeout: float = 60) -> bool:
    """Wait, pass by pass of the background thread, until *condition()* holds (no sleep);
    return whether it did within *timeout*: the thread has no public handle."""
    flusher = storage._engine.flusher
    assert flusher is not None, "a read-only store has no background thread"
    with flusher.passed:
        return flusher.passed.wait_for(condition, timeout=timeout)


def flusher_pass(storage: Storage, timeout: float = 60) -> bool:
    """Wake the background thread and wait until it has made one more pass; return whether it
    did within *timeout*: nothing public runs a pass on demand."""
    flusher = storage._engine.flusher
    assert flusher is not None, "a read-only store has no background thread"
    with flusher.passed:
        done = flusher.passes
        flusher.wake()
        return flusher.passed.wait_for(lambda: flusher.passes > done, timeout=timeout)


def join_maintenance(storage: Storage) -> None:
    """Wait for an automatic snapshot or compaction the background thread started: only
    ``close()`` waits for one publicly."""
    thread = storage._engine.maintenance_thread
    if thread is not None:
        thread.join()


# --- the filesystem ------------------------------------------------------------------------


def pretend_read_only_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every file look unwritable to the store, as on a read-only mount: tests run as
    root, for whom permission bits change nothing, and no config option says so."""
    monkeypatch.setattr(lmdb_env, "_writable", lambda path: False)


# --- races ----------------------------------------------------------------------------------


def stage_transition_race(monkeypatch: pytest.MonkeyPatch, stale_state: str) -> None:
    """Make the next ``transition()`` miss its idempotency key in its early check and read the
    instance once as *stale_state*, as a retry that ran just before another worker's first
    write landed: two processes cannot be timed to hit that window."""
    real_get = writes.get_instance
    calls = []

    def get(engine: Any, instance_id: str) -> Any:
        calls.append(instance_id)
        inst = real_get(engine, instance_id)
        if len(calls) == 1:
            inst.state = stale_state
        return inst

    monkeypatch.setattr(writes, "remembered", lambda engine, key: None)
    monkeypatch.setattr(writes, "get_instance", get)


def after_the_backup_finds_the_end(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]
) -> None:
    """Run *then()* right after the next backup or restore of *storage* has found where the
    WAL ends, before it lists the segments to copy: as a writer in another process rotating
    the WAL at that moment would, which cannot be timed from outside."""
    wal = storage._engine.wal
    real_tail_after = wal.tail_after

    def tail_after(seq: int | None = None) -> Any:
        end = real_tail_after(seq)
        monkeypatch.setattr(wal, "tail_after", real_tail_after)
        then()
        return end

    monkeypatch.setattr(wal, "tail_after", tail_after)


def after_the_next_wal_listing(monkeypatch: pytest.MonkeyPatch, then: Callable[[], None]) -> None:
    """Run *then()* right after the next listing of any WAL's segments, before the caller
    reads them: as compaction in another process deleting segments at that moment would."""
    from rstmdb_storage.wal.log import Wal

    real = Wal.segment_ids

    def segment_ids(self: Wal) -> list[int]:
        ids = real(self)
        monkeypatch.setattr(Wal, "segment_ids", real)
        then()
        return ids

    monkeypatch.setattr(Wal, "segment_ids", segment_ids)


def wait_for_queued_writes(storage: Storage, count: int, timeout: float = 60) -> bool:
    """Wait until *count* writes of other threads are queued behind the write in flight
    (polling: the queue notifies only a leader gathering its group); return whether they were
    within *timeout*."""
    group = storage._engine.thread_group()
    deadline = time.monotonic() + timeout
    while len(group._queue) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def fail_append_position_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Make every write of group commit's append position (``indexes/append.lock``) fail
    with OSError *code*, and nothing else: the file has no failpoint of its own."""

    def failing(self: Any, *position: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(group_commit.SharedAppendTail, "write", failing)


# --- LMDB's writer lock -----------------------------------------------------------------------


def writer_lock_held_here(storage: Storage) -> int | None:
    """The id of this process's thread that holds LMDB's writer mutex, or None: the thread id
    in the robust mutex's lock word in ``lock.mdb`` (after the 64-byte first cache line of
    LMDB's ``MDB_txninfo``), read holding the write mutex, when no write of ours is under way."""
    env = storage._engine.env
    with env.write_mutex:
        word = ctypes.string_at(_lock_file_mapping(env.path / "lock.mdb") + 64, 4)
    tid = int.from_bytes(word, "little") & 0x3FFFFFFF  # FUTEX_TID_MASK
    return tid if os.path.exists(f"/proc/self/task/{tid}") and tid else None


@contextlib.contextmanager
def write_txn_in_another_thread(storage: Storage) -> Iterator[int]:
    """An LMDB write transaction held open by another thread for the block, which gets that
    thread's id: what :func:`writer_lock_held_here` must find."""
    began, done = threading.Event(), threading.Event()

    def hold() -> None:
        txn = storage._engine.env.env.begin(write=True)
        began.set()
        done.wait()
        txn.abort()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert began.wait(30), "the write transaction did not begin"
        assert thread.native_id is not None
        yield thread.native_id
    finally:
        done.set()
        thread.join()


def _lock_file_mapping(path: Path) -> int:
    """Where LMDB mapped *path* (its ``lock.mdb``, from offset 0) in this process. Read there,
    not through a descriptor of our own: closing any descriptor of the file drops every
    fcntl() lock this process holds on it, LMDB's among them, and a process opening the
    environment next would take itself for its only user and reset the lock table."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real and int(fields[2], 16) == 0:
                return int(fields[0].partition("-")[0], 16)
    raise AssertionError(f"{real} is not mapped in this process")
