"""Applying WAL records to LMDB, in sequence order.

This is the one place where a change becomes visible. The write path calls it for the record it
has just appended, and replay calls it for records found in the WAL past LMDB's applied
sequence, so every write exercises the code that recovery relies on. It must be deterministic:
the same record applied to the same state gives the same result, whoever applies it and when,
which is why everything it fills in (``created_at``, ``updated_at``, ``last_wal_offset``) comes
from the record itself.
"""

from __future__ import annotations

import struct
from typing import Any

from .changes import (
    Change,
    DeleteInstance,
    IdempotencyKey,
    PutInstance,
    PutMachine,
)
from .codec import decode_instance, encode_instance_value, seal, unseal
from .config import DB_IDEMPOTENCY, DB_INSTANCES, DB_MACHINES
from .store.indexes import add_entries, entries_of, index_entries, remove_entries


def machine_key(name: str, version: int) -> bytes:
    """Key of a machine definition in the machines sub-database: name, 0x00, u64 BE version."""
    return name.encode() + b"\x00" + version.to_bytes(8, "big")


def _machine_conflict(txn: Any, machines_db: Any, change: PutMachine) -> str | None:
    key = machine_key(change.name, change.version)
    raw = txn.get(key, None, machines_db)
    if raw is None or unseal(key, raw, "machines") == change.definition:
        return None
    return f"machine {change.name!r} version {change.version} is already defined differently"


_IDEMPOTENCY_ENTRY = struct.Struct("<QQ")  # sequence number of the write, expiry (Unix ms)


def remembered_write(txn: Any, idempotency_db: Any, key: str, at_ms: int) -> int | None:
    """The sequence number of the write made with idempotency *key*, if it has not expired
    at *at_ms*."""
    raw_key = key.encode()
    raw = txn.get(raw_key, None, idempotency_db)
    if raw is None:
        return None
    seq, expires_at = _IDEMPOTENCY_ENTRY.unpack(unseal(raw_key, raw, "idempotency"))
    return seq if at_ms < expires_at else None


def purge_expired(
    txn: Any, idempotency_db: Any, at_ms: int, after: bytes | None, limit: int
) -> tuple[int, bytes | None]:
    """Delete up to *limit* idempotency entries expired at *at_ms*, scanning from *after*;
    return how many were deleted and where to go on (None at the end)."""
    cursor = txn.cursor(db=idempotency_db)
    found = cursor.set_range(after) if after is not None else cursor.first()
    deleted = scanned = 0
    while found and scanned < limit:
        key = cursor.key()
        _, expires_at = _IDEMPOTENCY_ENTRY.unpack(unseal(key, cursor.value(), "idempotency"))
        scanned += 1
        if expires_at <= at_ms:
            # delete() moves on to the next entry; past the last one the cursor is unset
            found = cursor.delete() and bool(cursor.key())
            deleted += 1
        else:
            found = cursor.next()
    return deleted, (cursor.key() if found else None)


def first_failure(
    txn: Any, dbs: dict[bytes, Any], seq: int, changes: list[Change], deletes_must_find: bool
) -> tuple[str, str] | None:
    """The first change of record *seq* that cannot apply, as ``(kind, message)`` with kind
    ``"conflict"`` (its condition fails) or ``"absent"`` (a delete finds nothing, when
    *deletes_must_find*); None when all can. Each change is judged against the state the
    changes before it leave."""
    instances_db, machines_db = dbs[DB_INSTANCES], dbs[DB_MACHINES]
    seen: dict[str, tuple[str, int] | None] = {}  # id -> (state, seq) or None when absent
    for change in changes:
        if type(change) is IdempotencyKey:
            continue
        if type(change) is PutMachine:
            message = _machine_conflict(txn, machines_db, change)
            if message is not None:
                return "conflict", message
            continue
        instance_id = change.id
        if instance_id in seen:
            current = seen[instance_id]
        else:
            key = instance_id.encode()
            raw = txn.get(key, None, instances_db)
            stored = None if raw is None else decode_instance(key, raw)
            current = None if stored is None else (stored.state, stored.last_wal_offset or 0)
        condition = change.condition
        if condition is not None:
            actual_state, actual_seq = current if current is not None else (None, 0)
            if condition.expected_seq is not None and actual_seq != condition.expected_seq:
                return "conflict", (
                    f"instance {instance_id!r} was last written at sequence {actual_seq}, "
                    f"not {condition.expected_seq}"
                )
            if condition.expected_state is not None and actual_state != condition.expected_state:
                found = "absent" if current is None else f"in state {actual_state!r}"
                return "conflict", (
                    f"instance {instance_id!r} is {found}, not {condition.expected_state!r}"
                )
        if type(change) is PutInstance:
            seen[instance_id] = (change.indexed_fields(seq)[1], seq)
        elif current is None and deletes_must_find:
            return "absent", f"no instance {instance_id!r} to delete"
        else:
            seen[instance_id] = None
    return None


def apply_changes(
    txn: Any, dbs: dict[bytes, Any], seq: int, timestamp_ms: int, changes: list[Change]
) -> None:
    """Apply the changes of record *seq*, written at *timestamp_ms*, inside *txn*: instances
    and their index entries together."""
    # py-lmdb's arguments by position on this path, every write's and replay's: see store.env
    conditional = False  # whether any change depends on what is stored (is_conditional)
    for change in changes:
        kind = type(change)
        if kind is IdempotencyKey:
            if remembered_write(txn, dbs[DB_IDEMPOTENCY], change.key, timestamp_ms) is not None:
                return  # a retry of a write already applied: it applies nothing
            key = change.key.encode()
            entry = _IDEMPOTENCY_ENTRY.pack(seq, timestamp_ms + change.retention_ms)
            txn.put(key, seal(key, entry), True, True, False, dbs[DB_IDEMPOTENCY])
        elif kind is PutMachine or change.condition is not None:
            conditional = True
    if conditional and first_failure(txn, dbs, seq, changes, deletes_must_find=False):
        return  # deterministic: whoever applies this record finds the same failure
    instances_db = dbs[DB_INSTANCES]
    for change in changes:
        kind = type(change)
        if kind is IdempotencyKey:
            continue
        if kind is PutMachine:
            key = machine_key(change.name, change.version)
            txn.put(key, seal(key, change.definition), True, True, False, dbs[DB_MACHINES])
            continue
        instance_id = change.id
        key = instance_id.encode()
        if kind is DeleteInstance:
            old = txn.get(key, None, instances_db)
            if old is not None:
                remove_entries(txn, dbs, entries_of(decode_instance(key, old)))
            txn.delete(key, b"", instances_db)
            continue
        created_at, updated_at = change.created_at, change.updated_at
        if updated_at is None:
            updated_at = timestamp_ms
        # Stored as an insert would be, in one call that returns what it replaces (a lookup
        # less than get and put); an update that keeps the stored created_at is put again.
        value_created = timestamp_ms if created_at is None else created_at
        value = encode_instance_value(key, seq, value_created, updated_at, change.body)
        old = txn.replace(key, value, instances_db)
        previous = None if old is None else decode_instance(key, old)
        if previous is not None and created_at is None and previous.created_at != value_created:
            value = encode_instance_value(key, seq, previous.created_at, updated_at, change.body)
            txn.put(key, value, True, True, False, instances_db)
        machine, state, metadata = change.indexed_fields(seq)
        fresh = index_entries(instance_id, machine, state, metadata, updated_at)
        if previous is not None:  # an update: touch only the entries that change (the time)
            stale = entries_of(previous)
            kept = set(stale).intersection(fresh)
            remove_entries(txn, dbs, [entry for entry in stale if entry not in kept])
            fresh = [entry for entry in fresh if entry not in kept]
        add_entries(txn, dbs, fresh)
