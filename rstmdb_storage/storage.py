"""``Storage``: the front door.

Every method checks nothing and holds nothing of its own (but for
:func:`~rstmdb_storage.engine.typed_calls`, the last line of defence against a foreign
exception): it hands over to the room that owns the work (see :mod:`rstmdb_storage.engine` for
the map of rooms, and the README's "Where things are"). A write passes through them once,
downward: ``changes`` checks and encodes it, ``writes`` appends it to the WAL and applies it
with ``apply`` in one LMDB transaction (or groups it with other processes' writes),
``maintenance`` later checkpoints, snapshots and compacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from . import inspection, maintenance, opening, query, recovery, writes
from .changes import DeleteInstance, PutInstance, PutMachine, WalRecord
from .compaction import CompactionResult
from .config import SNAPSHOTS_DIR, StorageConfig
from .engine import Engine, typed_calls, typed_calls_without_store
from .errors import CorruptionError, InvalidInputError
from .lookups import Lookups, Reader, reading
from .model import Instance
from .replication.bucket_restore import restore_from_bucket
from .replication.objects import is_url
from .replication.shipping import ShipReport
from .scrub import scrub_cycle
from .snapshots import Progress, SnapshotManifest, check_snapshot, manifests
from .verify import Finding, verify_store
from .wal import TornTailRepair
from .writes import Batch

__all__ = ["Batch", "Storage"]


class Storage(Lookups):
    """A data directory of state-machine instances, open in this process.

    Open with :meth:`open`; use as a context manager or call :meth:`close`. One ``Storage`` may
    be shared by threads; any number of processes may open the same directory.

    Example::

        with Storage.open("/var/lib/rstmdb") as storage:
            seq = storage.put_instance(Instance(id="order-1", machine="order", version=1,
                                                state="pending"))
            assert storage.get_instance("order-1").last_wal_offset == seq
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.config = engine.config

    # --- opening and closing --------------------------------------------------------------------

    @classmethod
    @typed_calls_without_store
    def open(
        cls,
        config: StorageConfig | str | os.PathLike[str],
        progress: Progress | None = None,
        *,
        replica_of: str | None = None,
    ) -> Storage:
        """Open the store in ``config.data_dir`` and replay the WAL records LMDB has not
        applied yet. A new store is created there when the path holds none, unless
        ``config.create`` is False (then :class:`NotAStoreError`, and nothing is created).

        When ``indexes/`` is missing, unreadable or fails its check, it is rebuilt from the
        newest intact snapshot and the WAL after it (see :mod:`rstmdb_storage.recovery`);
        *progress*, if given, hears how that goes (see :data:`Progress`).

        With *replica_of* (``s3://bucket/prefix``, the same as ``config.replica_of``), the
        store is a replica of what a primary ships there: restored from the bucket when the
        path holds no store, then following it (see :mod:`rstmdb_storage.replication`)::

            replica = Storage.open("/var/lib/replica", replica_of="s3://backups/rstmdb")

        :param config: a :class:`StorageConfig`, or a path for all defaults
        :raises ConfigError: a config field is invalid
        :raises NotAStoreError: ``create=False`` or ``read_only=True`` and the path is not a
            data directory
        :raises RecoveryNeededError: ``read_only=True`` and ``indexes/`` is missing
        :raises CorruptionError: the WAL or LMDB fails its checks and cannot be rebuilt (never
            silently skipped); :class:`WalGapError` names the missing sequence numbers
        """
        config = StorageConfig.of(config)
        if replica_of is not None:
            config = dataclasses.replace(config, replica_of=replica_of)
        return cls(opening.open_engine(config, progress))

    @typed_calls
    def close(self) -> None:
        """Sync what this process wrote, checkpoint LMDB, and release the files. Idempotent."""
        opening.release(self._engine, checkpoint_first=True)

    def __enter__(self) -> Storage:
        return self

    def __reduce__(self) -> tuple[Any, tuple[StorageConfig]]:
        # Pickled as its configuration: a process it is sent to (a ``spawn`` pool's task, say)
        # opens the store itself, as python-diskcache does; LMDB handles cannot be sent.
        return (Storage.open, (self.config,))

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading (and the lookups of Lookups) ---------------------------------------------------

    def reader(self) -> contextlib.AbstractContextManager[Reader]:
        """A consistent view for several lookups: every read through the :class:`Reader`
        sees one state of the store, and none begins a transaction of its own (about 9%
        cheaper a lookup). Keep it short; iterate its listings inside the with block.

        Example::

            with storage.reader() as r:
                order = r.get_instance("order-1")
                pending = r.list_by_state("order", "pending")
        """
        return reading(self._engine)

    @property
    def store_id(self) -> bytes:
        """The store's random 16-byte id, made when it was created (it names the store's
        directory in a bucket it ships to)."""
        return self._engine.wal.store_id

    @property
    @typed_calls
    def applied_seq(self) -> int:
        """The sequence number of the newest WAL record applied to LMDB."""
        return self._engine.applied_tail().applied_seq

    @typed_calls
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
        return verify_store(self._engine)

    @typed_calls
    def scrub(self) -> list[Finding]:
        """Run a whole cycle of the scrub now (the background thread runs a slice of it every
        ``scrub_interval_ms``, see :mod:`rstmdb_storage.scrub`); return what it found.

        It makes :meth:`verify`'s checks a slice at a time, and acts on damage in LMDB: it
        heals the store in place when no other process has it open, else fail-stops it and
        the next open heals it.

        Example::

            if storage.scrub():
                print(storage.health()["scrub"])
        """
        return scrub_cycle(self._engine)

    @typed_calls
    def read_wal(self, from_seq: int = 1, limit: int | None = None) -> Iterator[WalRecord]:
        """WAL records from sequence *from_seq* on, at most *limit* of them, up to the newest
        applied one. Each :class:`~rstmdb_storage.changes.WalRecord` has ``seq``,
        ``timestamp_ms`` and ``payload``; its ``changes()`` decodes the payload.

        :raises InvalidTypeError, InvalidInputError: *from_seq* or *limit* is not a positive
            int (at once, not when iterating)
        :raises WalGapError: segments holding the sequence numbers asked for are gone
        """
        return query.wal_records(self._engine, from_seq, limit)

    @typed_calls
    def purge_idempotency_keys(self) -> int:
        """Delete the idempotency keys whose retention has passed; return how many.

        Expired keys already count as absent; this reclaims their space. It runs in write
        transactions of at most 10,000 entries each, so writers are held up only briefly.
        It is housekeeping, not a change: it does not go through the WAL.
        """
        return maintenance.purge_idempotency_keys(self._engine)

    # --- snapshots ------------------------------------------------------------------------------

    @typed_calls
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
        return maintenance.create_snapshot(self._engine, progress)

    @typed_calls
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
        return maintenance.compact(self._engine, progress)

    @typed_calls
    def hold_wal(self, name: str, from_seq: int) -> None:
        """Keep every WAL record from *from_seq* on through compactions, until
        :meth:`release_wal` (for a shipper or a backup in progress; holds are kept in the
        store, so they outlive the process that set them).

        Example::

            storage.hold_wal("nightly-backup", storage.applied_seq + 1)
            ...   # copy snapshots/ and wal/
            storage.release_wal("nightly-backup")
        """
        maintenance.hold_wal(self._engine, name, from_seq)

    @typed_calls
    def release_wal(self, name: str) -> bool:
        """Drop the WAL hold *name*; return whether there was one."""
        return maintenance.release_wal(self._engine, name)

    @typed_calls
    def wal_holds(self) -> dict[str, int]:
        """Every WAL hold: name -> the first sequence number it keeps."""
        return self._engine.read(self._engine.meta.holds)

    @typed_calls
    def ship(self) -> ShipReport:
        """Seal the open WAL segment and ship, now, what is not in the bucket of
        ``config.replica_url`` yet (the background thread does it within
        ``max_seal_interval_ms`` of each write; this is for tests and planned switch-overs).

        Example::

            assert storage.ship().shipped_seq == storage.applied_seq

        :raises InvalidInputError: the store was not opened with a ``replica_url``
        :raises ObjectStoreUnavailableError: the bucket cannot be reached (nothing is lost)
        """
        return self._replication("replica_url").ship(seal=True)

    @typed_calls
    def catch_up(self) -> int:
        """On a replica: apply, now, every segment the bucket of ``config.replica_of`` holds
        past the last record applied here (the background thread does it every
        ``replica_poll_interval_ms``); return the last sequence number applied.

        Example::

            replica.catch_up()

        :raises InvalidInputError: the store is not a replica
        :raises WalGapError, CorruptionError: the bucket's next segment does not join, or fails
            its checks (named); the replica stays at its last good record
        """
        return self._replication("replica_of").catch_up()

    @typed_calls
    def replication_status(self) -> dict[str, Any]:
        """How replication goes, as this process sees it. Both roles: ``role`` ("primary" or
        "replica"), ``url``, ``epoch``, ``lag_seq`` and ``last_error`` (None, or why the last
        pass failed: a replica stopped at a bad object names it). A primary: ``shipping``
        (whether this process ships: one at a time does), ``shipped_seq``, ``backlog``
        (sealed segments not shipped yet), ``last_shipped_ms``. A replica: ``following``,
        ``applied_seq``, ``bucket_seq`` (the last record the bucket was seen to hold) and
        ``lag_seconds`` (since the last poll that left nothing to apply; None before one).

        Example::

            if storage.replication_status()["last_error"]: ...

        :raises InvalidInputError: the store neither ships nor follows
        """
        setting = "replica_of" if self.config.replica_of is not None else "replica_url"
        return self._replication(setting).status()

    def _replication(self, setting: str) -> Any:
        """The shipper (``replica_url``) or the follower (``replica_of``) of this store."""
        part = self._engine.shipper if setting == "replica_url" else self._engine.follower
        if part is None:
            raise InvalidInputError(
                f"{self.config.path} was not opened with a {setting} (or is read-only)"
            )
        return part

    @classmethod
    @typed_calls_without_store
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
        *source* may be in use; compaction there waits until the files are copied. *source*
        may also be the URL (``s3://bucket/prefix``) a store ships to (its
        ``config.replica_url``): then what it shipped is restored. Returns the sequence
        number restored to; open *target* to use it.

        Example::

            Storage.restore("/var/lib/rstmdb", "/tmp/before-the-bad-deploy", seq=52_117)
            Storage.restore("s3://backups/rstmdb", "/var/lib/rstmdb")  # what was shipped

        :raises InvalidInputError: *target* is not empty, or *seq* is not covered by the
            snapshots and WAL segments *source* keeps
        """
        if is_url(source):  # s3://bucket/prefix: what a store shipped there
            restored = restore_from_bucket(source, target, seq, until_ms, progress)  # type: ignore[arg-type]
        else:
            restored = recovery.restore(source, target, seq, until_ms, progress)
        with cls.open(StorageConfig(data_dir=target), progress) as storage:
            if storage.applied_seq != restored:
                raise CorruptionError(
                    f"restore into {target} reached sequence {storage.applied_seq}, not {restored}"
                )
        return restored

    @typed_calls
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
        return maintenance.backup(self._engine, target, progress)

    @classmethod
    @typed_calls_without_store
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
        return recovery.repair_wal(StorageConfig.of(config))

    @typed_calls
    def list_snapshots(self) -> list[SnapshotManifest]:
        """Manifests of the published snapshots, oldest first, read from ``snapshots/``.

        :raises CorruptionError: a manifest fails its checksum
        """
        return manifests(self.config.path / SNAPSHOTS_DIR)

    @typed_calls
    def check_snapshot(self, manifest: SnapshotManifest, progress: Progress | None = None) -> None:
        """Raise :class:`CorruptionError` unless the snapshot's file matches its manifest."""
        check_snapshot(self.config.path / SNAPSHOTS_DIR, manifest, progress)

    # --- machine definitions --------------------------------------------------------------------

    @typed_calls
    def put_machine(self, name: str, version: int, definition: dict[str, Any]) -> int:
        """Store version *version* of machine *name* (a JSON-like dict: states, transitions,
        whatever rstmdb's core keeps); return the WAL sequence number. A stored version is
        immutable: putting it again with the same definition changes nothing, with another
        one raises :class:`ConflictError`.

        Example::

            storage.put_machine("order", 1, {"states": ["pending", "paid"],
                                             "transitions": [["pending", "paid"]]})
        """
        change = PutMachine.of(name, version, definition, self.config.max_instance_size)
        return writes.commit(self._engine, [change])

    @typed_calls
    def rebuild_indexes(self) -> int:
        """Drop the state, metadata and time indexes and rebuild them from the instances;
        return how many instances were indexed.

        Up to 10,000 instances are rebuilt in one write transaction, atomically; a larger store
        is rebuilt in chunks of that size, and queries (here or in other processes) may see an
        index that is still partial until the call returns. Writes made meanwhile keep the
        indexes right for what they touch.
        """
        return query.rebuild_indexes(self._engine)

    # --- what an operator asks ------------------------------------------------------------------

    @typed_calls
    def pending_records(self) -> int:
        """How many WAL records follow the newest one applied to LMDB: 0 on a store opened
        for writing (opening replayed them); on a read-only store, records a writer appended
        and has not applied yet, or that a killed writer left for the next open to replay."""
        return inspection.pending_records(self._engine)

    @typed_calls
    def recovery_needed(self) -> str | None:
        """Why this store's LMDB does not hold everything its WAL does and nobody is about to
        apply it (None when it does): a read-only view of a store whose last writer stopped
        before applying its records. Opening it for writing replays them.

        Example::

            with Storage.open(StorageConfig(data_dir=path, read_only=True)) as storage:
                if storage.recovery_needed():
                    print(storage.recovery_needed())   # "3 WAL records are not applied ..."
        """
        return inspection.recovery_needed(self._engine)

    @typed_calls
    def stats(self) -> dict[str, Any]:
        """Sizes and counts for operators: the LMDB map and its use, entries and bytes per
        table, reader slots (in use, and stale: left by processes that are gone), WAL segments
        and bytes, snapshot files and bytes. Reads only.

        Example::

            stats = storage.stats()
            print(stats["map_used"] / stats["map_size"], stats["readers"]["stale"])
        """
        return inspection.stats(self._engine)

    @typed_calls
    def health(self) -> dict[str, Any]:
        """Whether the store is sound in this process: ``failed`` (why it fail-stopped, or
        None), ``background_error`` (the last error of the background thread or an automatic
        snapshot, or None), ``applied_seq``, ``checkpoint`` (the last flush of LMDB: its
        ``applied_seq`` and ``boot_id``), ``newest_snapshot_seq``, ``background_thread``
        (whether it runs), and ``scrub``: its ``cycles`` and ``slices`` so far, the ``part`` it
        is in, ``last_slice_ms`` and ``last_cycle_ms`` (Unix ms, or None), and its last
        ``findings`` (see :meth:`scrub`). Reads only.

        Example::

            health = storage.health()
            if health["failed"]:
                print("reopen:", health["failed"])
        """
        return inspection.health(self._engine)

    @typed_calls
    def wal_segments(self) -> list[int]:
        """First sequence numbers of the WAL segment files present, oldest first."""
        return self._engine.wal.segment_ids()

    @property
    def torn_tail_repairs(self) -> list[TornTailRepair]:
        """Torn WAL tails this process cut while opening or writing (each copied aside first)."""
        return list(self._engine.wal.repairs)

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
        put = PutInstance.of(instance, expected_state, expected_seq, self.config.max_instance_size)
        return writes.commit(self._engine, [put], idempotency_key)

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
        delete = DeleteInstance.of(instance_id, expected_state, expected_seq)
        return writes.commit(self._engine, [delete], idempotency_key)

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
        return writes.transition(
            self._engine, instance_id, from_state, to_state, ctx, event_id, idempotency_key
        )

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
        batch = Batch(self.config.max_instance_size)
        yield batch
        if batch.changes:
            batch.seq = writes.commit(self._engine, batch.changes, idempotency_key)

    @typed_calls
    def checkpoint(self) -> int:
        """Flush LMDB to disk now; return the applied sequence number the flush covers.

        The store does this by itself every ``checkpoint_interval_ms`` (from a background
        thread, when there were writes) and at close. The WAL segment being appended to is
        synced first, so LMDB on disk never gets ahead of the WAL.
        """
        return maintenance.checkpoint(self._engine)
