"""The data model: :class:`Instance`, and the checks a write applies to it before anything is
encoded or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import MAX_DECODE_DEPTH, MAX_ID_BYTES
from .errors import InvalidInputError, InvalidTypeError, shown

STATUS_ACTIVE = "active"
STATUS_DELETED = "deleted"
STATUSES = (STATUS_ACTIVE, STATUS_DELETED)

#: metadata label values that the metadata index can order
MetadataValue = str | int | float | bool


@dataclass(slots=True)
class Instance:
    """One state-machine instance, as rstmdb's core has it.

    ``last_wal_offset`` is the WAL sequence number of the instance's latest write; the store sets
    it (whatever the caller passes is replaced). ``created_at`` and ``updated_at`` are Unix
    milliseconds; left as ``None`` the store fills them (``created_at`` keeps the stored
    instance's value on an update).

    Example::

        inst = Instance(id="order-1", machine="order", version=1, state="pending",
                        ctx={"total": 99.5}, metadata={"customer": "alice"})
        seq = storage.put_instance(inst)
    """

    id: str
    machine: str
    version: int
    state: str
    ctx: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    status: str = STATUS_ACTIVE
    last_event_id: str | None = None
    last_wal_offset: int | None = None
    created_at: int | None = None
    updated_at: int | None = None


@dataclass(frozen=True, slots=True)
class MachineDefinition:
    """One version of a state machine's definition, as :meth:`Storage.put_machine` stored it.

    Example::

        storage.put_machine("order", 1, {"states": ["pending", "paid"]})
        assert storage.get_machine("order").version == 1
    """

    name: str
    version: int
    definition: dict[str, Any]


_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_LABEL_TYPES = frozenset({str, int, float, bool})
# Text of at most this many characters is at most MAX_ID_BYTES bytes in UTF-8, whatever it holds.
_SHORT_TEXT = MAX_ID_BYTES // 4


def check_instance(inst: object) -> Instance:
    """Raise :class:`InvalidTypeError`/:class:`InvalidInputError` unless *inst* is an
    :class:`Instance` the store can keep; return it.

    Text is checked for emptiness, NUL and length here; text that is not valid Unicode (lone
    surrogates) is refused when it is encoded, still before anything is written.
    """
    if not isinstance(inst, Instance):
        raise InvalidTypeError(f"expected an Instance, got {type(inst).__name__}")
    check_fields(
        inst.id,
        inst.machine,
        inst.version,
        inst.state,
        inst.ctx,
        inst.metadata,
        inst.status,
        inst.last_event_id,
        inst.created_at,
        inst.updated_at,
    )
    return inst


def check_fields(
    instance_id: Any,
    machine: Any,
    version: Any,
    state: Any,
    ctx: Any,
    metadata: Any,
    status: Any,
    last_event_id: Any,
    created_at: Any,
    updated_at: Any,
) -> None:
    """:func:`check_instance` of the fields of an instance (all but ``last_wal_offset``, which
    the store sets), in the order of :class:`Instance`: what replay checks of each put it
    decodes, without making an Instance to check (0.5 us a record).

    Example::

        check_fields("order-1", "order", 1, "paid", {}, {}, "active", None, None, None)
    """
    # A batch checks thousands of instances: the common case (short ASCII text without NUL,
    # which with at most _SHORT_TEXT characters surely passes _check_text; plain values and
    # labels) is tested in as few operations as it can be, inline, and anything else
    # gets the precise checks, which raise with the message (or pass: long or non-ASCII
    # text, a nested ctx, a float label).
    if not (
        type(instance_id) is str
        and type(machine) is str
        and type(state) is str
        and 0 < len(instance_id) <= _SHORT_TEXT
        and 0 < len(machine) <= _SHORT_TEXT
        and 0 < len(state) <= _SHORT_TEXT
        and (joined := instance_id + machine + state).isascii()
        and "\x00" not in joined
        and type(version) is int
        and 0 <= version < 2**63
    ):
        check_id(instance_id)
        check_name("machine", machine)
        check_int63("version", version)
        check_name("state", state)
    if type(ctx) is not dict:
        raise InvalidTypeError(f"ctx of {instance_id!r}: expected a dict, got {_tn(ctx)}")
    for key, item in ctx.items():
        if type(key) is not str or type(item) not in _SCALARS:  # nested, or bad
            check_plain_value(ctx, _Where("ctx of {!r}", instance_id))
            break
    if type(metadata) is not dict:
        _check_metadata(instance_id, metadata)  # raises
    for key, value in metadata.items():
        kind = type(value)
        if not (
            type(key) is str
            and 0 < len(key) <= _SHORT_TEXT
            and key.isascii()
            and "\x00" not in key
            and (
                (kind is str and len(value) <= _SHORT_TEXT and value.isascii())
                or kind is bool
                or (kind is int and -(2**63) <= value < 2**63)
            )
        ):
            _check_metadata(instance_id, metadata)
            break
    if status not in STATUSES:
        raise InvalidInputError(
            f"status of {instance_id!r}: expected one of {STATUSES}, got {status!r}"
        )
    if last_event_id is not None and type(last_event_id) is not str:
        raise InvalidTypeError(
            f"last_event_id of {instance_id!r}: expected str or None, got {_tn(last_event_id)}"
        )
    if created_at is not None:
        check_int63("created_at", created_at)
    if updated_at is not None:
        check_int63("updated_at", updated_at)


class _Where:
    """A place named in an error message, formatted only when a message is made."""

    __slots__ = ("template", "value")

    def __init__(self, template: str, value: object) -> None:
        self.template = template
        self.value = value

    def __str__(self) -> str:
        return self.template.format(self.value)


def check_id(instance_id: object) -> str:
    """Return *instance_id* if it is a usable instance id, else raise."""
    if not isinstance(instance_id, str):  # a StrEnum member is welcome (see plain_str)
        raise InvalidTypeError(f"instance id: expected str, got {_tn(instance_id)}")
    _check_text("instance id", instance_id)  # encodable: the id becomes the LMDB key
    return instance_id


def plain_str(value: str) -> str:
    """*value* as a plain ``str``: the text a ``str`` subclass (a ``StrEnum`` member, say)
    holds, whatever its ``encode`` or ``__str__`` say, so that keys, index entries and the WAL
    all carry the same bytes."""
    return value if type(value) is str else str.__str__(value)


def check_label_value(what: str, value: object) -> None:
    """Raise unless *value* can be a metadata label value (and so a metadata query bound)."""
    kind = type(value)
    if kind not in _LABEL_TYPES:
        raise InvalidTypeError(f"{what}: expected str, int, float or bool, got {_tn(value)}")
    if kind is str:
        _check_length(what, value)  # any text, even empty
    elif kind is int and not -(2**63) <= value < 2**63:
        raise InvalidInputError(f"{what}: int outside 64 bits")
    elif kind is float and math.isnan(value):
        raise InvalidInputError(f"{what}: NaN cannot be indexed")


def check_plain_value(value: Any, where: str | _Where, depth: int = 0) -> None:
    """Accept only JSON-like values (None, bool, int, float, str, bytes, lists and str-keyed
    dicts), nested at most ``MAX_DECODE_DEPTH - 2`` deep.

    cbor2 would happily encode datetimes, Decimals, sets or regular expressions as semantic
    tags; the decoder refuses those tags, so the encoder must never produce them.
    """
    if depth > MAX_DECODE_DEPTH - 2:
        raise InvalidInputError(f"{where}: nested deeper than {MAX_DECODE_DEPTH - 2} levels")
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidTypeError(f"{where}: dict keys must be str, got {_tn(key)}")
            if type(item) not in _SCALARS:  # only containers (or bad values) recurse
                check_plain_value(item, where, depth + 1)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) not in _SCALARS:
                check_plain_value(item, where, depth + 1)
    else:
        raise InvalidTypeError(
            f"{where}: {_tn(value)} cannot be stored (use None, bool, int, float, str, bytes, "
            f"list or dict)"
        )


def _check_metadata(instance_id: object, metadata: object) -> None:
    if type(metadata) is not dict:
        raise InvalidTypeError(f"metadata of {instance_id!r}: expected a dict, got {_tn(metadata)}")
    for key, value in metadata.items():
        if type(key) is not str:
            raise InvalidTypeError(f"metadata of {instance_id!r}: keys must be str, got {_tn(key)}")
        _check_text(f"metadata key of {instance_id!r}", key)
        check_label_value(f"metadata {key!r} of {instance_id!r}", value)


def check_name(what: str, value: object) -> None:
    """Raise unless *value* is usable as a machine, state or label name."""
    if not isinstance(value, str):  # a StrEnum member is welcome (see plain_str)
        raise InvalidTypeError(f"{what}: expected str, got {_tn(value)}")
    _check_text(what, value)


def _check_text(what: str, value: str) -> None:
    if not value:
        raise InvalidInputError(f"{what}: must not be empty")
    if "\x00" in value:
        raise InvalidInputError(f"{what}: must not contain NUL characters")
    _check_length(what, value)


def _check_length(what: str, value: str) -> None:
    # Short ASCII text is short enough and encodable; anything else is encoded to be sure.
    if len(value) > _SHORT_TEXT or not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{what}: not valid Unicode text ({exc.reason})") from None
        if size > MAX_ID_BYTES:
            raise InvalidInputError(
                f"{what}: {size} bytes in UTF-8, at most {MAX_ID_BYTES} allowed"
            )


def check_int63(what: str, value: object) -> None:
    """Raise unless *value* is an int that fits the stored width: 0 to 2**63 - 1 (versions,
    times, sequence numbers)."""
    if type(value) is not int:
        raise InvalidTypeError(f"{what}: expected int, got {_tn(value)}")
    if not 0 <= value < 2**63:
        raise InvalidInputError(f"{what}: must be between 0 and 2**63 - 1, got {shown(value)}")


def _tn(value: object) -> str:
    return type(value).__name__
