"""A replica: a store that follows the bucket its primary ships to.

A store opened with ``StorageConfig.replica_of`` (``s3://bucket/prefix``) is a replica. An
empty data directory is first restored from the bucket (:mod:`.bucket_restore`: the newest
snapshot and the segments after it). From then on a thread polls the bucket every
``replica_poll_interval_ms`` for the segments after the last record applied here and applies
each, in sequence order:

1. fetched, its CRC-32C checked against the one it was written with;
2. checked to join: its first sequence number follows the last record applied here, and its
   ``prev-last-seq`` metadata says the same;
3. checked to be a whole sealed segment of this store holding exactly the records its name
   says (:meth:`~rstmdb_storage.wal.Wal.check_sealed`);
4. put in place of the replica's open segment, which holds no record (a replica never
   appends), and replayed: each chunk of the replay is one LMDB transaction, and a record is
   never split, so lookups see one consistent state throughout, here and in read-only
   processes that have the directory open.

The first gap, mismatch or bad checksum stops the replica at the last good record, with the
object named in ``replication_status()["last_error"]``: it never skips. The thread tries again
every 30 s (objects do not change, so only a fix in the bucket helps). Writes are refused with
:class:`~rstmdb_storage.errors.ReadOnlyError`: they go to the primary. Of several processes
that open the replica with ``replica_of``, the one holding ``replication.lock`` follows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import CorruptionError, StorageError, WalGapError
from ..failpoints import failpoint
from ..fsutil import current_pid
from ..replay import replay
from ..wal.format import SEGMENT_HEADER_SIZE, segment_name
from .layout import ShippedSegment, epoch_dir, parse_segment
from .lease import read_epochs
from .objects import ObjectStore
from .shipping import MAX_BACKOFF, take_lock

log = logging.getLogger(__name__)

#: a segment being downloaded, beside the WAL's segments (which end in .wal)
DOWNLOAD_SUFFIX = ".download"


class Follower:
    """Applies the segments the bucket of ``config.replica_of`` holds past this replica's
    last applied record.

    Example (what ``Storage`` does with it)::

        follower = Follower(engine)      # the thread follows from then on
        follower.catch_up()              # or now: apply what the bucket holds
        follower.stop()
    """

    def __init__(self, engine: Engine) -> None:
        config = engine.config
        assert config.replica_of is not None
        self.pid = current_pid()
        self._engine = engine
        self.objects = ObjectStore(config.replica_of)
        self._store = engine.wal.store_id.hex()
        #: the epoch followed (found at the first pass), and its directory
        self.epoch: int | None = None
        self.base = ""
        self._poll = config.replica_poll_interval_ms / 1000
        self._pass_lock = threading.Lock()
        self._lock_fd: int | None = None
        #: the last sequence number the bucket was seen to hold
        self.bucket_seq = engine.applied_tail().applied_seq
        self.last_error: str | None = None
        self._caught_up_at: float | None = None  # monotonic, of the last poll that found all
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rstmdb-follower", daemon=True)
        self._thread.start()

    def catch_up(self) -> int:
        """Apply every segment the bucket holds past the last record applied here; return
        the last sequence number applied.

        :raises WalGapError: the bucket's next segment does not start where this replica ends
        :raises CorruptionError: a segment fails its checks (named)
        :raises ObjectStoreUnavailableError: the bucket cannot be reached
        """
        with self._pass_lock:
            polled = time.monotonic()
            try:
                applied = self._apply_new()
                self.last_error = None
                self._caught_up_at = polled
            except StorageError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            return applied

    def _apply_new(self) -> int:
        if self.epoch is None:
            self._follow_epoch(self._first_epoch())
        while True:
            applied = self._apply_epoch()
            later = read_epochs(self.objects, self._store, newer_than=self.epoch or 0)
            if not later:
                return applied
            epoch, begins = next(iter(later.items()))
            start = begins.start_seq
            if start != applied:
                where = self.objects.where(epoch_dir(self._store, epoch))
                raise WalGapError(
                    f"{where}: a new writer of the store began epoch {epoch} at sequence "
                    f"{start}, but epoch {self.epoch} ends at {applied} in the bucket and "
                    f"here: the replica cannot follow across; restore it again (into an "
                    f"empty directory)",
                    path=where,
                )
            self._follow_epoch(epoch)

    def _first_epoch(self) -> int:
        """The newest epoch that holds the record after this replica's last."""
        applied = self._engine.applied_tail().applied_seq
        known = read_epochs(self.objects, self._store)
        reaching = [epoch for epoch, begins in known.items() if begins.start_seq <= applied]
        if not reaching:
            raise WalGapError(
                f"{self.objects.url} holds no epoch of store {self._store} that reaches this "
                f"replica's last record ({applied})",
                path=self.objects.url,
            )
        return reaching[-1]

    def _follow_epoch(self, epoch: int) -> None:
        self.epoch, self.base = epoch, epoch_dir(self._store, epoch)

    def _apply_epoch(self) -> int:
        """Apply what the epoch followed holds past the last record applied; return it."""
        engine = self._engine
        tail = engine.applied_tail()
        after = f"{self.base}/wal/{tail.applied_seq:016x}.seg"  # sorts before <next>-...
        names = self.objects.names(f"{self.base}/wal/", after=after)
        for segment in sorted(s for s in map(parse_segment, names) if s is not None):
            self.bucket_seq = max(self.bucket_seq, segment.last_seq)
            if segment.last_seq <= tail.applied_seq:
                continue
            self._apply(segment, tail.next_seq)
            tail = engine.applied_tail()
        return tail.applied_seq

    def _apply(self, segment: ShippedSegment, next_seq: int) -> None:
        engine = self._engine
        name = f"{self.base}/{segment.name}"
        where = self.objects.where(name)
        if segment.first_seq != next_seq:
            raise WalGapError(
                f"{where} starts at sequence {segment.first_seq}, but this replica's last "
                f"record is {next_seq - 1}: records {next_seq} to {segment.first_seq - 1} are "
                f"not in the bucket; the replica stops here",
                path=where,
            )
        # Downloaded beside the segments, under a name the WAL does not read, and checked
        # there as the WAL reads its own, so that only a whole, good segment is renamed in.
        download = engine.wal.directory / f"{segment_name(segment.first_seq)}{DOWNLOAD_SUFFIX}"
        try:
            metadata = self.objects.download(name, download, engine.config.file_mode)
            if metadata.get("prev-last-seq") != str(next_seq - 1):
                raise CorruptionError(
                    f"{where}: its metadata says the segment before it ends at "
                    f"{metadata.get('prev-last-seq')}, but this replica's last record is "
                    f"{next_seq - 1}; the replica stops here",
                    path=where,
                )
            try:
                engine.wal.check_sealed(download, segment.first_seq, segment.last_seq)
            except CorruptionError as exc:  # said of the object, not of the download
                raise CorruptionError(f"{where}: {exc}", path=where) from exc
            self._adopt(segment, next_seq, download)
        finally:
            download.unlink(missing_ok=True)

    def _adopt(self, segment: ShippedSegment, next_seq: int, download: Path) -> None:
        engine = self._engine
        env = engine.live()
        with env.write_mutex:
            tail = engine.applied_tail()
            if (tail.segment, tail.offset) != (next_seq, SEGMENT_HEADER_SIZE):
                raise StorageError(
                    f"{engine.config.path}: this replica's WAL holds records that are not from "
                    f"the bucket (its tail is at offset {tail.offset} of segment "
                    f"{tail.segment}): was it written to as a primary?"
                )
            engine.wal.adopt_segment(segment.first_seq, download)
            failpoint("follow.after_adopt")
            replay(engine, strict=False)

    def status(self) -> dict[str, Any]:
        """See :meth:`rstmdb_storage.Storage.replication_status`."""
        applied = self._engine.applied_tail().applied_seq
        caught_up = self._caught_up_at
        return {
            "role": "replica",
            "url": self.objects.url,
            "epoch": self.epoch,
            "following": self._lock_fd is not None,
            "applied_seq": applied,
            "bucket_seq": self.bucket_seq,
            "lag_seq": max(self.bucket_seq - applied, 0),
            "lag_seconds": None if caught_up is None else time.monotonic() - caught_up,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            if self._lock_fd is None:
                try:
                    self._lock_fd = take_lock(self._engine.config)
                except StorageError as exc:
                    self.last_error = str(exc)
                if self._lock_fd is None:
                    wait = 1.0  # another process follows; take over if it goes
                    continue
            started = time.monotonic()
            try:
                self.catch_up()
                # At a fixed rate: a record waits at most one interval for the next poll.
                wait = max(self._poll - (time.monotonic() - started), 0.0)
            except StorageError as exc:
                wait = (
                    MAX_BACKOFF
                    if isinstance(exc, CorruptionError)
                    else min(max(wait * 2, 1.0), MAX_BACKOFF)
                )
                log.warning("following %s stopped (next try in %.0f s): %s", self._store, wait, exc)
            except Exception as exc:  # a thread must not die silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("following %s failed", self._store)
                wait = MAX_BACKOFF

    def stop(self) -> None:
        if self.pid != current_pid():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
