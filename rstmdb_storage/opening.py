"""Opening and closing a store: directories, the rebuild decision, the WAL's bootstrap.

Opening for writing creates what is missing (unless ``create=False``), then, holding
``indexes/open.lock`` (so that no other opener races a rebuild):

* rebuilds ``indexes/`` from the newest intact snapshot and the WAL (:mod:`.recovery`) when it is
  missing while snapshots exist, or when LMDB fails its check and nobody else has it open;
* adopts an existing WAL when LMDB holds no store yet (``indexes/`` lost without a snapshot, or
  a crash while the store was being created), else starts a new store with a random id;
* replays what LMDB has not applied (:mod:`.replay`) and starts the flusher thread.

Opening read-only checks that the store exists and LMDB is readable, and nothing else: it
never writes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import INDEXES_DIR, SNAPSHOTS_DIR, UNTRUSTED_MARKER, WAL_DIR, StorageConfig
from .engine import (
    RELAXED_NAME,
    Engine,
    boot_id,
    lmdb_suspect,
    make_wal,
    mark_relaxed,
    probe_wal,
    record_flush,
    refuse_unfinished_restore,
    require_store,
)
from .errors import (
    CorruptionError,
    IndexesCorruptionError,
    RecoveryNeededError,
    StorageFailedError,
    WalGapError,
)
from .fsutil import fsync_dir, make_dir, network_filesystem, os_error
from .maintenance import Flusher, checkpoint
from .recovery import DATA_FILE, rebuild_from_snapshot
from .replay import adopt_snapshot, recover
from .replication.bucket_restore import bucket_holds_store, restore_from_bucket
from .replication.following import Follower
from .replication.shipping import Shipper
from .snapshots import (
    Progress,
    SnapshotManifest,
    check_progress,
    published_seqs,
    remove_leftovers,
    snapshot_lock,
)
from .store import env as lmdb_env
from .store import locks
from .store.meta import Checkpoint, Meta
from .wal import Wal, WalTail
from .wal.format import SEGMENT_HEADER_SIZE
from .wal.log import FAILED_NAME, read_failure

log = logging.getLogger("rstmdb_storage")


def open_engine(config: StorageConfig, progress: Progress | None) -> Engine:
    """Open the store of *config* (see :meth:`rstmdb_storage.Storage.open`)."""
    config.validate()
    check_progress(progress)
    remote = network_filesystem(config.path)
    if remote is not None:
        log.warning(
            "%s is on a network filesystem (%s): LMDB's locks and memory map are not "
            "reliable there and the store can be corrupted; use a local disk",
            config.path,
            remote,
        )
    root = config.path
    refuse_unfinished_restore(config)
    if not config.holds_store():
        # A new replica starts from the bucket; so does a primary whose disk was lost, if
        # asked: a store shipped there is restored rather than a new, empty one started.
        if config.replica_of is not None:
            restore_from_bucket(config.replica_of, root, None, None, progress)
        elif config.restore_if_missing and bucket_holds_store(config.replica_url):
            restore_from_bucket(config.replica_url, root, None, None, progress)
    if not config.create or config.read_only:
        require_store(config)
    if config.read_only:
        return _open_read_only(config)
    try:
        make_dir(root, config.file_mode)
        for name in (WAL_DIR, SNAPSHOTS_DIR, INDEXES_DIR):
            make_dir(root / name, config.file_mode)
        # The lock file is there from the first open on, so that a restore copying this store
        # can hold its compaction off without writing here; what a snapshot that died left
        # goes now, unless a snapshot is being taken.
        with snapshot_lock(root / SNAPSHOTS_DIR, config.file_mode, blocking=False) as ours:
            if ours:
                remove_leftovers(root / SNAPSHOTS_DIR)
    except OSError as exc:
        raise os_error(exc, f"creating the data directory {root}") from exc
    indexes = root / INDEXES_DIR
    with locks.open_lock(config):
        _clear_failure(config)
        if not (indexes / DATA_FILE).exists() and published_seqs(root / SNAPSHOTS_DIR):
            missing = f"{indexes} is missing"
            restored = rebuild_from_snapshot(config, probe_wal(config), missing, progress)
            return _open_environment(config, restored, progress, rebuilt=True)
        try:
            if (indexes / UNTRUSTED_MARKER).exists():
                raise IndexesCorruptionError(
                    f"{indexes} is untrusted ({_reason(indexes / UNTRUSTED_MARKER)})",
                    path=str(indexes),
                )
            suspect = lmdb_suspect(config)
            if suspect is not None:
                # Never opened: a torn data.mdb can crash the process that maps it.
                raise IndexesCorruptionError(
                    f"{indexes} is untrusted: {suspect}", path=str(indexes)
                )
            return _open_environment(config, None, progress)
        except IndexesCorruptionError as exc:
            if locks.in_use(config):
                raise IndexesCorruptionError(
                    f"{exc}; another process has it open, so it is not rebuilt now: stop "
                    f"the processes using {root} and open it again",
                    path=exc.path,
                ) from exc
            restored = rebuild_from_snapshot(config, probe_wal(config), str(exc), progress)
            return _open_environment(config, restored, progress, rebuilt=True)


def release(engine: Engine, checkpoint_first: bool) -> None:
    """Close: stop the flusher, checkpoint (unless told not to: after a failed open it would
    mark an environment that failed its check as sound), and release the files. Idempotent."""
    if engine.closed:
        return
    try:
        if engine.shipper is not None:
            engine.shipper.stop(final_pass=checkpoint_first)
        if engine.follower is not None:
            engine.follower.stop()
        if engine.flusher is not None:
            engine.flusher.stop()
            if checkpoint_first and not engine.env.stale and engine.wal.usable:
                checkpoint(engine)
                _clear_relaxed(engine)
        if engine.wal.failure is not None:
            log.error(
                "closing %s, which failed: %s; opening it again replays the WAL",
                engine.config.path,
                engine.wal.failure,
            )
    finally:
        engine.release_files()


def _clear_relaxed(engine: Engine) -> None:
    """Remove ``indexes/relaxed`` when the flush just made covers every commit: no other
    handle in this process, and no other process (:meth:`alone` makes openers wait).

    Only under the open lock, and only if it is free (the mark can be cleared by a later
    close): :meth:`alone` converts this process's shared lock on ``users.lock``, and a
    failed conversion drops it for a moment, when an opener's :func:`locks.in_use` would
    find nobody using a store this process still has open."""
    config, env = engine.config, engine.env
    marker = config.path / INDEXES_DIR / RELAXED_NAME
    if not marker.exists() or env.refs > 1:
        return
    try:
        with locks.open_lock(config, wait=False) as held:
            if not held or not env.alone():
                return
            try:
                marker.unlink(missing_ok=True)
                fsync_dir(marker.parent)
            finally:
                env.share()
    except OSError as exc:
        raise os_error(exc, f"removing {marker}") from exc


def _open_read_only(config: StorageConfig) -> Engine:
    indexes = config.path / INDEXES_DIR
    if not (indexes / DATA_FILE).exists():
        raise RecoveryNeededError(
            f"{indexes / DATA_FILE} is missing: open {config.path} for writing to rebuild it "
            f"from its snapshots and WAL (rstmdb-storage recover {config.path})"
        )
    if (indexes / UNTRUSTED_MARKER).exists():
        raise RecoveryNeededError(
            f"{indexes / DATA_FILE} is untrusted ({_reason(indexes / UNTRUSTED_MARKER)}): open "
            f"{config.path} for writing to rebuild it (rstmdb-storage recover {config.path})"
        )
    suspect = lmdb_suspect(config)
    if suspect is not None:
        raise RecoveryNeededError(
            f"{indexes / DATA_FILE} may be torn: {suspect}; open {config.path} for writing to "
            f"rebuild it (rstmdb-storage recover {config.path})"
        )
    # Asked before our own shared lock on users.lock would answer it.
    writers_may_be_running = locks.in_use(config)
    env = lmdb_env.acquire(config)
    try:
        meta = Meta(env.meta)
        with env.read() as txn:
            meta.check_all(txn)
            store_id = meta.store_id(txn)
        engine = Engine(config, env, make_wal(config, store_id))
        engine.opened_in_use = writers_may_be_running
        return engine
    except BaseException:
        lmdb_env.release(env)
        raise


def _open_environment(
    config: StorageConfig,
    restored: SnapshotManifest | None,
    progress: Progress | None,
    rebuilt: bool = False,
) -> Engine:
    if not (config.path / INDEXES_DIR / DATA_FILE).exists():
        # Before LMDB creates the file: a power cut before its first flush must not leave a
        # data.mdb that the next boot trusts (flushed at 0 in an earlier boot is untrusted).
        record_flush(config, 0, boot_id())
    if config.fsync_policy.mode != "every_write":
        mark_relaxed(config)
    env = lmdb_env.acquire(config, lock_held=True)
    try:
        wal, created = _open_wal(config, env)
        engine = Engine(config, env, wal)
        if created:
            engine.write(
                lambda txn: engine.meta.write_checkpoint(txn, Checkpoint(0, engine.boot_id))
            )
    except BaseException:
        lmdb_env.release(env)
        raise
    engine.flusher = Flusher(engine)
    try:
        if restored is not None:
            adopt_snapshot(engine, restored)
        recover(engine, progress, rebuilt=rebuilt)
        # What this process committed last, as far as a write can tell: a first write that
        # waits for the lock (the flusher holds it) is then not taken for another writer's.
        engine.committed_tail = engine.applied_tail()
        if config.replica_url is not None:
            engine.shipper = Shipper(engine)
        if config.replica_of is not None:
            engine.follower = Follower(engine)
    except BaseException:
        release(engine, checkpoint_first=False)
        raise
    return engine


def _open_wal(config: StorageConfig, env: lmdb_env.LmdbEnvironment) -> tuple[Wal, bool]:
    """The WAL of the store, and whether the store is new: then this creates it (meta, and
    the first segment unless a WAL is adopted); the caller records its first checkpoint."""
    meta = Meta(env.meta)
    indexes = config.path / INDEXES_DIR
    with env.write_mutex, env.begin_write() as txn:
        try:
            if meta.exists(txn):
                meta.check_all(txn)
                return make_wal(config, meta.store_id(txn)), False
        except CorruptionError as exc:
            raise IndexesCorruptionError(
                f"{indexes} fails its check ({exc})", path=str(indexes)
            ) from exc
        if published_seqs(config.path / SNAPSHOTS_DIR):
            # An empty environment beside snapshots is one whose file was lost (a power loss
            # leaves a new, unsynced data.mdb empty): recovery, not a new store.
            raise IndexesCorruptionError(
                f"{indexes / DATA_FILE} holds no store, but {config.path / SNAPSHOTS_DIR} has "
                f"snapshots of one",
                path=str(indexes),
            )
        store_id, tail = _adopt_or_create(config, config.path / WAL_DIR)
        wal = make_wal(config, store_id)
        if tail is None:
            tail = wal.start()
        meta.create(txn, store_id, tail)
        return wal, True


def _adopt_or_create(config: StorageConfig, wal_dir: Path) -> tuple[bytes, WalTail | None]:
    """A new store gets a random id. A WAL without LMDB (``indexes/`` lost, or a crash while
    the store was being created) is adopted and replayed from its first record."""
    probe = make_wal(config, b"")  # only lists segments and reads a header
    ids = probe.segment_ids()
    if not ids:
        return os.urandom(16), None
    if ids[0] != 1:
        raise WalGapError(
            f"{config.path / INDEXES_DIR} holds no store, no snapshot is in "
            f"{config.path / SNAPSHOTS_DIR}, and the WAL in {wal_dir} starts at sequence "
            f"{ids[0]}: sequences 1..{ids[0] - 1} are missing",
            path=str(wal_dir),
        )
    return probe.segment_store_id(ids[0]), WalTail(1, SEGMENT_HEADER_SIZE, 1)


def _clear_failure(config: StorageConfig) -> None:
    """A store that failed in some process (``wal/FAILED``) opens again only once no process
    has it open: each of them may hold writes it was told failed, and none may go on as if
    the sync had succeeded. Opening then replays the WAL (and rebuilds an untrusted
    ``indexes/``)."""
    wal_dir = config.path / WAL_DIR
    reason = read_failure(wal_dir)
    if reason is None:
        return
    if locks.in_use(config):
        raise StorageFailedError(
            f"{config.path} has failed ({reason}) and other processes still have it open: "
            f"stop every process using it, then open it again"
        )
    log.warning("%s had failed (%s); opening it replays the WAL", config.path, reason)
    (wal_dir / FAILED_NAME).unlink()
    fsync_dir(wal_dir)


def _reason(marker: Path) -> str:
    """The first line of an ``UNTRUSTED`` marker: why ``data.mdb`` is not to be trusted."""
    try:
        return marker.read_text(errors="replace").partition("\n")[0] or "no reason recorded"
    except OSError as exc:
        return f"its reason cannot be read: {exc}"
