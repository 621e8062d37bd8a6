"""SQLite's (and diskcache's) records, and WAL frames as the store writes them.

The WAL frames of the floor and the ceiling are the store's: :func:`wal_frame` frames
:func:`wal_payload` with the project's own WAL encoder (:mod:`rstmdb_storage.wal.encoder`,
layout in :mod:`rstmdb_storage.wal.format`), so that they write and read the same bytes per
record as the store (the replay floor checks them with the format's constants and nothing
else of the project).
"""

from __future__ import annotations

from typing import Any

import cbor2
import crc32c

from rstmdb_storage.wal.encoder import encode_record as encode_wal_record
from rstmdb_storage.wal.format import RECORD_CHANGES

try:
    from rstmdb_storage.changes import CHANGE_PUT
except ImportError:  # before the changes module: the constants stood with the WAL format
    from rstmdb_storage.wal.format import CHANGE_PUT  # type: ignore[attr-defined, no-redef]

CREATED_MS = 1_767_225_600_000
"""A fixed timestamp for the ceiling's and SQLite's records (2026-01-01), and the ceiling's
WAL frames."""


def body_array(fields: dict[str, Any]) -> list[Any]:
    """The fields an instance's body holds, in the store's order: machine, version, state,
    ctx, metadata, status, last_event_id."""
    return [
        fields["machine"],
        fields["version"],
        fields["state"],
        fields["ctx"],
        fields["metadata"],
        "active",
        None,
    ]


def record_array(fields: dict[str, Any], seq: int) -> list[Any]:
    """All instance fields as a positional array: the ceiling's and SQLite's record.

    The order is Instance's: id, machine, version, state, ctx, metadata,
    status, last_event_id, last_wal_offset, created_at, updated_at.
    """
    return [fields["id"], *body_array(fields), seq, CREATED_MS, CREATED_MS]


def encode_record(fields: dict[str, Any], seq: int) -> bytes:
    """``cbor2.dumps`` of the record array (what SQLite stores)."""
    return cbor2.dumps(record_array(fields, seq))


def envelope(payload: bytes) -> bytes:
    """CRC32C (4 bytes, little-endian) + payload (what the raw LMDB ceiling stores)."""
    return crc32c.crc32c(payload).to_bytes(4, "little") + payload


def wal_payload(fields: dict[str, Any]) -> bytes:
    """The payload of the store's WAL record for one ``put_instance`` of a new instance (no
    times given, no condition), as the store lays it out: a CBOR array of one change
    ``[CHANGE_PUT, id, None, None, body]``, the body the CBOR of :func:`body_array`.
    :func:`bench.cli.check_api` checks that the store writes these very bytes."""
    return cbor2.dumps([[CHANGE_PUT, fields["id"], None, None, cbor2.dumps(body_array(fields))]])


def wal_frame(seq: int, payload: bytes) -> bytes:
    """A CHANGES record framed as the store's WAL frames it (header, payload, padding)."""
    return encode_wal_record(seq, CREATED_MS, RECORD_CHANGES, payload)
