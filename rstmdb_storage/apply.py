"""Applying WAL records to LMDB, in sequence order.

This is the one place where a change becomes visible. The write path calls it for the record it
has just appended, and replay calls it for records found in the WAL past LMDB's applied
sequence, so every write exercises the code that recovery relies on. It must be deterministic:
the same record applied to the same state gives the same result, whoever applies it and when,
which is why everything it fills in (``created_at``, ``updated_at``, ``last_wal_offset``) comes
from the record itself.
"""

from __future__ import annotations

from typing import Any

from .codec import encode_instance_value, instance_times
from .wal.format import CHANGE_PUT


def apply_changes(
    txn: Any, instances_db: Any, seq: int, timestamp_ms: int, changes: list[list[Any]]
) -> None:
    """Apply the changes of record *seq*, written at *timestamp_ms*, inside *txn*."""
    for change in changes:
        key = change[1].encode()
        if change[0] == CHANGE_PUT:
            _, _, created_at, updated_at, body = change
            if created_at is None:
                old = txn.get(key, db=instances_db)
                created_at = timestamp_ms if old is None else instance_times(key, old)[1]
            if updated_at is None:
                updated_at = timestamp_ms
            value = encode_instance_value(key, seq, created_at, updated_at, body)
            txn.put(key, value, db=instances_db)
        else:
            txn.delete(key, db=instances_db)
