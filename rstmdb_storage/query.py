"""Reads: an instance by id; queries over the indexes (key ranges for each kind of listing,
paging cursors, and the scans that read index entries with the instances they point to, one
read transaction each); machine definitions, keyed by the name, a NUL and the version as
u64 BE; and rebuilding the indexes from the instances.
"""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Iterator
from typing import Any

from .apply import remembered_write
from .changes import WalRecord
from .codec import cbor_loads, decode_instance, decode_instances, unseal
from .config import (
    DB_IDEMPOTENCY,
    DB_MACHINES,
    DB_STATE_INDEX,
    INDEX_DATABASES,
    MAX_ID_BYTES,
)
from .engine import Engine
from .errors import CorruptionError, InvalidInputError, InvalidTypeError, shown
from .model import (
    Instance,
    MachineDefinition,
    check_id,
    check_int63,
    check_label_value,
    check_name,
    plain_str,
)
from .store.env import LmdbEnvironment
from .store.indexes import (
    TAG_OF,
    KeyRange,
    add_entries,
    describes,
    entries_of,
    id_start,
    metadata_exact_range,
    metadata_span_range,
    state_range,
    time_range,
)

#: instances per page of a lazy listing, and per read transaction of a full scan
PAGE_SIZE = 512
#: instances reindexed per write transaction by rebuild_indexes()
REBUILD_CHUNK = 10_000


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
) -> tuple[list[bytes], list[bytes], list[bytes], bool]:
    """The keys of the index entries in *key_range* after *after*, the id each points to and
    that instance's stored value; and whether more entries follow the *limit* returned. (The
    values of the entries are not read: the key holds all an entry says, see
    :mod:`.store.indexes`.)"""
    cursor = txn.cursor(db=env.dbs[key_range.db])
    lower, upper = key_range.lower, key_range.upper
    if reverse:
        bound = after if after is not None else upper
        found = cursor.prev() if cursor.set_range(bound) else cursor.last()
        walk = cursor.iterprev(keys=True, values=False)
    else:
        found = cursor.set_range(after if after is not None else lower)
        walk = cursor.iternext(keys=True, values=False)
    keys: list[bytes] = []
    more = False
    if found:
        room = -1 if limit is None else limit
        for index_key in walk:
            if not lower <= index_key < upper:
                break
            if index_key == after:  # a forward walk starts at the cursor's own entry
                continue
            if len(keys) == room:
                more = True
                break
            keys.append(index_key)
    ids = entry_ids(key_range, keys)
    # a get per id, not one getmulti: its (id, value) tuples, all alive at once, are objects
    # the cyclic collector tracks, and 10,000 of them set it off 14 times in a listing; a
    # cursor's, which takes no db argument to parse (42.2k against 43.5k instructions an
    # instance listed, callgrind; see store.env)
    get = txn.cursor(db=env.instances).get
    stored = [get(key) for key in ids]
    if None in stored:
        _raise_unstored(key_range, keys, ids, stored)
    return keys, ids, stored, more


def entry_ids(key_range: KeyRange, keys: list[bytes]) -> list[bytes]:
    """The id each index entry of *key_range* in *keys* holds."""
    id_at = key_range.id_at
    if id_at:
        ids = [key[id_at:] for key in keys]
    else:
        db = key_range.db
        starts = [id_start(db, key) for key in keys]
        ids = [key[at:] if at > 0 else b"" for key, at in zip(keys, starts, strict=True)]
    if not all(ids):
        key = keys[ids.index(b"")]
        raise CorruptionError(
            f"{key_range.db.decode()}[{key!r}] holds no instance id; run rebuild_indexes()",
            key=key,
        )
    return ids


def _raise_unstored(
    key_range: KeyRange, keys: list[bytes], ids: list[bytes], stored: list[bytes | None]
) -> None:
    index_key, id_key = next(
        (k, i) for k, i, raw in zip(keys, ids, stored, strict=True) if raw is None
    )
    raise CorruptionError(
        f"{key_range.db.decode()}[{index_key!r}] points to instance {id_key!r}, which is not "
        f"stored; run rebuild_indexes()",
        key=index_key,
    )


def matching(key_range: KeyRange, keys: list[bytes], listed: list[Instance]) -> list[Instance]:
    """*listed*, the instances the entries *keys* of *key_range* point to, once each is
    checked to be one the entry describes (see :mod:`.store.indexes`)."""
    db = key_range.db
    if key_range.wanted is not None and db == DB_STATE_INDEX:  # the common case, inlined
        machine, state = key_range.wanted
        for inst in listed:
            if inst.state != state or inst.machine != machine:
                break
        else:
            return listed
    id_at = key_range.id_at
    for index_key, inst in zip(keys, listed, strict=True):
        if not describes(db, index_key, id_at or id_start(db, index_key), inst):
            raise CorruptionError(
                f"{db.decode()}[{index_key!r}] does not match instance {inst.id!r} as stored; "
                f"run rebuild_indexes()",
                key=index_key,
            )
    return listed


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
    for key, raw in page:
        add_entries(txn, dbs, entries_of(decode_instance(key, raw)))


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


# --- reads of an open store ---------------------------------------------------------------------


def get_instance(engine: Engine, instance_id: str) -> Instance | None:
    """The instance stored under *instance_id*, or None (see ``Storage.get_instance``)."""
    key = instance_key(instance_id)
    env = engine.env
    if env.stale or engine.closed:
        env = engine.live()
    raw = env.lookup(key)
    return None if raw is None else decode_instance(key, raw)


def instance_key(instance_id: str) -> bytes:
    """The key of *instance_id* in the instances table; the checks of ``check_id``, the
    common case first (a lookup's hot path)."""
    if type(instance_id) is not str:
        instance_id = plain_str(check_id(instance_id))  # a StrEnum member, or InvalidTypeError
    try:
        key = instance_id.encode()
    except UnicodeEncodeError:
        check_id(instance_id)  # raises InvalidInputError
        raise
    # `0 in key`, not `b"\x00" in key`: the same test, without bytes.__contains__ raising
    # and clearing a TypeError inside on every call (about 2k instructions of a get)
    if not 0 < len(key) <= MAX_ID_BYTES or 0 in key:
        check_id(instance_id)  # raises the precise InvalidInputError
    return key


def remembered(engine: Engine, idempotency_key: str) -> int | None:
    """The sequence number of the write made with *idempotency_key*, if still remembered."""
    check_name("idempotency_key", idempotency_key)
    now = time.time_ns() // 1_000_000
    db = engine.env.dbs[DB_IDEMPOTENCY]
    return engine.read(lambda txn: remembered_write(txn, db, idempotency_key, now))


def count_instances(engine: Engine) -> int:
    """How many instances are stored."""
    return engine.read(lambda txn: txn.stat(engine.env.instances)["entries"])


def instances(engine: Engine) -> Iterator[Instance]:
    """Every stored instance in id order, a page per short read transaction."""
    after: bytes | None = None
    while True:
        page = engine.read(lambda txn, after=after: instances_page(txn, engine.env, after))
        yield from (decode_instance(key, raw) for key, raw in page)
        if len(page) < PAGE_SIZE:
            return
        after = page[-1][0]


def wal_records(engine: Engine, from_seq: int, limit: int | None) -> Iterator[WalRecord]:
    """The applied WAL records from *from_seq* on, at most *limit* (see ``Storage.read_wal``);
    the arguments are checked at the call, not when iterating."""
    for name, value in (("from_seq", from_seq), ("limit", 1 if limit is None else limit)):
        if type(value) is not int:
            raise InvalidTypeError(f"{name}: expected an int, got {shown(value)}")
        if value < 1:
            raise InvalidInputError(f"{name}: must be at least 1, got {shown(value)}")
    until = engine.applied_tail().applied_seq
    if limit is not None:
        until = min(until, from_seq + limit - 1)
    frames = engine.wal.records(from_seq, until)
    return (WalRecord(frame.seq, frame.timestamp_ms, frame.payload) for frame in frames)


def list_page(
    engine: Engine, key_range: KeyRange, limit: int | None, cursor: str | None, reverse: bool
) -> Page:
    """One page of the listing *key_range*: at most *limit* instances after *cursor*."""
    if limit is not None and type(limit) is not int:
        raise InvalidTypeError(f"limit: expected an int or None, got {type(limit).__name__}")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit: must be at least 1, got {limit}")
    after = decode_cursor(cursor, key_range)
    keys, ids, stored, more = engine.read(
        lambda txn: scan(txn, engine.env, key_range, after, reverse, limit)
    )
    listed = matching(key_range, keys, decode_instances(ids, stored))
    return Page(listed, encode_cursor(key_range, keys[-1]) if more else None)


def iterate(engine: Engine, key_range: KeyRange, reverse: bool) -> Iterator[Instance]:
    """The whole listing *key_range*, lazily, a page per short read transaction."""
    cursor = None
    while True:
        page = list_page(engine, key_range, PAGE_SIZE, cursor, reverse)
        yield from page
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def count_by_state(engine: Engine, machine: str) -> dict[str, int]:
    """How many instances of *machine* are in each state, from the state index alone."""
    check_name("machine", machine)
    key_range = state_range(machine)
    return engine.read(lambda txn: count_states(txn, engine.env, key_range))


def get_machine(engine: Engine, name: str, version: int | None) -> MachineDefinition | None:
    """Version *version* of machine *name* (the newest when None), or None."""
    check_name("machine", name)
    if version is not None:
        check_int63("machine version", version)
    prefix = name.encode() + b"\x00"
    db = engine.env.dbs[DB_MACHINES]
    found = engine.read(lambda txn: machine_entry(txn, db, prefix, version))
    return None if found is None else decode_machine(*found)


def list_machines(engine: Engine, name: str | None) -> list[MachineDefinition]:
    """Every stored machine definition (of machine *name* only, when given)."""
    if name is not None:
        check_name("machine", name)
    prefix = b"" if name is None else name.encode() + b"\x00"
    db = engine.env.dbs[DB_MACHINES]
    found = engine.read(lambda txn: machine_entries(txn, db, prefix))
    return [decode_machine(key, raw) for key, raw in found]


def rebuild_indexes(engine: Engine) -> int:
    """Drop the indexes and rebuild them from the instances, :data:`REBUILD_CHUNK` per write
    transaction; return how many instances were indexed."""
    env = engine.writable()
    indexed, after = 0, None
    with env.write_mutex:
        engine.wal.check_usable()
        while True:
            page = engine.growing(env, _reindex_chunk, env, after)
            indexed += len(page)
            if len(page) < REBUILD_CHUNK:
                return indexed
            after = page[-1][0]


def _reindex_chunk(env: LmdbEnvironment, after: bytes | None) -> list[tuple[bytes, bytes]]:
    """Index the next :data:`REBUILD_CHUNK` instances after *after* (dropping the indexes
    first, when it is the first chunk); return them."""
    with env.begin_write() as txn:
        if after is None:
            for name in INDEX_DATABASES:
                txn.drop(env.dbs[name], delete=False)
        page = instances_page(txn, env, after, REBUILD_CHUNK)
        index_page(txn, env.dbs, page)
    return page
