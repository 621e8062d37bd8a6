"""Shipping an open store to a bucket: each sealed WAL segment, each published snapshot.

A store opened with ``StorageConfig.replica_url`` ships from a background thread of its own
(one :class:`Shipper` per process, started by :mod:`rstmdb_storage.opening`). Of the processes
that have the store open, one ships at a time: the one holding the POSIX lock on
``<data_dir>/replication.lock`` (a lock a killed process drops, so another takes over, and one
a forked child does not inherit).

What it ships, oldest first:

* a WAL segment once it is sealed (a sealed segment is immutable, and was synced when it was
  sealed). The open segment is sealed early (and cut to its used length) so that its first
  record is in the bucket ``max_seal_interval_ms`` after it was written: checked every 50 ms,
  sealed ahead by the time recent uploads took;
* a snapshot once it is published and the WAL shipped reaches it, the copy first and its
  manifest after it: the newest state in the bucket is always the last record shipped.

What is in the bucket already is not sent again (objects are written once: :mod:`.objects`),
so a shipper started again, here or in another process, goes on where the last one stopped.
While segments wait to be shipped, the WAL hold ``replication`` keeps them through compactions:
it is set when the store is opened with a ``replica_url``, at the first segment not shipped,
and moves on as they are shipped. It outlives the process; a store that stops shipping for good
drops it with ``storage.release_wal("replication")``. When the bucket cannot be reached,
writes go on; the backlog and the error are in ``Storage.replication_status()``, and shipping
resumes, with nothing skipped, once it answers. Layout and metadata: :mod:`.layout`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..config import SNAPSHOTS_DIR, StorageConfig
from ..engine import Engine
from ..errors import LeaseHeldError, ObjectStoreUnavailableError, StorageError
from ..failpoints import failpoint
from ..fsutil import current_pid, os_error
from ..maintenance import create_snapshot, hold_wal, release_wal
from ..replay import replay
from ..snapshots import DATA_SUFFIX, MANIFEST_SUFFIX, published_seqs
from ..wal.format import segment_name
from ..writes import seal_wal
from .layout import ShippedSegment, epoch_dir, parse_manifest, snapshot_objects
from .lease import Epoch, LeaseKeeper, begin_epoch, holder_of, read_epochs
from .objects import ObjectStore

log = logging.getLogger(__name__)

#: the WAL hold that keeps unshipped segments through compactions
HOLD_NAME = "replication"
#: the file whose POSIX lock makes one process of those that have the store open the shipper
LOCK_NAME = "replication.lock"
#: the longest wait between two tries while the bucket cannot be reached, in seconds
MAX_BACKOFF = 30.0


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[BinaryIO | None]:
    """*path* open for reading, or None if it is gone."""
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        raise os_error(exc, f"opening {path} to ship it") from exc
    with file:
        yield file


def take_lock(config: StorageConfig) -> int | None:
    """The descriptor holding the POSIX lock on ``<data_dir>/replication.lock`` if this
    process could take it now, else None: of the processes that have a store open, the one
    holding it ships (or, on a replica, follows). Not inherited by a forked child, and dropped
    by a killed process, so that another takes over."""
    path = config.path / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, config.file_mode)
    except OSError as exc:
        raise os_error(exc, f"opening {path}") from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return None  # another process holds it
        raise os_error(exc, f"locking {path}") from exc
    return fd


@dataclass
class ShipReport:
    """What one :meth:`Shipper.ship` pass did."""

    #: names of the objects written, relative to the store's directory in the bucket
    shipped: list[str] = field(default_factory=list)
    #: sealed segments not shipped yet (0 after a pass that met no error)
    backlog: int = 0
    #: the last WAL sequence number in the bucket
    shipped_seq: int = 0


class Shipper:
    """Ships one open store's sealed segments and snapshots to ``config.replica_url``.

    Example (what ``Storage`` does with it)::

        shipper = Shipper(engine)       # sets the hold; the thread ships from then on
        report = shipper.ship(seal=True)  # or now: seal the open segment, ship what is new
        shipper.stop()
    """

    def __init__(self, engine: Engine) -> None:
        config = engine.config
        assert config.replica_url is not None
        self.pid = current_pid()
        self._engine = engine
        self.objects = ObjectStore(config.replica_url)
        self._store = engine.wal.store_id.hex()
        self._lease = LeaseKeeper(
            self.objects, self._store, holder_of(config.path, config.file_mode), config.lease_ttl_ms
        )
        #: the epoch shipped under (None until the lease is held), and the record it starts at
        self.epoch: int | None = None
        self.epoch_start = 0
        self.base = ""  # <store-id>/e<epoch>, once the lease is held
        self._seal_after = config.max_seal_interval_ms / 1000
        # The open segment is checked this often: it is sealed at most this late.
        self._poll = min(self._seal_after / 10, 0.05)
        self._pass_lock = threading.Lock()  # one pass at a time in this process
        self._shipped: set[str] | None = None  # names in the epoch's directory, once listed
        #: the open segment, and when its first record was written (Unix s)
        self._open_since: tuple[int, float] | None = None
        self._seen: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # what the last pass saw
        self._upload_seconds = 0.0
        self._lock_fd: int | None = None
        self.last_error: str | None = None
        self.last_shipped_ms: int | None = None
        # Before anything can be compacted away: hold from the first segment not shipped.
        holds = engine.read(engine.meta.holds)
        new_hold = HOLD_NAME not in holds
        if new_hold:
            firsts = engine.wal.segment_ids()
            holds[HOLD_NAME] = firsts[0] if firsts else engine.applied_tail().next_seq
            hold_wal(engine, HOLD_NAME, holds[HOLD_NAME])
        # The hold is at the first record not known shipped.
        self.shipped_seq = holds[HOLD_NAME] - 1
        try:
            with self._pass_lock:
                self._take_lease()  # a second writer is refused here, at open
        except ObjectStoreUnavailableError as exc:  # taken before the first upload instead
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("%s: the lease is taken once the bucket answers: %s", config.path, exc)
        except LeaseHeldError:
            if new_hold:  # refused: this store ships nothing, and must not keep its WAL for it
                release_wal(engine, HOLD_NAME)
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rstmdb-shipper", daemon=True)
        self._thread.start()

    # --- the lease and the epoch ------------------------------------------------------------

    def _take_lease(self) -> None:
        """Take the lease; abort uploads left unfinished under the store; begin the epoch if
        this writer has not shipped under it yet, and ship from there."""
        known = read_epochs(self.objects, self._store)
        epoch = self._lease.acquire(list(known))
        if self.objects.abort_uploads(f"{self._store}/"):
            log.warning("%s: aborted uploads left unfinished under the store", self.objects.url)
        begins = known.get(epoch) or self._begin_epoch(epoch)
        self.epoch, self.epoch_start = epoch, begins.start_seq
        self.base = epoch_dir(self._store, epoch)
        self.shipped_seq = max(self.shipped_seq, begins.start_seq)
        self._shipped = None

    def _begin_epoch(self, epoch: int) -> Epoch:
        """An epoch restores alone: it ships the segments after the end of the last sealed
        one, from a snapshot taken after it (a replica switching epochs goes on from there)."""
        engine = self._engine
        seal_wal(engine)
        start = engine.wal.segment_ids()[-1] - 1
        replay(engine, strict=False)  # records other processes appended, applied first
        applied = engine.applied_tail().applied_seq
        begins = Epoch(start, create_snapshot(engine, None).seq if applied else 0)
        hold_wal(engine, HOLD_NAME, start + 1)  # what came before is not shipped here
        begin_epoch(self.objects, self._store, epoch, begins)
        return begins

    # --- one pass ---------------------------------------------------------------------------

    def ship(self, seal: bool = False) -> ShipReport:
        """Seal the open segment first if *seal* (or if it is due), then ship every sealed
        segment and reachable snapshot not in the bucket yet, oldest first, moving the hold
        past what is shipped.

        :raises ObjectStoreUnavailableError: the bucket cannot be reached; nothing is lost,
            the next pass ships it
        :raises LeaseHeldError: another writer holds the lease (nothing is shipped)
        """
        with self._pass_lock:
            report = ShipReport()
            try:
                if self.epoch is None:
                    self._take_lease()
                else:
                    self._renew_lease()
                if seal or self._seal_due():
                    seal_wal(self._engine)
                    self._open_since = None
                self._ship_pass(report)
                self.last_error = None
            except StorageError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                report.backlog = self.backlog()
                report.shipped_seq = self.shipped_seq
            return report

    def _renew_lease(self) -> None:
        try:
            self._lease.renew_if_due()
        except LeaseHeldError:
            self.epoch = None  # lost: taken again (under a new epoch) only once it expires
            raise

    def _ship_pass(self, report: ShipReport) -> None:
        shipped = self._bucket_names()
        engine = self._engine
        held = engine.read(engine.meta.holds).get(HOLD_NAME, 0)
        for segment in self._sealed():
            if segment.last_seq <= self.epoch_start:
                continue  # before this epoch: its snapshot holds it
            if segment.name not in shipped:
                self._ship_segment(segment, shipped, report)
            if segment.last_seq + 1 > held:  # moved past each as it is shipped, forward only
                held = segment.last_seq + 1
                hold_wal(engine, HOLD_NAME, held)
            self.shipped_seq = max(self.shipped_seq, segment.last_seq)
        self._ship_snapshots(shipped, report)
        if report.shipped:
            self.last_shipped_ms = time.time_ns() // 1_000_000

    def backlog(self) -> int:
        """Sealed segments not shipped yet (as far as this process knows)."""
        shipped = self._shipped or set()
        start = self.epoch_start
        return sum(1 for s in self._sealed() if s.last_seq > start and s.name not in shipped)

    def _seal_due(self) -> bool:
        """Whether the open segment must be sealed now for its first record to be in the
        bucket ``max_seal_interval_ms`` after it was written."""
        firsts = self._engine.wal.segment_ids()
        if not firsts:
            return False
        if self._open_since is None or self._open_since[0] != firsts[-1]:
            written_ms = self._engine.wal.first_record_ms(firsts[-1])
            if written_ms is None:
                return False  # it holds no record
            self._open_since = (firsts[-1], written_ms / 1000)
        # Sealed in time for its upload to end by the deadline: max_seal_interval_ms is how
        # long a record may wait to be in the bucket (when the bucket answers promptly).
        ahead = self._poll + self._upload_seconds
        return time.time() - self._open_since[1] >= self._seal_after - ahead

    def _bucket_names(self) -> set[str]:
        if self._shipped is None:
            prefix = f"{self.base}/"
            self._shipped = {n[len(prefix) :] for n in self.objects.names(prefix)}
        return self._shipped

    def _sealed(self) -> list[ShippedSegment]:
        """The sealed segments present: every one but the last (the one appended to)."""
        firsts = self._engine.wal.segment_ids()
        return [ShippedSegment(a, b - 1) for a, b in itertools.pairwise(firsts)]

    def _ship_segment(self, segment: ShippedSegment, shipped: set[str], report: ShipReport) -> None:
        metadata = {
            **self._identity(),
            "first-seq": str(segment.first_seq),
            "last-seq": str(segment.last_seq),
            "prev-last-seq": str(segment.first_seq - 1),
        }
        path = self._engine.wal.directory / segment_name(segment.first_seq)
        started = time.monotonic()
        with _opened(path) as body:
            # Gone: compaction deletes only what the hold has passed, so another process
            # shipped it.
            if body is not None and self._upload(segment.name, body, metadata):
                report.shipped.append(segment.name)
                failpoint("ship.after_upload")
                # How long an upload takes, smoothed: the open segment is sealed this early.
                smoothed = 0.8 * self._upload_seconds + 0.2 * (time.monotonic() - started)
                self._upload_seconds = min(smoothed, self._seal_after / 2)
        shipped.add(segment.name)

    def _ship_snapshots(self, shipped: set[str], report: ShipReport) -> None:
        """Ship the snapshots not in the bucket yet that the WAL shipped reaches: a snapshot
        newer than the last shipped record waits for the segment holding it, so that the
        newest state in the bucket is always the last shipped record. The copy is streamed
        from its file, then the manifest."""
        directory = self._engine.config.path / SNAPSHOTS_DIR
        have = {seq for seq in map(parse_manifest, shipped) if seq is not None}
        for seq in published_seqs(directory):
            if seq in have or not self.epoch_start <= seq <= self.shipped_seq:
                continue
            stem = directory / f"{seq:020d}"
            metadata = {**self._identity(), "seq": str(seq)}
            # Both opened first: compaction may delete them meanwhile, and then a newer
            # snapshot is shipped instead.
            with (
                _opened(stem.with_name(stem.name + DATA_SUFFIX)) as data,
                _opened(stem.with_name(stem.name + MANIFEST_SUFFIX)) as manifest,
            ):
                if data is None or manifest is None:
                    continue
                for name, body in zip(snapshot_objects(seq), (data, manifest), strict=True):
                    if self._upload(name, body, metadata):
                        report.shipped.append(name)
                    shipped.add(name)

    def _upload(self, name: str, body: BinaryIO, metadata: dict[str, str]) -> bool:
        """Write *name* of the epoch's directory once; the lease is renewed first when due,
        before every object rather than every pass: a process thawed after a long pause
        ships nothing more (``LeaseHeldError``) once another writer has taken over."""
        self._renew_lease()
        return self.objects.put_once(f"{self.base}/{name}", body, metadata)

    def _identity(self) -> dict[str, str]:
        return {"store-id": self._store, "epoch": str(self.epoch)}

    # --- the thread -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """See :meth:`rstmdb_storage.Storage.replication_status`."""
        applied = self._engine.applied_tail().applied_seq
        return {
            "role": "primary",
            "url": self.objects.url,
            "epoch": self.epoch,
            "shipping": self._lock_fd is not None,
            "shipped_seq": self.shipped_seq,
            "lag_seq": max(applied - self.shipped_seq, 0),
            "backlog": self.backlog(),
            "last_error": self.last_error,
            "last_shipped_ms": self.last_shipped_ms,
        }

    def _work_waits(self) -> bool:
        """Whether a pass has anything to do: a segment sealed, a snapshot published, the
        open segment due, the lease due, or the last pass failed (cheap: two listings)."""
        seen = (
            tuple(self._engine.wal.segment_ids()),
            tuple(published_seqs(self._engine.config.path / SNAPSHOTS_DIR)),
        )
        changed, self._seen = seen != self._seen, seen
        return (
            changed or self.last_error is not None or self._lease.renewal_due() or self._seal_due()
        )

    def _run(self) -> None:
        wait = self._poll
        while not self._stop.wait(wait):
            if not self._leading():
                wait = 1.0  # another process ships; take over if it goes
                continue
            try:
                if self._work_waits():
                    self.ship()
                wait = self._poll
            except StorageError as exc:  # the bucket is away, or the store failed: again later
                wait = min(max(wait * 2, 1.0), MAX_BACKOFF)
                log.warning("shipping %s failed (next try in %.0f s): %s", self._store, wait, exc)
            except Exception as exc:  # a thread must not die silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("shipping %s failed", self._store)
                wait = MAX_BACKOFF

    def _leading(self) -> bool:
        """Whether this process holds the replication lock (taking it if it is free)."""
        if self._lock_fd is None:
            try:
                self._lock_fd = take_lock(self._engine.config)
            except StorageError as exc:
                self.last_error = str(exc)
        return self._lock_fd is not None

    def restarted(self) -> Shipper:
        """A new shipper for the same store, in a forked child (threads do not survive a fork)."""
        return Shipper(self._engine)

    def stop(self, final_pass: bool = True) -> None:
        """Stop the thread; then, if this process ships (or may: no other does) and the last
        pass reached the bucket, seal and ship what is left, and let the lease go: a store
        closed cleanly leaves nothing unshipped, and the next writer need not wait."""
        if self.pid != current_pid():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if final_pass and self.last_error is None and self._leading():
            try:
                self.ship(seal=True)
                self._lease.release()
            except StorageError as exc:  # kept in last_error; closing must not fail for it
                log.warning("shipping %s on close failed: %s", self._store, exc)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
