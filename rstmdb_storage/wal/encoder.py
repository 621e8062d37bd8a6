"""Writing the WAL format: segment headers and framed records (layout in
:mod:`rstmdb_storage.wal.format`)."""

from __future__ import annotations

import struct

from crc32c import crc32c

from .format import (
    RECORD_ALIGN,
    RECORD_HEADER,
    RECORD_SEAL,
    SEAL_PAYLOAD,
    SEGMENT_HEADER,
    SEGMENT_HEADER_CRC,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    padded,
)


def encode_segment_header(first_seq: int, store_id: bytes) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, first_seq, store_id)
    return head + SEGMENT_HEADER_CRC.pack(crc32c(head))


#: the header's bytes that the CRC covers (0..4 and 8..32, side by side), packed as one
_CRC_COVERED = struct.Struct("<IQQB7x")  # length, seq, timestamp_ms, type
_PADDING = [bytes(n) for n in range(RECORD_ALIGN)]


def encode_record(seq: int, timestamp_ms: int, record_type: int, payload: bytes) -> bytes:
    """One framed record: header, payload and zero padding to the record alignment."""
    # Packed twice rather than sliced: 0.9 against 1.7 us a record, on every write
    length = len(payload)
    crc = crc32c(payload, crc32c(_CRC_COVERED.pack(length, seq, timestamp_ms, record_type)))
    header = RECORD_HEADER.pack(length, crc, seq, timestamp_ms, record_type)
    return b"".join((header, payload, _PADDING[padded(length) - length]))


def encode_seal(last_seq: int, timestamp_ms: int, records_crc: int) -> bytes:
    return encode_record(last_seq, timestamp_ms, RECORD_SEAL, SEAL_PAYLOAD.pack(records_crc))
