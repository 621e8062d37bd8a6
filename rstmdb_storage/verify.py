"""Checks that return findings: every stored value against its checksum, the indexes against
the instances, the WAL from its first segment to the applied sequence, every snapshot against
its manifest, and the meta table. Nothing is repaired here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codec import (
    INSTANCE_BODY_OFFSET,
    cbor_loads_exact,
    decode_instance,
    unseal,
)
from .config import DB_INSTANCES, DB_MACHINES, INDEX_DATABASES, MAX_VALUE_BYTES, SNAPSHOTS_DIR
from .engine import Engine
from .errors import CorruptionError, InvalidInputError, InvalidTypeError
from .model import check_instance
from .snapshots import check_data, first_needed_segment, published_seqs, read_manifest
from .store.indexes import entries_of
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


def check_instances(txn: Any, dbs: dict[bytes, Any], applied_seq: int) -> Iterator[Finding]:
    """Inside one read transaction (a consistent view, streamed so memory stays flat): every
    instance decodes, passes its CRC, has fields a write would accept and was written by an
    applied record; every index entry it should have is there and points back to it; and no
    index holds an entry that no instance explains; and every machine definition decodes."""
    expected: Counter[bytes] = Counter()
    for key, raw in txn.cursor(db=dbs[DB_INSTANCES]).iternext():
        where = f"instances[{key!r}]"
        try:
            inst = decode_instance(key, raw)
            cbor_loads_exact(raw[INSTANCE_BODY_OFFSET:], where, MAX_VALUE_BYTES)
        except CorruptionError as exc:
            yield Finding.of(where, exc)
            continue
        try:
            check_instance(inst)  # the CRC passed; are the fields what a write allows?
        except (InvalidInputError, InvalidTypeError) as exc:
            yield Finding(where, f"stored fields are not valid: {exc}")
            continue
        if inst.last_wal_offset is None or inst.last_wal_offset > applied_seq:
            yield Finding(
                where,
                f"last_wal_offset {inst.last_wal_offset} is beyond the applied sequence "
                f"{applied_seq}",
            )
        for db, index_key in entries_of(inst):
            expected[db] += 1
            yield from _check_entry(txn, dbs, db, index_key, key)
    for db in INDEX_DATABASES:
        if txn.stat(dbs[db])["entries"] != expected[db]:
            yield from _stray_entries(txn, dbs, db)
    for key, raw in txn.cursor(db=dbs[DB_MACHINES]).iternext():
        try:
            body = unseal(key, raw, "machines")
            cbor_loads_exact(body, f"machines[{key!r}]", MAX_VALUE_BYTES)
        except CorruptionError as exc:
            yield Finding.of(f"machines[{key!r}]", exc)


def _check_entry(
    txn: Any, dbs: dict[bytes, Any], db: bytes, index_key: bytes, instance_key: bytes
) -> Iterator[Finding]:
    where = f"{db.decode()}[{index_key!r}]"
    raw = txn.get(index_key, db=dbs[db])
    if raw is None:
        yield Finding(where, f"missing: instance {instance_key!r} is not indexed")
        return
    try:
        points_to = unseal(index_key, raw, db.decode())
    except CorruptionError as exc:
        yield Finding.of(where, exc)
        return
    if points_to != instance_key:
        yield Finding(where, f"points to {points_to!r} instead of {instance_key!r}")


def _stray_entries(txn: Any, dbs: dict[bytes, Any], db: bytes) -> Iterator[Finding]:
    """Entries of index *db* that no stored instance explains (run only when the counts say
    there are some, since it decodes an instance per entry)."""
    for index_key, raw in txn.cursor(db=dbs[db]).iternext():
        where = f"{db.decode()}[{index_key!r}]"
        try:
            instance_key = unseal(index_key, raw, db.decode())
            stored = txn.get(instance_key, db=dbs[DB_INSTANCES])
            inst = None if stored is None else check_instance(decode_instance(instance_key, stored))
        except (CorruptionError, InvalidInputError, InvalidTypeError):
            continue  # reported with the entry or the instance it belongs to
        if inst is None:
            yield Finding(where, f"points to instance {instance_key!r}, which is not stored")
        elif (db, index_key) not in entries_of(inst):
            yield Finding(where, f"does not match instance {instance_key!r} as stored")


def check_wal(wal: Wal, applied_seq: int) -> Iterator[Finding]:
    """Every record from the first segment present up to *applied_seq* is readable, in order,
    with its CRC; sealed segments match their seal."""
    ids = wal.segment_ids()
    if not ids:
        yield Finding(str(wal.directory), "no WAL segments")
        return
    try:
        for _ in wal.records(ids[0], applied_seq):
            pass
    except CorruptionError as exc:
        where = f"{exc.path} at offset {exc.offset}" if exc.path else str(wal.directory)
        yield Finding.of(where, exc)


def check_snapshots(directory: Path, wal: Wal) -> Iterator[Finding]:
    """Every published snapshot: its manifest reads, its file matches the manifest's size and
    CRC32C, it is this store's, and the WAL still holds the records after it (so that recovery
    from any of them works)."""
    ids = wal.segment_ids()
    for seq in published_seqs(directory):
        where = f"snapshot {seq:020d}"
        try:
            manifest = read_manifest(directory, seq)
            check_data(directory, manifest)
        except FileNotFoundError:
            continue  # deleted by a compaction meanwhile
        except CorruptionError as exc:
            if published_seqs(directory).count(seq):  # still published: really damaged
                yield Finding.of(where, exc)
            continue
        if manifest.store_id != wal.store_id:
            yield Finding(where, f"belongs to store {manifest.store_id.hex()}, not this one")
        elif first_needed_segment(ids, seq) is None:
            yield Finding(where, f"the WAL after it is gone (its first segment starts at {ids[0]})")


def run_checks(checks: Iterable[Callable[[], Iterator[Finding]]]) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks:
        try:
            findings.extend(check())
        except CorruptionError as exc:
            findings.append(Finding("store", str(exc)))
    return findings


def verify_store(engine: Engine) -> list[Finding]:
    """See :meth:`rstmdb_storage.Storage.verify`."""
    applied = engine.applied_tail().applied_seq

    def meta() -> Iterator[Finding]:
        engine.read(engine.meta.check_all)
        return iter(())

    return run_checks(
        [
            meta,
            lambda: check_stored(engine, applied),
            lambda: check_wal(engine.wal, applied),
            lambda: check_snapshots(engine.config.path / SNAPSHOTS_DIR, engine.wal),
        ]
    )


def check_stored(engine: Engine, applied: int) -> Iterator[Finding]:
    """Every instance and index entry, in one read transaction (see ``check_instances``)."""
    dbs = engine.live().dbs
    return iter(engine.read(lambda txn: list(check_instances(txn, dbs, applied))))
