"""``Storage``: the front door.

The write path, for one put, a delete or a whole batch:

1. check and encode the input (outside any lock: bad input raises before anything is written);
2. take the write lock (a thread lock, then LMDB's cross-process write transaction);
3. under the append lock (which keeps grouped appenders of other processes out), read the WAL
   tail from meta and apply any record past it that a crashed writer left behind, then append
   the record at the tail;
4. put its changes and the new tail into the same transaction while the device writes the
   record, then ``fdatasync`` it (under the default policy);
5. commit: the changes become visible.

A change is therefore never visible before its WAL record is written (and, by default, durable),
and the LMDB transaction that applies it records its sequence number, so opening the store
replays exactly the records LMDB has not seen. LMDB itself runs with ``sync=False``; it is
flushed at *checkpoints* (every ``checkpoint_interval_ms`` and at close), after the WAL.

When writer *processes* contend, durable writes use group commit instead (see the section of
that name below and :mod:`rstmdb_storage.wal.group_commit`): append, sync and apply become three
steps under three locks, so that one ``fdatasync`` serves every record appended before it. A
background thread per store checkpoints, syncs under ``every_ms``, grows the map early, and
starts automatic snapshots and compaction (:mod:`rstmdb_storage.snapshots`,
:mod:`rstmdb_storage.compaction`); opening rebuilds a lost or damaged ``indexes/``
(:mod:`rstmdb_storage.recovery`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from .apply import (
    IndexedFields,
    apply_changes,
    first_failure,
    is_conditional,
    purge_expired,
    remembered_write,
)
from .codec import cbor_dumps, decode_instance, encode_instance_body, seal
from .compaction import CompactionResult, plan_compaction
from .config import (
    DB_IDEMPOTENCY,
    DB_MACHINES,
    DB_SNAPSHOTS,
    INDEX_DATABASES,
    INDEXES_DIR,
    MAX_ID_BYTES,
    SNAPSHOTS_DIR,
    WAL_DIR,
    StorageConfig,
)
from .errors import (
    ConflictError,
    CorruptionError,
    IndexesCorruptionError,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidTypeError,
    NotAStoreError,
    ReadOnlyError,
    RecordTooLargeError,
    RecoveryNeededError,
    StorageClosedError,
    StorageError,
    WalGapError,
    shown,
)
from .failpoints import failpoint
from .fsutil import make_dir, network_filesystem, os_error
from .model import (
    Instance,
    MachineDefinition,
    MetadataValue,
    check_id,
    check_instance,
    check_name,
    check_plain_value,
)
from .query import (
    PAGE_SIZE,
    Page,
    count_states,
    decode_cursor,
    decode_machine,
    encode_cursor,
    index_page,
    instances_page,
    machine_entries,
    machine_entry,
    metadata_query,
    scan,
    state_query,
    time_query,
)
from .recovery import (
    DATA_FILE,
    cut_damaged_tail,
    rebuild_from_snapshot,
    restore_to,
    seq_at_time,
)
from .snapshots import (
    MANIFEST_SUFFIX,
    Progress,
    SnapshotManifest,
    check_data,
    manifests,
    publish,
    published_seqs,
    read_manifest,
    readable_manifests,
    snapshot_lock,
)
from .snapshots import delete as delete_snapshot
from .store import env as lmdb_env
from .store.indexes import (
    KeyRange,
    state_range,
)
from .store.meta import Checkpoint, Meta
from .verify import Finding, check_instances, check_snapshots, check_wal, run_checks
from .wal import TornTailRepair, Wal, WalRecord, WalTail
from .wal.decoder import decode_changes
from .wal.format import (
    CHANGE_DELETE,
    CHANGE_IDEMPOTENCY,
    CHANGE_MACHINE,
    CHANGE_PUT,
    SEGMENT_HEADER_SIZE,
    segment_name,
)
from .wal.group_commit import SharedAppendTail, SharedSync

log = logging.getLogger("rstmdb_storage")

_RETRY = object()

#: records applied per LMDB transaction when replaying (bounds a transaction's dirty pages)
REPLAY_CHUNK = 2000

#: a wait for the write lock longer than this means another writer held it: contention
_CONTENDED_WAIT = 0.0002
#: how long group commit stays on after contention was last seen, in seconds
_GROUP_WINDOW = 0.5


class Storage:
    """A data directory of state-machine instances, open in this process.

    Open with :meth:`open`; use as a context manager or call :meth:`close`. One ``Storage`` may
    be shared by threads; any number of processes may open the same directory.

    Example::

        with Storage.open("/var/lib/rstmdb") as storage:
            seq = storage.put_instance(Instance(id="order-1", machine="order", version=1,
                                                state="pending"))
            assert storage.get_instance("order-1").last_wal_offset == seq
    """

    def __init__(self, config: StorageConfig, env: lmdb_env.LmdbEnvironment, wal: Wal) -> None:
        self.config = config
        self._env = env
        self._wal = wal
        self._meta = Meta(env.meta)
        self._closed = False
        self._last_checkpoint = time.monotonic()
        self._dirty = False
        self._boot_id = _boot_id()
        self._maintenance: threading.Thread | None = None
        #: WAL segments left by the last automatic compaction (retention or holds may keep
        #: more than ``max_wal_segments``; then only a new segment makes it due again)
        self._segments_left = 0
        #: group commit is used until then (see _note_contention)
        self._group_until = 0.0
        self._group_files: tuple[SharedAppendTail, SharedSync] | None = None
        self._flusher = None if config.read_only else _Flusher(self)
        #: read-only: whether another process had the store open when this one opened it
        self._opened_in_use = True

    # --- opening and closing --------------------------------------------------------------------

    @classmethod
    def open(
        cls, config: StorageConfig | str | os.PathLike[str], progress: Progress | None = None
    ) -> Storage:
        """Open the store in ``config.data_dir`` and replay the WAL records LMDB has not
        applied yet. A new store is created there when the path holds none, unless
        ``config.create`` is False (then :class:`NotAStoreError`, and nothing is created).

        When ``indexes/`` is missing, unreadable or fails its check, it is rebuilt from the
        newest intact snapshot and the WAL after it (see :mod:`rstmdb_storage.recovery`);
        *progress*, if given, hears how that goes (see :data:`Progress`).

        :param config: a :class:`StorageConfig`, or a path for all defaults
        :raises ConfigError: a config field is invalid
        :raises NotAStoreError: ``create=False`` or ``read_only=True`` and the path is not a
            data directory
        :raises RecoveryNeededError: ``read_only=True`` and ``indexes/`` is missing
        :raises CorruptionError: the WAL or LMDB fails its checks and cannot be rebuilt (never
            silently skipped); :class:`WalGapError` names the missing sequence numbers
        """
        if not isinstance(config, StorageConfig):
            config = StorageConfig(data_dir=config)
        config.validate()
        remote = network_filesystem(config.path)
        if remote is not None:
            log.warning(
                "%s is on a network filesystem (%s): LMDB's locks and memory map are not "
                "reliable there and the store can be corrupted; use a local disk",
                config.path,
                remote,
            )
        root = config.path
        if not config.create or config.read_only:
            _require_store(config)
        if config.read_only:
            return cls._open_read_only(config)
        try:
            make_dir(root, config.file_mode)
            for name in (WAL_DIR, SNAPSHOTS_DIR, INDEXES_DIR):
                make_dir(root / name, config.file_mode)
        except OSError as exc:
            raise os_error(exc, f"creating the data directory {root}") from exc
        with lmdb_env.open_lock(config):
            if not (root / INDEXES_DIR / DATA_FILE).exists() and published_seqs(
                root / SNAPSHOTS_DIR
            ):
                missing = f"{root / INDEXES_DIR} is missing"
                restored = rebuild_from_snapshot(config, _probe_wal(config), missing, progress)
                return cls._open_environment(config, restored, progress)
            try:
                return cls._open_environment(config, None, progress)
            except IndexesCorruptionError as exc:
                if lmdb_env.in_use(config):
                    raise IndexesCorruptionError(
                        f"{exc}; another process has it open, so it is not rebuilt now: stop "
                        f"the processes using {root} and open it again",
                        path=exc.path,
                    ) from exc
                restored = rebuild_from_snapshot(config, _probe_wal(config), str(exc), progress)
                return cls._open_environment(config, restored, progress)

    @classmethod
    def _open_read_only(cls, config: StorageConfig) -> Storage:
        indexes = config.path / INDEXES_DIR
        if not (indexes / DATA_FILE).exists():
            raise RecoveryNeededError(
                f"{indexes / DATA_FILE} is missing: open {config.path} for writing to rebuild it "
                f"from its snapshots and WAL (rstmdb-storage recover {config.path})"
            )
        # Asked before our own shared lock on users.lock would answer it.
        writers_may_be_running = lmdb_env.in_use(config)
        env = lmdb_env.acquire(config)
        try:
            meta = Meta(env.meta)
            with env.read() as txn:
                meta.check_all(txn)
                store_id = meta.store_id(txn)
            storage = cls(config, env, _wal(config, store_id))
            storage._opened_in_use = writers_may_be_running
            return storage
        except BaseException:
            lmdb_env.release(env)
            raise

    @classmethod
    def _open_environment(
        cls,
        config: StorageConfig,
        restored: SnapshotManifest | None,
        progress: Progress | None,
    ) -> Storage:
        env = lmdb_env.acquire(config, lock_held=True)
        try:
            wal = _open_wal(config, env)
            storage = cls(config, env, wal)
        except BaseException:
            lmdb_env.release(env)
            raise
        try:
            if restored is not None:
                storage._adopt_snapshot(restored)
            storage._recover(progress)
        except BaseException:
            # No checkpoint: it would mark an environment that failed its check as sound.
            storage._release(checkpoint=False)
            raise
        return storage

    def close(self) -> None:
        """Sync what this process wrote, checkpoint LMDB, and release the files. Idempotent."""
        self._release(checkpoint=True)

    def _release(self, checkpoint: bool) -> None:
        if self._closed:
            return
        try:
            if self._flusher is not None:
                self._flusher.stop()
                if checkpoint and not self._env.stale and self._wal.usable:
                    self.checkpoint()
        finally:
            self._closed = True
            if self._group_files is not None and self._group_files[0].pid == os.getpid():
                for file in self._group_files:
                    file.close()
            try:
                self._wal.close()
            finally:
                lmdb_env.release(self._env)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading --------------------------------------------------------------------------------

    def get_instance(self, instance_id: str) -> Instance | None:
        """The instance stored under *instance_id*, or None.

        :raises InvalidInputError: the id is empty or too long
        :raises CorruptionError: the stored value fails its checksum
        """
        if type(instance_id) is not str:
            check_id(instance_id)  # raises InvalidTypeError
        try:
            key = instance_id.encode()
        except UnicodeEncodeError:
            check_id(instance_id)  # raises InvalidInputError
            raise
        if not 0 < len(key) <= MAX_ID_BYTES or b"\x00" in key:
            check_id(instance_id)  # raises the precise InvalidInputError
        env = self._env
        if env.stale or self._closed:
            env = self._live_env()
        gate = env.gate  # ForkGate.enter/leave inlined: this is the hot path of every lookup
        gate.active.append(None)
        try:
            if gate.closing:
                raw = _RETRY  # a fork is waiting: let it go first
            else:
                with env.env.begin(db=env.instances) as txn:
                    raw = txn.get(key)
        except lmdb.MapResizedError:
            raw = _RETRY  # another process grew the map: the slow path adopts its size
        except lmdb.Error as exc:
            raise lmdb_env.lmdb_read_error(env.path, exc) from exc
        finally:
            gate.leave()
        if raw is _RETRY:
            raw = self._read(lambda txn: txn.get(key, db=self._env.instances))
        return None if raw is None else decode_instance(key, raw)

    @property
    def applied_seq(self) -> int:
        """The sequence number of the newest WAL record applied to LMDB."""
        return self._read(lambda txn: self._meta.tail(txn).applied_seq)

    def count_instances(self) -> int:
        """How many instances are stored."""
        return self._read(lambda txn: txn.stat(self._env.instances)["entries"])

    def iter_instances(self) -> Iterator[Instance]:
        """Every stored instance, in id order (UTF-8 byte order), read in short transactions."""
        for page in self._instance_pages():
            yield from (decode_instance(key, raw) for key, raw in page)

    def _instance_pages(self) -> Iterator[list[tuple[bytes, bytes]]]:
        after: bytes | None = None
        while True:
            page = self._read(lambda txn, after=after: instances_page(txn, self._env, after))
            yield page
            if len(page) < PAGE_SIZE:
                return
            after = page[-1][0]

    def verify(self) -> list[Finding]:
        """Check everything the store holds; return what is wrong (empty when all is well).

        Every instance against its CRC32C and format, every index entry against the instance
        it describes (in one consistent read transaction, streamed), the meta table, every
        WAL record from the first segment present to the applied sequence (CRCs, gaps, seals),
        and every snapshot file against its manifest.

        Example::

            for finding in storage.verify():
                print(finding)   # e.g. "instances[b'order-7']: CRC32C mismatch ..."
        """
        applied = self.applied_seq

        def meta() -> Iterator[Finding]:
            self._read(self._meta.check_all)
            return iter(())

        return run_checks(
            [
                meta,
                lambda: self._check_instances(applied),
                lambda: check_wal(self._wal, applied),
                lambda: check_snapshots(self._snapshots_dir, self._wal),
            ]
        )

    def _check_instances(self, applied: int) -> Iterator[Finding]:
        return iter(self._read(lambda txn: list(check_instances(txn, self._env.dbs, applied))))

    def read_wal(self, from_seq: int = 1, limit: int | None = None) -> Iterator[WalRecord]:
        """WAL records from sequence *from_seq* on, at most *limit* of them, up to the newest
        applied one. Each :class:`WalRecord` has ``seq``, ``timestamp_ms`` and ``payload``;
        :func:`rstmdb_storage.wal.decoder.decode_changes` decodes the payload.

        :raises InvalidTypeError, InvalidInputError: *from_seq* or *limit* is not a positive
            int (at once, not when iterating)
        :raises WalGapError: segments holding the sequence numbers asked for are gone
        """
        checked = (
            (("from_seq", from_seq),)
            if limit is None
            else (("from_seq", from_seq), ("limit", limit))
        )
        for name, value in checked:
            if type(value) is not int:
                raise InvalidTypeError(f"{name}: expected an int, got {shown(value)}")
            if value < 1:
                raise InvalidInputError(f"{name}: must be at least 1, got {shown(value)}")
        until = self.applied_seq
        if limit is not None:
            until = min(until, from_seq + limit - 1)
        return self._wal.records(from_seq, until)

    def purge_idempotency_keys(self) -> int:
        """Delete the idempotency keys whose retention has passed; return how many.

        Expired keys already count as absent; this reclaims their space. It runs in write
        transactions of at most 10,000 entries each, so writers are held up only briefly.
        It is housekeeping, not a change: it does not go through the WAL.
        """
        env = self._writable_env()
        now = time.time_ns() // 1_000_000
        purged, after = 0, None
        while True:
            with env.write_mutex, env.begin_write() as txn:
                deleted, after = purge_expired(
                    txn, env.dbs[DB_IDEMPOTENCY], now, after, _REBUILD_CHUNK
                )
            purged += deleted
            if after is None:
                return purged

    def _remembered(self, idempotency_key: str) -> int | None:
        check_name("idempotency_key", idempotency_key)
        now = time.time_ns() // 1_000_000
        return self._read(
            lambda txn: remembered_write(txn, self._env.dbs[DB_IDEMPOTENCY], idempotency_key, now)
        )

    # --- snapshots ------------------------------------------------------------------------------

    def create_snapshot(self, progress: Progress | None = None) -> SnapshotManifest:
        """Publish a consistent copy of the store as of the newest applied WAL record; return
        its manifest (``.seq`` is the sequence number it contains).

        The copy is made inside one read transaction, so writers here and in other processes
        go on while it runs; see :mod:`rstmdb_storage.snapshots` for the files. One process at
        a time snapshots: this waits for a snapshot or compaction running elsewhere. If a
        snapshot of the current sequence number exists already, its manifest is returned.
        *progress*, if given, is called with ("checksum", bytes done, bytes in all).

        Example::

            manifest = storage.create_snapshot()
            print(manifest.seq, manifest.size, manifest.instances)
        """
        self._writable_env()
        with snapshot_lock(self._snapshots_dir, self.config.file_mode):
            return self._snapshot_locked(progress)

    def _snapshot_locked(self, progress: Progress | None) -> SnapshotManifest:
        env = self._writable_env()
        directory = self._snapshots_dir
        with env.read() as txn:
            seq = self._meta.tail(txn).applied_seq
            changes = self._meta.change_count(txn)
            if (directory / f"{seq:020d}{MANIFEST_SUFFIX}").exists():
                manifest = read_manifest(directory, seq)
            else:
                fields = {
                    "seq": seq,
                    "instances": txn.stat(env.instances)["entries"],
                    "created_at_ms": time.time_ns() // 1_000_000,
                    "store_id": self._wal.store_id,
                }
                manifest = publish(
                    lambda fd: env.env.copyfd(fd, compact=True, txn=txn),
                    directory,
                    fields,
                    self.config.file_mode,
                    progress,
                )
        with env.write_mutex, env.begin_write() as txn:
            _list_snapshot(txn, env, manifest)
            if changes > self._meta.snapshot_changes(txn):
                self._meta.write_snapshot_changes(txn, changes)
        return manifest

    def compact(self, progress: Progress | None = None) -> CompactionResult:
        """Snapshot (when anything changed since the newest snapshot), then delete the
        snapshots beyond ``snapshots_kept`` and the WAL segments that the oldest kept snapshot
        and every WAL hold no longer need (see :mod:`rstmdb_storage.compaction`).

        The store does this by itself after automatic snapshots unless ``compaction_enabled``
        is False; calling it is always allowed.

        Example::

            result = storage.compact()
            print(result.snapshots_created, result.segments_deleted, result.bytes_reclaimed)
        """
        self._writable_env()
        with snapshot_lock(self._snapshots_dir, self.config.file_mode):
            created = 0
            newest = published_seqs(self._snapshots_dir)
            if not newest or newest[-1] < self.applied_seq:
                self._snapshot_locked(progress)
                created = 1
            return self._delete_covered(created)

    def _delete_covered(self, snapshots_created: int) -> CompactionResult:
        directory = self._snapshots_dir
        holds = self._read(self._meta.holds).values()
        planned = plan_compaction(
            self._wal.segment_ids(),
            readable_manifests(directory),
            self.config.snapshots_kept,
            holds,
        )
        freed = 0
        for manifest in planned.snapshots:
            freed += delete_snapshot(directory, manifest)
            failpoint("compact.after_snapshot_delete")
        if planned.snapshots:
            env = self._writable_env()
            with env.write_mutex, env.begin_write() as txn:
                for manifest in planned.snapshots:
                    txn.delete(manifest.seq.to_bytes(8, "big"), db=env.dbs[DB_SNAPSHOTS])
        freed += self._wal.delete_segments(planned.segments)
        if planned.segments or planned.snapshots:
            log.info(
                "compacted %s: %d WAL segment(s) and %d snapshot(s) deleted, %d bytes",
                self.config.path,
                len(planned.segments),
                len(planned.snapshots),
                freed,
            )
        return CompactionResult(
            snapshots_created, len(planned.segments), freed, len(planned.snapshots)
        )

    def hold_wal(self, name: str, from_seq: int) -> None:
        """Keep every WAL record from *from_seq* on through compactions, until
        :meth:`release_wal` (for a shipper or a backup in progress; holds are kept in the
        store, so they outlive the process that set them).

        Example::

            storage.hold_wal("nightly-backup", storage.applied_seq + 1)
            ...   # copy snapshots/ and wal/
            storage.release_wal("nightly-backup")
        """
        check_name("hold name", name)
        if type(from_seq) is not int or not 0 <= from_seq < 2**63:
            raise InvalidInputError(f"from_seq: expected an int >= 0, got {from_seq!r}")
        env = self._writable_env()
        with env.write_mutex, env.begin_write() as txn:
            self._meta.write_hold(txn, name, from_seq)

    def release_wal(self, name: str) -> bool:
        """Drop the WAL hold *name*; return whether there was one."""
        check_name("hold name", name)
        env = self._writable_env()
        with env.write_mutex, env.begin_write() as txn:
            return self._meta.delete_hold(txn, name)

    def wal_holds(self) -> dict[str, int]:
        """Every WAL hold: name -> the first sequence number it keeps."""
        return self._read(self._meta.holds)

    @classmethod
    def restore(
        cls,
        source: str | os.PathLike[str],
        target: str | os.PathLike[str],
        *,
        seq: int | None = None,
        until_ms: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Build in the new directory *target* a store holding the state of the data
        directory *source* at WAL sequence *seq* (its newest record when None), or as of the
        time *until_ms* (Unix milliseconds: every record written up to then): point-in-time
        restore, from the newest intact snapshot at or before *seq* and the WAL after it.
        *source* may be in use; compaction there waits until the files are copied. Returns
        the sequence number restored to; open *target* to use it.

        Example::

            Storage.restore("/var/lib/rstmdb", "/tmp/before-the-bad-deploy", seq=52_117)

        :raises InvalidInputError: *target* is not empty, or *seq* is not covered by the
            snapshots and WAL segments *source* keeps
        """
        source_config = StorageConfig(data_dir=source)
        source_config.validate()
        _require_store(source_config)
        wal = _probe_wal(source_config)
        if until_ms is not None:
            if seq is not None:
                raise InvalidInputError("restore: give seq or until_ms, not both")
            if type(until_ms) is not int:
                raise InvalidTypeError(f"until_ms: expected an int, got {shown(until_ms)}")
            seq = seq_at_time(wal, until_ms)
        restored = restore_to(
            source_config.path,
            Path(os.fspath(target)),
            wal,
            seq,
            source_config.file_mode,
            progress,
        )
        with cls.open(StorageConfig(data_dir=target), progress) as storage:
            if storage.applied_seq != restored:
                raise CorruptionError(
                    f"restore into {target} reached sequence {storage.applied_seq}, not {restored}"
                )
        return restored

    def backup(self, target: str | os.PathLike[str], *, progress: Progress | None = None) -> int:
        """Copy the store into the new (or empty) directory *target*: a snapshot taken now
        and the WAL after it, up to the newest record. Writers go on meanwhile; compaction
        waits until the files are copied. Returns the last sequence number the backup holds.

        The backup is a data directory without ``indexes/``: open it (opening rebuilds
        ``indexes/`` from the snapshot and replays the WAL) or restore from it with
        :meth:`restore`.

        Example::

            seq = storage.backup("/backups/rstmdb-2026-11-25")
        """
        if not isinstance(target, str | os.PathLike):
            raise InvalidTypeError(f"backup target: expected a path, got {shown(target)}")
        self.create_snapshot(progress)
        target_path = Path(os.fspath(target))
        return restore_to(
            self.config.path,
            target_path,
            self._wal,
            None,
            self.config.file_mode,
            progress,
            target_role="backup target",
        )

    @classmethod
    def repair_wal(cls, config: StorageConfig | str | os.PathLike[str]) -> TornTailRepair | None:
        """Cut the last WAL segment at a bad record that opening refuses because good records
        follow it (copying the segment aside first); return what was cut, or None when there
        is nothing to cut. Run it when ``Storage.open`` raises such a ``CorruptionError``
        after a power loss: records appended but never synced can reach the disk out of
        order, and none of them was acknowledged (see :mod:`rstmdb_storage.recovery`).

        Example::

            repair = Storage.repair_wal("/var/lib/rstmdb")   # the store must be closed

        :raises CorruptionError: the bad record was applied to LMDB already (real damage)
        """
        if not isinstance(config, StorageConfig):
            config = StorageConfig(data_dir=config)
        config.validate()
        _require_store(config)
        with lmdb_env.open_lock(config):
            if lmdb_env.in_use(config):
                raise StorageError(f"{config.path} is open (here or in another process); close it")
            applied = 0
            if (config.path / INDEXES_DIR / DATA_FILE).exists():
                env = lmdb_env.acquire(config, lock_held=True)
                try:
                    with env.read() as txn:
                        applied = Meta(env.meta).tail(txn).applied_seq
                finally:
                    lmdb_env.release(env)
            else:
                applied = max(published_seqs(config.path / SNAPSHOTS_DIR), default=0)
            return cut_damaged_tail(_probe_wal(config), applied)

    @property
    def _snapshots_dir(self) -> Path:
        return self.config.path / SNAPSHOTS_DIR

    def list_snapshots(self) -> list[SnapshotManifest]:
        """Manifests of the published snapshots, oldest first, read from ``snapshots/``.

        :raises CorruptionError: a manifest fails its checksum
        """
        return manifests(self._snapshots_dir)

    def check_snapshot(self, manifest: SnapshotManifest, progress: Progress | None = None) -> None:
        """Raise :class:`CorruptionError` unless the snapshot's file matches its manifest."""
        check_data(self._snapshots_dir, manifest, progress)

    # --- machine definitions --------------------------------------------------------------------

    def put_machine(self, name: str, version: int, definition: dict[str, Any]) -> int:
        """Store version *version* of machine *name* (a JSON-like dict: states, transitions,
        whatever rstmdb's core keeps); return the WAL sequence number. A stored version is
        immutable: putting it again with the same definition changes nothing, with another
        one raises :class:`ConflictError`.

        Example::

            storage.put_machine("order", 1, {"states": ["pending", "paid"],
                                             "transitions": [["pending", "paid"]]})
        """
        check_name("machine", name)
        if type(version) is not int:
            raise InvalidTypeError(f"machine version: expected int, got {type(version).__name__}")
        if not 0 <= version < 2**63:
            raise InvalidInputError(
                f"machine version: must be between 0 and 2**63 - 1, got {shown(version)}"
            )
        if type(definition) is not dict:
            raise InvalidTypeError(
                f"definition of machine {name!r}: expected a dict, got {type(definition).__name__}"
            )
        check_plain_value(definition, f"definition of machine {name!r}")
        body = cbor_dumps(definition, f"definition of machine {name!r}")
        if len(body) > self.config.max_instance_size:
            raise RecordTooLargeError(
                f"definition of machine {name!r}: {len(body)} bytes, more than "
                f"max_instance_size ({self.config.max_instance_size})"
            )
        return self._commit([[CHANGE_MACHINE, name, version, body]], [None])

    def get_machine(self, name: str, version: int | None = None) -> MachineDefinition | None:
        """Version *version* of machine *name* (the newest when None), or None if absent."""
        check_name("machine", name)
        prefix = name.encode() + b"\x00"
        found = self._read(
            lambda txn: machine_entry(txn, self._env.dbs[DB_MACHINES], prefix, version)
        )
        if found is None:
            return None
        return decode_machine(*found)

    def list_machines(self, name: str | None = None) -> list[MachineDefinition]:
        """Every stored machine definition (only those of machine *name*, when given), by
        name, then version."""
        if name is not None:
            check_name("machine", name)
        prefix = b"" if name is None else name.encode() + b"\x00"
        found = self._read(lambda txn: machine_entries(txn, self._env.dbs[DB_MACHINES], prefix))
        return [decode_machine(key, raw) for key, raw in found]

    # --- queries --------------------------------------------------------------------------------

    def list_by_state(
        self, machine: str, state: str, *, limit: int | None = None, cursor: str | None = None
    ) -> Page:
        """Instances of *machine* in *state*, in id order.

        With *limit*, at most that many; the returned :class:`Page` carries ``next_cursor``
        to pass back as *cursor* for the next page (None on the last page). Without a limit,
        every match; prefer :meth:`iter_by_state` for large results.

        Example::

            page = storage.list_by_state("order", "pending", limit=100)
            while page.next_cursor:
                page = storage.list_by_state("order", "pending", limit=100,
                                             cursor=page.next_cursor)
        """
        return self._list(state_query(machine, state), limit, cursor, reverse=False)

    def iter_by_state(self, machine: str, state: str) -> Iterator[Instance]:
        """Like :meth:`list_by_state`, lazily, a page of short read transaction at a time."""
        return self._iterate(state_query(machine, state), reverse=False)

    def count_by_state(self, machine: str) -> dict[str, int]:
        """How many instances of *machine* are in each state, from the state index alone
        (no instance is decoded). States with no instance are absent."""
        check_name("machine", machine)
        key_range = state_range(machine)
        return self._read(lambda txn: count_states(txn, self._env, key_range))

    def list_by_metadata(
        self,
        key: str,
        value: MetadataValue | None = None,
        *,
        start: MetadataValue | None = None,
        end: MetadataValue | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """Instances whose metadata label *key* equals *value*, or, with *start* and/or *end*
        instead, lies in ``start <= label < end`` (values of the bounds' type only; str, int,
        float and bool each sort among themselves). Ordered by label value, then id; paged
        like :meth:`list_by_state`.

        Example::

            storage.list_by_metadata("customer", "alice")
            storage.list_by_metadata("priority", start=5)            # 5 and above
            storage.list_by_metadata("total", start=10.0, end=99.5)
        """
        query = metadata_query(key, value, start, end)
        return self._list(query, limit, cursor, reverse=False)

    def iter_by_metadata(
        self,
        key: str,
        value: MetadataValue | None = None,
        *,
        start: MetadataValue | None = None,
        end: MetadataValue | None = None,
    ) -> Iterator[Instance]:
        """Like :meth:`list_by_metadata`, lazily."""
        return self._iterate(metadata_query(key, value, start, end), reverse=False)

    def list_by_time(
        self,
        start_ms: int,
        end_ms: int,
        *,
        newest_first: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """Instances with ``start_ms <= updated_at < end_ms``, oldest first (or newest first),
        ties in id order; paged like :meth:`list_by_state`.

        Example::

            hour_ago = int(time.time() * 1000) - 3_600_000
            recent = storage.list_by_time(hour_ago, 2**63 - 1, newest_first=True, limit=50)
        """
        return self._list(time_query(start_ms, end_ms), limit, cursor, reverse=newest_first)

    def iter_by_time(
        self, start_ms: int, end_ms: int, *, newest_first: bool = False
    ) -> Iterator[Instance]:
        """Like :meth:`list_by_time`, lazily."""
        return self._iterate(time_query(start_ms, end_ms), reverse=newest_first)

    def rebuild_indexes(self) -> int:
        """Drop the state, metadata and time indexes and rebuild them from the instances;
        return how many instances were indexed.

        Up to 10,000 instances are rebuilt in one write transaction, atomically; a larger store
        is rebuilt in chunks of that size, and queries (here or in other processes) may see an
        index that is still partial until the call returns. Writes made meanwhile keep the
        indexes right for what they touch.
        """
        env = self._writable_env()
        indexed, after = 0, None
        with env.write_mutex:
            self._wal.check_usable()
            while True:
                with env.begin_write() as txn:
                    if after is None:
                        for name in INDEX_DATABASES:
                            txn.drop(env.dbs[name], delete=False)
                    page = instances_page(txn, env, after, _REBUILD_CHUNK)
                    index_page(txn, env.dbs, page)
                indexed += len(page)
                if len(page) < _REBUILD_CHUNK:
                    return indexed
                after = page[-1][0]

    def _list(
        self, key_range: KeyRange, limit: int | None, cursor: str | None, reverse: bool
    ) -> Page:
        if limit is not None and type(limit) is not int:
            raise InvalidTypeError(f"limit: expected an int or None, got {type(limit).__name__}")
        if limit is not None and limit < 1:
            raise InvalidInputError(f"limit: must be at least 1, got {limit}")
        after = decode_cursor(cursor, key_range)
        found, more = self._read(lambda txn: scan(txn, self._env, key_range, after, reverse, limit))
        instances = [decode_instance(id_key, raw) for _, id_key, raw in found]
        return Page(instances, encode_cursor(key_range, found[-1][0]) if more else None)

    def _iterate(self, key_range: KeyRange, reverse: bool) -> Iterator[Instance]:
        cursor = None
        while True:
            page = self._list(key_range, PAGE_SIZE, cursor, reverse)
            yield from page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def pending_records(self) -> int:
        """How many WAL records follow the newest one applied to LMDB: 0 on a store opened
        for writing (opening replayed them); on a read-only store, records a writer appended
        and has not applied yet, or that a killed writer left for the next open to replay."""
        applied = self.applied_seq
        return self._wal.tail_after().applied_seq - applied

    def recovery_needed(self) -> str | None:
        """Why this store's LMDB does not hold everything its WAL does and nobody is about to
        apply it (None when it does): a read-only view of a store whose last writer stopped
        before applying its records. Opening it for writing replays them.

        Example::

            with Storage.open(StorageConfig(data_dir=path, read_only=True)) as storage:
                if storage.recovery_needed():
                    print(storage.recovery_needed())   # "3 WAL records are not applied ..."
        """
        if not self.config.read_only or self._opened_in_use:
            return None
        pending = self.pending_records()
        if pending <= 0:
            return None
        return (
            f"{pending} WAL record(s) after sequence {self.applied_seq} are not applied yet "
            f"and no process has {self.config.path} open; open it for writing to replay them "
            f"(rstmdb-storage recover {self.config.path})"
        )

    def stats(self) -> dict[str, Any]:
        """Sizes and counts for operators: the LMDB map and its use, entries and bytes per
        table, reader slots (in use, and stale: left by processes that are gone), WAL segments
        and bytes, snapshot files and bytes. Reads only.

        Example::

            stats = storage.stats()
            print(stats["map_used"] / stats["map_size"], stats["readers"]["stale"])
        """
        report = self._live_env().stats()
        segments = self._wal.segment_ids()
        snapshot_files = [p for p in self._snapshots_dir.iterdir() if p.is_file()]
        report["applied_seq"] = self.applied_seq
        report["wal"] = {
            "segments": len(segments),
            "bytes": sum((self._wal.directory / segment_name(i)).stat().st_size for i in segments),
        }
        report["snapshots"] = {
            "count": len(published_seqs(self._snapshots_dir)),
            "bytes": sum(p.stat().st_size for p in snapshot_files),
        }
        return report

    def wal_segments(self) -> list[int]:
        """First sequence numbers of the WAL segment files present, oldest first."""
        return self._wal.segment_ids()

    @property
    def torn_tail_repairs(self) -> list[TornTailRepair]:
        """Torn WAL tails this process cut while opening or writing (each copied aside first)."""
        return list(self._wal.repairs)

    # --- writing --------------------------------------------------------------------------------

    def put_instance(
        self,
        instance: Instance,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Store *instance* (insert or replace); return the WAL sequence number of the write.

        With *expected_state* and/or *expected_seq*, the write applies only if the stored
        instance is still in that state and/or was last written at that sequence number (its
        ``last_wal_offset``; 0 means "no instance stored yet"), else :class:`ConflictError`
        is raised and nothing is written: two workers that read the same instance cannot both
        move it.

        Example::

            inst = storage.get_instance("order-1")
            inst.state = "paid"
            storage.put_instance(inst, expected_seq=inst.last_wal_offset)

        With *idempotency_key*, the store remembers this write's sequence number for
        ``idempotency_retention_ms``: a retry with the same key returns that number and writes
        nothing, whatever it carries (a worker that crashed after writing can simply retry).

        :raises ConflictError: the stored instance is not as expected; nothing is written
        :raises InvalidInputError, InvalidTypeError: the instance is not storable; nothing
            is written
        :raises StorageFailedError: an earlier fsync failed; reopen the store
        """
        change, fields = self._put_change(instance, expected_state, expected_seq)
        return self._commit([change], [fields], idempotency_key)

    def delete_instance(
        self,
        instance_id: str,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Delete the instance stored under *instance_id*; return the WAL sequence number.
        *expected_state*, *expected_seq* and *idempotency_key* work as for
        :meth:`put_instance`.

        :raises InstanceNotFoundError: nothing is stored under that id; nothing is written
        :raises ConflictError: the stored instance is not as expected; nothing is written
        """
        change = _delete_change(instance_id, expected_state, expected_seq)
        return self._commit([change], [None], idempotency_key)

    def transition(
        self,
        instance_id: str,
        from_state: str,
        to_state: str,
        *,
        ctx: dict[str, Any] | None = None,
        event_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Instance:
        """Move an instance from *from_state* to *to_state*, atomically: the write applies
        only if the instance is still in *from_state* and nobody wrote it since it was read.
        *ctx* replaces the context when given; *event_id* becomes ``last_event_id``. Returns
        the instance as stored. With *idempotency_key*, a retry of a transition that was
        already made returns the instance as it is now instead of raising.

        Example::

            storage.transition("order-1", "pending", "paid", event_id="evt-42")

        :raises InstanceNotFoundError: no instance is stored under that id
        :raises ConflictError: it is not in *from_state*, or another write won the race
        """
        check_name("from_state", from_state)
        if idempotency_key is not None and self._remembered(idempotency_key) is not None:
            return self.get_instance(instance_id)  # type: ignore[return-value]
        current = self.get_instance(instance_id)
        if current is None:
            raise InstanceNotFoundError(f"no instance {instance_id!r} to transition")
        if current.state != from_state:
            raise ConflictError(
                f"instance {instance_id!r} is in state {current.state!r}, not {from_state!r}"
            )
        moved = dataclasses.replace(
            current,
            state=to_state,
            ctx=current.ctx if ctx is None else ctx,
            last_event_id=event_id if event_id is not None else current.last_event_id,
            updated_at=None,
        )
        seq = self.put_instance(
            moved,
            expected_state=from_state,
            expected_seq=current.last_wal_offset,
            idempotency_key=idempotency_key,
        )
        stored = self.get_instance(instance_id)
        if stored is not None and (stored.last_wal_offset == seq or idempotency_key is not None):
            return stored  # ours; or, for a retry the key absorbed, the instance as it is now
        moved.last_wal_offset = seq  # moved on since our write: ours, rebuilt locally
        return moved

    @contextlib.contextmanager
    def batch(self, *, idempotency_key: str | None = None) -> Iterator[Batch]:
        """Group puts and deletes into one WAL record and one LMDB transaction: all or nothing.

        Nothing is written if the block raises. After the block, ``batch.seq`` is the sequence
        number of the record (None if the batch was empty); with *idempotency_key*, a retried
        batch writes nothing and gets the first one's number.

        Example::

            with storage.batch() as batch:
                batch.put_instance(order)
                batch.delete_instance("order-0")
        """
        batch = Batch(self)
        yield batch
        if batch.changes:
            batch.seq = self._commit(batch.changes, batch.known, idempotency_key)

    def _put_change(
        self, instance: Instance, expected_state: str | None, expected_seq: int | None
    ) -> tuple[list[Any], IndexedFields]:
        check_instance(instance)
        body = encode_instance_body(instance, self.config.max_instance_size)
        change = [CHANGE_PUT, instance.id, instance.created_at, instance.updated_at, body]
        condition = _condition(expected_state, expected_seq)
        if condition is not None:
            change.append(condition)
        return change, (instance.machine, instance.state, instance.metadata)

    def _commit(
        self,
        changes: list[list[Any]],
        known: list[IndexedFields | None],
        idempotency_key: str | None = None,
    ) -> int:
        if idempotency_key is not None:
            check_name("idempotency_key", idempotency_key)
            retention = self.config.idempotency_retention_ms
            changes = [*changes, [CHANGE_IDEMPOTENCY, idempotency_key, retention]]
            known = [*known, None]
        payload = cbor_dumps(changes, "WAL record")
        if len(payload) > self.config.max_record_size:
            raise RecordTooLargeError(
                f"WAL record of {len(payload)} bytes is larger than max_record_size "
                f"({self.config.max_record_size})"
            )
        env = self._writable_env()
        if self._grouping():
            seq = self._commit_grouped(env, changes, payload, idempotency_key)
        else:
            with env.write_mutex:
                self._wal.check_usable()
                seq = self._write_locked(env, changes, payload, known, idempotency_key)
                self._dirty = True
        if self._flusher is not None and self._flusher.pid != os.getpid():
            self._flusher = _Flusher(self)  # forked: threads do not survive a fork
        return seq

    def _write_locked(
        self,
        env: lmdb_env.LmdbEnvironment,
        changes: list[list[Any]],
        payload: bytes,
        known: list[IndexedFields | None],
        idempotency_key: str | None,
    ) -> int:
        must_check = _must_check(changes)
        appends, _ = self._group_locks()
        written: int | None = None
        growths = 0
        while True:
            try:
                started = time.perf_counter()
                with env.begin_write() as txn:
                    if time.perf_counter() - started > _CONTENDED_WAIT:
                        # Another process held the write lock. (Threads of this process wait
                        # for the write mutex instead: under the GIL, the extra steps of group
                        # commit cost them more than the syncs they share.)
                        self._note_contention()
                    # The append lock keeps grouped appenders out while the log's end is
                    # read and written; it is not held across the sync.
                    with appends.locked():
                        tail, caught_up = self._apply_pending(txn, self._meta.tail(txn))
                        if not caught_up:
                            continue  # commit this chunk of replay, then go on
                        if written is not None:
                            return written  # the catch-up above applied our record
                        timestamp_ms = time.time_ns() // 1_000_000
                        if idempotency_key is not None:
                            first = remembered_write(
                                txn, env.dbs[DB_IDEMPOTENCY], idempotency_key, timestamp_ms
                            )
                            if first is not None:
                                return first  # a retry: the first write's result
                        if must_check:
                            _raise_failure(txn, env.dbs, tail.next_seq, changes)
                        new_tail = self._append_record(appends, tail, timestamp_ms, payload)
                    written = tail.next_seq
                    failpoint("write.after_append")
                    # The changes go into the transaction while the record is being written to
                    # the device; they become visible only with the commit, after the sync.
                    sync_due = self._wal.sync_due()
                    if sync_due:
                        self._wal.start_sync()
                    apply_changes(txn, env.dbs, written, timestamp_ms, changes, known)
                    self._meta.write_tail(txn, new_tail)
                    self._count_changes(txn, changes)
                    if sync_due:
                        self._wal.sync()
                    failpoint("write.after_sync")
                failpoint("write.after_commit")
                return written
            except lmdb.MapFullError:
                # The transaction was aborted; if our record was appended it waits at the WAL
                # tail, and the catch-up of the next attempt applies it.
                growths += 1
                env.grow(growths)

    # --- group commit ---------------------------------------------------------------------------
    #
    # Under contention (another process was found holding the write lock, or a sync of another
    # writer covered ours) durable writes take three steps instead of one, so that one
    # fdatasync serves many of them (see wal/group_commit.py): append under the append lock,
    # without LMDB's write lock and without syncing; sync outside both, unless another
    # writer's sync covered the record; apply every synced record, whoever wrote it. Nothing is
    # visible before it is durable, and conditions are judged at append time against the state
    # every earlier record leads to, which is what applying them in order reaches again.

    def _grouping(self) -> bool:
        return (
            self.config.fsync_policy.mode == "every_write" and time.monotonic() < self._group_until
        )

    def _note_contention(self) -> None:
        if self.config.fsync_policy.mode == "every_write":
            self._group_until = time.monotonic() + _GROUP_WINDOW

    def _group_locks(self) -> tuple[SharedAppendTail, SharedSync]:
        """This process's append and sync locks (opened again in a forked child: a ``flock``
        is shared with every process the descriptor was inherited by)."""
        files = self._group_files
        if files is None or files[0].pid != os.getpid():
            indexes, mode = self.config.path / INDEXES_DIR, self.config.file_mode
            files = self._group_files = (
                SharedAppendTail(indexes, self._boot_id, mode),
                SharedSync(indexes, self.config.path / WAL_DIR, self._boot_id, mode),
            )
        return files

    def _commit_grouped(
        self,
        env: lmdb_env.LmdbEnvironment,
        changes: list[list[Any]],
        payload: bytes,
        idempotency_key: str | None,
    ) -> int:
        with env.write_mutex:
            self._wal.check_usable()
            seq = self._append_grouped(env, changes, payload, idempotency_key)
        failpoint("group.after_append")
        synced, covered = self._sync_through(seq)
        failpoint("group.after_sync")
        # A writer whose sync covered ours may have applied it already; one that synced its
        # own record goes straight to the apply (which checks again inside the transaction).
        if not covered or self.applied_seq < seq:
            with env.write_mutex:
                self._apply_through(env, seq, synced)
                self._dirty = True
        failpoint("group.after_apply")
        return seq

    def _append_grouped(
        self,
        env: lmdb_env.LmdbEnvironment,
        changes: list[list[Any]],
        payload: bytes,
        idempotency_key: str | None,
    ) -> int:
        """Step 1: append the record at the append tail; return its sequence number (or, for
        a retry with a known idempotency key, the first write's). A plain put needs only the
        append lock; a condition or an idempotency key is judged inside an LMDB write
        transaction that is then thrown away."""
        appends, _ = self._group_locks()
        if idempotency_key is None and not _must_check(changes):
            with appends.locked():
                tail = self._tail_for_append(appends, None)
                timestamp_ms = time.time_ns() // 1_000_000
                return self._append_record(appends, tail, timestamp_ms, payload).applied_seq
        growths = 0
        while True:
            try:
                txn = env.begin_write()
                try:
                    applied = self._meta.tail(txn)
                    with appends.locked():
                        appended = self._tail_for_append(appends, applied)
                        if appended != applied:
                            self._note_contention()
                        timestamp_ms = time.time_ns() // 1_000_000
                        first = self._judge(
                            txn, env, applied, appended, changes, idempotency_key, timestamp_ms
                        )
                        if first is not None:
                            return first  # steps 2 and 3 make the first write durable, visible
                        return self._append_record(
                            appends, appended, timestamp_ms, payload
                        ).applied_seq
                finally:
                    txn.abort()
            except lmdb.MapFullError:
                # The judging transaction filled the map; nothing was appended.
                growths += 1
                env.grow(growths)

    def _tail_for_append(self, appends: SharedAppendTail, applied: WalTail | None) -> WalTail:
        """Where the next record goes; call holding the append lock. The tail the last
        append stored, unless there is none in this boot or it is behind the applied tail;
        then past any complete record a writer appended before it crashed."""
        tail = appends.tail()
        if tail is None or (applied is not None and tail.next_seq < applied.next_seq):
            tail = applied if applied is not None else self._applied_tail()
        while (step := self._wal.next_record(tail)) is not None:
            record, tail = step
            if record is not None:
                self._wal.mark_unsynced(tail.segment)
        return tail

    def _append_record(
        self, appends: SharedAppendTail, tail: WalTail, timestamp_ms: int, payload: bytes
    ) -> WalTail:
        """Append the record at *tail* and store the tail after it; call holding the append
        lock. Return the new tail."""
        new_tail = self._wal.append(tail, timestamp_ms, payload)
        appends.write_tail(new_tail)
        return new_tail

    def _judge(
        self,
        txn: Any,
        env: lmdb_env.LmdbEnvironment,
        applied: WalTail,
        appended: WalTail,
        changes: list[list[Any]],
        idempotency_key: str | None,
        timestamp_ms: int,
    ) -> int | None:
        """Judge *changes* against the state after every record before them: the first
        write's sequence number for a known idempotency key; raises when a condition fails."""
        # Records appended but not applied yet are applied in a nested transaction thrown away
        # afterwards: what they change is not durable yet.
        view = txn if appended == applied else env.env.begin(write=True, parent=txn)
        try:
            if view is not txn:
                self._apply_records(view, applied, appended.applied_seq)
            if idempotency_key is not None:
                first = remembered_write(
                    view, env.dbs[DB_IDEMPOTENCY], idempotency_key, timestamp_ms
                )
                if first is not None:
                    return first
            if _must_check(changes):
                _raise_failure(view, env.dbs, appended.next_seq, changes)
            return None
        finally:
            if view is not txn:
                view.abort()

    def _sync_through(self, seq: int) -> tuple[int, bool]:
        """Step 2: make the records up to *seq* durable, sharing the sync; return the sequence
        number known durable, and whether another writer's sync covered *seq*."""
        _, shared = self._group_locks()
        try:
            synced, covered = shared.sync_through(seq, self._appended_tail)
        except OSError as exc:
            raise self._wal.failed(exc, str(self.config.path / WAL_DIR)) from exc
        if covered:
            self._note_contention()
        return synced, covered

    def _appended_tail(self) -> WalTail:
        appends, _ = self._group_locks()
        with appends.locked():
            tail = appends.tail()
        return tail if tail is not None else self._applied_tail()

    def _applied_tail(self) -> WalTail:
        return self._read(self._meta.tail)

    def _apply_through(self, env: lmdb_env.LmdbEnvironment, seq: int, synced: int) -> None:
        """Step 3: apply every synced record not applied yet, unless another writer applied
        record *seq* already."""
        growths = 0
        while True:
            try:
                with env.begin_write() as txn:
                    applied = self._meta.tail(txn)
                    if applied.applied_seq >= seq:
                        return
                    tail, changed = self._apply_records(txn, applied, synced)
                    self._meta.write_tail(txn, tail)
                    self._count_changes(txn, changed)
                return
            except lmdb.MapFullError:
                growths += 1
                env.grow(growths)

    def _apply_records(
        self, txn: Any, tail: WalTail, until_seq: int
    ) -> tuple[WalTail, list[list[Any]]]:
        """Apply the records after *tail* up to *until_seq*, all of which exist."""
        changed: list[list[Any]] = []
        while tail.applied_seq < until_seq:
            step = self._wal.next_record(tail)
            if step is None:
                raise WalGapError(
                    f"the WAL ends at sequence {tail.applied_seq}, before {until_seq}",
                    path=str(self.config.path / WAL_DIR),
                )
            record, tail = step
            if record is not None:
                changed.extend(self._apply_record(txn, record, tail))
        return tail, changed

    def _apply_record(self, txn: Any, record: WalRecord, tail: WalTail) -> list[list[Any]]:
        changes = decode_changes(
            record.payload, f"WAL record {record.seq} in segment {tail.segment}"
        )
        apply_changes(txn, self._env.dbs, record.seq, record.timestamp_ms, changes)
        return changes

    def _apply_pending(
        self, txn: Any, tail: WalTail, strict: bool = False, limit: int = REPLAY_CHUNK
    ) -> tuple[WalTail, bool]:
        """Apply WAL records past *tail* (left by a writer that crashed before its commit, or
        by LMDB losing commits). Returns the new tail and whether the log end was reached."""
        start, applied, changed = tail, 0, []
        while applied < limit:
            step = self._wal.next_record(tail, strict)
            if step is None:
                break
            record, tail = step
            if record is not None:
                changed.extend(self._apply_record(txn, record, tail))
                self._wal.mark_unsynced(tail.segment)
                applied += 1
        if tail != start:
            self._wal.sync()  # what becomes visible must be durable first
            self._meta.write_tail(txn, tail)
            self._count_changes(txn, changed)
        return tail, applied < limit

    def _count_changes(self, txn: Any, changes: list[list[Any]]) -> None:
        """Count the puts and deletes applied; wake the flusher when a snapshot may be due."""
        count = sum(1 for change in changes if change[0] in (CHANGE_PUT, CHANGE_DELETE))
        if count:
            total = self._meta.add_changes(txn, count)
            interval = self.config.snapshot_interval
            if interval and total // interval != (total - count) // interval and self._flusher:
                self._flusher.wake()

    def _recover(self, progress: Progress | None = None) -> None:
        """Make LMDB whole on open: check it if a reboot may have torn it, then replay.

        LMDB runs with ``sync=False``, so commits after the last checkpoint may be missing or
        torn on disk after a power loss. The WAL holds them; the environment is checked when the
        machine rebooted since the last checkpoint and commits happened after it.
        """
        checkpoint, applied = self._read(
            lambda txn: (self._meta.checkpoint(txn), self._meta.tail(txn).applied_seq)
        )
        rebooted = checkpoint is None or checkpoint.boot_id != self._boot_id
        if rebooted and applied > (checkpoint.applied_seq if checkpoint else 0):
            findings = run_checks([lambda: self._check_instances(applied)])
            if findings:
                raise IndexesCorruptionError(
                    f"{self.config.path / INDEXES_DIR} was not flushed before the machine "
                    f"restarted and fails its check "
                    f"({len(findings)} problem(s), first: {findings[0]})",
                    path=str(self.config.path / INDEXES_DIR),
                )
        # A crash cannot leave a hole before written bytes; a power loss can, so the end of the
        # log is checked byte for byte only after a reboot.
        self._replay(strict=rebooted, progress=progress)

    def _adopt_snapshot(self, manifest: SnapshotManifest) -> None:
        """Record a snapshot just copied into place as flushed (it was synced) and listed."""
        env = self._env
        with env.write_mutex, env.begin_write() as txn:
            self._meta.write_checkpoint(txn, Checkpoint(manifest.seq, self._boot_id))
            _list_snapshot(txn, env, manifest)
        env.sync()

    def _replay(self, strict: bool, progress: Progress | None = None) -> int:
        """Apply every WAL record LMDB has not seen; return how many."""
        env = self._live_env()
        replayed = 0
        appends, _ = self._group_locks()
        with env.write_mutex:
            while True:
                with env.begin_write() as txn, appends.locked():
                    before = self._meta.tail(txn)
                    tail, done = self._apply_pending(txn, before, strict)
                    if done:
                        # Any other append tail is stale: the records it counted were cut
                        # (restore, repair) or lost with a power loss, each of which is
                        # followed by an open. Appends go on at the end.
                        appends.write_tail(tail)
                replayed += tail.next_seq - before.next_seq
                strict = False  # the end of the log was checked once, in the first pass
                if progress is not None:
                    progress("replay", replayed, 0)
                if done:
                    break
                failpoint("replay.after_chunk")
        if replayed:
            log.info("replayed %d WAL records into %s", replayed, self.config.path)
        return replayed

    # --- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self) -> int:
        """Flush LMDB to disk now; return the applied sequence number the flush covers.

        The store does this by itself every ``checkpoint_interval_ms`` (from a background
        thread, when there were writes) and at close. The WAL segment being appended to is
        synced first, so LMDB on disk never gets ahead of the WAL.
        """
        env = self._writable_env()
        with env.write_mutex:
            applied = self._checkpoint_locked(env)
        failpoint("checkpoint.before_lmdb_sync")
        env.sync()  # outside the mutex: writers go on while the data file is flushed
        return applied

    def _checkpoint_locked(self, env: lmdb_env.LmdbEnvironment) -> int:
        self._wal.check_usable()
        with env.begin_write() as txn:
            tail = self._meta.tail(txn)
            # Syncing the tail segment also covers records other processes appended to it.
            self._wal.mark_unsynced(tail.segment)
            self._wal.sync()
            failpoint("checkpoint.after_wal_sync")
            self._meta.write_checkpoint(txn, Checkpoint(tail.applied_seq, self._boot_id))
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        return tail.applied_seq

    def _background_flush(self) -> None:
        """One pass of the flusher thread: clearing reader slots of dead processes, growing
        the map when it is nearly full, the ``every_ms`` WAL sync, and a checkpoint when one
        is due."""
        env = self._env
        if self._closed or env.stale:
            return
        with env.write_mutex:
            env.env.reader_check()  # slots of killed readers (PITFALLS 5: now and then)
            env.grow_if_nearly_full()
            if self._wal.has_unsynced and self._wal.sync_due():
                self._wal.sync()
            elapsed_ms = (time.monotonic() - self._last_checkpoint) * 1000
            if not (self._dirty and elapsed_ms >= self.config.checkpoint_interval_ms):
                return
            self._checkpoint_locked(env)
        failpoint("checkpoint.before_lmdb_sync")
        env.sync()

    # --- automatic snapshots and compaction ---------------------------------------------------

    def _start_maintenance_if_due(self) -> None:
        running = self._maintenance
        if running is not None and running.is_alive():
            return
        if self._closed or self._env.stale or not self._maintenance_due():
            return
        thread = threading.Thread(target=self._maintain, name="rstmdb-maintenance", daemon=True)
        thread.start()
        # Published only once started: _join_maintenance() in another thread may read it at once.
        self._maintenance = thread

    def _maintenance_due(self) -> bool:
        config = self.config
        if config.snapshot_interval:
            changes, base = self._read(
                lambda txn: (self._meta.change_count(txn), self._meta.snapshot_changes(txn))
            )
            if changes - base >= config.snapshot_interval:
                return True
        if config.compaction_enabled:
            segments = len(self._wal.segment_ids())
            return segments > config.max_wal_segments and segments != self._segments_left
        return False

    def _maintain(self) -> None:
        """Snapshot and compact, unless another process is doing it (it runs in a thread of
        its own, so that checkpoints and WAL syncs go on meanwhile)."""
        try:
            with snapshot_lock(self._snapshots_dir, self.config.file_mode, blocking=False) as ours:
                if not ours or self._closed or not self._maintenance_due():
                    return
                self._snapshot_locked(None)
                if self.config.compaction_enabled:
                    self._delete_covered(snapshots_created=1)
                self._segments_left = len(self._wal.segment_ids())
        except StorageError:
            log.exception("automatic snapshot of %s failed", self.config.path)

    def _join_maintenance(self) -> None:
        running = self._maintenance
        if running is not None and running is not threading.current_thread():
            running.join()

    # --- plumbing -------------------------------------------------------------------------------

    def _writable_env(self) -> lmdb_env.LmdbEnvironment:
        """The environment, for a change: refused when the store is open read-only."""
        if self.config.read_only:
            raise ReadOnlyError(f"storage at {self.config.path} is open read-only")
        return self._live_env()

    def _live_env(self) -> lmdb_env.LmdbEnvironment:
        env = self._env
        if env.stale or self._closed:
            if self._closed:
                raise StorageClosedError(f"storage at {self.config.path} is closed")
            env = self._env = lmdb_env.acquire(self.config)  # forked: our own handle
            self._meta = Meta(env.meta)
        return env

    def _read(self, read: Callable[[Any], Any]) -> Any:
        """``read(txn)`` in a short read transaction."""
        with self._live_env().read() as txn:
            return read(txn)


class _Flusher:
    """A daemon thread that syncs the WAL under ``FsyncPolicy.every_ms`` and checkpoints LMDB
    every ``checkpoint_interval_ms`` while there are writes, so neither waits for the next
    write to happen; and starts automatic snapshots and compaction when they are due."""

    def __init__(self, storage: Storage) -> None:
        config = storage.config
        interval_ms = config.checkpoint_interval_ms
        if config.fsync_policy.mode == "every_ms":
            interval_ms = min(interval_ms, config.fsync_policy.value)
        self.pid = os.getpid()
        self.passes = 0
        #: notified after every pass, so that tests can wait for one instead of sleeping
        self.passed = threading.Condition()
        self._interval = interval_ms / 1000
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._storage = weakref.ref(storage)
        self._thread = threading.Thread(target=self._run, name="rstmdb-flusher", daemon=True)
        self._thread.start()
        _flushers.add(self)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            storage = self._storage()
            if storage is None or self._stop.is_set():
                return
            try:
                storage._background_flush()
                storage._start_maintenance_if_due()
            except StorageError:
                # A failed sync has already made the store fail-stop; writers will say so.
                log.exception("background flush of %s failed", storage.config.path)
                return
            finally:
                del storage
            with self.passed:
                self.passes += 1
                self.passed.notify_all()

    def wake(self) -> None:
        """Run a pass now rather than at the end of the interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.pid == os.getpid() and self._thread is not threading.current_thread():
            self._thread.join()
            storage = self._storage()
            if storage is not None:
                storage._join_maintenance()
        _flushers.discard(self)


_flushers: weakref.WeakSet[_Flusher] = weakref.WeakSet()


@atexit.register
def _stop_flushers() -> None:
    # Stop flushing (and let a snapshot finish) before the interpreter tears down under a
    # running daemon thread.
    for flusher in list(_flushers):
        flusher.stop()


class Batch:
    """Changes collected by :meth:`Storage.batch`, committed together when the block ends."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.changes: list[list[Any]] = []
        #: the indexed fields of each put, parallel to ``changes`` (None for deletes)
        self.known: list[IndexedFields | None] = []
        #: the sequence number of the batch's WAL record, once committed
        self.seq: int | None = None

    def put_instance(
        self,
        instance: Instance,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
    ) -> None:
        """Add a put, conditional as :meth:`Storage.put_instance`; the instance is checked
        and encoded now (bad input raises here). A failed condition fails the whole batch."""
        change, fields = self._storage._put_change(instance, expected_state, expected_seq)
        self.changes.append(change)
        self.known.append(fields)

    def delete_instance(
        self,
        instance_id: str,
        *,
        expected_state: str | None = None,
        expected_seq: int | None = None,
    ) -> None:
        """Add a delete; the instance must exist when the batch commits (or be put earlier in
        the batch), else the whole batch raises :class:`InstanceNotFoundError`."""
        self.changes.append(_delete_change(instance_id, expected_state, expected_seq))
        self.known.append(None)

    def __len__(self) -> int:
        return len(self.changes)


def _must_check(changes: list[list[Any]]) -> bool:
    """Whether *changes* can fail against the stored state (a delete, or a condition)."""
    return any(change[0] == CHANGE_DELETE or is_conditional(change) for change in changes)


def _condition(expected_state: str | None, expected_seq: int | None) -> list[Any] | None:
    if expected_state is not None:
        check_name("expected_state", expected_state)
    if expected_seq is not None and (type(expected_seq) is not int or expected_seq < 0):
        raise InvalidInputError(f"expected_seq: expected an int >= 0, got {expected_seq!r}")
    if expected_state is None and expected_seq is None:
        return None
    return [expected_state, expected_seq]


def _delete_change(
    instance_id: str, expected_state: str | None, expected_seq: int | None
) -> list[Any]:
    check_id(instance_id)
    condition = _condition(expected_state, expected_seq)
    return [CHANGE_DELETE, instance_id] + ([condition] if condition is not None else [])


def _raise_failure(txn: Any, dbs: dict[bytes, Any], seq: int, changes: list[list[Any]]) -> None:
    """Refuse, before anything is written, a record whose conditions or deletes fail."""
    failure = first_failure(txn, dbs, seq, changes, deletes_must_find=True)
    if failure is not None:
        kind, message = failure
        raise (ConflictError if kind == "conflict" else InstanceNotFoundError)(message)


_REBUILD_CHUNK = 10_000


def _list_snapshot(txn: Any, env: lmdb_env.LmdbEnvironment, manifest: SnapshotManifest) -> None:
    key = manifest.seq.to_bytes(8, "big")
    txn.put(key, seal(key, manifest.encode()), db=env.dbs[DB_SNAPSHOTS])


def _require_store(config: StorageConfig) -> None:
    if not config.holds_store():
        raise NotAStoreError(
            f"not an rstmdb-storage data directory: {config.path} (no {WAL_DIR}/ or {INDEXES_DIR}/)"
        )


def _open_wal(config: StorageConfig, env: lmdb_env.LmdbEnvironment) -> Wal:
    """The WAL of the store, creating the store (meta and first segment) if it is new."""
    wal_dir = config.path / WAL_DIR
    meta = Meta(env.meta)
    with env.write_mutex, env.begin_write() as txn:
        try:
            if meta.exists(txn):
                meta.check_all(txn)
                return _wal(config, meta.store_id(txn))
        except CorruptionError as exc:
            indexes = config.path / INDEXES_DIR
            raise IndexesCorruptionError(
                f"{indexes} fails its check ({exc})", path=str(indexes)
            ) from exc
        store_id, tail = _adopt_or_create(config, wal_dir)
        wal = _wal(config, store_id)
        if tail is None:
            tail = wal.start()
        meta.create(txn, store_id, tail)
        meta.write_checkpoint(txn, Checkpoint(0, _boot_id()))
        return wal


def _adopt_or_create(config: StorageConfig, wal_dir: Path) -> tuple[bytes, WalTail | None]:
    """A new store gets a random id. A WAL without LMDB (``indexes/`` lost, or a crash while
    the store was being created) is adopted and replayed from its first record."""
    probe = _wal(config, b"")  # only lists segments and reads a header
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


def _probe_wal(config: StorageConfig) -> Wal:
    """The WAL of a data directory whose LMDB is not open, with the store id of its first
    segment (an empty id when there is none)."""
    probe = _wal(config, b"")  # only lists segments and reads a header
    ids = probe.segment_ids()
    return _wal(config, probe.segment_store_id(ids[0]) if ids else b"")


def _wal(config: StorageConfig, store_id: bytes) -> Wal:
    return Wal(
        config.path / WAL_DIR,
        store_id,
        config.wal_segment_size,
        config.fsync_policy,
        config.file_mode,
    )


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
