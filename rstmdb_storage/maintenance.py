"""Keeping an open store in shape: checkpoints, snapshots, compaction, WAL holds, and the
background thread that runs them.

A *checkpoint* flushes LMDB (which runs with ``sync=False``) after syncing the WAL segment being
appended to, so LMDB on disk never gets ahead of the WAL. A *snapshot* is a consistent copy made
inside one read transaction (:mod:`rstmdb_storage.snapshots` has the files); *compaction* then
deletes the snapshots beyond ``snapshots_kept`` and the WAL segments nothing needs any more
(:mod:`rstmdb_storage.compaction` decides which). Each store open for writing has a
:class:`Flusher` thread: it clears the reader slots of dead processes, grows the map early,
syncs under ``FsyncPolicy.every_ms``, checkpoints every ``checkpoint_interval_ms`` while there
are writes, starts automatic snapshots and compaction in a thread of their own, and runs the
scrub (:mod:`rstmdb_storage.scrub`) a slice at a time.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any

from .apply import purge_expired
from .compaction import CompactionResult, plan_compaction
from .config import DB_IDEMPOTENCY, DB_SNAPSHOTS, SNAPSHOTS_DIR
from .engine import Engine
from .failpoints import failpoint
from .fsutil import current_pid
from .model import check_int63, check_name
from .recovery import check_target, restore_to
from .scrub import scrub_if_due
from .snapshots import (
    MANIFEST_SUFFIX,
    Progress,
    SnapshotManifest,
    check_progress,
    publish,
    published_seqs,
    read_manifest,
    readable_manifests,
    remove_leftovers,
    snapshot_lock,
)
from .snapshots import delete as delete_snapshot
from .store.env import LmdbEnvironment
from .store.meta import Checkpoint

log = logging.getLogger("rstmdb_storage")

#: idempotency entries purged per write transaction
_PURGE_CHUNK = 10_000


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint(engine: Engine) -> int:
    """Flush LMDB to disk now; return the applied sequence number the flush covers."""
    env = engine.writable()
    with env.write_mutex:
        applied = _checkpoint_locked(engine, env)
    failpoint("checkpoint.before_lmdb_sync")
    engine.flush_lmdb(applied)  # outside the mutex: writers go on while the file is flushed
    return applied


def _checkpoint_locked(engine: Engine, env: LmdbEnvironment) -> int:
    engine.wal.check_usable()
    applied = engine.growing(env, _record_checkpoint, engine, env)
    engine.dirty = False
    engine.last_checkpoint = time.monotonic()
    return applied


def _record_checkpoint(engine: Engine, env: LmdbEnvironment) -> int:
    with env.begin_write() as txn:
        tail = engine.meta.tail(txn)
        # Syncing the tail segment also covers records other processes appended to it.
        engine.wal.mark_unsynced(tail.segment)
        engine.wal.sync()
        failpoint("checkpoint.after_wal_sync")
        engine.meta.write_checkpoint(txn, Checkpoint(tail.applied_seq, engine.boot_id))
    return tail.applied_seq


def _background_flush(engine: Engine) -> None:
    """One pass of the flusher thread: clearing reader slots of dead processes, growing the
    map when it is nearly full, the ``every_ms`` WAL sync, and a checkpoint when one is due."""
    env = engine.env
    if engine.closed or env.stale:
        return
    with env.write_mutex:
        env.reader_check()
        env.grow_if_nearly_full()
        if engine.wal.has_unsynced and engine.wal.sync_due():
            engine.wal.sync()
        elapsed_ms = (time.monotonic() - engine.last_checkpoint) * 1000
        if not (engine.dirty and elapsed_ms >= engine.config.checkpoint_interval_ms):
            return
        applied = _checkpoint_locked(engine, env)
    failpoint("checkpoint.before_lmdb_sync")
    engine.flush_lmdb(applied)


# --- snapshots and compaction -----------------------------------------------------------------


def create_snapshot(engine: Engine, progress: Progress | None) -> SnapshotManifest:
    """See :meth:`rstmdb_storage.Storage.create_snapshot`."""
    check_progress(progress)
    engine.writable()
    with snapshot_lock(engine.config.path / SNAPSHOTS_DIR, engine.config.file_mode):
        return _snapshot_locked(engine, progress)


def _snapshot_locked(engine: Engine, progress: Progress | None) -> SnapshotManifest:
    env = engine.writable()
    meta = engine.meta
    directory = engine.config.path / SNAPSHOTS_DIR
    with env.read() as txn:
        seq = meta.tail(txn).applied_seq
        changes = meta.change_count(txn)
        if (directory / f"{seq:020d}{MANIFEST_SUFFIX}").exists():
            manifest = read_manifest(directory, seq)
        else:
            fields = {
                "seq": seq,
                "instances": txn.stat(env.instances)["entries"],
                "created_at_ms": time.time_ns() // 1_000_000,
                "store_id": engine.wal.store_id,
            }
            manifest = publish(
                lambda fd: env.copy_to(fd, txn),
                directory,
                fields,
                engine.config.file_mode,
                progress,
            )

    def record(txn: Any) -> None:
        engine.list_snapshot(txn, manifest)
        if changes > meta.snapshot_changes(txn):
            meta.write_snapshot_changes(txn, changes)

    engine.write(record)
    return manifest


def compact(engine: Engine, progress: Progress | None) -> CompactionResult:
    """See :meth:`rstmdb_storage.Storage.compact`."""
    check_progress(progress)
    engine.writable()
    directory = engine.config.path / SNAPSHOTS_DIR
    with snapshot_lock(directory, engine.config.file_mode):
        created = 0
        newest = published_seqs(directory)
        if not newest or newest[-1] < engine.applied_tail().applied_seq:
            _snapshot_locked(engine, progress)
            created = 1
        return _delete_covered(engine, created)


def _delete_covered(engine: Engine, snapshots_created: int) -> CompactionResult:
    directory = engine.config.path / SNAPSHOTS_DIR
    remove_leftovers(directory)
    planned = plan_compaction(
        engine.wal.segment_ids(),
        readable_manifests(directory),
        engine.config.snapshots_kept,
        engine.read(engine.meta.holds).values(),
    )
    freed = 0
    for manifest in planned.snapshots:
        freed += delete_snapshot(directory, manifest)
        failpoint("compact.after_snapshot_delete")
    if planned.snapshots:
        listed = engine.env.dbs[DB_SNAPSHOTS]

        def unlist(txn: Any) -> None:
            for manifest in planned.snapshots:
                txn.delete(manifest.seq.to_bytes(8, "big"), db=listed)

        engine.write(unlist)
    freed += engine.wal.delete_segments(planned.segments)
    if planned.segments or planned.snapshots:
        log.info(
            "compacted %s: %d WAL segment(s) and %d snapshot(s) deleted, %d bytes",
            engine.config.path,
            len(planned.segments),
            len(planned.snapshots),
            freed,
        )
    return CompactionResult(snapshots_created, len(planned.segments), freed, len(planned.snapshots))


def _start_if_due(engine: Engine) -> None:
    """Start an automatic snapshot (and compaction) in a thread, when one is due."""
    running = engine.maintenance_thread
    if running is not None and running.is_alive():
        return
    if engine.closed or engine.env.stale or not _maintenance_due(engine):
        return
    thread = threading.Thread(target=_maintain, args=(engine,), name="rstmdb-maintenance")
    thread.daemon = True
    thread.start()
    # Published only once started: join_maintenance() in another thread may read it at once.
    engine.maintenance_thread = thread


def _maintenance_due(engine: Engine) -> bool:
    config, meta = engine.config, engine.meta
    if config.snapshot_interval:
        changes, base = engine.read(
            lambda txn: (meta.change_count(txn), meta.snapshot_changes(txn))
        )
        if changes - base >= config.snapshot_interval:
            return True
    if config.compaction_enabled:
        segments = len(engine.wal.segment_ids())
        return segments > config.max_wal_segments and segments != engine.segments_left
    return False


def _maintain(engine: Engine) -> None:
    """Snapshot and compact, unless another process is doing it (it runs in a thread of its
    own, so that checkpoints and WAL syncs go on meanwhile)."""
    directory = engine.config.path / SNAPSHOTS_DIR
    try:
        with snapshot_lock(directory, engine.config.file_mode, blocking=False) as ours:
            if not ours or engine.closed or not _maintenance_due(engine):
                return
            _snapshot_locked(engine, None)
            if engine.config.compaction_enabled:
                _delete_covered(engine, snapshots_created=1)
            engine.segments_left = len(engine.wal.segment_ids())
    except Exception as exc:  # reported, and tried again when next due
        engine.background_error = f"{type(exc).__name__}: {exc}"
        log.exception("automatic snapshot of %s failed", engine.config.path)


# --- holds and housekeeping -------------------------------------------------------------------


def hold_wal(engine: Engine, name: str, from_seq: int) -> None:
    """See :meth:`rstmdb_storage.Storage.hold_wal`."""
    check_name("hold name", name)
    check_int63("from_seq", from_seq)
    engine.write(lambda txn: engine.meta.write_hold(txn, name, from_seq))


def release_wal(engine: Engine, name: str) -> bool:
    """See :meth:`rstmdb_storage.Storage.release_wal`."""
    check_name("hold name", name)
    return engine.write(lambda txn: engine.meta.delete_hold(txn, name))


def purge_idempotency_keys(engine: Engine) -> int:
    """See :meth:`rstmdb_storage.Storage.purge_idempotency_keys`."""
    db = engine.writable().dbs[DB_IDEMPOTENCY]
    now = time.time_ns() // 1_000_000
    purged, after = 0, None
    while True:
        deleted, after = engine.write(
            lambda txn, after=after: purge_expired(txn, db, now, after, _PURGE_CHUNK)
        )
        purged += deleted
        if after is None:
            return purged


# --- the background thread --------------------------------------------------------------------


class Flusher:
    """A daemon thread that syncs the WAL under ``FsyncPolicy.every_ms`` and checkpoints LMDB
    every ``checkpoint_interval_ms`` while there are writes, so neither waits for the next
    write to happen; and starts automatic snapshots and compaction when they are due.

    It holds the engine weakly: a store dropped without ``close()`` stops its thread."""

    def __init__(self, engine: Engine) -> None:
        config = engine.config
        interval_ms = config.checkpoint_interval_ms
        if config.fsync_policy.mode == "every_ms":
            interval_ms = min(interval_ms, config.fsync_policy.value)
        self.pid = current_pid()
        self.passes = 0
        #: notified after every pass, so that tests can wait for one instead of sleeping
        self.passed = threading.Condition()
        self._interval = interval_ms / 1000
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ended = False
        self._engine = weakref.ref(engine)
        self._thread = threading.Thread(target=self._run, name="rstmdb-flusher", daemon=True)
        self._thread.start()
        _flushers.add(self)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            engine = self._engine()
            if engine is None or self._stop.is_set():
                return
            failed = False
            try:
                _background_flush(engine)
                _start_if_due(engine)
                scrub_if_due(engine)
            except Exception as exc:  # a thread must not die silently
                # Seen in Storage.health(). A failed sync has made the store fail-stop (writers
                # will say so) and there is nothing left to do; anything else is tried again.
                engine.background_error = f"{type(exc).__name__}: {exc}"
                log.exception("background flush of %s failed", engine.config.path)
                failed = not engine.wal.usable
            finally:
                del engine
            with self.passed:
                self._ended = failed  # said before the pass is: a waiter then sees both
                self.passes += 1
                self.passed.notify_all()
            if failed:
                return

    def running(self) -> bool:
        """Whether the thread runs (in this process) and has not given up on a failed store."""
        return self.pid == os.getpid() and self._thread.is_alive() and not self._ended

    def wake(self) -> None:
        """Run a pass now rather than at the end of the interval."""
        self._wake.set()

    def restarted(self) -> Flusher:
        """A new flusher for the same store, in a forked child (threads do not survive a fork)."""
        engine = self._engine()
        assert engine is not None  # the engine asked
        return Flusher(engine)

    def stop(self) -> None:
        """Stop the thread and wait for it and for an automatic snapshot in progress."""
        self._stop.set()
        self._wake.set()
        if self.pid == os.getpid() and self._thread is not threading.current_thread():
            self._thread.join()
            engine = self._engine()
            running = engine.maintenance_thread if engine is not None else None
            if running is not None and running is not threading.current_thread():
                running.join()
        _flushers.discard(self)


_flushers: weakref.WeakSet[Flusher] = weakref.WeakSet()


@atexit.register
def _stop_flushers() -> None:
    # Stop flushing (and let a snapshot finish) before the interpreter tears down under a
    # running daemon thread.
    for flusher in list(_flushers):
        flusher.stop()


def backup(engine: Engine, target: str | os.PathLike[str], progress: Progress | None) -> int:
    """See :meth:`rstmdb_storage.Storage.backup`."""
    target_path = check_target(target, "backup target")  # before the snapshot: nothing written
    create_snapshot(engine, progress)
    return restore_to(
        engine.config.path,
        target_path,
        engine.wal,
        None,
        engine.config.file_mode,
        progress,
        target_role="backup target",
    )
