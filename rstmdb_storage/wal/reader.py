"""Reading many WAL records in a row: replay on open, and the write path's catch-up.

:meth:`Wal.next_record <rstmdb_storage.wal.log.Wal.next_record>` reads one record with two
``pread`` calls and decides everything a record can be (good, a seal, a torn tail, damage, the
end). Replaying a million records that way spends more time in system calls and layers than on
the records. :class:`WalReader` reads the segment in large chunks instead, and takes from a
chunk only what is certainly a good record: a ``CHANGES`` header of a plausible length, the
expected sequence number, a matching CRC and zero padding, all inside the chunk. Anything else
(a seal, zeros, a bad or torn record, a record running past the end of the file) goes to
``next_record``, which reads it afresh and judges it as it always does; so the chunks only make
good records cheaper, and every other judgement stays ``next_record``'s.

A reader lives for one walk over the log, under the locks its caller holds for that walk: the
bytes of a good record never change once written, and the end of the log is only decided on
bytes read at that very offset during the walk. A walk first asks :func:`ends_at` whether
the log simply ends at the tail (zeros there: one 32-byte ``pread``, what nearly every write's
catch-up finds), under the same locks, and reads chunks only when something else is there.
"""

from __future__ import annotations

from crc32c import crc32c

from ..config import MAX_RECORD_BYTES
from .decoder import FramedRecord
from .format import RECORD_ALIGN, RECORD_CHANGES, RECORD_HEADER, RECORD_HEADER_SIZE
from .log import Wal, WalTail

#: the first read of a walk: one page, since a walk past the tail (a catch-up after another
#: process's writes) often finds the end within a few records
FIRST_READ = 4096
#: later reads double, up to this size, while the records go on
LARGEST_READ = 1 << 20

_unpack_header = RECORD_HEADER.unpack_from
_ZERO_HEADER = bytes(RECORD_HEADER_SIZE)
_ALIGN_MASK = RECORD_ALIGN - 1


def ends_at(wal: Wal, tail: WalTail) -> bool:
    """Whether the log ends at *tail*: zeros where a record's header would be, read there
    just now, as :class:`WalReader` would judge them outside *strict*. What the write path's
    catch-up finds on nearly every write, in one small ``pread``; False means anything else
    (a record, a seal, damage, a short or missing file), for a :class:`WalReader` to judge."""
    try:
        segment = wal.segment(tail.segment)
    except FileNotFoundError:
        return False
    return segment.read(tail.offset, RECORD_HEADER_SIZE) == _ZERO_HEADER


class WalReader:
    """The records of the log after *tail*, in order, read in large chunks.

    :meth:`read` returns each ``CHANGES`` record (passing seals on the way) and None at the
    end of the log; :attr:`tail` is the tail after the last record read. It raises what
    ``next_record`` raises, and cuts a torn tail as it does (*strict* as it takes it).
    """

    __slots__ = (
        "_asked",
        "_base",
        "_chunk",
        "_strict",
        "_view",
        "_wal",
        "next_seq",
        "offset",
        "segment",
    )

    def __init__(self, wal: Wal, tail: WalTail, strict: bool = False) -> None:
        self._wal = wal
        self._strict = strict
        self.segment, self.offset, self.next_seq = tail
        self._drop_chunk()

    @property
    def tail(self) -> WalTail:
        """Where the log goes on after the last record read."""
        return WalTail(self.segment, self.offset, self.next_seq)

    def read(self) -> FramedRecord | None:
        """The next ``CHANGES`` record, or None at the end of the log."""
        while True:
            chunk, start = self._chunk, self.offset - self._base  # where the record starts
            need = 0  # bytes from *start* that a new chunk must hold (0: next_record judges)
            if self._base < 0 or start + RECORD_HEADER_SIZE > len(chunk):
                need = RECORD_HEADER_SIZE
            else:
                length, stored, seq, timestamp_ms, kind = _unpack_header(chunk, start)
                payload_end = start + RECORD_HEADER_SIZE + length
                end = (payload_end + _ALIGN_MASK) & ~_ALIGN_MASK
                if kind != RECORD_CHANGES or length > MAX_RECORD_BYTES:
                    if self._at_end(chunk, start):
                        return None
                elif end > len(chunk):
                    need = end - start
                elif (
                    # The CRC covers bytes 0..4 and 8..32 of the header, then the payload:
                    # the last two lie side by side.
                    crc32c(
                        self._view[start + 8 : payload_end], crc32c(self._view[start : start + 4])
                    )
                    == stored
                    and seq == self.next_seq
                    and chunk.count(0, payload_end, end) == end - payload_end
                ):
                    offset = self.offset
                    self.offset = offset + end - start
                    self.next_seq = seq + 1
                    payload = chunk[start + RECORD_HEADER_SIZE : payload_end]
                    return FramedRecord(seq, timestamp_ms, kind, payload, offset, self.offset)
            if need and self._fill(need):
                continue
            step = self._wal.next_record(self.tail, self._strict)
            self._drop_chunk()  # it may have gone on to another segment, or cut a torn tail
            if step is None:
                return None
            record, tail = step
            self.segment, self.offset, self.next_seq = tail
            if record is not None:
                return record

    def go_on_after(self, tail: WalTail) -> None:
        """Go on at *tail*, after a record the caller knows without reading it (one its own
        process appended, and has in memory); a chunk already read stays usable in the same
        segment, since a written record's bytes never change."""
        if tail.segment != self.segment:
            self._drop_chunk()
        self.segment, self.offset, self.next_seq = tail

    def _at_end(self, chunk: bytes, start: int) -> bool:
        """Whether the header at *start* is the end of the log: zeros, read at the tail just
        now (as next_record would read them). Under *strict* next_record checks the rest."""
        return (
            not self._strict and self._base == self.offset and chunk.startswith(_ZERO_HEADER, start)
        )

    def _fill(self, need: int) -> bool:
        """Read a chunk at the tail that holds *need* bytes if the file has them; False when
        no read can help (a chunk read here ended with the file)."""
        if self._base == self.offset and len(self._chunk) < self._asked:
            return False
        size = max(need, min(LARGEST_READ, 2 * self._asked) if self._asked else FIRST_READ)
        try:
            segment = self._wal.segment(self.segment)
        except FileNotFoundError:
            return False  # next_record knows where the log goes on
        self._chunk = segment.read(self.offset, size)
        self._view = memoryview(self._chunk)
        self._base = self.offset
        self._asked = size
        return True

    def _drop_chunk(self) -> None:
        self._chunk = b""
        self._view = memoryview(b"")
        self._base = -1  # file offset of the chunk's first byte (-1: no chunk)
        self._asked = 0
