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

from .codec import decode_instance, decode_instance_body, encode_instance_value
from .config import DB_INSTANCES
from .store.indexes import Indexes, index_entries
from .wal.format import CHANGE_PUT

#: the fields of an instance the indexes need: machine, state, metadata
IndexedFields = tuple[str, str, dict[str, Any]]


def apply_changes(
    txn: Any,
    dbs: dict[bytes, Any],
    seq: int,
    timestamp_ms: int,
    changes: list[list[Any]],
    known: list[IndexedFields | None] | None = None,
) -> None:
    """Apply the changes of record *seq*, written at *timestamp_ms*, inside *txn*: instances
    and their index entries together.

    *known* may give, for each change, the indexed fields of the instance a put writes, when
    the caller has them at hand (the write path); replay decodes them from the record.
    """
    instances_db = dbs[DB_INSTANCES]
    indexes = Indexes(dbs)
    for position, change in enumerate(changes):
        instance_id = change[1]
        key = instance_id.encode()
        old = txn.get(key, db=instances_db)
        previous = None if old is None else decode_instance(key, old)
        if previous is not None:
            indexes.remove(
                txn,
                index_entries(
                    previous.id,
                    previous.machine,
                    previous.state,
                    previous.metadata,
                    previous.updated_at,
                ),
            )
        if change[0] != CHANGE_PUT:
            txn.delete(key, db=instances_db)
            continue
        _, _, created_at, updated_at, body = change
        if created_at is None:
            created_at = timestamp_ms if previous is None else previous.created_at
        if updated_at is None:
            updated_at = timestamp_ms
        fields = known[position] if known is not None else None
        if fields is None:
            decoded = decode_instance_body(body, f"WAL record {seq}, instance {instance_id!r}")
            fields = (decoded[0], decoded[2], decoded[4])
        machine, state, metadata = fields
        txn.put(key, encode_instance_value(key, seq, created_at, updated_at, body), db=instances_db)
        indexes.add(txn, key, index_entries(instance_id, machine, state, metadata, updated_at))
