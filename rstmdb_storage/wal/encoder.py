"""Writing the WAL format: segment headers and framed records (layout in
:mod:`rstmdb_storage.wal.format`)."""

from __future__ import annotations

from crc32c import crc32c

from .format import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
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


def encode_record(seq: int, timestamp_ms: int, record_type: int, payload: bytes) -> bytes:
    """One framed record: header, payload and zero padding to the record alignment."""
    length = len(payload)
    header = RECORD_HEADER.pack(length, 0, seq, timestamp_ms, record_type)
    crc = crc32c(payload, crc32c(header[8:], crc32c(header[:4])))
    pad = padded(length) - length
    return b"".join(
        (header[:4], crc.to_bytes(4, "little"), header[8:RECORD_HEADER_SIZE], payload, bytes(pad))
    )


def encode_seal(last_seq: int, timestamp_ms: int, records_crc: int) -> bytes:
    return encode_record(last_seq, timestamp_ms, RECORD_SEAL, SEAL_PAYLOAD.pack(records_crc))
