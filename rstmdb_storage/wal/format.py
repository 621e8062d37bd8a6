"""The WAL's on-disk format: segment names, the segment header, record framing.

Segments
--------
``<data_dir>/wal/`` holds segment files named after the sequence number of their first record,
zero-padded to 20 digits so that names sort in log order::

    00000000000000000001.wal      records 1 ..
    00000000000000052117.wal      records 52117 ..

A segment is preallocated (filled with zeros) to ``wal_segment_size`` when it is created and
starts with a 48-byte header::

    offset  size  field
    ------  ----  ------------------------------------------------------------------
    0       8     magic      SEGMENT_MAGIC, b"RSTMWAL\\x00"
    8       4     version    u32 LE, SEGMENT_VERSION (1)
    12      4     reserved   zero
    16      8     first_seq  u64 LE: sequence number of the first record; equals the name
    24      16    store_id   random id of the store that wrote it
    40      4     reserved   zero
    44      4     crc32c     u32 LE, CRC-32C of bytes 0..44

Records
-------
Records follow the header back to back, each starting at a multiple of 8 (RECORD_ALIGN) so that a
header never straddles a sector boundary. A record is a 32-byte header, the payload, and zero
padding up to the next multiple of 8::

    offset  size  field
    ------  ----  ------------------------------------------------------------------
    0       4     length        u32 LE: payload length in bytes (without padding)
    4       4     crc32c        u32 LE: CRC-32C of bytes 0..4 and 8..32 of this header,
                                then the payload
    8       8     seq           u64 LE: sequence number (CHANGES: gap-free, +1 per record;
                                SEAL: the last sequence number in the segment)
    16      8     timestamp_ms  u64 LE: when the record was written, Unix milliseconds
    24      1     type          RECORD_CHANGES (1) or RECORD_SEAL (2)
    25      7     reserved      zero
    32      n     payload
    32+n    pad   zero up to a multiple of 8

A ``CHANGES`` payload is opaque to the WAL: the encoded changes of one write or batch,
defined by :mod:`rstmdb_storage.changes`.

A ``SEAL`` record closes a segment that is full, or sealed early (below): its payload is 8
bytes, the CRC-32C (u32 LE) of every byte from the end of the header to the start of the seal,
then 4 zero bytes. A sealed segment is immutable; the next record goes to a new segment named
after its sequence number.

Nothing follows the last record of the last segment but zeros (the preallocation), or the end
of the file: a segment sealed before it is full (a store shipping to object storage seals every
``max_seal_interval_ms``) is cut to its used length, and the open segment of a store restored
from a bucket starts as its header alone (appends extend it). A write that
was cut short (a torn tail) leaves a bad record after which no good record follows; that is the
only damage recovery may cut away. See :mod:`rstmdb_storage.wal.decoder`.
"""

from __future__ import annotations

import re
import struct

SEGMENT_MAGIC = b"RSTMWAL\x00"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sI4xQ16s4x")  # magic, version, first_seq, store_id
SEGMENT_HEADER_CRC = struct.Struct("<I")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + SEGMENT_HEADER_CRC.size  # 48
STORE_ID_SIZE = 16

RECORD_HEADER = struct.Struct("<IIQQB7x")  # length, crc32c, seq, timestamp_ms, type
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 32
RECORD_ALIGN = 8
RECORD_CHANGES = 1
RECORD_SEAL = 2
RECORD_TYPES = (RECORD_CHANGES, RECORD_SEAL)

SEAL_PAYLOAD = struct.Struct("<I4x")  # crc32c of the records before the seal
SEAL_RECORD_SIZE = RECORD_HEADER_SIZE + SEAL_PAYLOAD.size  # 40

SEGMENT_SUFFIX = ".wal"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")


def segment_name(first_seq: int) -> str:
    """``segment_name(52117) == "00000000000000052117.wal"``"""
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first sequence number a segment file name carries, or None if it is not one."""
    match = _SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else None


def padded(length: int) -> int:
    """*length* rounded up to a multiple of RECORD_ALIGN."""
    return (length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)
