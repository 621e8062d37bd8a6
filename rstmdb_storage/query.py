"""Queries over the indexes: key ranges for each kind of listing, paging cursors, and the
scans that read index entries with the instances they point to (one read transaction each);
and the lookups of machine definitions, keyed by the name, a NUL and the version as u64 BE.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

from .codec import cbor_loads, decode_instance, unseal
from .errors import CorruptionError, InvalidInputError, InvalidTypeError, shown
from .model import Instance, MachineDefinition, check_label_value, check_name
from .store.env import LmdbEnvironment
from .store.indexes import (
    TAG_OF,
    Indexes,
    KeyRange,
    entries_of,
    metadata_exact_range,
    metadata_span_range,
    state_range,
    time_range,
)

#: instances per page of a lazy listing, and per read transaction of a full scan
PAGE_SIZE = 512


class Page(list[Instance]):
    """One page of a listing: a list of instances, with the cursor of the next page in
    ``next_cursor`` (None when there is no next page)."""

    def __init__(self, instances: list[Instance], next_cursor: str | None) -> None:
        super().__init__(instances)
        self.next_cursor = next_cursor


def state_query(machine: str, state: str) -> KeyRange:
    check_name("machine", machine)
    check_name("state", state)
    return state_range(machine, state)


def metadata_query(key: str, value: Any, start: Any, end: Any) -> KeyRange:
    check_name("metadata key", key)
    if value is not None:
        if start is not None or end is not None:
            raise InvalidInputError("list_by_metadata: give a value, or start/end, not both")
        check_label_value("metadata value", value)
        return metadata_exact_range(key, value)
    if start is None and end is None:
        raise InvalidInputError("list_by_metadata: give a value, or a start and/or an end")
    bounds = [bound for bound in (start, end) if bound is not None]
    for bound in bounds:
        check_label_value("metadata bound", bound)
    kinds = {type(bound) for bound in bounds}
    if len(kinds) > 1:
        raise InvalidTypeError(
            f"list_by_metadata: start and end must have one type, got "
            f"{sorted(kind.__name__ for kind in kinds)}"
        )
    return metadata_span_range(key, TAG_OF[kinds.pop()], start, end)


def time_query(start_ms: int, end_ms: int) -> KeyRange:
    for name, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if type(value) is not int:
            raise InvalidTypeError(f"{name}: expected int, got {type(value).__name__}")
        if not 0 <= value < 2**64:
            raise InvalidInputError(f"{name}: must be between 0 and 2**64 - 1, got {shown(value)}")
    return time_range(start_ms, end_ms)


def encode_cursor(key_range: KeyRange, index_key: bytes) -> str:
    # The index's name travels with the key, so that a cursor of another query is refused
    # even when its key happens to fall inside this query's range.
    return base64.urlsafe_b64encode(key_range.db + b"\x00" + index_key).decode()


def decode_cursor(cursor: str | None, key_range: KeyRange) -> bytes | None:
    if cursor is None:
        return None
    if type(cursor) is not str:
        raise InvalidTypeError(f"cursor: expected a str or None, got {type(cursor).__name__}")
    try:
        raw = base64.urlsafe_b64decode(cursor.encode())
    except (ValueError, TypeError):
        raw = b""
    db, _, key = raw.partition(b"\x00")
    if db != key_range.db or key not in key_range:
        raise InvalidInputError(f"cursor {cursor!r:.60} does not belong to this query")
    return key


def scan(
    txn: Any,
    env: LmdbEnvironment,
    key_range: KeyRange,
    after: bytes | None,
    reverse: bool,
    limit: int | None,
) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """Index entries in *key_range* after *after*, with the raw instance each points to; and
    whether more entries follow the *limit* returned."""
    db_name = key_range.db.decode()
    cursor = txn.cursor(db=env.dbs[key_range.db])
    if reverse:
        bound = after if after is not None else key_range.upper
        found = cursor.prev() if cursor.set_range(bound) else cursor.last()
    else:
        found = cursor.set_range(after if after is not None else key_range.lower)
        if found and after is not None and cursor.key() == after:
            found = cursor.next()
    entries: list[tuple[bytes, bytes, bytes]] = []
    while found:
        index_key = cursor.key()
        if index_key not in key_range:
            break
        if limit is not None and len(entries) == limit:
            return entries, True
        id_key = unseal(index_key, cursor.value(), db_name)
        raw = txn.get(id_key, db=env.instances)
        if raw is None:
            raise CorruptionError(
                f"{db_name}[{index_key!r}] points to instance {id_key!r}, which is not stored; "
                f"run rebuild_indexes()",
                key=index_key,
            )
        entries.append((index_key, id_key, raw))
        found = cursor.prev() if reverse else cursor.next()
    return entries, False


def count_states(txn: Any, env: LmdbEnvironment, key_range: KeyRange) -> dict[str, int]:
    counts: dict[str, int] = {}
    cursor = txn.cursor(db=env.dbs[key_range.db])
    skip = len(key_range.lower)
    if cursor.set_range(key_range.lower):
        for index_key in cursor.iternext(keys=True, values=False):
            if index_key >= key_range.upper:
                break
            state = index_key[skip : index_key.index(b"\x00", skip)].decode()
            counts[state] = counts.get(state, 0) + 1
    return counts


def instances_page(
    txn: Any, env: LmdbEnvironment, after: bytes | None, size: int = PAGE_SIZE
) -> list[tuple[bytes, bytes]]:
    cursor = txn.cursor(db=env.instances)
    found = cursor.set_range(after) if after is not None else cursor.first()
    page: list[tuple[bytes, bytes]] = []
    while found and len(page) < size:
        key = cursor.key()
        if key != after:
            page.append((key, cursor.value()))
        found = cursor.next()
    return page


def index_page(txn: Any, dbs: dict[bytes, Any], page: list[tuple[bytes, bytes]]) -> None:
    indexes = Indexes(dbs)
    for key, raw in page:
        inst = decode_instance(key, raw)
        indexes.add(txn, key, entries_of(inst))


def machine_entry(
    txn: Any, machines_db: Any, prefix: bytes, version: int | None
) -> tuple[bytes, bytes] | None:
    """The entry of version *version* of the machine whose keys start with *prefix* (the name
    and a NUL), or of its newest version when None."""
    if version is not None:
        key = prefix + version.to_bytes(8, "big")
        raw = txn.get(key, db=machines_db)
        return None if raw is None else (key, raw)
    cursor = txn.cursor(db=machines_db)  # the newest: the last key with this prefix
    upper = prefix[:-1] + b"\x01"
    found = cursor.prev() if cursor.set_range(upper) else cursor.last()
    if found and cursor.key().startswith(prefix):
        return cursor.key(), cursor.value()
    return None


def machine_entries(txn: Any, machines_db: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """Every entry whose key starts with *prefix* (b"" for all), in key order."""
    cursor = txn.cursor(db=machines_db)
    if not cursor.set_range(prefix):
        return []
    return list(itertools.takewhile(lambda entry: entry[0].startswith(prefix), cursor))


def decode_machine(key: bytes, raw: bytes) -> MachineDefinition:
    definition = cbor_loads(unseal(key, raw, "machines"), f"machines[{key!r}]")
    name = key[:-9].decode()  # the name, a NUL, then the version as u64 BE
    return MachineDefinition(name, int.from_bytes(key[-8:], "big"), definition)
