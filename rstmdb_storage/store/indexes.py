"""The secondary indexes: by (machine, state), by metadata label, by ``updated_at``.

Each index is a sub-database whose keys sort in query order and end with the instance id.
Index entries are written and removed in the same LMDB transaction as the instance they
describe, so readers never see them disagree.

=================  =================================================================================
sub-database       key
=================  =================================================================================
``idx_state``      machine, 0x00, state, 0x00, id (UTF-8; none of them may contain NUL)
``idx_time``       updated_at (u64 big-endian), id
``idx_metadata``   label key, 0x00, tag, encoded value, id
=================  =================================================================================

=================  =================================================================================
value              written by
=================  =================================================================================
empty              this version: an entry carries nothing its key does not, so no checksum
envelope           earlier versions: the envelope of :mod:`..codec` around the id (read as well)
=================  =================================================================================

An entry has no checksum of its own, so its key is checked against what it points to instead:
a listing takes the id from the key, checks the instance's own checksum (which covers the id)
and that the instance matches the entry (its machine and state, its ``updated_at``, its label's
value: :func:`describes`); an entry that does not is damage, a
:class:`~rstmdb_storage.errors.CorruptionError` as a failed checksum is. ``verify`` and the
scrub cross-check every entry against the instances both ways, and check the envelope of an
entry an earlier version wrote (listings do not read values at all).

Metadata values are encoded so that byte order is value order within one type:

======  ==========  ========================================================================
tag     type        encoding
======  ==========  ========================================================================
0x01    bool        one byte, 0x00 or 0x01
0x02    int         u64 big-endian of ``value + 2**63`` (signed order)
0x03    float       IEEE 754 big-endian: sign bit set for positives, all bits flipped for
                    negatives (-0.0 is stored as 0.0; NaN is refused on write)
0x04    str         UTF-8 with each 0x00 written as 0x00 0xFF, then the terminator 0x00 0x01
======  ==========  ========================================================================
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import DB_METADATA_INDEX, DB_STATE_INDEX, DB_TIME_INDEX
from ..model import Instance

TAG_BOOL = 1
TAG_INT = 2
TAG_FLOAT = 3
TAG_STR = 4
TAG_OF = {bool: TAG_BOOL, int: TAG_INT, float: TAG_FLOAT, str: TAG_STR}
_FLOAT_BITS = struct.Struct(">Q")
_FLOAT = struct.Struct(">d")
_ALL_ONES = (1 << 64) - 1
#: bytes after the tag of a fixed-size label value
_FIXED_SIZE = {TAG_BOOL: 1, TAG_INT: 8, TAG_FLOAT: 8}

SEP = b"\x00"
STR_TERMINATOR = b"\x00\x01"
ESCAPED_NUL = b"\x00\xff"
_STR_TAG = bytes((TAG_STR,))
#: the value of every index entry this version writes
EMPTY = b""


def encode_label_value(value: Any) -> bytes:
    """The tag and order-preserving bytes of a metadata value (see the module docstring)."""
    kind = type(value)
    if kind is bool:
        return bytes((TAG_BOOL, value))
    if kind is int:
        return bytes((TAG_INT,)) + (value + (1 << 63)).to_bytes(8, "big")
    if kind is float:
        (bits,) = _FLOAT_BITS.unpack(_FLOAT.pack(value + 0.0))  # + 0.0 turns -0.0 into 0.0
        bits = bits ^ _ALL_ONES if bits >> 63 else bits | (1 << 63)
        return bytes((TAG_FLOAT,)) + bits.to_bytes(8, "big")
    return _STR_TAG + value.encode().replace(SEP, ESCAPED_NUL) + STR_TERMINATOR


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Index keys ``lower <= key < upper`` of one sub-database, in ``db``.

    ``id_at`` is where the id starts in every key of the range (0: it varies, see
    :func:`id_start`); ``wanted`` is what every instance the range lists has: (machine,
    state) for the state index, the label for the metadata index (the time is in the key)."""

    db: bytes
    lower: bytes
    upper: bytes
    id_at: int = 0
    wanted: Any = None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.lower <= key < self.upper


def _after_prefix(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with *prefix*."""
    stripped = prefix.rstrip(b"\xff")  # never empty: every prefix starts with text and NUL
    return stripped[:-1] + bytes((stripped[-1] + 1,))


def state_range(machine: str, state: str | None = None) -> KeyRange:
    prefix = machine.encode() + SEP + (state.encode() + SEP if state is not None else b"")
    if state is None:
        return KeyRange(DB_STATE_INDEX, prefix, _after_prefix(prefix))
    return KeyRange(DB_STATE_INDEX, prefix, _after_prefix(prefix), len(prefix), (machine, state))


def time_range(start_ms: int, end_ms: int) -> KeyRange:
    return KeyRange(DB_TIME_INDEX, start_ms.to_bytes(8, "big"), end_ms.to_bytes(8, "big"), 8)


def metadata_exact_range(label: str, value: Any) -> KeyRange:
    prefix = label.encode() + SEP + encode_label_value(value)
    return KeyRange(DB_METADATA_INDEX, prefix, _after_prefix(prefix), len(prefix), label)


def metadata_span_range(label: str, tag: int, start: Any, end: Any) -> KeyRange:
    """Values of type *tag* with ``start <= value < end`` (None: unbounded on that side)."""
    head = label.encode() + SEP
    lower = head + (encode_label_value(start) if start is not None else bytes((tag,)))
    upper = head + (encode_label_value(end) if end is not None else bytes((tag + 1,)))
    return KeyRange(DB_METADATA_INDEX, lower, upper, 0, label)


def id_start(db: bytes, key: bytes) -> int:
    """Where the id starts in *key*, an entry of index *db* (see the layouts above); -1 when
    the key has none, which only damage makes."""
    if db == DB_TIME_INDEX:
        return 8 if len(key) > 8 else -1
    first = key.find(SEP)  # after the machine, or the label
    if first < 0:
        return -1
    if db == DB_STATE_INDEX:
        second = key.find(SEP, first + 1)
        return second + 1 if 0 <= second < len(key) - 1 else -1
    tag_at = first + 1
    if tag_at >= len(key):
        return -1
    tag = key[tag_at]
    if tag == TAG_STR:
        # UTF-8 has no 0x00 byte but an escaped NUL's, so the first 0x00 0x01 ends the value
        end = key.find(STR_TERMINATOR, tag_at + 1)
        start = end + len(STR_TERMINATOR) if end >= 0 else -1
    else:
        start = tag_at + 1 + _FIXED_SIZE.get(tag, len(key))
    return start if 0 < start < len(key) else -1


def describes(db: bytes, key: bytes, id_at: int, inst: Instance) -> bool:
    """Whether *key*, an entry of index *db* whose id starts at *id_at*, is one that
    instance *inst* (stored under that id) has: the cross-check that stands in for a
    checksum of the entry's own."""
    if db == DB_STATE_INDEX:
        return key[:id_at] == inst.machine.encode() + SEP + inst.state.encode() + SEP
    if db == DB_TIME_INDEX:
        return id_at == 8 and int.from_bytes(key[:8], "big") == (inst.updated_at or 0)
    label_end = key.find(SEP)
    value = inst.metadata.get(key[:label_end].decode("utf-8", "replace"), _ABSENT)
    if type(value) not in TAG_OF:
        return False
    return key[label_end + 1 : id_at] == encode_label_value(value)


_ABSENT = object()


def index_entries(
    instance_id: str, machine: str, state: str, metadata: dict[str, Any], updated_at: int
) -> list[tuple[bytes, bytes]]:
    """Every (sub-database, key) an instance with these fields has in the indexes."""
    key = instance_id.encode()
    # b"".join of the parts: one allocation where + makes one per part (1.2 against 1.6 us
    # for an instance with two text labels)
    entries = [
        (DB_STATE_INDEX, b"".join((machine.encode(), SEP, state.encode(), SEP, key))),
        (DB_TIME_INDEX, updated_at.to_bytes(8, "big") + key),
    ]
    for label, value in metadata.items():
        if type(value) is str:  # encode_label_value's text, inline: 0.2 us a label
            encoded = value.encode().replace(SEP, ESCAPED_NUL)
            entry = b"".join((label.encode(), SEP, _STR_TAG, encoded, STR_TERMINATOR, key))
        else:
            entry = b"".join((label.encode(), SEP, encode_label_value(value), key))
        entries.append((DB_METADATA_INDEX, entry))
    return entries


def entries_of(inst: Instance) -> list[tuple[bytes, bytes]]:
    """Every (sub-database, key) a stored instance has in the indexes."""
    return index_entries(inst.id, inst.machine, inst.state, inst.metadata, inst.updated_at or 0)


def add_entries(txn: Any, dbs: dict[bytes, Any], entries: Iterable[tuple[bytes, bytes]]) -> None:
    """Write index *entries* (from :func:`index_entries`) inside *txn*."""
    for db, key in entries:
        # (key, value, dupdata, overwrite, append, db): positional, see store.env
        txn.put(key, EMPTY, True, True, False, dbs[db])


def remove_entries(txn: Any, dbs: dict[bytes, Any], entries: Iterable[tuple[bytes, bytes]]) -> None:
    """Remove index *entries* inside *txn*."""
    for db, key in entries:
        txn.delete(key, b"", dbs[db])
