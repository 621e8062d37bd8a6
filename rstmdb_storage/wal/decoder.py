"""Reading the WAL format, and telling a torn tail from damage in the middle of the log.

A record is *good* when its header is complete, its type known, its payload inside the file and
its CRC matches. Where a good record is expected but none is found, there are three cases:

* the header is all zeros: the end of the written log (segments are preallocated with zeros);
* the bad record is the last thing written: a write cut short by a crash, a *torn tail*, which
  was never acknowledged (under the default fsync policy the next record is only written after
  this one was synced) and may be cut away;
* a good record with a later sequence number follows it: *damage* inside the log, which is never
  skipped: it is a :class:`~rstmdb_storage.errors.CorruptionError` naming file and offset.

:func:`find_later_record` makes that last distinction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from crc32c import crc32c

from ..config import MAX_RECORD_BYTES
from ..errors import CorruptionError
from .format import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    RECORD_TYPES,
    SEGMENT_HEADER,
    SEGMENT_HEADER_CRC,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    padded,
)

#: ``read(offset, size) -> bytes``, shorter at the end of the file (``os.pread`` bound to a file)
Reader = Callable[[int, int], bytes]


class FramedRecord(NamedTuple):
    """One good record, and where it lies in its segment (``end`` includes the padding).

    A named tuple rather than a frozen dataclass: replay makes one per record, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs three times as much."""

    seq: int
    timestamp_ms: int
    type: int
    payload: bytes
    offset: int
    end: int


@dataclass(frozen=True, slots=True)
class BadRecord:
    """Where a good record was expected but bytes that are not one were found."""

    offset: int
    reason: str
    #: where the bad record would end if its length field is to be believed (else offset + 32)
    extent_end: int


def decode_segment_header(data: bytes, path: str) -> tuple[int, bytes]:
    """(first_seq, store_id) of a segment header; raise :class:`CorruptionError` if it is bad."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptionError(f"{path}: segment header is truncated", path=path, offset=0)
    head = data[: SEGMENT_HEADER.size]
    (stored,) = SEGMENT_HEADER_CRC.unpack_from(data, SEGMENT_HEADER.size)
    computed = crc32c(head)
    if stored != computed:
        raise CorruptionError(
            f"{path}: segment header CRC32C mismatch at offset 0 "
            f"(stored {stored:#010x}, computed {computed:#010x})",
            path=path,
            offset=0,
        )
    magic, version, first_seq, store_id = SEGMENT_HEADER.unpack(head)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION:
        raise CorruptionError(
            f"{path}: not a WAL segment of a known version (magic {magic!r}, version {version})",
            path=path,
            offset=0,
        )
    return first_seq, store_id


def decode_record(read: Reader, offset: int) -> FramedRecord | BadRecord | None:
    """The record at *offset*: a :class:`FramedRecord`, a :class:`BadRecord`, or None for the
    end of the log (an all-zero header, or the end of the file)."""
    header = read(offset, RECORD_HEADER_SIZE)
    if header.count(0) == len(header):
        return None  # zeros, or the end of the file
    if len(header) < RECORD_HEADER_SIZE:
        return BadRecord(offset, "record header cut short by the end of the file", offset + 32)
    length, stored, seq, timestamp_ms, record_type = RECORD_HEADER.unpack(header)
    if length > MAX_RECORD_BYTES or record_type not in RECORD_TYPES:
        return BadRecord(
            offset, f"implausible header (length {length}, type {record_type})", offset + 32
        )
    end = offset + RECORD_HEADER_SIZE + padded(length)
    framed = read(offset + RECORD_HEADER_SIZE, end - offset - RECORD_HEADER_SIZE)
    if len(framed) < length:
        return BadRecord(offset, "payload cut short by the end of the file", end)
    payload = framed[:length]
    computed = crc32c(payload, crc32c(header[8:], crc32c(header[:4])))
    if computed != stored:
        return BadRecord(
            offset, f"CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})", end
        )
    padding = framed[length:]
    if padding.count(0) != len(padding):  # padding is outside the CRC, so check it is zero
        return BadRecord(offset, "non-zero padding after the payload", end)
    return FramedRecord(seq, timestamp_ms, record_type, payload, offset, end)


def find_later_record(
    read: Reader, start: int, file_size: int, first_seq: int, window: int = 64
) -> int | None:
    """Offset of a good record with a sequence number in ``[first_seq, first_seq + window)``
    at or after *start*, or None. Finding one proves that bad bytes before it are damage inside
    the log rather than a torn tail."""
    wanted = [(seq).to_bytes(8, "little") for seq in range(first_seq, first_seq + window)]
    chunk_size = 4 << 20
    position = start - start % 8
    while position < file_size:
        chunk = read(position, chunk_size + RECORD_HEADER_SIZE)
        if not chunk:
            break
        for needle in wanted:
            found = chunk.find(needle)
            while 0 <= found < chunk_size:
                seq_offset = position + found
                record_offset = seq_offset - 8
                if seq_offset % 8 == 0 and record_offset >= start:
                    candidate = decode_record(read, record_offset)
                    if isinstance(candidate, FramedRecord):
                        return record_offset
                found = chunk.find(needle, found + 1)
        position += chunk_size
    return None


def is_zero(read: Reader, start: int, end: int) -> bool:
    """True when every byte in ``[start, end)`` is zero (or past the end of the file)."""
    chunk_size = 1 << 20
    position = start
    while position < end:
        chunk = read(position, min(chunk_size, end - position))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        position += len(chunk)
    return True


def last_nonzero(read: Reader, start: int, end: int) -> int:
    """One past the last non-zero byte in ``[start, end)``, or *start* if all are zero."""
    chunk_size = 1 << 20
    position = end
    while position > start:
        begin = max(start, position - chunk_size)
        chunk = read(begin, position - begin).rstrip(b"\x00")
        if chunk:
            return begin + len(chunk)
        position = begin
    return start
