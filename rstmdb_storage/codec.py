"""How values are stored in LMDB: a checksummed envelope around CBOR.

Every value in every sub-database is an *envelope*::

    offset  size  field
    ------  ----  ------------------------------------------------------------------
    0       4     crc32c   CRC-32C (Castagnoli), little-endian, over the key's bytes
                           followed by bytes 4..end of the envelope
    4       1     version  envelope format version, ENVELOPE_VERSION (1)
    5       n     payload  depends on the sub-database

Covering the key means a value moved under another key fails its check as surely as a flipped bit.

An *instance* value (sub-database ``instances``, key = the id in UTF-8) has this payload::

    offset  size  field
    ------  ----  ------------------------------------------------------------------
    5       8     last_wal_offset  u64 LE: WAL sequence number of the latest write
    13      8     created_at       u64 LE: Unix milliseconds
    21      8     updated_at       u64 LE: Unix milliseconds
    29      n     body             CBOR array, positional (smaller and faster to decode than a
                                   map): [machine, version, state, ctx, metadata, status,
                                   last_event_id]

The body is encoded once, when the write is made, and the very same bytes travel in the WAL
record and land in LMDB: applying a record (on the write path or in replay) never re-encodes.

Decoding is strict. The length is capped before decoding; indefinite-length items, duplicate map
keys, nesting deeper than ``MAX_DECODE_DEPTH`` and semantic tags other than bignums (2, 3) are
refused with :class:`~rstmdb_storage.errors.DecodeError`: cbor2 would otherwise turn tag 35 into a
compiled regular expression, tag 36 into an e-mail message and tag 4 into a Decimal of any
exponent.
"""

from __future__ import annotations

import io
import operator
import struct
from typing import Any

import cbor2
from crc32c import crc32c

from .config import MAX_DECODE_DEPTH, MAX_VALUE_BYTES
from .errors import CorruptionError, DecodeError, InvalidInputError, RecordTooLargeError
from .model import Instance

ENVELOPE_VERSION = 1
ENVELOPE_HEADER = struct.Struct("<IB")  # crc32c, version
ENVELOPE_HEADER_SIZE = ENVELOPE_HEADER.size  # 5

INSTANCE_FIXED = struct.Struct("<QQQ")  # last_wal_offset, created_at, updated_at
INSTANCE_BODY_OFFSET = ENVELOPE_HEADER_SIZE + INSTANCE_FIXED.size  # 29
INSTANCE_BODY_FIELDS = 7
#: the fields the indexes need, (machine, state, metadata), of a body's positional fields
indexed_body_fields = operator.itemgetter(0, 2, 4)

# Semantic tags cbor2 may decode: only bignums, which it emits for ints beyond 64 bits.
ALLOWED_TAGS = frozenset({2, 3})
# Tags cbor2 (6.3) decodes by itself unless told otherwise; each is refused explicitly, and a
# test probes cbor2 for any tag it decodes that is missing here.
BUILTIN_TAGS = (
    0,
    1,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)


def _refuser(number: int) -> Any:
    def refuse(*_: Any) -> Any:
        raise DecodeError(f"CBOR semantic tag {number} is not allowed in stored data")

    return refuse


def _refuse_unknown_tag(tag: cbor2.CBORTag, immutable: bool = False) -> Any:
    raise DecodeError(f"CBOR semantic tag {tag.tag} is not allowed in stored data")


_REFUSED_TAGS = {number: _refuser(number) for number in BUILTIN_TAGS}

# Every stored byte string is decoded with the same options: max_depth=MAX_DECODE_DEPTH,
# allow_indefinite=False, allow_duplicate_keys=False, tag_hook=_refuse_unknown_tag,
# semantic_decoders=_REFUSED_TAGS. cbor_loads, cbor_loads_exact and decode_instance spell
# them out: passing a dict of them with ``**`` costs a fifth of a lookup's decoding.


def cbor_dumps(value: Any, where: str) -> bytes:
    """Encode *value* (already checked to be plain data) as CBOR."""
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, UnicodeEncodeError, OverflowError) as exc:
        raise InvalidInputError(f"{where}: cannot be encoded as CBOR ({exc})") from None


def cbor_loads(data: bytes | memoryview, where: str, max_size: int = MAX_VALUE_BYTES) -> Any:
    """Decode CBOR from bytes the store wrote, refusing anything it would not have written."""
    if len(data) > max_size:
        raise DecodeError(f"{where}: {len(data)} bytes of CBOR, more than the {max_size} allowed")
    try:
        return cbor2.loads(  # the decoding options, spelled out
            data,
            max_depth=MAX_DECODE_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            tag_hook=_refuse_unknown_tag,
            semantic_decoders=_REFUSED_TAGS,
        )
    except DecodeError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, DecodeError) else exc
        raise DecodeError(f"{where}: bad CBOR ({cause})") from None


def cbor_loads_exact(data: bytes, where: str, max_size: int) -> Any:
    """Like :func:`cbor_loads`, and the value must fill *data*: bytes after it are damage.

    ``cbor2.loads`` ignores bytes after the first value; the store never writes any, so WAL
    records and :meth:`~rstmdb_storage.Storage.verify` look for them (reads do not: the CRC
    already shows the bytes are the ones written)."""
    if len(data) > max_size:
        raise DecodeError(f"{where}: {len(data)} bytes of CBOR, more than the {max_size} allowed")
    stream = io.BytesIO(data)
    try:
        # cbor2.load, not a CBORDecoder of our own: 1.2 against 1.5 us a WAL record
        value = cbor2.load(  # the decoding options, spelled out
            stream,
            max_depth=MAX_DECODE_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            tag_hook=_refuse_unknown_tag,
            semantic_decoders=_REFUSED_TAGS,
        )
    except DecodeError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, DecodeError) else exc
        raise DecodeError(f"{where}: bad CBOR ({cause})") from None
    if stream.tell() != len(data):
        raise DecodeError(f"{where}: bytes follow the CBOR value")
    return value


# --- the envelope -------------------------------------------------------------------------------


def seal(key: bytes, payload: bytes) -> bytes:
    """Wrap *payload* in an envelope whose checksum covers *key* too."""
    tail = bytes((ENVELOPE_VERSION,)) + payload
    return crc32c(tail, crc32c(key)).to_bytes(4, "little") + tail


def unseal(key: bytes, raw: bytes, db: str) -> bytes:
    """Check an envelope and return its payload; raise :class:`CorruptionError` if it fails."""
    _check_envelope(key, raw, db)
    return raw[ENVELOPE_HEADER_SIZE:]


def _check_envelope(key: bytes, raw: bytes, db: str) -> None:
    if len(raw) < ENVELOPE_HEADER_SIZE:
        raise CorruptionError(
            f"{db}[{key!r}]: value of {len(raw)} bytes is shorter than its header", key=key
        )
    stored, version = ENVELOPE_HEADER.unpack_from(raw)
    computed = crc32c(memoryview(raw)[4:], crc32c(key))
    if stored != computed:
        raise CorruptionError(
            f"{db}[{key!r}]: CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})",
            key=key,
        )
    if version != ENVELOPE_VERSION:
        raise CorruptionError(f"{db}[{key!r}]: unknown envelope version {version}", key=key)


# --- instances ----------------------------------------------------------------------------------


def encode_instance_body(inst: Instance, max_size: int) -> bytes:
    """The CBOR body of an (already checked) instance; raise if larger than *max_size*."""
    fields = [
        inst.machine,
        inst.version,
        inst.state,
        inst.ctx,
        inst.metadata,
        inst.status,
        inst.last_event_id,
    ]
    try:
        body = cbor2.dumps(fields)
    except Exception:
        # The message names the instance: made only when it is needed, not on every put
        cbor_dumps(fields, f"instance {inst.id!r}")  # raises the typed error
        raise
    if len(body) > max_size:
        raise RecordTooLargeError(
            f"instance {inst.id!r}: {len(body)} bytes encoded, more than max_instance_size "
            f"({max_size})"
        )
    return body


def encode_instance_value(
    key: bytes, seq: int, created_at: int, updated_at: int, body: bytes
) -> bytes:
    return seal(key, INSTANCE_FIXED.pack(seq, created_at, updated_at) + body)


def decode_instance_body(body: bytes, where: str) -> list[Any]:
    """The positional fields of an instance body (see the layout above), checked for shape."""
    fields = cbor_loads(body, where)
    if type(fields) is not list or len(fields) != INSTANCE_BODY_FIELDS:
        raise DecodeError(f"{where}: body is not a {INSTANCE_BODY_FIELDS}-field array")
    return fields


def instance_times(key: bytes, raw: bytes) -> tuple[int, int, int]:
    """(last_wal_offset, created_at, updated_at) of a stored instance, checksum verified."""
    _check_envelope(key, raw, "instances")
    return INSTANCE_FIXED.unpack_from(raw, ENVELOPE_HEADER_SIZE)


def decode_instance(key: bytes, raw: bytes) -> Instance:
    """Decode a stored instance value, verifying its checksum first."""
    # The hot path of every lookup: checks inlined, cbor2 called directly.
    if (
        not INSTANCE_BODY_OFFSET <= len(raw) <= _MAX_INSTANCE_VALUE
        or raw[4] != ENVELOPE_VERSION
        or int.from_bytes(raw[:4], "little") != crc32c(raw[4:], crc32c(key))
    ):
        _check_envelope(key, raw, "instances")  # raises with the details
        if len(raw) > _MAX_INSTANCE_VALUE:
            cbor_loads(raw[INSTANCE_BODY_OFFSET:], f"instances[{key!r}]")  # raises: too large
        raise CorruptionError(f"instances[{key!r}]: value too short", key=key)
    try:
        body = cbor2.loads(
            raw[INSTANCE_BODY_OFFSET:],
            max_depth=MAX_DECODE_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            tag_hook=_refuse_unknown_tag,
            semantic_decoders=_REFUSED_TAGS,
        )
    except Exception:
        body = cbor_loads(raw[INSTANCE_BODY_OFFSET:], f"instances[{key!r}]")  # raises
    if type(body) is not list or len(body) != INSTANCE_BODY_FIELDS:
        raise DecodeError(f"instances[{key!r}]: body is not a {INSTANCE_BODY_FIELDS}-field array")
    return Instance(key.decode(), *body, *_unpack_fixed(raw, ENVELOPE_HEADER_SIZE))


def decode_instances(keys: list[bytes], stored: list[bytes]) -> list[Instance]:
    """:func:`decode_instance` of each key of *keys* and its stored value in *stored*."""
    # Its own copy of decode_instance's checks saved 1.3% of a decode (25.1k against 25.4k
    # instructions an instance, callgrind): not worth a second copy of them.
    return [decode_instance(key, raw) for key, raw in zip(keys, stored, strict=True)]


_unpack_fixed = INSTANCE_FIXED.unpack_from
_MAX_INSTANCE_VALUE = INSTANCE_BODY_OFFSET + MAX_VALUE_BYTES
