"""The byte layouts documented in module docstrings match the code (STYLE habit 1).

``rstmdb_storage/wal/format.py`` and ``rstmdb_storage/codec.py`` describe their on-disk formats
as tables of ``offset  size  field`` lines. These tests parse those tables and the prose around
them and compare them with the struct formats and constants, so that the prose cannot drift from
the code (etcd's ``doc.go`` says CRC32 while its code uses Castagnoli; not here).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import struct
from dataclasses import dataclass
from types import ModuleType

import cbor2
import pytest
from crc32c import crc32c

from rstmdb_storage import changes, codec
from rstmdb_storage.errors import DecodeError
from rstmdb_storage.model import Instance
from rstmdb_storage.wal import decoder, encoder, group_commit
from rstmdb_storage.wal import format as wal_format

# --- parsing the docstrings ---------------------------------------------------------------------

_TABLE_HEADER = re.compile(r"^(\s*)offset\s+size\s+field\s*$")
_ROW = re.compile(r"^\s+(\d+|\d+\+n)\s+(\d+|n|pad)\s+(\S+)\s*(.*)$")


@dataclass(frozen=True)
class Row:
    offset: str  # "12", or "32+n"
    size: str  # "4", "n" or "pad"
    field: str
    text: str  # the description, continuation lines joined

    @property
    def start(self) -> int:
        return int(self.offset)

    @property
    def length(self) -> int:
        return int(self.size)


def doc_tables(module: ModuleType) -> list[list[Row]]:
    """Every ``offset size field`` table in the module docstring, in order."""
    lines = (module.__doc__ or "").splitlines()
    tables: list[list[Row]] = []
    i = 0
    while i < len(lines):
        if not _TABLE_HEADER.match(lines[i]):
            i += 1
            continue
        i += 2  # the header and its ------ underline
        rows: list[Row] = []
        while i < len(lines) and lines[i].strip():
            match = _ROW.match(lines[i])
            if match:
                rows.append(Row(*match.groups()))
            else:  # a continuation of the previous row's description
                assert rows, f"table row expected, got {lines[i]!r}"
                last = rows[-1]
                rows[-1] = dataclasses.replace(last, text=f"{last.text} {lines[i].strip()}")
            i += 1
        tables.append(rows)
    return tables


def struct_layout(fmt: str) -> list[tuple[int, int, str]]:
    """(offset, size, code) of each item of a little-endian struct format; padding is 'x'."""
    assert fmt.startswith("<"), f"{fmt!r}: on-disk formats are little-endian with no alignment"
    items, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        n = int(count) if count else 1
        if code in "sx":
            size = struct.calcsize("<" + f"{n}{code}")
            items.append((offset, size, code))
            offset += size
        else:
            for _ in range(n):
                size = struct.calcsize("<" + code)
                items.append((offset, size, code))
                offset += size
    assert offset == struct.calcsize(fmt)
    return items


def source_field_names(module: ModuleType, constant: str) -> list[str]:
    """The field names in the comment after ``CONSTANT = struct.Struct("...")``."""
    source = inspect.getsource(module)
    match = re.search(rf"^{constant} = struct\.Struct\(\"[^\"]*\"\)\s*#\s*(.+)$", source, re.M)
    assert match, f"{module.__name__}.{constant} has no comment naming its fields"
    return [name.strip() for name in match.group(1).split(",")]


_CODE_FOR_DOC_TYPE = {"u32 LE": "I", "u64 LE": "Q"}


def assert_rows_match_struct(rows: list[Row], packer: struct.Struct, names: list[str], base: int):
    """Documented rows == the struct's items (named ones by name, 'reserved' ones as padding),
    the struct placed at offset *base* of the table."""
    layout = struct_layout(packer.format)
    assert len(rows) == len(layout), (rows, layout)
    named = iter(names)
    for row, (offset, size, code) in zip(rows, layout, strict=True):
        assert row.start == base + offset, f"{row.field}: documented at {row.start}"
        assert row.length == size, f"{row.field}: documented as {row.length} bytes, struct {size}"
        if row.field == "reserved":
            assert code == "x", f"reserved bytes at {row.start} are a {code!r} field in the struct"
            assert "zero" in row.text
        else:
            assert code != "x", f"{row.field} at {row.start} is padding in the struct"
            assert row.field == next(named), f"{row.field}: named otherwise in the struct comment"
            for doc_type, doc_code in _CODE_FOR_DOC_TYPE.items():
                if row.text.startswith(doc_type):
                    assert code == doc_code, f"{row.field}: documented {doc_type}, struct {code!r}"
    assert list(named) == []


def assert_contiguous(rows: list[Row]) -> None:
    """Every fixed-size row ends where the next row starts."""
    for row, following in itertools.pairwise(rows):
        if row.size.isdigit() and following.offset.isdigit():
            assert row.start + row.length == following.start, (row, following)


def documented_constants(module: ModuleType) -> dict[str, int]:
    """``NAME (value)`` mentions in the docstring, e.g. ``RECORD_SEAL (2)``."""
    found = re.findall(r"\b([A-Z][A-Z_]{2,})\s+\((\d+)\)", module.__doc__ or "")
    return {name: int(value) for name, value in found}


# --- wal/format.py ------------------------------------------------------------------------------

WAL_TABLES = doc_tables(wal_format)
SEGMENT_ROWS, RECORD_ROWS = WAL_TABLES


def test_wal_format_documents_two_tables() -> None:
    assert len(WAL_TABLES) == 2
    assert [r.field for r in SEGMENT_ROWS] == [
        "magic",
        "version",
        "reserved",
        "first_seq",
        "store_id",
        "reserved",
        "crc32c",
    ]
    assert [r.field for r in RECORD_ROWS] == [
        "length",
        "crc32c",
        "seq",
        "timestamp_ms",
        "type",
        "reserved",
        "payload",
        "zero",  # the padding row: "32+n  pad  zero up to a multiple of 8"
    ]


def test_segment_header_table_matches_struct() -> None:
    assert_contiguous(SEGMENT_ROWS)
    *fields, crc_row = SEGMENT_ROWS
    assert_rows_match_struct(
        fields, wal_format.SEGMENT_HEADER, source_field_names(wal_format, "SEGMENT_HEADER"), 0
    )
    assert crc_row.field == "crc32c"
    assert crc_row.start == wal_format.SEGMENT_HEADER.size
    assert crc_row.length == wal_format.SEGMENT_HEADER_CRC.size == 4
    assert crc_row.start + crc_row.length == wal_format.SEGMENT_HEADER_SIZE == 48
    assert "48-byte header" in wal_format.__doc__
    # "CRC-32C of bytes 0..44": the CRC covers exactly the bytes before it.
    covered = re.search(r"CRC-32C of bytes 0\.\.(\d+)", crc_row.text)
    assert covered and int(covered.group(1)) == crc_row.start
    header = encoder.encode_segment_header(7, bytes(range(16)))
    assert len(header) == wal_format.SEGMENT_HEADER_SIZE
    assert header[crc_row.start :] == crc32c(header[: crc_row.start]).to_bytes(4, "little")


def test_segment_header_constants_match_prose() -> None:
    doc = wal_format.__doc__
    magic = re.search(r'SEGMENT_MAGIC, b"([^"]*)"', doc)
    assert magic
    assert magic.group(1).encode().decode("unicode_escape").encode() == wal_format.SEGMENT_MAGIC
    store_id_row = next(r for r in SEGMENT_ROWS if r.field == "store_id")
    assert store_id_row.length == wal_format.STORE_ID_SIZE
    header = encoder.encode_segment_header(52117, bytes(range(16)))
    for row in SEGMENT_ROWS:
        if row.field == "reserved":
            assert header[row.start : row.start + row.length] == bytes(row.length)
    first_seq_row = next(r for r in SEGMENT_ROWS if r.field == "first_seq")
    assert int.from_bytes(header[first_seq_row.start : first_seq_row.start + 8], "little") == 52117


def test_record_header_table_matches_struct() -> None:
    assert_contiguous(RECORD_ROWS)
    header_rows = [r for r in RECORD_ROWS if r.size.isdigit()]
    payload_row, pad_row = [r for r in RECORD_ROWS if not r.size.isdigit()]
    assert_rows_match_struct(
        header_rows, wal_format.RECORD_HEADER, source_field_names(wal_format, "RECORD_HEADER"), 0
    )
    assert payload_row.field == "payload"
    assert payload_row.start == wal_format.RECORD_HEADER_SIZE == 32
    assert "32-byte header" in wal_format.__doc__
    assert pad_row.offset == f"{wal_format.RECORD_HEADER_SIZE}+n"
    assert pad_row.size == "pad"
    assert f"multiple of {wal_format.RECORD_ALIGN}" in pad_row.text
    # "CRC-32C of bytes 0..4 and 8..32 of this header, then the payload"
    crc_row = next(r for r in RECORD_ROWS if r.field == "crc32c")
    spans = re.findall(r"(\d+)\.\.(\d+)", crc_row.text)
    assert [(int(a), int(b)) for a, b in spans] == [
        (0, crc_row.start),
        (crc_row.start + crc_row.length, wal_format.RECORD_HEADER_SIZE),
    ]


def test_record_framing_follows_the_table() -> None:
    payload = b"\x01\x02\x03\x04\x05"
    frame = encoder.encode_record(9, 1_700_000_000_123, wal_format.RECORD_CHANGES, payload)
    by_field = {r.field: r for r in RECORD_ROWS}

    def field(name: str) -> bytes:
        row = by_field[name]
        return frame[row.start : row.start + row.length]

    assert int.from_bytes(field("length"), "little") == len(payload)
    assert int.from_bytes(field("seq"), "little") == 9
    assert int.from_bytes(field("timestamp_ms"), "little") == 1_700_000_000_123
    assert field("type")[0] == wal_format.RECORD_CHANGES
    assert field("reserved") == bytes(by_field["reserved"].length)
    crc = crc32c(payload, crc32c(frame[8:32], crc32c(frame[:4])))
    assert int.from_bytes(field("crc32c"), "little") == crc
    assert frame[32 : 32 + len(payload)] == payload
    assert len(frame) % wal_format.RECORD_ALIGN == 0
    assert frame[32 + len(payload) :] == bytes(len(frame) - 32 - len(payload))


def test_documented_constants_have_the_documented_values() -> None:
    constants = documented_constants(wal_format)
    assert constants == {
        "SEGMENT_VERSION": 1,
        "RECORD_CHANGES": 1,
        "RECORD_SEAL": 2,
    }
    for name, value in constants.items():
        assert getattr(wal_format, name) == value, name
    assert "multiple of 8 (RECORD_ALIGN)" in wal_format.__doc__
    assert wal_format.RECORD_ALIGN == 8
    assert wal_format.RECORD_TYPES == (wal_format.RECORD_CHANGES, wal_format.RECORD_SEAL)


def test_seal_payload_matches_prose() -> None:
    doc = " ".join(wal_format.__doc__.split())
    size = re.search(r"its payload is (\d+) bytes, the CRC-32C \(u32 LE\)", doc)
    assert size and int(size.group(1)) == wal_format.SEAL_PAYLOAD.size == 8
    assert "then 4 zero bytes" in doc
    assert struct_layout(wal_format.SEAL_PAYLOAD.format) == [(0, 4, "I"), (4, 4, "x")]
    assert wal_format.SEAL_RECORD_SIZE == wal_format.RECORD_HEADER_SIZE + 8 == 40
    frame = encoder.encode_seal(41, 5, 0xDEADBEEF)
    assert len(frame) == wal_format.SEAL_RECORD_SIZE
    assert frame[32:] == (0xDEADBEEF).to_bytes(4, "little") + bytes(4)
    assert frame[24] == wal_format.RECORD_SEAL


def test_segment_name_examples_in_prose() -> None:
    examples = re.findall(r"^\s+(\d+\.wal)\s+records (\d+) \.\.", wal_format.__doc__, re.M)
    assert len(examples) == 2
    for name, first_seq in examples:
        assert len(name) == 20 + len(wal_format.SEGMENT_SUFFIX)
        assert wal_format.parse_segment_name(name) == int(first_seq)
        assert wal_format.segment_name(int(first_seq)) == name
    assert "zero-padded to 20 digits" in wal_format.__doc__
    assert wal_format.segment_name(2**64 - 1) == f"{2**64 - 1}.wal"
    assert wal_format.parse_segment_name("00000000000000000001.wal.tmp") is None
    assert wal_format.parse_segment_name("1.wal") is None


def test_change_layout_in_prose() -> None:
    doc = changes.__doc__
    put = re.search(
        r"\[(\d+), id, created_at \| null, updated_at \| null, body, condition\?\]\s+put", doc
    )
    delete = re.search(r"\[(\d+), id, condition\?\]\s+delete", doc)
    condition = re.search(r"``\[expected_state \| null, expected_seq \| null\]``", doc)
    assert put and int(put.group(1)) == changes.CHANGE_PUT == 1
    assert delete and int(delete.group(1)) == changes.CHANGE_DELETE == 2
    assert condition
    body = codec.encode_instance_body(Instance(id="a", machine="m", version=1, state="s"), 1 << 20)
    good = [
        [changes.CHANGE_PUT, "a", None, 5, body],
        [changes.CHANGE_PUT, "a", None, 5, body, ["paid", None]],
        [changes.CHANGE_DELETE, "a"],
        [changes.CHANGE_DELETE, "a", [None, 7]],
        [changes.CHANGE_MACHINE, "order", 1, cbor2.dumps({"states": ["a"]})],
        [changes.CHANGE_IDEMPOTENCY, "request-1", 86_400_000],
    ]
    idempotency = re.search(r"\[(\d+), key, retention_ms\]\s+idempotency key", doc)
    assert idempotency and int(idempotency.group(1)) == changes.CHANGE_IDEMPOTENCY == 4
    machine = re.search(r"\[(\d+), name, version, definition\]\s+put a machine", doc)
    assert machine and int(machine.group(1)) == changes.CHANGE_MACHINE == 3
    decoded = changes.decode_changes(cbor2.dumps(good), "doc")
    assert [type(change) for change in decoded] == [
        changes.PutInstance,
        changes.PutInstance,
        changes.DeleteInstance,
        changes.DeleteInstance,
        changes.PutMachine,
        changes.IdempotencyKey,
    ]
    assert decoded[1].condition == changes.Condition("paid", None)
    assert [change.encoded() for change in decoded] == good
    assert cbor2.loads(changes.encode_changes(decoded, 1 << 20)) == good
    for bad in (
        [[changes.CHANGE_PUT, "a", None, None]],  # four fields
        [[changes.CHANGE_DELETE, "a", None]],  # a condition that is not one
        [[changes.CHANGE_DELETE, "a", [None, None]]],  # a condition of nothing
        [[changes.CHANGE_PUT, "a", None, 5, b"body", ["paid"]]],  # half a condition
        [[changes.CHANGE_DELETE, "a", [1, 2]]],  # a state that is not text
        [[changes.CHANGE_MACHINE, "order", "1", b"x"]],  # a version that is not an int
        [[changes.CHANGE_IDEMPOTENCY, "request-1", 0]],  # no retention
        [[9, "a"]],  # unknown kind
    ):
        with pytest.raises(DecodeError):
            changes.decode_changes(cbor2.dumps(bad), "doc")


def test_the_wal_leaves_the_payload_to_the_changes_module() -> None:
    assert "rstmdb_storage.changes" in wal_format.__doc__
    assert not hasattr(wal_format, "CHANGE_PUT")
    assert not hasattr(decoder, "decode_changes")


# --- codec.py -----------------------------------------------------------------------------------

CODEC_TABLES = doc_tables(codec)


def test_codec_documents_two_tables() -> None:
    assert len(CODEC_TABLES) == 2
    envelope, instance = CODEC_TABLES
    assert [r.field for r in envelope] == ["crc32c", "version", "payload"]
    assert [r.field for r in instance] == [
        "last_wal_offset",
        "created_at",
        "updated_at",
        "body",
    ]


def test_envelope_table_matches_struct() -> None:
    envelope, _ = CODEC_TABLES
    assert_contiguous(envelope)
    *fields, payload = envelope
    assert_rows_match_struct(
        fields, codec.ENVELOPE_HEADER, source_field_names(codec, "ENVELOPE_HEADER"), 0
    )
    assert payload.start == codec.ENVELOPE_HEADER_SIZE == 5
    assert payload.size == "n"
    assert "little-endian" in envelope[0].text
    assert "ENVELOPE_VERSION (1)" in envelope[1].text
    assert codec.ENVELOPE_VERSION == 1
    # "over the key's bytes followed by bytes 4..end of the envelope"
    assert "bytes 4..end" in envelope[0].text
    assert envelope[1].start == 4


def test_instance_table_matches_struct() -> None:
    _, instance = CODEC_TABLES
    assert_contiguous(instance)
    *fields, body = instance
    assert fields[0].start == codec.ENVELOPE_HEADER_SIZE
    assert_rows_match_struct(
        fields,
        codec.INSTANCE_FIXED,
        source_field_names(codec, "INSTANCE_FIXED"),
        codec.ENVELOPE_HEADER_SIZE,
    )
    assert body.field == "body"
    assert body.start == codec.INSTANCE_BODY_OFFSET == 29
    for row in fields:
        assert row.text.startswith("u64 LE")


def test_instance_body_fields_match_the_model() -> None:
    _, instance = CODEC_TABLES
    body = instance[-1]
    listed = re.search(r"\[([a-z_, ]+)\]", body.text)
    assert listed
    names = [name.strip() for name in listed.group(1).split(",")]
    assert len(names) == codec.INSTANCE_BODY_FIELDS == 7
    model_fields = [f.name for f in dataclasses.fields(Instance)]
    # id is the key; the three fixed fields follow the body in the dataclass.
    assert names == model_fields[1 : 1 + codec.INSTANCE_BODY_FIELDS]
    fixed = [r.field for r in instance[:-1]]
    assert fixed == model_fields[1 + codec.INSTANCE_BODY_FIELDS :]


def test_codec_prose_constants() -> None:
    doc = codec.__doc__
    assert "``MAX_DECODE_DEPTH``" in doc
    tags = re.search(r"other than bignums \((\d+), (\d+)\)", doc)
    assert tags and {int(tags.group(1)), int(tags.group(2))} == set(codec.ALLOWED_TAGS) == {2, 3}
    # The tags named as refused in the prose are among the ones refused explicitly.
    for number in (35, 36, 4):
        assert f"tag {number}" in doc
        assert number in codec.BUILTIN_TAGS


def test_group_commit_position_tables_match_structs() -> None:
    """The append lock's table, then the sync lock's, each field for field as packed."""
    tables = doc_tables(group_commit)
    constants = ["_APPEND_POSITION", "_SYNC_POSITION"]
    assert len(tables) == len(constants)
    for rows, constant in zip(tables, constants, strict=True):
        assert_contiguous(rows)
        packer = getattr(group_commit, constant)
        layout = struct_layout(packer.format)
        names = source_field_names(group_commit, constant)
        assert [(r.start, r.length, r.field) for r in rows] == [
            (offset, size, name) for (offset, size, _), name in zip(layout, names, strict=True)
        ]
        for row, (_, _, code) in zip(rows, layout, strict=True):
            assert (code == "Q") == row.text.startswith("u64 LE"), row
