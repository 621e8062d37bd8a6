"""The value envelope and the instance encoding (rstmdb_storage/codec.py, model.py).

Tiers (STYLE habit 9): byte tables against hand-built bytes; hypothesis round trips; every bit
flip caught; hostile CBOR with a valid CRC refused; bad input refused with typed errors; golden
files of the on-disk format (PITFALLS 16) that a format change cannot pass.

Regenerate the golden files only on purpose: ``RSTMDB_REGEN_GOLDEN=1 pytest tests/test_codec.py``.
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from rstmdb_storage import codec
from rstmdb_storage.changes import CHANGE_DELETE, CHANGE_PUT, decode_changes
from rstmdb_storage.codec import (
    ENVELOPE_VERSION,
    INSTANCE_BODY_OFFSET,
    cbor_loads,
    decode_instance,
    encode_instance_body,
    encode_instance_value,
    instance_times,
    seal,
    unseal,
)
from rstmdb_storage.config import MAX_DECODE_DEPTH, MAX_ID_BYTES, MAX_VALUE_BYTES, FsyncPolicy
from rstmdb_storage.errors import (
    CorruptionError,
    DecodeError,
    InvalidInputError,
    InvalidTypeError,
    RecordTooLargeError,
    StorageError,
)
from rstmdb_storage.model import STATUSES, Instance, check_instance
from rstmdb_storage.wal.format import SEGMENT_HEADER_SIZE
from rstmdb_storage.wal.log import Wal, WalTail

MiB = 1024 * 1024
LIMIT = 1 * MiB  # the default max_instance_size

# --- helpers ------------------------------------------------------------------------------------


def stored(inst: Instance, seq: int = 7, created: int = 11, updated: int = 13) -> bytes:
    """The value the store keeps for *inst*: checked, encoded, sealed under its id."""
    check_instance(inst)
    body = encode_instance_body(inst, LIMIT)
    return encode_instance_value(inst.id.encode(), seq, created, updated, body)


def raw_with_body(body: bytes, key: bytes = b"k") -> bytes:
    """An instance value around arbitrary *body* bytes, with a valid envelope CRC."""
    return encode_instance_value(key, 1, 2, 3, body)


def same(a: Any, b: Any) -> bool:
    """Equality that also demands equal types (True != 1 here) and the sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def same_instance(a: Instance, b: Instance) -> bool:
    names = a.__dataclass_fields__
    return all(same(getattr(a, n), getattr(b, n)) for n in names)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- CRC-32C sanity (PITFALLS 17) -----------------------------------------------------------


def test_crc32c_known_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    # continuing a CRC equals the CRC of the concatenation, which the envelope relies on
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283
    assert crc32c(b"") == 0


# --- byte tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "payload"),
    [(b"order-1", b"payload"), (b"k", b""), ("ключ".encode(), bytes(range(256)))],
)
def test_envelope_byte_table(key: bytes, payload: bytes) -> None:
    raw = seal(key, payload)
    expected_crc = crc32c(key + b"\x01" + payload)  # over the key, then bytes 4..end
    assert raw == struct.pack("<I", expected_crc) + b"\x01" + payload
    assert raw[4] == ENVELOPE_VERSION == 1
    assert unseal(key, raw, "test") == payload


def test_envelope_refuses_unknown_version_even_with_a_good_crc() -> None:
    key = b"k"
    tail = b"\x02payload"
    raw = struct.pack("<I", crc32c(key + tail)) + tail
    with pytest.raises(CorruptionError, match="unknown envelope version 2"):
        unseal(key, raw, "test")
    body = cbor2.dumps(["m", 1, "s", {}, {}, "active", None])
    tail = b"\x02" + bytes(24) + body
    raw = struct.pack("<I", crc32c(key + tail)) + tail
    with pytest.raises(CorruptionError):
        decode_instance(key, raw)


def test_instance_value_byte_table() -> None:
    inst = Instance(
        id="order-1",
        machine="order",
        version=1,
        state="pending",
        ctx={"n": 5},
        metadata={"customer": "alice"},
        last_event_id="e9",
    )
    raw = stored(inst, seq=0x0102030405060708, created=1_700_000_000_000, updated=2**64 - 1)
    # offset 0: crc32c over key + bytes 4..; 4: version; 5/13/21: u64 LE fixed fields; 29: body
    assert raw[:4] == crc32c(b"order-1" + raw[4:]).to_bytes(4, "little")
    assert raw[4] == 1
    assert raw[5:13] == bytes.fromhex("0807060504030201")
    assert raw[13:21] == (1_700_000_000_000).to_bytes(8, "little")
    assert raw[21:29] == b"\xff" * 8
    assert INSTANCE_BODY_OFFSET == 29
    assert cbor2.loads(raw[29:]) == [
        "order",
        1,
        "pending",
        {"n": 5},
        {"customer": "alice"},
        "active",
        "e9",
    ]
    assert instance_times(b"order-1", raw) == (0x0102030405060708, 1_700_000_000_000, 2**64 - 1)


def test_hand_built_instance_value_decodes() -> None:
    """Bytes written out by hand from the layout table, not by the encoder."""
    body = (
        b"\x87"  # array(7)
        b"\x65order"  # machine
        b"\x02"  # version 2
        b"\x64paid"  # state
        b"\xa2\x65total\xfb\x40\x58\xe0\x00\x00\x00\x00\x00\x64tags\x82\xf5\xf6"  # ctx
        b"\xa1\x68customer\x65alice"  # metadata
        b"\x66active"  # status
        b"\xf6"  # last_event_id: null
    )
    fixed = struct.pack("<QQQ", 42, 1_000, 2_000)
    tail = b"\x01" + fixed + body
    raw = struct.pack("<I", crc32c(b"order-1" + tail)) + tail
    inst = decode_instance(b"order-1", raw)
    expected = Instance(
        id="order-1",
        machine="order",
        version=2,
        state="paid",
        ctx={"total": 99.5, "tags": [True, None]},
        metadata={"customer": "alice"},
        status="active",
        last_event_id=None,
        last_wal_offset=42,
        created_at=1_000,
        updated_at=2_000,
    )
    assert same_instance(inst, expected)


# --- round trips --------------------------------------------------------------------------------

names = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: len(s.encode()) <= MAX_ID_BYTES)
long_names = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=60, max_size=255
).filter(lambda s: len(s.encode()) <= MAX_ID_BYTES)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: ints beyond 64 bits travel as bignum tags 2/3
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
metadata_values = (
    st.text(max_size=20)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
u63 = st.integers(0, 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)
instances = st.builds(
    Instance,
    id=names | long_names,
    machine=names,
    version=u63,
    state=names,
    ctx=st.dictionaries(st.text(max_size=8), json_like, max_size=5),
    metadata=st.dictionaries(names, metadata_values, max_size=5),
    status=st.sampled_from(STATUSES),
    last_event_id=st.none() | st.text(max_size=30),
)


@settings(max_examples=200, deadline=None)
@given(inst=instances, seq=u64, created=u64, updated=u64)
def test_instance_round_trip(inst: Instance, seq: int, created: int, updated: int) -> None:
    raw = stored(inst, seq, created, updated)
    out = decode_instance(inst.id.encode(), raw)
    expected = Instance(
        inst.id,
        inst.machine,
        inst.version,
        inst.state,
        inst.ctx,
        inst.metadata,
        inst.status,
        inst.last_event_id,
        seq,
        created,
        updated,
    )
    assert same_instance(out, expected), (out, expected)
    assert instance_times(inst.id.encode(), raw) == (seq, created, updated)


def test_nan_in_ctx_round_trips() -> None:
    inst = Instance("n", "m", 1, "s", ctx={"x": math.nan, "y": [-0.0, math.inf]})
    out = decode_instance(b"n", stored(inst))
    assert math.isnan(out.ctx["x"])
    assert same(out.ctx["y"], [-0.0, math.inf])


def nested(depth: int) -> dict[str, Any]:
    """A ctx whose innermost value sits *depth* containers below the ctx dict."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deepest_ctx_accepted_also_decodes() -> None:
    """The encoder's depth limit and the decoder's must agree: whatever check_instance lets
    through decodes, and one level more is refused before anything is written."""
    deepest = None
    for depth in range(MAX_DECODE_DEPTH - 4, MAX_DECODE_DEPTH + 2):
        inst = Instance("deep", "m", 1, "s", ctx=nested(depth))
        try:
            check_instance(inst)
        except InvalidInputError:
            break
        assert decode_instance(b"deep", stored(inst)).ctx == inst.ctx
        deepest = depth
    assert deepest is not None and deepest >= MAX_DECODE_DEPTH - 4
    with pytest.raises(InvalidInputError, match="nested deeper"):
        check_instance(Instance("deep", "m", 1, "s", ctx=nested(deepest + 1)))


# --- damage -------------------------------------------------------------------------------------

SMALL = Instance(
    id="order-1",
    machine="order",
    version=1,
    state="pending",
    ctx={"total": 99.5, "lines": [1, 2]},
    metadata={"customer": "alice", "vip": True},
    last_event_id="e1",
)


def assert_every_bit_flip_caught(key: bytes, raw: bytes) -> None:
    for bit in range(len(raw) * 8):
        bad = flip(raw, bit)
        with pytest.raises(CorruptionError) as caught:
            decode_instance(key, bad)
        assert caught.value.key == key
        with pytest.raises(CorruptionError):
            instance_times(key, bad)
        with pytest.raises(CorruptionError):
            unseal(key, bad, "instances")


def test_every_bit_flip_of_a_stored_value_is_caught() -> None:
    assert_every_bit_flip_caught(b"order-1", stored(SMALL))


small_instances = st.builds(
    Instance,
    id=names,
    machine=names,
    version=u63,
    state=names,
    ctx=st.dictionaries(st.text(max_size=4), scalars, max_size=3),
    metadata=st.dictionaries(names, metadata_values, max_size=2),
)


@settings(max_examples=15, deadline=None)
@given(inst=small_instances)
def test_every_bit_flip_is_caught_property(inst: Instance) -> None:
    assert_every_bit_flip_caught(inst.id.encode(), stored(inst))


def test_truncated_or_extended_values_are_caught() -> None:
    raw = stored(SMALL)
    for size in range(len(raw)):
        with pytest.raises(CorruptionError):
            decode_instance(b"order-1", raw[:size])
    for extra in (b"\x00", b"\xf6", b"junk"):
        with pytest.raises(CorruptionError):
            decode_instance(b"order-1", raw + extra)


@pytest.mark.parametrize("other", [b"order-2", b"order-1 ", b"Order-1", b"", b"order-"])
def test_value_moved_under_another_key_is_caught(other: bytes) -> None:
    raw = stored(SMALL)
    with pytest.raises(CorruptionError, match="CRC32C mismatch") as caught:
        decode_instance(other, raw)
    assert caught.value.key == other
    assert repr(other) in str(caught.value)
    with pytest.raises(CorruptionError):
        unseal(other, raw, "instances")


# --- hostile CBOR with a valid CRC (PITFALLS 15, SPEC guarantee 8) ------------------------------

D = cbor2.dumps


def body7(ctx: bytes = b"\xa0", metadata: bytes = b"\xa0", head: bytes = b"\x87") -> bytes:
    """A body array with raw CBOR for ctx and metadata."""
    return head + D("m") + D(1) + D("s") + ctx + metadata + D("active") + b"\xf6"


def tagged(number: int, content: Any) -> bytes:
    return D(cbor2.CBORTag(number, content))


TAGS = [
    (35, "a+b*"),  # compiled regular expression
    (36, "From: a@b\n\nhi"),  # e-mail message
    (4, [-2, 12345]),  # Decimal
    (4, [10**9, 1]),  # Decimal with a huge exponent
    (5, [-2, 3]),  # bigfloat
    (1, 0),  # epoch datetime
    (0, "2020-01-01T00:00:00Z"),  # datetime string
    (258, [1, 2]),  # set
    (25, 0),  # string reference
    (28, [1]),  # shareable
    (30, [1, 2]),  # rational
    (37, b"0123456789abcdef"),  # UUID
    (52, b"\x7f\x00\x00\x01"),  # IPv4 address
    (54, bytes(16)),  # IPv6 address
    (100, 1),  # epoch date
    (256, [1]),  # string reference namespace
    (260, b"\x7f\x00\x00\x01"),  # network address
    (261, {b"\x7f": 8}),  # network prefix
    (1004, "2020-01-01"),  # date string
    (55799, 1),  # self-described CBOR
    (999, 1),  # a tag nobody registered
    (2**32 + 5, 1),  # a 64-bit tag number
]


def _hostile_bodies() -> list[tuple[str, bytes]]:
    cases = [
        ("indefinite body array", b"\x9f" + body7()[1:] + b"\xff"),
        ("indefinite map in ctx", body7(ctx=b"\xbf" + D("a") + D(1) + b"\xff")),
        ("indefinite text in ctx", body7(ctx=b"\xa1" + D("a") + b"\x7f" + D("x") + b"\xff")),
        ("indefinite bytes in ctx", body7(ctx=b"\xa1" + D("a") + b"\x5f" + D(b"x") + b"\xff")),
        ("indefinite list in ctx", body7(ctx=b"\xa1" + D("a") + b"\x9f\x01\xff")),
        ("duplicate ctx keys", body7(ctx=b"\xa2" + D("a") + D(1) + D("a") + D(2))),
        ("duplicate metadata keys", body7(metadata=b"\xa2" + D("k") + D(1) + D("k") + D(1))),
        (
            "duplicate keys deep in ctx",
            body7(ctx=b"\xa1" + D("a") + b"\x81\xa2" + D("x") + D(1) + D("x") + D(1)),
        ),
        ("ctx deeper than MAX_DECODE_DEPTH", body7(ctx=b"\x81" * (MAX_DECODE_DEPTH + 5) + b"\x01")),
        (
            "metadata deeper than MAX_DECODE_DEPTH",
            body7(metadata=b"\xa1" + D("k") + b"\x81" * (MAX_DECODE_DEPTH + 1) + b"\x01"),
        ),
        ("self-described body", b"\xd9\xd9\xf7" + body7()),
        ("a map, not an array", D({"machine": "m"})),
        ("six fields", b"\x86" + body7()[1:-1]),
        ("eight fields", b"\x88" + body7()[1:] + b"\xf6"),
        ("an int", D(7)),
        ("a string", D("body")),
        ("null", b"\xf6"),
        ("nothing", b""),
        ("truncated array", body7()[:-3]),
        ("a lone break", b"\xff"),
        ("invalid UTF-8 in state", b"\x87" + D("m") + D(1) + b"\x62\xc3\x28" + body7()[6:]),
        ("length far beyond the data", b"\x87" + D("m") + D(1) + b"\x7b" + b"\xff" * 8),
    ]
    for number, content in TAGS:
        cases.append(
            (f"tag {number} in ctx", body7(ctx=b"\xa1" + D("t") + tagged(number, content)))
        )
    cases.append(("tag 35 as the state", b"\x87" + D("m") + D(1) + tagged(35, "x") + body7()[6:]))
    return cases


HOSTILE = _hostile_bodies()


@pytest.mark.parametrize(("name", "body"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_body_with_valid_crc_raises_decode_error(name: str, body: bytes) -> None:
    raw = raw_with_body(body)
    assert unseal(b"k", raw, "instances")  # the envelope itself is fine
    with pytest.raises(DecodeError) as caught:
        decode_instance(b"k", raw)
    assert isinstance(caught.value, CorruptionError)
    assert "instances[b'k']" in str(caught.value)


@pytest.mark.parametrize(("number", "content"), TAGS, ids=[str(n) for n, _ in TAGS])
def test_cbor_loads_refuses_every_tag_but_bignums(number: int, content: Any) -> None:
    with pytest.raises(DecodeError, match=re.escape(str(number))):
        cbor_loads(tagged(number, content), "test")
    with pytest.raises(DecodeError):
        decode_changes(D([[CHANGE_DELETE, "a"], cbor2.CBORTag(number, content)]), "wal")


def test_bignums_are_the_allowed_tags() -> None:
    inst = Instance("b", "m", 1, "s", ctx={"big": 2**100, "small": -(2**90)})
    assert decode_instance(b"b", stored(inst)).ctx == {"big": 2**100, "small": -(2**90)}
    assert cbor_loads(tagged(2, b"\x01\x00"), "test") == 256
    assert cbor_loads(tagged(3, b"\x01\x00"), "test") == -257


def test_body_over_max_value_bytes_is_refused_before_decoding() -> None:
    body = body7(ctx=b"\xa1" + D("b") + D(bytes(MAX_VALUE_BYTES)))
    assert len(body) > MAX_VALUE_BYTES
    raw = raw_with_body(body)
    with pytest.raises(DecodeError, match="more than"):
        decode_instance(b"k", raw)
    with pytest.raises(DecodeError, match="more than"):
        cbor_loads(body, "test")


# --- bad input ----------------------------------------------------------------------------------


def base(**changes: Any) -> Instance:
    fields = {"id": "i", "machine": "m", "version": 1, "state": "s"}
    fields.update(changes)
    return Instance(**fields)


class Weird:
    pass


BAD_TYPE = [
    ("id int", base(id=5)),
    ("id bytes", base(id=b"i")),
    ("id None", base(id=None)),
    ("machine int", base(machine=1)),
    ("state None", base(state=None)),
    ("version str", base(version="1")),
    ("version float", base(version=1.0)),
    ("version bool", base(version=True)),
    ("ctx list", base(ctx=[1])),
    ("ctx None", base(ctx=None)),
    ("ctx datetime", base(ctx={"t": datetime.datetime(2024, 1, 1)})),
    ("ctx date", base(ctx={"t": datetime.date(2024, 1, 1)})),
    ("ctx set", base(ctx={"s": {1, 2}})),
    ("ctx frozenset", base(ctx={"s": frozenset()})),
    ("ctx Decimal", base(ctx={"d": decimal.Decimal("1.5")})),
    ("ctx complex", base(ctx={"c": 1j})),
    ("ctx regex", base(ctx={"r": re.compile("x")})),
    ("ctx object", base(ctx={"o": Weird()})),
    ("ctx bytearray", base(ctx={"b": bytearray(b"x")})),
    ("ctx set in list", base(ctx={"l": [1, [2, {3}]]})),
    ("ctx int key", base(ctx={1: "a"})),
    ("ctx tuple key deep", base(ctx={"a": {(1,): "a"}})),
    ("ctx None key", base(ctx={None: 1})),
    ("metadata list", base(metadata={"k": [1]})),
    ("metadata None", base(metadata={"k": None})),
    ("metadata dict", base(metadata={"k": {}})),
    ("metadata bytes", base(metadata={"k": b"v"})),
    ("metadata not a dict", base(metadata=[("k", "v")])),
    ("metadata int key", base(metadata={1: "v"})),
    ("last_event_id int", base(last_event_id=5)),
    ("created_at str", base(created_at="1")),
    ("updated_at bool", base(updated_at=True)),
]

BAD_VALUE = [
    ("empty id", base(id="")),
    ("id over 255 bytes", base(id="a" * 256)),
    ("id over 255 UTF-8 bytes", base(id="é" * 128)),
    ("NUL in id", base(id="a\x00b")),
    ("lone surrogate in id", base(id="a\ud800")),
    ("empty machine", base(machine="")),
    ("NUL in state", base(state="\x00")),
    ("state over 255 bytes", base(state="ж" * 200)),
    ("negative version", base(version=-1)),
    ("version over 63 bits", base(version=2**63)),
    ("unknown status", base(status="archived")),
    ("status None", base(status=None)),
    ("metadata NaN", base(metadata={"k": math.nan})),
    ("metadata int over 64 bits", base(metadata={"k": 2**63})),
    ("metadata int under 64 bits", base(metadata={"k": -(2**63) - 1})),
    ("metadata value over 255 bytes", base(metadata={"k": "v" * 256})),
    ("metadata empty key", base(metadata={"": 1})),
    ("metadata NUL key", base(metadata={"a\x00": 1})),
    ("negative created_at", base(created_at=-1)),
    ("updated_at over 63 bits", base(updated_at=2**63)),
    ("ctx too deep", base(ctx=nested(MAX_DECODE_DEPTH + 1))),
    ("lone surrogate in ctx", base(ctx={"s": "\udfff"})),
    ("lone surrogate in ctx key", base(ctx={"\ud800": 1})),
]


def check_and_encode(inst: Any) -> bytes:
    """What a write does before anything is written."""
    check_instance(inst)
    return encode_instance_body(inst, LIMIT)


@pytest.mark.parametrize(("name", "inst"), BAD_TYPE, ids=[n for n, _ in BAD_TYPE])
def test_bad_types_raise_invalid_type_error(name: str, inst: Instance) -> None:
    with pytest.raises(InvalidTypeError) as caught:
        check_and_encode(inst)
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, StorageError)


@pytest.mark.parametrize(("name", "inst"), BAD_VALUE, ids=[n for n, _ in BAD_VALUE])
def test_bad_values_raise_invalid_input_error(name: str, inst: Instance) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_and_encode(inst)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, StorageError)


@pytest.mark.parametrize("not_an_instance", [None, {"id": "i"}, "i", ("i", "m", 1, "s")])
def test_check_instance_wants_an_instance(not_an_instance: Any) -> None:
    with pytest.raises(InvalidTypeError):
        check_instance(not_an_instance)


GOOD_EDGES = [
    ("id of exactly 255 bytes", base(id="a" * 255)),
    ("id of 255 UTF-8 bytes", base(id="é" * 127 + "a")),
    ("version 0", base(version=0)),
    ("version 2**63 - 1", base(version=2**63 - 1)),
    ("metadata int bounds", base(metadata={"lo": -(2**63), "hi": 2**63 - 1})),
    ("metadata inf", base(metadata={"k": math.inf})),
    ("metadata value of 255 bytes", base(metadata={"k": "v" * 255})),
    ("status deleted", base(status="deleted")),
    ("ctx tuple", base(ctx={"t": (1, 2)})),
]


@pytest.mark.parametrize(("name", "inst"), GOOD_EDGES, ids=[n for n, _ in GOOD_EDGES])
def test_edge_values_are_accepted_and_round_trip(name: str, inst: Instance) -> None:
    out = decode_instance(inst.id.encode(), stored(inst))
    assert out.id == inst.id
    assert out.version == inst.version
    assert out.metadata == inst.metadata
    assert out.status == inst.status
    assert out.ctx == {k: list(v) if type(v) is tuple else v for k, v in inst.ctx.items()}


def test_record_too_large() -> None:
    inst = base(ctx={"blob": b"x" * 3000})
    size = len(encode_instance_body(inst, LIMIT))
    assert encode_instance_body(inst, size)  # exactly at the limit is accepted
    with pytest.raises(RecordTooLargeError, match="max_instance_size") as caught:
        encode_instance_body(inst, size - 1)
    assert isinstance(caught.value, InvalidInputError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(RecordTooLargeError):
        encode_instance_body(base(ctx={"blob": "y" * (LIMIT + 1)}), LIMIT)


# --- golden files (PITFALLS 16) -----------------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_STORE_ID = bytes.fromhex("52535446a1b2c3d4e5f60718293a4b5c")
GOLDEN_SEGMENT_SIZE = 4096
GOLDEN_T0 = 1_700_000_000_000
GOLDEN_INSTANCE_FILE = GOLDEN / "instance-order-1.bin"
GOLDEN_WAL_DIR = GOLDEN / "wal"

GOLDEN_INSTANCE = Instance(
    id="order-1",
    machine="order",
    version=3,
    state="paid",
    ctx={
        "total": 99.5,
        "items": [{"sku": "A-1", "qty": 2}, {"sku": "Б-2", "qty": 1}],
        "note": None,
        "flags": [True, False],
        "raw": b"\x00\xff",
        "big": 2**70,
        "neg": -5,
    },
    metadata={"customer": "alice", "priority": 2, "score": 0.25, "vip": True},
    status="active",
    last_event_id="evt-7",
    last_wal_offset=42,
    created_at=GOLDEN_T0,
    updated_at=GOLDEN_T0 + 123_456,
)


def _golden_put(index: int, blob_size: int) -> Instance:
    return Instance(
        id=f"order-{index}",
        machine="order",
        version=1,
        state="pending",
        ctx={"index": index, "blob": "x" * blob_size},
        metadata={"customer": f"c{index}"},
    )


# (seq, timestamp_ms, changes) with the instance of each put as an Instance
GOLDEN_WAL: list[tuple[int, int, list[list[Any]]]] = [
    (1, GOLDEN_T0 + 1, [[CHANGE_PUT, None, None, _golden_put(1, 10)]]),
    (2, GOLDEN_T0 + 2, [[CHANGE_PUT, None, None, _golden_put(2, 1500)]]),
    (3, GOLDEN_T0 + 3, [[CHANGE_PUT, None, None, _golden_put(3, 2000)]]),
    (
        4,
        GOLDEN_T0 + 4,
        [[CHANGE_PUT, GOLDEN_T0, GOLDEN_T0 + 4, GOLDEN_INSTANCE], [CHANGE_DELETE, "order-2"]],
    ),
    (5, GOLDEN_T0 + 5, [[CHANGE_PUT, None, None, _golden_put(5, 3800)]]),
    (6, GOLDEN_T0 + 6, [[CHANGE_DELETE, "order-3"]]),
]


def _wire(change: list[Any]) -> list[Any]:
    """A change as the WAL carries it."""
    if change[0] == CHANGE_DELETE:
        return change
    kind, created, updated, inst = change
    return [kind, inst.id, created, updated, encode_instance_body(inst, LIMIT)]


def write_golden(directory: Path) -> None:
    """Generate the golden files (run only with RSTMDB_REGEN_GOLDEN=1)."""
    directory.mkdir(parents=True, exist_ok=True)
    inst = GOLDEN_INSTANCE
    body = encode_instance_body(check_instance(inst), LIMIT)
    value = encode_instance_value(
        inst.id.encode(), inst.last_wal_offset, inst.created_at, inst.updated_at, body
    )
    (directory / GOLDEN_INSTANCE_FILE.name).write_bytes(value)
    wal_dir = directory / GOLDEN_WAL_DIR.name
    shutil.rmtree(wal_dir, ignore_errors=True)
    wal_dir.mkdir()
    wal = Wal(wal_dir, GOLDEN_STORE_ID, GOLDEN_SEGMENT_SIZE, FsyncPolicy.never(), 0o644)
    tail = wal.start()
    for seq, timestamp_ms, changes in GOLDEN_WAL:
        assert tail.next_seq == seq
        tail = wal.append(tail, timestamp_ms, cbor2.dumps([_wire(c) for c in changes]))
    wal.close()


def test_golden_files_decode() -> None:
    if os.environ.get("RSTMDB_REGEN_GOLDEN") == "1":
        write_golden(GOLDEN)
    assert GOLDEN_INSTANCE_FILE.is_file(), "golden files missing: run with RSTMDB_REGEN_GOLDEN=1"
    raw = GOLDEN_INSTANCE_FILE.read_bytes()
    assert same_instance(decode_instance(b"order-1", raw), GOLDEN_INSTANCE)
    assert instance_times(b"order-1", raw) == (42, GOLDEN_T0, GOLDEN_T0 + 123_456)
    with pytest.raises(CorruptionError):
        decode_instance(b"order-2", raw)


def _check_golden_change(found: list[Any], expected: list[Any]) -> None:
    if expected[0] == CHANGE_DELETE:
        assert found == expected
        return
    kind, created, updated, inst = expected
    assert found[:4] == [kind, inst.id, created, updated]
    value = encode_instance_value(inst.id.encode(), 9, 1, 2, found[4])
    decoded = decode_instance(inst.id.encode(), value)
    assert decoded.machine == inst.machine
    assert decoded.version == inst.version
    assert decoded.state == inst.state
    assert same(decoded.ctx, inst.ctx)
    assert same(decoded.metadata, inst.metadata)
    assert decoded.status == inst.status
    assert decoded.last_event_id == inst.last_event_id


def test_golden_wal_segments_decode(tmp_path: Path) -> None:
    if os.environ.get("RSTMDB_REGEN_GOLDEN") == "1":
        write_golden(GOLDEN)
    names = sorted(p.name for p in GOLDEN_WAL_DIR.glob("*.wal"))
    assert names == [
        "00000000000000000001.wal",
        "00000000000000000004.wal",
        "00000000000000000005.wal",
    ], "golden WAL changed shape: run with RSTMDB_REGEN_GOLDEN=1 only if that is intended"
    shutil.copytree(GOLDEN_WAL_DIR, tmp_path / "wal")
    for path in (tmp_path / "wal").iterdir():
        path.chmod(0o600)
    wal = Wal(tmp_path / "wal", GOLDEN_STORE_ID, GOLDEN_SEGMENT_SIZE, FsyncPolicy.never(), 0o600)
    try:
        assert wal.segment_store_id(1) == GOLDEN_STORE_ID
        records = list(wal.records(1, len(GOLDEN_WAL)))  # also checks the seals' CRCs
        assert [(r.seq, r.timestamp_ms, r.type) for r in records] == [
            (seq, ts, 1) for seq, ts, _ in GOLDEN_WAL
        ]
        for record, (_, _, changes) in zip(records, GOLDEN_WAL, strict=True):
            where = f"golden record {record.seq}"
            found = [change.encoded() for change in decode_changes(record.payload, where)]
            assert len(found) == len(changes)
            for got, expected in zip(found, changes, strict=True):
                _check_golden_change(got, expected)
        # replay walks the same records, seals included, and cuts nothing
        tail, walked = WalTail(1, SEGMENT_HEADER_SIZE, 1), []
        while (step := wal.next_record(tail, strict=True)) is not None:
            record, tail = step
            if record is not None:
                walked.append(record.seq)
        assert walked == [seq for seq, _, _ in GOLDEN_WAL]
        assert wal.repairs == []
    finally:
        wal.close()


def test_no_tag_that_cbor2_decodes_by_itself_gets_through() -> None:
    """Probe cbor2 for every tag it turns into something: a cbor2 release that adds one must
    fail this test until the tag is added to BUILTIN_TAGS."""
    decoded_by_cbor2 = []
    for number in range(70_000):
        if number in (2, 3):
            continue
        try:
            value = cbor2.loads(tagged(number, 0))
        except cbor2.CBORDecodeError:
            decoded_by_cbor2.append(number)  # it tried, and failed on the content
            continue
        if not isinstance(value, cbor2.CBORTag):
            decoded_by_cbor2.append(number)
    assert decoded_by_cbor2
    assert set(decoded_by_cbor2) <= set(codec.BUILTIN_TAGS)
    for number in decoded_by_cbor2:
        with pytest.raises(DecodeError, match=f"tag {number} "):
            cbor_loads(tagged(number, 0), "probe")
