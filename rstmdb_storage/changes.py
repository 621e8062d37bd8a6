"""The changes a WAL record carries: their types, their checks, and their bytes.

This is the log's *logical* format. The WAL (:mod:`rstmdb_storage.wal`) frames and checksums a
``CHANGES`` record's payload without looking inside; this module builds the payload on the
write path, decodes it for replay, and :mod:`rstmdb_storage.apply` applies what it decoded.

Payload
-------
A ``CHANGES`` payload is a CBOR array of changes, applied all together in one LMDB transaction
(a single put is an array of one change; a batch is one record)::

    [1, id, created_at | null, updated_at | null, body, condition?]   put (body: see codec)
    [2, id, condition?]                                                delete
    [3, name, version, definition]                                     put a machine definition
    [4, key, retention_ms]                                             idempotency key

An optional *condition* is ``[expected_state | null, expected_seq | null]``: the change applies
only if the stored instance is in that state and/or was last written by that sequence number
(0: no instance is stored under the id), judged in order against the changes before it in the
same record. If any condition of a record fails, none of its changes apply. A machine
definition (``definition``: CBOR bytes of a JSON-like map) is immutable once stored: putting
the same name and version again with another definition is a failed condition. A record with
an idempotency key applies only if no unexpired entry for that key is stored (expiry is judged
at the record's timestamp); applying it stores the key with the record's sequence number until
``timestamp_ms + retention_ms``.

In Python each change is a small type: :class:`PutInstance`, :class:`DeleteInstance`,
:class:`PutMachine` and :class:`IdempotencyKey`; :func:`encode_changes` and
:func:`decode_changes` turn a list of them into the payload and back.

Example::

    for record in storage.read_wal(from_seq=1, limit=10):
        for change in record.changes():
            if isinstance(change, PutInstance):
                print(record.seq, "put", change.id)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codec import (
    cbor_dumps,
    cbor_loads,
    cbor_loads_exact,
    decode_instance_body,
    encode_instance_body,
    indexed_body_fields,
)
from .config import MAX_RECORD_BYTES
from .errors import DecodeError, InvalidInputError, InvalidTypeError, RecordTooLargeError
from .model import (
    Instance,
    check_fields,
    check_id,
    check_instance,
    check_int63,
    check_name,
    check_plain_value,
    plain_str,
)

CHANGE_PUT = 1
CHANGE_DELETE = 2
CHANGE_MACHINE = 3
CHANGE_IDEMPOTENCY = 4

#: the fields of an instance the indexes need: machine, state, metadata
IndexedFields = tuple[str, str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Condition:
    """What the stored instance must be for a change to apply (None: not checked)."""

    expected_state: str | None
    expected_seq: int | None

    @classmethod
    def of(cls, expected_state: str | None, expected_seq: int | None) -> Condition | None:
        """The condition of a write's arguments, checked; None when there is none."""
        if expected_state is not None:
            check_name("expected_state", expected_state)
        if expected_seq is not None:
            check_int63("expected_seq", expected_seq)
        if expected_state is None and expected_seq is None:
            return None
        return cls(expected_state, expected_seq)


# Not frozen, unlike the other changes: a batch, and a replay, make one per instance, and a
# frozen dataclass's __init__ (object.__setattr__ per field) costs three times a plain one's
# (0.71 against 0.21 us). Nothing changes one once made.
@dataclass(slots=True)
class PutInstance:
    """Insert or replace instance *id* with *body* (the instance minus its envelope fields;
    ``None`` timestamps are filled in from the record when it is applied)."""

    id: str
    created_at: int | None
    updated_at: int | None
    body: bytes = field(repr=False)
    condition: Condition | None = None
    #: (machine, state, metadata) when the writer has them at hand; never encoded: replay
    #: decodes them from *body*
    indexed: IndexedFields | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        instance: Instance,
        expected_state: str | None,
        expected_seq: int | None,
        max_instance_size: int,
    ) -> PutInstance:
        """The put that stores *instance*, checked and encoded (bad input raises here)."""
        check_instance(instance)
        body = encode_instance_body(instance, max_instance_size)  # CBOR takes the plain text
        instance_id, machine, state = instance.id, instance.machine, instance.state
        if not type(instance_id) is type(machine) is type(state) is str:  # a StrEnum member
            instance_id, machine, state = (
                plain_str(instance_id),
                plain_str(machine),
                plain_str(state),
            )
        condition = None
        if expected_state is not None or expected_seq is not None:
            condition = Condition.of(expected_state, expected_seq)
        return cls(
            instance_id,
            instance.created_at,
            instance.updated_at,
            body,
            condition,
            (machine, state, instance.metadata),
        )

    def indexed_fields(self, seq: int | None = None) -> IndexedFields:
        """The machine, state and metadata this put stores: at hand on the write path,
        decoded from *body* otherwise (a ``DecodeError`` names record *seq*)."""
        if self.indexed is not None:
            return self.indexed
        return indexed_body_fields(
            decode_instance_body(self.body, f"WAL record {seq}, instance {self.id!r}")
        )

    def encoded(self) -> list[Any]:
        change = [CHANGE_PUT, self.id, self.created_at, self.updated_at, self.body]
        if self.condition is not None:
            change.append([self.condition.expected_state, self.condition.expected_seq])
        return change


@dataclass(frozen=True, slots=True)
class DeleteInstance:
    """Delete instance *id*."""

    id: str
    condition: Condition | None = None

    @classmethod
    def of(
        cls, instance_id: str, expected_state: str | None, expected_seq: int | None
    ) -> DeleteInstance:
        check_id(instance_id)
        return cls(plain_str(instance_id), Condition.of(expected_state, expected_seq))

    def encoded(self) -> list[Any]:
        if self.condition is None:
            return [CHANGE_DELETE, self.id]
        return [
            CHANGE_DELETE,
            self.id,
            [self.condition.expected_state, self.condition.expected_seq],
        ]


@dataclass(frozen=True, slots=True)
class PutMachine:
    """Store version *version* of machine *name*; *definition* is its CBOR."""

    name: str
    version: int
    definition: bytes = field(repr=False)

    @classmethod
    def of(cls, name: str, version: int, definition: dict[str, Any], max_size: int) -> PutMachine:
        check_name("machine", name)
        check_int63("machine version", version)
        where = f"definition of machine {name!r}"
        if type(definition) is not dict:
            raise InvalidTypeError(f"{where}: expected a dict, got {type(definition).__name__}")
        check_plain_value(definition, where)
        body = cbor_dumps(definition, where)
        if len(body) > max_size:
            raise RecordTooLargeError(
                f"{where}: {len(body)} bytes, more than max_instance_size ({max_size})"
            )
        return cls(name, version, body)

    def encoded(self) -> list[Any]:
        return [CHANGE_MACHINE, self.name, self.version, self.definition]


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """Remember the record's sequence number under *key* for *retention_ms*; a record whose
    key is remembered applies nothing."""

    key: str
    retention_ms: int

    def encoded(self) -> list[Any]:
        return [CHANGE_IDEMPOTENCY, self.key, self.retention_ms]


Change = PutInstance | DeleteInstance | PutMachine | IdempotencyKey


def encode_changes(changes: list[Change], max_size: int) -> bytes:
    """The payload of a record of *changes*.

    :raises RecordTooLargeError: it is larger than *max_size* bytes
    """
    payload = cbor_dumps([change.encoded() for change in changes], "WAL record")
    if len(payload) > max_size:
        raise RecordTooLargeError(
            f"WAL record of {len(payload)} bytes is larger than max_record_size ({max_size})"
        )
    return payload


def decode_changes(payload: bytes, where: str) -> list[Change]:
    """The changes of a ``CHANGES`` payload, checked as strictly as the API checks a write:
    a record that passes its CRC but holds what ``put_instance`` would refuse (an empty id, a
    time beyond 64 bits, a body field of the wrong type, bytes after the payload) is damage.

    :raises DecodeError: it is not an array of well-formed, acceptable changes
    """
    raw = cbor_loads_exact(payload, where, MAX_RECORD_BYTES)
    if type(raw) is not list:
        raise DecodeError(f"{where}: CHANGES payload is not an array")
    changes: list[Change] = []
    for change in raw:
        # each change decoded if it has the shape of a change and the API would have
        # accepted it: the checks of a write, applied to what the record holds
        decoded = None
        if type(change) is list and len(change) >= 2 and type(change[1]) is str:
            decode = _DECODERS.get(change[0]) if type(change[0]) is int else None
            try:
                decoded = decode(change, where) if decode is not None else None
            except (InvalidInputError, InvalidTypeError) as exc:
                raise DecodeError(f"{where}: a change put_instance would refuse ({exc})") from None
        if decoded is None:
            raise DecodeError(f"{where}: malformed change {change!r:.80}")
        changes.append(decoded)
    return changes


# Each decoder takes a change (a list whose second item is text) and returns None when it
# does not have its kind's shape; it raises InvalidInputError or InvalidTypeError when the
# API would refuse what it holds.


def _decode_put(change: list[Any], where: str) -> PutInstance | None:
    """A put comes back with its indexed fields, decoded once here for the apply."""
    size = len(change)
    if size not in (5, 6) or type(change[4]) is not bytes:
        return None
    instance_id, created_at, updated_at, body = change[1], change[2], change[3], change[4]
    if not (created_at is None or type(created_at) is int) or not (
        updated_at is None or type(updated_at) is int
    ):
        return None
    condition = None
    if size == 6:
        condition = _condition(change[5])
        if condition is None:
            return None
    try:
        fields = decode_instance_body(body, "")
    except DecodeError:  # decode again to name the place: errors only pay for the message
        decode_instance_body(body, f"{where}, instance {instance_id!r}")  # raises
        raise
    # positionally: the id, the body's seven fields, created_at, updated_at
    check_fields(instance_id, *fields, created_at, updated_at)
    return PutInstance(
        instance_id, created_at, updated_at, body, condition, indexed_body_fields(fields)
    )


def _decode_delete(change: list[Any], where: str) -> DeleteInstance | None:
    size = len(change)
    if size not in (2, 3):
        return None
    condition = None
    if size == 3:
        condition = _condition(change[2])
        if condition is None:
            return None
    check_id(change[1])
    return DeleteInstance(change[1], condition)


def _decode_idempotency(change: list[Any], where: str) -> IdempotencyKey | None:
    if len(change) != 3 or type(change[2]) is not int or not 0 < change[2] < 2**63:
        return None
    check_name("idempotency_key", change[1])
    return IdempotencyKey(change[1], change[2])


def _decode_machine(change: list[Any], where: str) -> PutMachine | None:
    if len(change) != 4 or type(change[2]) is not int or type(change[3]) is not bytes:
        return None
    name, version, definition = change[1], change[2], change[3]
    decoded = cbor_loads(definition, f"{where}, machine {name!r}")
    PutMachine.of(name, version, decoded, MAX_RECORD_BYTES)  # the checks of a write
    return PutMachine(name, version, definition)


_DECODERS = {
    CHANGE_PUT: _decode_put,
    CHANGE_DELETE: _decode_delete,
    CHANGE_IDEMPOTENCY: _decode_idempotency,
    CHANGE_MACHINE: _decode_machine,
}


def _condition(value: Any) -> Condition | None:
    """The condition encoded as *value*, checked as a write's; None when it is not a
    well-formed one."""
    if type(value) is not list or len(value) != 2 or value == [None, None]:
        return None
    state, seq = value
    if (state is None or type(state) is str) and (seq is None or type(seq) is int):
        return Condition.of(state, seq)
    return None


def must_check(changes: list[Change]) -> bool:
    """Whether *changes* can fail against the stored state: a delete (which must find its
    instance), a condition, or a machine definition (which must not redefine a version)."""
    return any(
        type(change) is DeleteInstance
        or type(change) is PutMachine
        or (type(change) is PutInstance and change.condition is not None)
        for change in changes
    )


def is_conditional(change: Change) -> bool:
    """Whether applying *change* depends on what is stored: it has a condition, or it is a
    machine definition."""
    if type(change) is PutInstance or type(change) is DeleteInstance:
        return change.condition is not None
    return type(change) is PutMachine


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One record of the log, as :meth:`Storage.read_wal` hands it out: its sequence number,
    when it was written (Unix milliseconds), and its payload; :meth:`changes` decodes it.

    Example::

        record = next(storage.read_wal(from_seq=7))
        print(record.seq, [type(change).__name__ for change in record.changes()])
    """

    seq: int
    timestamp_ms: int
    payload: bytes

    def changes(self) -> list[Change]:
        """The changes the record carries (see the module docstring).

        :raises DecodeError: the payload is not a well-formed change list
        """
        return decode_changes(self.payload, f"WAL record {self.seq}")
