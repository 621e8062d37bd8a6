"""Checks that return findings: every stored value against its checksum, the indexes against
the instances, the instances against what the WAL says they must be, the WAL from its first
segment to the applied sequence, every snapshot against its manifest, and the meta table.
Nothing is repaired here.

The checks of one entry (an instance, an index entry, a machine definition) and the WAL's
cross-check (:class:`WalEffects`) are shared with :mod:`rstmdb_storage.scrub`, which runs them
a bounded slice at a time in the background. Walking a sub-database, each entry is also looked
up again by its own key: LMDB keeps no checksum of its pages, and a flipped bit in a leaf key
moves the key out of sort order, where a lookup misses it without an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .changes import (
    Change,
    DeleteInstance,
    IdempotencyKey,
    PutInstance,
    decode_changes,
    is_conditional,
)
from .codec import (
    INSTANCE_BODY_OFFSET,
    cbor_loads_exact,
    decode_instance,
    instance_times,
    unseal,
)
from .config import DB_INSTANCES, DB_MACHINES, INDEX_DATABASES, MAX_VALUE_BYTES, SNAPSHOTS_DIR
from .engine import Engine
from .errors import CorruptionError, InvalidInputError, InvalidTypeError
from .model import check_instance
from .snapshots import (
    check_data,
    first_needed_segment,
    leftovers,
    published_seqs,
    read_manifest,
    snapshot_lock,
)
from .store.indexes import describes, entries_of, id_start
from .wal import Wal


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong: where (a file and offset, or a sub-database and key) and what."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"

    @classmethod
    def of(cls, where: str, exc: Exception) -> Finding:
        """The finding an error makes, saying *where* once: the error's own message names
        the place too (``instances[b'o-1']: CRC32C mismatch``), so that part is dropped."""
        problem = str(exc).replace(f"{where}: ", "").replace(f" in {where}", "")
        return cls(where, problem)


# --- one entry at a time ----------------------------------------------------------------------


def entries(
    txn: Any, db: Any, name: str, after: bytes | None = None
) -> Iterator[tuple[bytes, bytes, Finding | None]]:
    """The entries of sub-database *db* in key order (from the first key past *after*), each
    with a finding when it is out of order or not found again by its key."""
    cursor = txn.cursor(db=db)
    found = cursor.set_range(after + b"\x00") if after is not None else cursor.first()
    previous = after
    while found:
        key, raw = cursor.item()
        finding = None
        if (previous is not None and key <= previous) or txn.get(key, db=db) != raw:
            finding = Finding(
                f"{name}[{key!r}]",
                "out of order: a lookup by its key does not find it (a damaged page)",
            )
        yield key, raw, finding
        previous = key
        found = cursor.next()


def check_instance_entry(
    txn: Any,
    dbs: dict[bytes, Any],
    key: bytes,
    raw: bytes,
    applied_seq: int,
    indexed: Counter[bytes] | None = None,
) -> Iterator[Finding]:
    """One instance: it decodes, passes its CRC, has fields a write would accept and was
    written by an applied record; every index entry it should have is there (and counted in
    *indexed*, per index, when given: an index holding more entries than were found has
    entries no instance has, a key moved by damage, say)."""
    where = f"instances[{key!r}]"
    try:
        inst = decode_instance(key, raw)
        cbor_loads_exact(raw[INSTANCE_BODY_OFFSET:], where, MAX_VALUE_BYTES)
    except CorruptionError as exc:
        yield Finding.of(where, exc)
        return
    try:
        check_instance(inst)  # the CRC passed; are the fields what a write allows?
    except (InvalidInputError, InvalidTypeError) as exc:
        yield Finding(where, f"stored fields are not valid: {exc}")
        return
    if inst.last_wal_offset is None or inst.last_wal_offset > applied_seq:
        yield Finding(
            where,
            f"last_wal_offset {inst.last_wal_offset} is beyond the applied sequence {applied_seq}",
        )
    for db, index_key in entries_of(inst):
        entry = f"{db.decode()}[{index_key!r}]"
        stored = txn.get(index_key, db=dbs[db])
        if stored is None:
            yield Finding(entry, f"missing: instance {key!r} is not indexed")
            continue
        if indexed is not None:
            indexed[db] += 1
        if stored:  # an envelope around the id, as earlier versions wrote
            yield from _check_enveloped(entry, db, index_key, stored, key)


def check_index_entry(
    txn: Any, dbs: dict[bytes, Any], db: bytes, index_key: bytes
) -> Iterator[Finding]:
    """One entry of index *db*: the id its key ends with is a stored instance that it
    describes. (A broken instance, or the broken envelope of an entry an earlier version
    wrote, is reported with the instance's own check.)"""
    where = f"{db.decode()}[{index_key!r}]"
    id_at = id_start(db, index_key)
    if id_at < 0:
        yield Finding(where, "holds no instance id (a damaged key)")
        return
    instance_key = index_key[id_at:]
    try:
        stored = txn.get(instance_key, db=dbs[DB_INSTANCES])
        inst = None if stored is None else check_instance(decode_instance(instance_key, stored))
    except (CorruptionError, InvalidInputError, InvalidTypeError):
        return
    if inst is None:
        yield Finding(where, f"points to instance {instance_key!r}, which is not stored")
    elif not describes(db, index_key, id_at, inst):
        yield Finding(where, f"does not match instance {instance_key!r} as stored")


def _check_enveloped(
    where: str, db: bytes, index_key: bytes, raw: bytes, instance_key: bytes
) -> Iterator[Finding]:
    """An index entry's value as earlier versions wrote it: an envelope around the id the
    key ends with."""
    try:
        points_to = unseal(index_key, raw, db.decode())
    except CorruptionError as exc:
        yield Finding.of(where, exc)
        return
    if points_to != instance_key:
        yield Finding(where, f"points to {points_to!r} instead of {instance_key!r}")


def check_machine_entry(key: bytes, raw: bytes) -> Iterator[Finding]:
    where = f"machines[{key!r}]"
    try:
        cbor_loads_exact(unseal(key, raw, "machines"), where, MAX_VALUE_BYTES)
    except CorruptionError as exc:
        yield Finding.of(where, exc)


class WalEffects:
    """What the WAL says the instances it touches must look like now, from the records of
    one window of it (from its first segment, say) up to the applied sequence.

    A record applies all its changes or none: one with a condition, an idempotency key or a
    machine definition may have applied nothing, and says nothing for sure. An unconditional
    one surely applied; so for each instance the last sure change is kept, and whether any
    delete came after it. Then: an instance surely put and not deleted since must be stored,
    and a stored one must have been written at or after its last sure change. (A record
    before the window is unknown; the checks never report what could be right.)"""

    def __init__(self) -> None:
        #: instance id -> ``sure_seq << 2 | was_put << 1 | deleted``: the sequence of its
        #: last sure change (or 0), whether that change was a put, whether a delete came after
        #: it. One int, not a tuple of three: a store's whole WAL window is held here (1M ids:
        #: 120 MiB instead of 181).
        self.by_id: dict[str, int] = {}

    def add(self, seq: int, changes: list[Change]) -> None:
        sure = not any(is_conditional(c) or type(c) is IdempotencyKey for c in changes)
        by_id = self.by_id
        for change in changes:
            kind = type(change)
            if kind is not PutInstance and kind is not DeleteInstance:
                continue
            if sure:
                by_id[change.id] = seq << 2 | (kind is PutInstance) << 1
            elif kind is DeleteInstance:
                by_id[change.id] = by_id.get(change.id, 0) | 1
            else:
                by_id.setdefault(change.id, 0)

    def check(self, txn: Any, instances_db: Any) -> Iterator[Finding]:
        for instance_id, packed in self.by_id.items():
            sure_seq, was_put, deleted = packed >> 2, packed & 2, packed & 1
            if not sure_seq:
                continue
            key = instance_id.encode()
            where = f"instances[{key!r}]"
            raw = txn.get(key, db=instances_db)
            if raw is None:
                if was_put and not deleted:
                    yield Finding(
                        where,
                        f"missing: WAL record {sure_seq} put it and no record after it "
                        f"deletes it (a damaged page, or a key lost)",
                    )
                continue
            try:  # the sequence it was written at, checksum verified, without the body
                written = instance_times(key, raw)[0]
            except CorruptionError:
                continue  # reported by the instance's own check
            if written < sure_seq:
                change = "put" if was_put else "deleted"
                yield Finding(
                    where,
                    f"stored as written at sequence {written}, but WAL record {sure_seq} "
                    f"{change} it after that",
                )


def walk_wal(wal: Wal, from_seq: int, until_seq: int, effects: WalEffects) -> Iterator[Finding]:
    """Read the records *from_seq* to *until_seq* (CRCs, gaps, seals, the changes each holds)
    into *effects*; a bad one is a finding, and the walk ends there."""
    try:
        for record in wal.records(from_seq, until_seq):
            effects.add(record.seq, decode_changes(record.payload, f"WAL record {record.seq}"))
    except CorruptionError as exc:
        where = f"{exc.path} at offset {exc.offset}" if exc.path else str(wal.directory)
        yield Finding.of(where, exc)
    except FileNotFoundError as exc:  # deleted by a compaction meanwhile: callers look
        yield Finding(str(wal.directory), f"segment {exc.filename} went while it was read")


# --- the whole store --------------------------------------------------------------------------


def check_lmdb(engine: Engine) -> list[Finding]:
    """The meta table, every instance and index entry and machine definition, and the
    instances against the WAL, in one read transaction (one consistent view, streamed so that
    memory stays flat but for the WAL's effects). What was found before LMDB itself gave up
    on a damaged page is kept, with that."""
    found: list[Finding] = []
    try:
        engine.read(lambda txn: found.extend(_lmdb_findings(engine, txn)))
    except CorruptionError as exc:
        found.append(Finding("store", str(exc)))
    return found


def _lmdb_findings(engine: Engine, txn: Any) -> Iterator[Finding]:
    try:
        engine.meta.check_all(txn)
    except CorruptionError as exc:
        yield Finding("meta", str(exc))
        return
    applied = engine.meta.tail(txn).applied_seq
    dbs = engine.live().dbs
    indexed: Counter[bytes] = Counter()
    for key, raw, finding in entries(txn, dbs[DB_INSTANCES], "instances"):
        if finding is not None:
            yield finding
        yield from check_instance_entry(txn, dbs, key, raw, applied, indexed)
    for db in INDEX_DATABASES:
        # Looking each entry up again costs a second pass; only a count that disagrees
        # (an entry no instance has, a moved key, say, or one out of order) needs it.
        if txn.stat(dbs[db])["entries"] != indexed[db]:
            for index_key, _raw, finding in entries(txn, dbs[db], db.decode()):
                if finding is not None:
                    yield finding
                yield from check_index_entry(txn, dbs, db, index_key)
    for key, raw, finding in entries(txn, dbs[DB_MACHINES], "machines"):
        if finding is not None:
            yield finding
        yield from check_machine_entry(key, raw)
    ids = engine.wal.segment_ids()
    if not ids:
        yield Finding(str(engine.wal.directory), "no WAL segments")
        return
    for _ in range(_WALK_ATTEMPTS):
        effects = WalEffects()
        found = list(walk_wal(engine.wal, ids[0], applied, effects))
        if not found or engine.wal.segment_ids()[:1] == ids[:1]:
            break
        ids = engine.wal.segment_ids()  # a compaction deleted segments being read: again
    yield from found
    yield from effects.check(txn, dbs[DB_INSTANCES])


#: walks of the WAL started again when a compaction deletes its first segments meanwhile
_WALK_ATTEMPTS = 3


def check_snapshots(directory: Path, wal: Wal) -> Iterator[Finding]:
    """Every published snapshot: its manifest reads, its file matches the manifest's size and
    CRC32C, it is this store's, and the WAL still holds the records after it (so that recovery
    from any of them works)."""
    ids = wal.segment_ids()
    for seq in published_seqs(directory):
        yield from check_snapshot(directory, wal, seq, ids)
    yield from check_leftovers(directory, wal.file_mode)


def check_leftovers(directory: Path, file_mode: int) -> Iterator[Finding]:
    """Files a snapshot that died left in *directory*, when no snapshot is being taken (the
    lock cannot be taken on a read-only copy: then nothing is said)."""
    try:
        with snapshot_lock(directory, file_mode, blocking=False, create=False) as ours:
            found = leftovers(directory) if ours else []
    except OSError:
        return
    for path in found:
        yield Finding(
            str(path),
            "left by a snapshot that did not finish (opening the store for writing, or a "
            "snapshot, removes it)",
        )


def check_snapshot(directory: Path, wal: Wal, seq: int, ids: list[int]) -> Iterator[Finding]:
    where = f"snapshot {seq:020d}"
    try:
        manifest = read_manifest(directory, seq)
        check_data(directory, manifest)
    except FileNotFoundError:
        return  # deleted by a compaction meanwhile
    except CorruptionError as exc:
        if published_seqs(directory).count(seq):  # still published: really damaged
            yield Finding.of(where, exc)
        return
    if manifest.store_id != wal.store_id:
        yield Finding(where, f"belongs to store {manifest.store_id.hex()}, not this one")
    elif first_needed_segment(ids, seq) is None:
        yield Finding(where, f"the WAL after it is gone (its first segment starts at {ids[0]})")


def verify_store(engine: Engine) -> list[Finding]:
    """See :meth:`rstmdb_storage.Storage.verify`."""
    found = check_lmdb(engine)
    try:
        found.extend(check_snapshots(engine.config.path / SNAPSHOTS_DIR, engine.wal))
    except CorruptionError as exc:
        found.append(Finding("snapshots", str(exc)))
    return found
