"""The write-ahead log of one data directory: appending, rotation, sync policies, and reading.

The WAL keeps no position of its own: where the next record goes (:class:`WalTail`) is the
caller's, shared by every process writing the directory. The *applied* tail lives in LMDB's
meta table, stored by the write transaction that applies the record; under group commit the
*append* tail, which may run ahead of it, lives in ``indexes/append.lock``
(:mod:`.group_commit`). Appending at a tail read and written under those locks is what
serialises appends across processes and keeps sequence numbers gap-free.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from crc32c import crc32c

from ..config import FsyncPolicy
from ..errors import CorruptionError, StorageFailedError, WalGapError
from ..failpoints import failpoint
from ..fsutil import fsync_dir, start_writeback, write_file_atomic
from .decoder import (
    BadRecord,
    FramedRecord,
    decode_record,
    decode_segment_header,
    find_later_record,
    is_zero,
)
from .encoder import encode_record, encode_seal
from .format import (
    RECORD_CHANGES,
    RECORD_HEADER_SIZE,
    RECORD_SEAL,
    SEAL_PAYLOAD,
    SEAL_RECORD_SIZE,
    SEGMENT_HEADER_SIZE,
    SEGMENT_SUFFIX,
    padded,
    parse_segment_name,
    segment_name,
)
from .repair import TornTailRepair, cut_torn_tail
from .segment import WalSegment


class WalTail(NamedTuple):
    """Where the next record is appended, and the sequence number it will carry."""

    segment: int  # first sequence number (and name) of the segment being appended to
    offset: int  # byte offset of the next record in that segment
    next_seq: int

    @property
    def applied_seq(self) -> int:
        return self.next_seq - 1


#: in ``wal/`` once a sync failed in any process: the store is failed for every process
FAILED_NAME = "FAILED"


def read_failure(directory: Path) -> str | None:
    """Why a sync failed in some process of the store in *directory* (``wal/``), or None.
    Asked after every sync: the usual answer costs one ``access`` call and no exception."""
    # A string, not ``directory / FAILED_NAME``: a new Path on every sync costs more than
    # the access call (Path caches its own str).
    if not os.access(f"{directory}/{FAILED_NAME}", os.F_OK):
        return None
    try:
        return (directory / FAILED_NAME).read_text(errors="replace") or "unknown"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{FAILED_NAME} is there but unreadable ({exc.strerror})"


def write_failure(directory: Path, reason: str, mode: int) -> None:
    """Tell every process of the store that a sync failed (best effort: the disk is failing).
    After a writeback error the kernel may have marked the pages it could not write clean,
    so another process's later successful sync proves nothing about them."""
    if read_failure(directory) is None:
        with contextlib.suppress(OSError):
            write_file_atomic(directory / FAILED_NAME, reason.encode(), mode)


class Wal:
    """The segments under ``<data_dir>/wal/``, as seen by this process."""

    def __init__(
        self,
        directory: Path,
        store_id: bytes,
        segment_size: int,
        policy: FsyncPolicy,
        file_mode: int,
    ) -> None:
        self.directory = directory
        self.store_id = store_id
        self.segment_size = segment_size
        self.policy = policy
        self.file_mode = file_mode
        #: torn tails this process cut, oldest first
        self.repairs: list[TornTailRepair] = []
        self._segments: dict[int, WalSegment] = {}
        self._unsynced: set[int] = set()
        self._writes_since_sync = 0
        self._last_sync = time.monotonic()
        self._failed: str | None = None

    # --- segments -------------------------------------------------------------------------------

    def segment_ids(self) -> list[int]:
        """First sequence numbers of the segment files present, in log order."""
        ids = (parse_segment_name(p.name) for p in self.directory.glob("*" + SEGMENT_SUFFIX))
        return sorted(i for i in ids if i is not None)

    def segment_store_id(self, first_seq: int) -> bytes:
        """The store id in the header of segment *first_seq* (to adopt a WAL without LMDB)."""
        path = self.directory / segment_name(first_seq)
        with open(path, "rb") as f:
            return decode_segment_header(f.read(SEGMENT_HEADER_SIZE), str(path))[1]

    def segment(self, first_seq: int) -> WalSegment:
        segment = self._segments.get(first_seq)
        if segment is None:
            segment = WalSegment.open(self.directory, first_seq, self.store_id)
            self._segments[first_seq] = segment
        return segment

    def _forget(self, first_seq: int) -> None:
        """Close a sealed segment this process no longer appends to (fds do not pile up)."""
        segment = self._segments.pop(first_seq, None)
        if segment is not None:
            segment.close()

    def delete_segments(self, first_seqs: list[int]) -> int:
        """Delete the sealed segments *first_seqs* (compaction decided nobody needs them);
        return the bytes freed."""
        freed = 0
        for first_seq in first_seqs:
            self._forget(first_seq)
            self._unsynced.discard(first_seq)
            path = self.directory / segment_name(first_seq)
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue  # deleted by a compaction of another process
            failpoint("wal.after_segment_delete")
        if first_seqs:
            fsync_dir(self.directory)
        return freed

    def adopt_segment(self, first_seq: int, source: Path) -> None:
        """Rename *source*, a synced file in this directory holding a whole sealed segment
        (checked with :meth:`check_sealed`), into the place of segment
        *first_seq*, which the caller knows holds no record: the WAL of a replica grows so, by
        whole segments from the bucket its primary ships to. Replay then applies it."""
        self._forget(first_seq)
        os.replace(source, self.directory / segment_name(first_seq))
        fsync_dir(self.directory)

    def check_sealed(self, path: Path, first_seq: int, last_seq: int) -> None:
        """Check that the file *path* is a whole sealed segment of this store holding exactly
        the records *first_seq* to *last_seq*, every CRC good (a segment downloaded from a
        bucket, before :meth:`adopt_segment`).

        :raises CorruptionError: it is not
        """
        segment = WalSegment.open(self.directory, first_seq, self.store_id, path)
        try:
            last = first_seq - 1
            for record in self._segment_records(segment, first_seq, sealed=True):
                last = record.seq
        finally:
            segment.close()
        if last != last_seq:
            raise CorruptionError(
                f"{path} holds records {first_seq} to {last}, not to {last_seq}", path=str(path)
            )

    def first_record_ms(self, first_seq: int) -> int | None:
        """When the first record of segment *first_seq* was written (Unix ms), or None while
        it holds none (a shipper seals a segment once its first record is old enough)."""
        found = decode_record(self.segment(first_seq).read, SEGMENT_HEADER_SIZE)
        return found.timestamp_ms if isinstance(found, FramedRecord) else None

    def start(self) -> WalTail:
        """Create the first segment of a new store; return the tail of the empty log."""
        self._create_segment(1)
        return WalTail(1, SEGMENT_HEADER_SIZE, 1)

    def _create_segment(self, first_seq: int) -> WalSegment:
        segment = WalSegment.create(
            self.directory, first_seq, self.store_id, self.segment_size, self.file_mode
        )
        self._segments[first_seq] = segment
        return segment

    # --- appending ------------------------------------------------------------------------------

    def append(
        self, tail: WalTail, timestamp_ms: int, payload: bytes, frames: list[bytes] | None = None
    ) -> WalTail:
        """Write a CHANGES record with sequence ``tail.next_seq`` at *tail*; return the tail
        after it. Seals the segment and starts a new one first when the record does not fit.
        The caller must hold the store's write lock and sync according to the policy.

        With *frames*, the record is not written yet: its frame joins *frames*, which the
        caller writes with :meth:`write_frames`, and it must fit in the segment (see
        :meth:`fits`)."""
        self.check_usable()
        frame = encode_record(tail.next_seq, timestamp_ms, RECORD_CHANGES, payload)
        if frames is not None:
            frames.append(frame)
        else:
            full = tail.offset + len(frame) + SEAL_RECORD_SIZE > self.segment_size
            if full and tail.offset > SEGMENT_HEADER_SIZE:
                tail = self._rotate(tail, timestamp_ms)
            self.write_frames(tail, [frame])
        return WalTail(tail.segment, tail.offset + len(frame), tail.next_seq + 1)

    def fits(self, tail: WalTail, payloads: list[bytes]) -> bool:
        """Whether records of *payloads* appended at *tail* leave room for the segment's seal:
        then none of them makes :meth:`append` start a new segment."""
        size = sum(RECORD_HEADER_SIZE + padded(len(payload)) for payload in payloads)
        return tail.offset + size + SEAL_RECORD_SIZE <= self.segment_size

    def write_frames(self, tail: WalTail, frames: list[bytes]) -> None:
        """Write *frames* (made by :meth:`append`) back to back at *tail*, in one write; the
        one place that writes records and counts them unsynced."""
        segment = self.segment(tail.segment)
        segment.write(tail.offset, b"".join(frames))
        self._unsynced.add(segment.first_seq)
        self._writes_since_sync += len(frames)

    def seal(self, tail: WalTail, timestamp_ms: int) -> WalTail:
        """Seal the segment *tail* is in though it is not full, and start the next; return
        the tail in it. The sealed file is cut to its used length (a store sealing every second
        keeps no preallocated space). A segment holding no record is left open. The caller
        holds the append lock, as for :meth:`append`."""
        if tail.offset == SEGMENT_HEADER_SIZE:
            return tail
        return self._rotate(tail, timestamp_ms, cut=True)

    def _rotate(self, tail: WalTail, timestamp_ms: int, cut: bool = False) -> WalTail:
        segment = self.segment(tail.segment)
        records_crc = _crc_of(segment, SEGMENT_HEADER_SIZE, tail.offset)
        segment.write(tail.offset, encode_seal(tail.applied_seq, timestamp_ms, records_crc))
        if cut:
            segment.truncate(tail.offset + SEAL_RECORD_SIZE)
        self._sync_segment(segment)  # a sealed segment is immutable and durable, whatever policy
        self._unsynced.discard(segment.first_seq)
        self._forget(segment.first_seq)
        failpoint("wal.after_seal")
        self._create_segment(tail.next_seq)
        failpoint("wal.after_new_segment")
        return WalTail(tail.next_seq, SEGMENT_HEADER_SIZE, tail.next_seq)

    # --- syncing --------------------------------------------------------------------------------

    def sync_due(self) -> bool:
        """Whether the policy wants the records appended so far synced now."""
        mode = self.policy.mode
        if mode == "every_write":
            return True
        if mode == "every_n":
            return self._writes_since_sync >= self.policy.value
        if mode == "every_ms":
            return (time.monotonic() - self._last_sync) * 1000 >= self.policy.value
        return False

    def start_sync(self) -> None:
        """Start writing what :meth:`sync` will sync, without waiting: work done between the
        two then overlaps the device's write."""
        for first_seq in self._unsynced:
            start_writeback(self.segment(first_seq).fd)

    def sync(self) -> None:
        """``fdatasync`` every segment this process appended to since its last sync."""
        self.check_usable()
        for first_seq in sorted(self._unsynced):
            self._sync_segment(self.segment(first_seq))
        elsewhere = read_failure(self.directory)
        if elsewhere is not None:  # a sync this one covers may be one that failed there
            raise self.failed("a sync in another process", elsewhere)
        self._unsynced.clear()
        self._writes_since_sync = 0
        self._last_sync = time.monotonic()

    def _sync_segment(self, segment: WalSegment) -> None:
        self.check_usable()
        try:
            failpoint("wal.sync")
            segment.sync()
        except OSError as exc:
            raise self.failed(f"fdatasync of {segment.path}", exc.strerror or str(exc)) from exc

    def failed(self, what: str, cause: str) -> StorageFailedError:
        """Record that *what* (a sync of the WAL, or of LMDB) failed with *cause*: the store is
        failed in this process, every later write is refused; return the error to raise.
        Never retry: the kernel may already have dropped the pages it failed to write."""
        self._failed = f"{what} failed ({cause})"
        write_failure(self.directory, self._failed, self.file_mode)
        return StorageFailedError(
            f"{self._failed}; writes are refused until the store is reopened (the write that "
            f"raised this may or may not have taken effect: reopening replays the WAL)"
        )

    def mark_unsynced(self, first_seq: int) -> None:
        """Count records found in segment *first_seq* as unsynced: they were read past the
        tail, written by a process that may have died before syncing them."""
        self._unsynced.add(first_seq)

    @property
    def has_unsynced(self) -> bool:
        return bool(self._unsynced)

    @property
    def usable(self) -> bool:
        return self._failed is None

    @property
    def failure(self) -> str | None:
        """Why the store failed in this process (None while it has not)."""
        return self._failed

    def check_usable(self) -> None:
        if self._failed is not None:
            raise StorageFailedError(f"the store has failed: {self._failed}; reopen it")

    # --- reading --------------------------------------------------------------------------------

    def next_record(
        self, tail: WalTail, strict: bool = False
    ) -> tuple[FramedRecord | None, WalTail] | None:
        """The record at *tail* that nobody has applied yet, and the tail after it.

        Returns None at the end of the log. A seal moves on to the next segment, returning
        ``(None, tail_in_next_segment)``, and completes a rotation a crash interrupted. A torn
        tail is cut (see :mod:`.repair`); damage before good records raises
        :class:`CorruptionError`. With *strict*, the end of the log must be zeros through to
        the end of the segment, which catches a lost header in front of written bytes.
        """
        try:
            segment = self.segment(tail.segment)
        except FileNotFoundError:
            return self._past_deleted_segment(tail)
        found = decode_record(segment.read, tail.offset)
        if found is None:
            if strict and not is_zero(segment.read, tail.offset, segment.size()):
                found = BadRecord(tail.offset, "zero header followed by data", tail.offset)
            else:
                return None
        if isinstance(found, BadRecord):
            self._cut_or_raise(segment, found, tail)
            return None
        if found.type == RECORD_SEAL:
            if found.seq != tail.applied_seq:
                raise _unexpected(segment, found, tail.applied_seq, "seal")
            if segment.first_seq not in self._unsynced:
                self._forget(segment.first_seq)
            try:
                self.segment(tail.next_seq)
            except FileNotFoundError:
                later = [first for first in self.segment_ids() if first > tail.next_seq]
                if later:
                    raise WalGapError(
                        f"WAL sequences {tail.next_seq}..{later[0] - 1} are missing: "
                        f"{segment.path} is sealed at {tail.applied_seq} but no segment "
                        f"starts at {tail.next_seq}",
                        path=str(segment.path),
                        offset=found.offset,
                    ) from None
                self._create_segment(tail.next_seq)  # the rotation a crash interrupted
            return None, WalTail(tail.next_seq, SEGMENT_HEADER_SIZE, tail.next_seq)
        if found.seq != tail.next_seq:
            raise _unexpected(segment, found, tail.next_seq, "record")
        return found, WalTail(tail.segment, found.end, found.seq + 1)

    def _past_deleted_segment(self, tail: WalTail) -> tuple[None, WalTail]:
        # Compaction deletes a segment once every record in it is in a snapshot; a tail left in
        # it (by a snapshot, or a crash right after a rotation) goes on where the log goes on.
        if tail.next_seq in self.segment_ids():
            return None, WalTail(tail.next_seq, SEGMENT_HEADER_SIZE, tail.next_seq)
        raise WalGapError(
            f"WAL segment {segment_name(tail.segment)} is gone and no segment starts at "
            f"sequence {tail.next_seq} in {self.directory}: the records from {tail.next_seq} on "
            f"are missing",
            path=str(self.directory / segment_name(tail.segment)),
        )

    def _cut_or_raise(self, segment: WalSegment, bad: BadRecord, tail: WalTail) -> None:
        where = f"{segment.path} at offset {bad.offset}"
        if any(first > segment.first_seq for first in self.segment_ids()):
            raise CorruptionError(
                f"bad WAL record in {where}: {bad.reason}; later segments exist, so this is "
                f"damage inside the log, not a torn tail",
                path=str(segment.path),
                offset=bad.offset,
            )
        later = find_later_record(segment.read, bad.offset + 8, segment.size(), tail.next_seq)
        if later is not None:
            raise CorruptionError(
                f"bad WAL record in {where}: {bad.reason}; a good record follows at offset "
                f"{later}, so this is damage inside the log, not a torn tail",
                path=str(segment.path),
                offset=bad.offset,
            )
        self.repairs.append(cut_torn_tail(segment, bad.offset, bad.reason))

    def records(self, from_seq: int, until_seq: int) -> Iterator[FramedRecord]:
        """CHANGES records with ``from_seq <= seq <= until_seq``, in order.

        Raises :class:`WalGapError` when the segments present do not hold *from_seq* or skip
        sequence numbers, and :class:`CorruptionError` on any bad record before *until_seq*.
        """
        if from_seq > until_seq:
            return
        ids = self.segment_ids()
        starts = [i for i in ids if i <= from_seq]
        if not starts:
            first = ids[0] if ids else None
            raise WalGapError(
                f"WAL in {self.directory} does not hold sequence {from_seq} "
                f"(its first segment starts at {first})"
            )
        expected = starts[-1]
        for first_seq in ids[ids.index(starts[-1]) :]:
            if first_seq != expected:
                raise WalGapError(
                    f"WAL sequences {expected}..{first_seq - 1} are missing "
                    f"(no segment holds them in {self.directory})"
                )
            segment = WalSegment.open(self.directory, first_seq, self.store_id)
            try:
                for record in self._segment_records(segment, expected):
                    if record.seq >= from_seq:
                        yield record
                    if record.seq >= until_seq:
                        return
                    expected = record.seq + 1
            finally:
                segment.close()
        raise WalGapError(
            f"WAL in {self.directory} ends at sequence {expected - 1}, but {until_seq} was expected"
        )

    def tail_after(self, seq: int | None = None) -> WalTail:
        """Where the log would go on after record *seq* (after its last good record when
        None), without changing anything: a torn end is not cut, just not read past.

        :raises WalGapError: no segment present holds record *seq*
        """
        ids = self.segment_ids()
        if not ids:
            raise WalGapError(f"{self.directory} holds no WAL segment")
        if seq is not None and seq + 1 in ids:
            return WalTail(seq + 1, SEGMENT_HEADER_SIZE, seq + 1)
        holders = [i for i in ids if seq is None or i <= seq]
        if not holders:
            raise WalGapError(
                f"WAL in {self.directory} does not hold sequence {seq} (its first segment "
                f"starts at {ids[0]})"
            )
        segment = WalSegment.open(self.directory, holders[-1], self.store_id)
        try:
            tail = WalTail(segment.first_seq, SEGMENT_HEADER_SIZE, segment.first_seq)
            while tail.applied_seq != seq:
                found = decode_record(segment.read, tail.offset)
                if not isinstance(found, FramedRecord) or found.type == RECORD_SEAL:
                    break
                tail = WalTail(tail.segment, found.end, found.seq + 1)
        finally:
            segment.close()
        if seq is not None and tail.applied_seq != seq:
            raise WalGapError(
                f"WAL in {self.directory} ends at sequence {tail.applied_seq}, before {seq}"
            )
        return tail

    def _segment_records(
        self, segment: WalSegment, first_seq: int, sealed: bool = False
    ) -> Iterator[FramedRecord]:
        """The records of *segment*, checked, up to its seal (which must be there if
        *sealed*) or the end of what was written."""
        offset, expected = SEGMENT_HEADER_SIZE, first_seq
        while True:
            found = decode_record(segment.read, offset)
            if found is None:
                if sealed:
                    raise CorruptionError(
                        f"{segment.path} ends at offset {offset} without a seal",
                        path=str(segment.path),
                        offset=offset,
                    )
                return
            if isinstance(found, BadRecord):
                raise CorruptionError(
                    f"bad WAL record in {segment.path} at offset {found.offset}: {found.reason}",
                    path=str(segment.path),
                    offset=found.offset,
                )
            if found.type == RECORD_SEAL:
                if found.seq != expected - 1:  # a seal holds the last sequence before it
                    raise _unexpected(segment, found, expected - 1, "seal")
                _check_seal(segment, found)
                return
            if found.seq != expected:
                raise _unexpected(segment, found, expected, "record")
            yield found
            offset, expected = found.end, found.seq + 1

    def close(self) -> None:
        """Sync what this process appended (unless a sync already failed) and close files."""
        try:
            if self._unsynced and self._failed is None:
                self.sync()
        finally:
            for segment in self._segments.values():
                segment.close()
            self._segments.clear()


def _crc_of(segment: WalSegment, start: int, end: int) -> int:
    crc, position = 0, start
    while position < end:
        chunk = segment.read(position, min(1 << 20, end - position))
        if not chunk:
            break
        crc = crc32c(chunk, crc)
        position += len(chunk)
    return crc


def _check_seal(segment: WalSegment, seal: FramedRecord) -> None:
    (stored,) = SEAL_PAYLOAD.unpack(seal.payload)
    computed = _crc_of(segment, SEGMENT_HEADER_SIZE, seal.offset)
    if stored != computed:
        raise CorruptionError(
            f"{segment.path}: sealed segment CRC32C mismatch (stored {stored:#010x}, "
            f"computed {computed:#010x})",
            path=str(segment.path),
            offset=seal.offset,
        )


def _unexpected(
    segment: WalSegment, record: FramedRecord, expected: int, what: str
) -> CorruptionError:
    error = WalGapError if record.seq > expected else CorruptionError
    return error(
        f"{segment.path} at offset {record.offset}: {what} has sequence {record.seq}, "
        f"expected {expected}",
        path=str(segment.path),
        offset=record.offset,
    )
