"""A pure-Python, in-memory model of what the store keeps and what its queries answer.

Every query is answered by brute force over every record, so the model is slow and obviously
right; the tests compare the store's indexes against it. It knows nothing of LMDB, the WAL or
the index byte layouts: orders are stated in terms of values (UTF-8 byte order for text).

A write is a list of changes, committed atomically as one sequence number, like a batch of the
store. New kinds of change (conditional puts, transitions) are added as new change classes and a
branch in :meth:`ModelStore.commit`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from rstmdb_storage import Instance

LABEL_TYPES = (bool, int, float, str)


class ModelAbsent(Exception):
    """Raised when a delete finds no instance (the store raises InstanceNotFoundError)."""


@dataclass(frozen=True)
class Put:
    """Store *instance* (insert or replace). ``updated_at`` must be set: the model keeps time
    queries deterministic; ``created_at`` may be None (the store fills it)."""

    instance: Instance


@dataclass(frozen=True)
class Delete:
    """Delete the instance stored under *id*; it must exist when the change applies."""

    id: str


Change = Put | Delete


@dataclass(frozen=True)
class Record:
    """An instance as the model holds it. ``created_at`` is None until the test has read back
    the value the store filled in (see :meth:`ModelStore.unresolved`)."""

    id: str
    machine: str
    version: int
    state: str
    ctx: dict[str, Any]
    metadata: dict[str, Any]
    status: str
    last_event_id: str | None
    created_at: int | None
    updated_at: int
    seq: int


def label_sort_key(value: Any) -> Any:
    """The order of label values of one type: text by UTF-8 bytes, -0.0 as 0.0."""
    if type(value) is str:
        return value.encode()
    if type(value) is float:
        return value + 0.0
    return value


def same_label(stored: Any, wanted: Any) -> bool:
    """Exact metadata match: same type (True is not 1, 1 is not 1.0) and equal value."""
    return type(stored) is type(wanted) and label_sort_key(stored) == label_sort_key(wanted)


def typed(value: Any) -> Any:
    """A form of a JSON-like value whose equality tells apart True/1/1.0 and -0.0/0.0."""
    if type(value) is dict:
        return ("dict", tuple((key, typed(item)) for key, item in value.items()))
    if type(value) in (list, tuple):
        return ("list", tuple(typed(item) for item in value))
    if type(value) is float:
        return ("float", repr(value))
    return (type(value).__name__, value)


def view(item: Instance | Record) -> tuple[Any, ...]:
    """Everything an instance holds, comparable between the store's Instance and a Record."""
    seq = item.seq if isinstance(item, Record) else item.last_wal_offset
    return (
        item.id,
        item.machine,
        item.version,
        item.state,
        typed(item.ctx),
        typed(dict(sorted(item.metadata.items()))),
        item.status,
        item.last_event_id,
        item.created_at,
        item.updated_at,
        seq,
    )


def _id_key(record: Record) -> bytes:
    return record.id.encode()


class ModelStore:
    """Records by id, and the next WAL sequence number a successful write takes."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.next_seq = 1

    def clone(self) -> ModelStore:
        return copy.deepcopy(self)

    # --- writing ----------------------------------------------------------------------------

    def commit(self, changes: list[Change]) -> int:
        """Apply *changes* in order as one write; return its sequence number. All or nothing:
        on ModelAbsent nothing changes and no sequence number is used."""
        seq = self.next_seq
        records = dict(self.records)
        for change in changes:
            if isinstance(change, Put):
                records[change.instance.id] = _record(change.instance, records, seq)
            elif isinstance(change, Delete):
                if records.pop(change.id, None) is None:
                    raise ModelAbsent(change.id)
            else:
                raise TypeError(f"unknown change {change!r}")
        self.records = records
        self.next_seq = seq + 1
        return seq

    def unresolved(self) -> list[str]:
        """Ids whose ``created_at`` the store filled in and the test has not read back yet."""
        return [rid for rid, record in self.records.items() if record.created_at is None]

    def resolve_created_at(self, instance_id: str, created_at: int) -> None:
        self.records[instance_id] = replace(self.records[instance_id], created_at=created_at)

    # --- queries (brute force) --------------------------------------------------------------

    def get(self, instance_id: str) -> Record | None:
        return self.records.get(instance_id)

    def by_state(self, machine: str, state: str) -> list[Record]:
        found = [r for r in self.records.values() if (r.machine, r.state) == (machine, state)]
        return sorted(found, key=_id_key)

    def count_by_state(self, machine: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records.values():
            if record.machine == machine:
                counts[record.state] = counts.get(record.state, 0) + 1
        return counts

    def by_metadata(self, key: str, value: Any) -> list[Record]:
        found = [
            r
            for r in self.records.values()
            if key in r.metadata and same_label(r.metadata[key], value)
        ]
        return sorted(found, key=_id_key)

    def by_metadata_range(self, key: str, start: Any, end: Any) -> list[Record]:
        """Labels of the bounds' type with ``start <= value < end`` (None: unbounded)."""
        kinds = {type(bound) for bound in (start, end) if bound is not None}
        assert len(kinds) == 1, "the model takes one bound type"
        kind = kinds.pop()
        found = []
        for record in self.records.values():
            value = record.metadata.get(key)
            if type(value) is not kind:
                continue
            order = label_sort_key(value)
            if start is not None and order < label_sort_key(start):
                continue
            if end is not None and order >= label_sort_key(end):
                continue
            found.append(record)
        return sorted(found, key=lambda r: (label_sort_key(r.metadata[key]), _id_key(r)))

    def by_time(self, start_ms: int, end_ms: int, newest_first: bool = False) -> list[Record]:
        found = [r for r in self.records.values() if start_ms <= r.updated_at < end_ms]
        return sorted(found, key=lambda r: (r.updated_at, _id_key(r)), reverse=newest_first)


def _record(inst: Instance, records: dict[str, Record], seq: int) -> Record:
    assert inst.updated_at is not None, "the model needs explicit updated_at values"
    previous = records.get(inst.id)
    created_at = inst.created_at
    if created_at is None and previous is not None:
        created_at = previous.created_at  # kept across updates (may itself be unresolved)
    return Record(
        id=inst.id,
        machine=inst.machine,
        version=inst.version,
        state=inst.state,
        ctx=copy.deepcopy(inst.ctx),
        metadata=dict(inst.metadata),
        status=inst.status,
        last_event_id=inst.last_event_id,
        created_at=created_at,
        updated_at=inst.updated_at,
        seq=seq,
    )
