"""The write-ahead log on its own: class Wal on a temporary directory (rstmdb_storage/wal/).

Tiers (STYLE habit 9): byte tables of the segment header, record framing and seal; hypothesis
round trips across rotations; reading windows and gaps; a torn tail cut at every byte against
damage inside the log that must raise (SPEC guarantee 2, PITFALLS 9); sync policies; fail-stop
after a failed fdatasync (SPEC guarantee 9).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rstmdb_storage.config import FsyncPolicy
from rstmdb_storage.errors import CorruptionError, StorageFailedError, WalGapError
from rstmdb_storage.wal import log as wal_log
from rstmdb_storage.wal.decoder import FramedRecord
from rstmdb_storage.wal.format import (
    RECORD_ALIGN,
    RECORD_CHANGES,
    RECORD_HEADER_SIZE,
    RECORD_SEAL,
    SEAL_RECORD_SIZE,
    SEGMENT_HEADER_SIZE,
    padded,
    segment_name,
)
from rstmdb_storage.wal.log import Wal, WalTail

STORE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
SEG = 64 * 1024
T0 = 1_700_000_000_000
START = WalTail(1, SEGMENT_HEADER_SIZE, 1)

# --- helpers ------------------------------------------------------------------------------------


def open_wal(directory: Path, policy: FsyncPolicy | None = None, segment_size: int = SEG) -> Wal:
    directory.mkdir(parents=True, exist_ok=True)
    return Wal(directory, STORE_ID, segment_size, policy or FsyncPolicy.every_write(), 0o600)


_NONZERO = bytes(range(1, 256))


def payload_for(seq: int, size: int) -> bytes:
    """*size* bytes, none of them zero, different for every seq (so that no 8-byte window of a
    payload looks like a sequence number, and zeroing any payload byte changes it)."""
    k = seq % 255
    pattern = _NONZERO[k:] + _NONZERO[:k]
    return (pattern * (size // 255 + 1))[:size]


def write_log(wal: Wal, sizes: list[int], sync: bool = True) -> WalTail:
    """Start a new log and append one record per size; record n has timestamp T0 + n."""
    tail = wal.start()
    for size in sizes:
        seq = tail.next_seq
        tail = wal.append(tail, T0 + seq, payload_for(seq, size))
        if sync and wal.sync_due():
            wal.sync()
    return tail


def walk(wal: Wal, strict: bool = False, into: list[FramedRecord] | None = None) -> WalTail:
    """Replay from the start with next_record, as opening a store does; records go to *into*."""
    records = into if into is not None else []
    tail = START
    while (step := wal.next_record(tail, strict)) is not None:
        record, tail = step
        if record is not None:
            records.append(record)
    return tail


def walked(wal: Wal, strict: bool = False) -> tuple[list[FramedRecord], WalTail]:
    records: list[FramedRecord] = []
    tail = walk(wal, strict, records)
    return records, tail


def assert_records(records: list[FramedRecord], sizes: list[int], first_seq: int = 1) -> None:
    assert [r.seq for r in records] == list(range(first_seq, first_seq + len(sizes)))
    for record, size in zip(records, sizes, strict=True):
        assert record.type == RECORD_CHANGES
        assert record.timestamp_ms == T0 + record.seq
        assert record.payload == payload_for(record.seq, size)
        assert record.offset % RECORD_ALIGN == 0
        assert record.end == record.offset + RECORD_HEADER_SIZE + padded(size)


def segment_path(directory: Path, first_seq: int) -> Path:
    return directory / segment_name(first_seq)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


def broken_copies(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.broken-*"))


def locate(directory: Path, n: int) -> dict[int, tuple[Path, int, int]]:
    """seq -> (segment path, offset, end) of records 1..n, read with a fresh Wal."""
    wal = open_wal(directory)
    try:
        return {
            r.seq: (segment_path(directory, _segment_of(wal, r.seq)), r.offset, r.end)
            for r in wal.records(1, n)
        }
    finally:
        wal.close()


def _segment_of(wal: Wal, seq: int) -> int:
    return max(i for i in wal.segment_ids() if i <= seq)


@pytest.fixture
def fdatasync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count fdatasync calls (they still happen)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


# --- byte tables --------------------------------------------------------------------------------


def test_segment_header_byte_table(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    assert wal.start() == WalTail(1, 48, 1)
    wal.close()
    path = tmp_path / "00000000000000000001.wal"
    assert segment_files(tmp_path) == [path]
    data = path.read_bytes()
    assert len(data) == SEG  # preallocated
    assert data[0:8] == b"RSTMWAL\x00"
    assert data[8:12] == struct.pack("<I", 1)
    assert data[12:16] == bytes(4)
    assert data[16:24] == struct.pack("<Q", 1)
    assert data[24:40] == STORE_ID
    assert data[40:44] == bytes(4)
    assert data[44:48] == struct.pack("<I", crc32c(data[0:44]))
    assert data[48:] == bytes(SEG - 48)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("size", [0, 1, 5, 7, 8, 9, 15, 16, 17, 100, 1000])
def test_record_framing_byte_table(tmp_path: Path, size: int) -> None:
    wal = open_wal(tmp_path)
    tail = wal.start()
    payload = payload_for(1, size)
    timestamp = 1_234_567_890_123
    tail = wal.append(tail, timestamp, payload)
    pad = (8 - size % 8) % 8
    assert tail == WalTail(1, 48 + 32 + size + pad, 2)
    tail = wal.append(tail, timestamp + 1, b"second")
    wal.close()
    data = (tmp_path / segment_name(1)).read_bytes()
    record = data[48 : 48 + 32 + size + pad]
    # the header, field by field, at the documented offsets
    assert record[0:4] == struct.pack("<I", size)
    assert record[8:16] == struct.pack("<Q", 1)
    assert record[16:24] == struct.pack("<Q", timestamp)
    assert record[24] == RECORD_CHANGES == 1
    assert record[25:32] == bytes(7)
    expected_crc = crc32c(record[0:4] + record[8:32] + payload)
    assert record[4:8] == struct.pack("<I", expected_crc)
    assert record[32 : 32 + size] == payload
    assert record[32 + size :] == bytes(pad)  # zero padding to a multiple of 8
    # the second record starts at the next multiple of 8, with the next sequence number
    second = 48 + len(record)
    assert second % 8 == 0
    assert data[second : second + 4] == struct.pack("<I", 6)
    assert data[second + 8 : second + 16] == struct.pack("<Q", 2)
    assert data[second + 32 : second + 38] == b"second"
    assert data[second + 40 :] == bytes(SEG - second - 40)


def test_seal_record_byte_table(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, segment_size=4096)
    tail = wal.start()
    tail = wal.append(tail, T0 + 1, payload_for(1, 1500))
    tail = wal.append(tail, T0 + 2, payload_for(2, 1500))
    seal_offset = tail.offset
    assert seal_offset == 48 + 2 * (32 + 1504)
    tail = wal.append(tail, T0 + 3, payload_for(3, 1500))  # does not fit: rotates
    assert tail == WalTail(3, 48 + 32 + 1504, 4)
    wal.close()
    first = (tmp_path / segment_name(1)).read_bytes()
    seal = first[seal_offset : seal_offset + SEAL_RECORD_SIZE]
    assert seal[0:4] == struct.pack("<I", 8)
    assert seal[8:16] == struct.pack("<Q", 2)  # the last sequence number in the segment
    assert seal[16:24] == struct.pack("<Q", T0 + 3)
    assert seal[24] == RECORD_SEAL == 2
    assert seal[25:32] == bytes(7)
    records_crc = crc32c(first[48:seal_offset])
    assert seal[32:40] == struct.pack("<I", records_crc) + bytes(4)
    assert seal[4:8] == struct.pack("<I", crc32c(seal[0:4] + seal[8:40]))
    assert first[seal_offset + 40 :] == bytes(4096 - seal_offset - 40)
    second = (tmp_path / segment_name(3)).read_bytes()
    assert len(second) == 4096
    assert second[16:24] == struct.pack("<Q", 3)
    assert second[24:40] == STORE_ID
    assert second[48 + 8 : 48 + 16] == struct.pack("<Q", 3)
    assert [p.name for p in segment_files(tmp_path)] == [segment_name(1), segment_name(3)]


# --- round trips across rotations ---------------------------------------------------------------

record_sizes = st.lists(
    st.one_of(
        st.integers(0, 64),
        st.integers(0, 3000),
        st.integers(3000, 30_000),
        st.integers(SEG - 100, SEG + 40_000),  # larger than a whole segment
    ),
    min_size=1,
    max_size=25,
)


def check_segments(directory: Path, sizes: list[int], segment_size: int) -> None:
    """Every segment is named after its first record; every one but the last ends with a seal
    carrying its last sequence number and the CRC of its records, then zeros."""
    files = segment_files(directory)
    wal = open_wal(directory, segment_size=segment_size)
    try:
        ids = wal.segment_ids()
        assert [p.name for p in files] == [segment_name(i) for i in ids]
        assert ids[0] == 1
        n = len(sizes)
        for index, (first_seq, path) in enumerate(zip(ids, files, strict=True)):
            data = path.read_bytes()
            assert len(data) >= segment_size
            last_seq = ids[index + 1] - 1 if index + 1 < len(ids) else n
            offset = SEGMENT_HEADER_SIZE
            for seq in range(first_seq, last_seq + 1):
                length, _, found_seq = struct.unpack_from("<IIQ", data, offset)
                assert (found_seq, length) == (seq, sizes[seq - 1])
                frame = RECORD_HEADER_SIZE + padded(length)
                if seq != first_seq:  # only a segment's first record may overflow it
                    assert offset + frame + SEAL_RECORD_SIZE <= segment_size
                offset += frame
            if index + 1 < len(ids):
                length, _, seal_seq, _, kind = struct.unpack_from("<IIQQB", data, offset)
                assert (length, seal_seq, kind) == (8, last_seq, RECORD_SEAL)
                records_crc = struct.unpack_from("<I", data, offset + 32)[0]
                assert records_crc == crc32c(data[SEGMENT_HEADER_SIZE:offset])
                offset += SEAL_RECORD_SIZE
            assert data[offset:] == bytes(len(data) - offset)
    finally:
        wal.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=record_sizes)
def test_append_and_read_back_across_rotations(tmp_path_factory: Any, sizes: list[int]) -> None:
    directory = tmp_path_factory.mktemp("wal")
    wal = open_wal(directory, FsyncPolicy.never())
    tail = write_log(wal, sizes)
    wal.close()
    n = len(sizes)
    assert tail.next_seq == n + 1
    check_segments(directory, sizes, SEG)
    reader = open_wal(directory)  # another process reading what this one wrote
    try:
        assert_records(list(reader.records(1, n)), sizes)
        records, end = walked(reader, strict=True)
        assert_records(records, sizes)
        assert end == tail
        assert reader.repairs == []
    finally:
        reader.close()
    shutil.rmtree(directory)


def test_a_record_larger_than_a_segment_gets_a_fresh_one(tmp_path: Path) -> None:
    sizes = [10, 3 * SEG, 10, 2 * SEG, 2 * SEG]
    wal = open_wal(tmp_path)
    write_log(wal, sizes)
    wal.close()
    assert [p.name for p in segment_files(tmp_path)] == [segment_name(i) for i in (1, 2, 3, 4, 5)]
    check_segments(tmp_path, sizes, SEG)
    reader = open_wal(tmp_path)
    assert_records(list(reader.records(1, 5)), sizes)
    reader.close()


# --- reading windows, and gaps ------------------------------------------------------------------

_rng = random.Random(7)
LOG_SIZES = [_rng.choice([5, 60, 700, 4000, 20_000]) for _ in range(200)]
LOG_SIZES[50] = SEG + 500
LOG_SIZES[120] = 2 * SEG


@pytest.fixture(scope="module")
def written_log(tmp_path_factory: Any) -> Path:
    directory = tmp_path_factory.mktemp("log")
    wal = open_wal(directory, FsyncPolicy.never())
    write_log(wal, LOG_SIZES)
    wal.close()
    assert len(segment_files(directory)) >= 8
    return directory


@pytest.fixture
def log_copy(written_log: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "wal"
    shutil.copytree(written_log, directory)
    return directory


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_in_any_window(written_log: Path, data: st.DataObject) -> None:
    n = len(LOG_SIZES)
    first = data.draw(st.integers(1, n), label="from_seq")
    last = data.draw(st.integers(first, n), label="until_seq")
    wal = open_wal(written_log)
    try:
        found = list(wal.records(first, last))
    finally:
        wal.close()
    assert_records(found, LOG_SIZES[first - 1 : last], first_seq=first)


def test_records_empty_and_overlong_windows(written_log: Path) -> None:
    n = len(LOG_SIZES)
    wal = open_wal(written_log)
    try:
        assert list(wal.records(10, 9)) == []
        seen: list[int] = []
        with pytest.raises(WalGapError, match=f"ends at sequence {n}"):
            for record in wal.records(n - 2, n + 1):
                seen.append(record.seq)
        assert seen == [n - 2, n - 1, n]
        with pytest.raises(WalGapError):
            list(wal.records(0, 5))
    finally:
        wal.close()


def test_missing_middle_segment_is_a_gap(log_copy: Path) -> None:
    n = len(LOG_SIZES)
    ids = open_wal(log_copy).segment_ids()
    gone, before, after = ids[3], ids[2], ids[4]
    segment_path(log_copy, gone).unlink()
    wal = open_wal(log_copy)
    try:
        seen: list[int] = []
        with pytest.raises(WalGapError, match=f"{gone}\\.\\.{after - 1} are missing"):
            for record in wal.records(before, n):
                seen.append(record.seq)
        assert seen == list(range(before, gone))  # all that is there is read first
        with pytest.raises(WalGapError):
            list(wal.records(1, n))
        with pytest.raises(WalGapError):
            list(wal.records(gone + 1, gone + 1))  # held only by the missing segment
        assert_records(list(wal.records(after, n)), LOG_SIZES[after - 1 :], first_seq=after)
    finally:
        wal.close()


def test_replay_into_a_missing_middle_segment_raises(log_copy: Path) -> None:
    """Replay that reaches the seal before a missing segment while later segments exist must
    raise, not take the gap for an interrupted rotation (PITFALLS 9: a gap is corruption)."""
    ids = open_wal(log_copy).segment_ids()
    gone = ids[3]
    segment_path(log_copy, gone).unlink()
    wal = open_wal(log_copy)
    try:
        records: list[FramedRecord] = []
        with pytest.raises(CorruptionError):
            walk(wal, into=records)
        assert [r.seq for r in records] == list(range(1, gone))
    finally:
        wal.close()
    assert not segment_path(log_copy, gone).exists()  # no empty segment made up in its place


def test_from_seq_before_the_first_segment_is_a_gap(log_copy: Path) -> None:
    n = len(LOG_SIZES)
    ids = open_wal(log_copy).segment_ids()
    for first_seq in ids[:2]:  # what compaction would delete
        segment_path(log_copy, first_seq).unlink()
    wal = open_wal(log_copy)
    try:
        with pytest.raises(WalGapError, match=f"does not hold sequence 1 .*starts at {ids[2]}"):
            list(wal.records(1, n))
        with pytest.raises(WalGapError):
            list(wal.records(ids[2] - 1, n))
        assert_records(list(wal.records(ids[2], n)), LOG_SIZES[ids[2] - 1 :], first_seq=ids[2])
    finally:
        wal.close()


# --- torn tails: cut at every byte --------------------------------------------------------------


def zero_from(path: Path, start: int, end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))


def check_cut(directory: Path, sizes: list[int], cut: int, image: bytes, where: tuple) -> None:
    """Zero the last record from *cut* on (a crash on a preallocated file), replay, and check
    that exactly the records before the cut come back and the torn bytes are cut."""
    path, offset, end = where
    n = len(sizes)
    for copy in broken_copies(directory):
        copy.unlink()
    path.write_bytes(image)
    zero_from(path, cut, end)
    damaged = path.read_bytes()
    intact = damaged[offset:end] == image[offset:end]
    clean_end = damaged[offset:end] == bytes(end - offset)
    wal = open_wal(directory)
    try:
        records, tail = walked(wal)
        kept = n if intact else n - 1
        assert_records(records, sizes[:kept])
        if intact:
            assert tail.next_seq == n + 1
        else:
            assert (tail.segment, tail.offset, tail.next_seq) == (
                int(path.name[:20]),
                offset,
                n,
            )
        if intact or clean_end:
            assert wal.repairs == []
            assert broken_copies(directory) == []
            assert path.read_bytes() == damaged
        else:
            (repair,) = wal.repairs
            assert repair.path == str(path)
            assert repair.offset == offset
            assert Path(repair.copy_path) == path.with_name(f"{path.name}.broken-{offset}")
            assert Path(repair.copy_path).read_bytes() == damaged
            after = path.read_bytes()
            assert after[:offset] == image[:offset]
            assert after[offset:] == bytes(len(after) - offset)
            assert repair.bytes_cut == len(damaged[offset:].rstrip(b"\x00"))
            # a second replay finds the same records and nothing more to cut
            again = open_wal(directory)
            try:
                records_again, tail_again = walked(again, strict=True)
                assert [r.seq for r in records_again] == list(range(1, n))
                assert tail_again == tail and again.repairs == []
            finally:
                again.close()
    finally:
        wal.close()


def torn_setup(directory: Path, sizes: list[int], segment_size: int = SEG):
    wal = open_wal(directory, segment_size=segment_size)
    write_log(wal, sizes)
    wal.close()
    where = locate(directory, len(sizes))[len(sizes)]
    image = where[0].read_bytes()
    return where, image


@pytest.mark.parametrize(
    ("sizes", "segment_size", "fresh_segment"),
    [
        ([10, 200, 37], SEG, False),
        ([64, 1, 0, 9], SEG, False),  # the last record has an empty payload
        ([100, 3000, 1000], 4096, True),  # the last record opens a new segment after a seal
    ],
)
def test_torn_last_record_cut_at_every_byte(
    tmp_path: Path, sizes: list[int], segment_size: int, fresh_segment: bool
) -> None:
    (path, offset, end), image = torn_setup(tmp_path, sizes, segment_size)
    assert (offset == SEGMENT_HEADER_SIZE and path.name != segment_name(1)) == fresh_segment
    for cut in range(offset, end + 1):  # padding included: cutting zeros changes nothing
        check_cut(tmp_path, sizes, cut, image, (path, offset, end))


def test_torn_record_larger_than_a_segment(tmp_path: Path) -> None:
    sizes = [10, 20, SEG + 1000]
    (path, offset, end), image = torn_setup(tmp_path, sizes)
    cuts = sorted({*range(offset, offset + 48), *range(offset + 48, end, 997), end - 1, end})
    for cut in cuts:
        check_cut(tmp_path, sizes, cut, image, (path, offset, end))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 120), min_size=1, max_size=6))
def test_torn_tail_property(tmp_path_factory: Any, sizes: list[int]) -> None:
    directory = tmp_path_factory.mktemp("torn")
    (path, offset, end), image = torn_setup(directory, sizes)
    for cut in range(offset, end + 1):
        check_cut(directory, sizes, cut, image, (path, offset, end))
    shutil.rmtree(directory)


def test_appending_after_a_cut_tail(tmp_path: Path) -> None:
    sizes = [30, 40, 50]
    (path, offset, end), _ = torn_setup(tmp_path, sizes)
    zero_from(path, offset + 40, end)
    wal = open_wal(tmp_path)
    try:
        tail = walk(wal)
        assert len(wal.repairs) == 1
        assert tail == WalTail(1, offset, 3)
        tail = wal.append(tail, T0 + 3, payload_for(3, 77))
        wal.sync()
        assert_records(list(wal.records(1, 3)), [30, 40, 77])
    finally:
        wal.close()


nonzero_garbage = st.lists(st.integers(1, 255), min_size=1, max_size=200).map(bytes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=nonzero_garbage, gap=st.integers(0, 31))
def test_garbage_after_the_last_record_is_a_torn_tail(
    tmp_path_factory: Any, garbage: bytes, gap: int
) -> None:
    directory = tmp_path_factory.mktemp("garbage")
    sizes = [12, 300, 45]
    wal = open_wal(directory)
    tail = write_log(wal, sizes)
    wal.close()
    path = segment_path(directory, 1)
    with open(path, "r+b") as f:
        f.seek(tail.offset + gap)
        f.write(garbage)
    damaged = path.read_bytes()
    wal = open_wal(directory)
    try:
        records, end = walked(wal)
        assert_records(records, sizes)
        assert end == tail
        (repair,) = wal.repairs
        assert (repair.path, repair.offset) == (str(path), tail.offset)
        assert repair.bytes_cut == gap + len(garbage)
        assert Path(repair.copy_path).read_bytes() == damaged
        after = path.read_bytes()
        assert after[tail.offset :] == bytes(len(after) - tail.offset)
        assert after[: tail.offset] == damaged[: tail.offset]
    finally:
        wal.close()
    shutil.rmtree(directory)


def test_garbage_behind_zeros_is_cut_by_a_strict_replay(tmp_path: Path) -> None:
    sizes = [12, 300]
    wal = open_wal(tmp_path)
    tail = write_log(wal, sizes)
    wal.close()
    path = segment_path(tmp_path, 1)
    with open(path, "r+b") as f:
        f.seek(tail.offset + 64)
        f.write(b"\x99" * 40)
    wal = open_wal(tmp_path)
    try:
        records, end = walked(wal)  # not strict: an all-zero header ends the log
        assert_records(records, sizes)
        assert end == tail and wal.repairs == []
        records, end = walked(wal, strict=True)
        assert_records(records, sizes)
        assert end == tail
        (repair,) = wal.repairs
        assert repair.offset == tail.offset
        assert path.read_bytes()[tail.offset :] == bytes(SEG - tail.offset)
    finally:
        wal.close()


# --- damage inside the log is never cut ---------------------------------------------------------


def flip_bit(path: Path, bit_offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit_offset // 8)
        byte = f.read(1)[0]
        f.seek(bit_offset // 8)
        f.write(bytes([byte ^ (1 << (bit_offset % 8))]))


def assert_damage_raises(directory: Path, path: Path, offset: int, n: int, bad_seq: int) -> None:
    """Replay and records() both raise a CorruptionError naming *path* and *offset*; nothing is
    cut or copied, and the records before *bad_seq* were returned first."""
    before = path.read_bytes()
    wal = open_wal(directory)
    try:
        records: list[FramedRecord] = []
        with pytest.raises(CorruptionError) as caught:
            walk(wal, into=records)
        error = caught.value
        assert error.path == str(path)
        assert error.offset == offset
        assert str(path) in str(error)
        assert f"offset {offset}" in str(error)
        assert [r.seq for r in records] == list(range(1, bad_seq))
        assert wal.repairs == []
        with pytest.raises(CorruptionError) as caught:
            list(wal.records(1, n))
        assert caught.value.path == str(path)
    finally:
        wal.close()
    assert path.read_bytes() == before
    assert broken_copies(directory) == []


def test_flipped_bit_before_a_good_record_raises(tmp_path: Path) -> None:
    sizes = [50, 20, 30, 40]
    wal = open_wal(tmp_path)
    write_log(wal, sizes)
    wal.close()
    where = locate(tmp_path, len(sizes))
    for seq in (1, 2, 3):  # each followed by a good record
        path, offset, end = where[seq]
        for bit in range(offset * 8, end * 8):  # header, payload and padding
            flip_bit(path, bit)
            try:
                assert_damage_raises(tmp_path, path, offset, len(sizes), seq)
            finally:
                flip_bit(path, bit)
    # undamaged again: everything reads back
    records, _ = walked(open_wal(tmp_path))
    assert_records(records, sizes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flipped_bit_anywhere_before_the_last_record_raises(
    log_copy_factory: Any, data: st.DataObject
) -> None:
    directory, where = log_copy_factory
    n = len(LOG_SIZES)
    seq = data.draw(st.integers(1, n - 1), label="damaged record")
    path, offset, _ = where[seq]
    covered = RECORD_HEADER_SIZE + LOG_SIZES[seq - 1]
    bit = data.draw(st.integers(offset * 8, (offset + covered) * 8 - 1), label="bit")
    flip_bit(path, bit)
    try:
        assert_damage_raises(directory, path, offset, n, seq)
    finally:
        flip_bit(path, bit)


@pytest.fixture(scope="module")
def log_copy_factory(written_log: Path, tmp_path_factory: Any) -> Iterator[tuple[Path, dict]]:
    directory = tmp_path_factory.mktemp("flips") / "wal"
    shutil.copytree(written_log, directory)
    yield directory, locate(directory, len(LOG_SIZES))


def _sealed_log(directory: Path) -> tuple[list[int], list[int]]:
    sizes = [300, 1200, 1000, 1500, 800, 700, 1600, 40]
    wal = open_wal(directory, segment_size=4096)
    write_log(wal, sizes)
    wal.close()
    ids = open_wal(directory, segment_size=4096).segment_ids()
    assert len(ids) >= 3
    return sizes, ids


def test_damaged_record_in_a_sealed_segment_raises(tmp_path: Path) -> None:
    sizes, ids = _sealed_log(tmp_path)
    n = len(sizes)
    where = locate(tmp_path, n)
    path = segment_path(tmp_path, ids[0])
    last_in_first = ids[1] - 1
    cases = []
    for seq in (1, last_in_first):  # the last record of a sealed segment is no torn tail
        _, offset, _ = where[seq]
        cases.append(("flip", seq, offset, (offset + 20) * 8 + 3))
        cases.append(("flip", seq, offset, (offset + RECORD_HEADER_SIZE) * 8))
    _, offset, end = where[last_in_first]
    cases.append(("zero", last_in_first, offset, offset + 40))  # looks torn; a later segment exists
    cases.append(("flip", last_in_first + 1, end, (end + 30) * 8))  # the seal itself
    image = path.read_bytes()
    for kind, bad_seq, offset, position in cases:
        path.write_bytes(image)
        if kind == "flip":
            flip_bit(path, position)
        else:
            zero_from(path, position, where[last_in_first][2])
        assert_damage_raises(tmp_path, path, offset, n, bad_seq)
    path.write_bytes(image)
    records, _ = walked(open_wal(tmp_path, segment_size=4096))
    assert_records(records, sizes)


def test_flipped_padding_is_damage_named_by_offset(tmp_path: Path) -> None:
    sizes, _ = _sealed_log(tmp_path)
    where = locate(tmp_path, len(sizes))
    path, offset, end = where[1]
    assert end > offset + RECORD_HEADER_SIZE + sizes[0]  # record 1 has padding
    flip_bit(path, (end - 1) * 8)
    wal = open_wal(tmp_path)
    try:
        with pytest.raises(CorruptionError, match="non-zero padding") as caught:
            list(wal.records(1, len(sizes)))
        assert (caught.value.path, caught.value.offset) == (str(path), offset)
    finally:
        wal.close()


def test_damaged_segment_header_raises(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write_log(wal, [10, 20])
    wal.close()
    path = segment_path(tmp_path, 1)
    image = path.read_bytes()
    for bit in range(0, 48 * 8, 7):
        path.write_bytes(image)
        flip_bit(path, bit)
        wal = open_wal(tmp_path)
        with pytest.raises(CorruptionError) as caught:
            walk(wal)
        assert (caught.value.path, caught.value.offset) == (str(path), 0)
        wal.close()
    path.write_bytes(image)
    stranger = Wal(tmp_path, bytes(16), SEG, FsyncPolicy.never(), 0o600)
    with pytest.raises(CorruptionError, match="belongs to store"):
        walk(stranger)
    stranger.close()


# --- sync policies ------------------------------------------------------------------------------


def test_sync_due_every_write(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.every_write())
    tail = wal.start()
    for seq in range(1, 6):
        tail = wal.append(tail, T0 + seq, b"x")
        assert wal.sync_due()
        before = len(fdatasync_calls)
        wal.sync()
        assert len(fdatasync_calls) == before + 1
    wal.close()


def test_sync_due_every_n(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.every_n(3))
    tail = wal.start()
    due = []
    for seq in range(1, 10):
        tail = wal.append(tail, T0 + seq, b"x")
        due.append(wal.sync_due())
        if due[-1]:
            wal.sync()
    assert due == [False, False, True] * 3
    assert len(fdatasync_calls) == 3
    wal.close()


def test_sync_due_never(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.never())
    tail = wal.start()
    for seq in range(1, 50):
        tail = wal.append(tail, T0 + seq, b"x")
        assert not wal.sync_due()
    assert fdatasync_calls == []
    wal.close()  # close syncs what was appended
    assert len(fdatasync_calls) == 1


def test_sync_due_every_ms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(wal_log, "time", Clock)
    wal = open_wal(tmp_path, FsyncPolicy.every_ms(50))
    tail = wal.append(wal.start(), T0, b"x")
    assert not wal.sync_due()
    now[0] += 0.049
    assert not wal.sync_due()
    now[0] += 0.001
    assert wal.sync_due()
    wal.sync()
    assert not wal.sync_due()
    wal.append(tail, T0 + 1, b"y")
    wal.close()


def test_sync_covers_every_segment_appended_to(tmp_path: Path, fdatasync_calls: list[int]) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.never(), segment_size=4096)
    tail = wal.start()
    for seq in range(1, 4):
        tail = wal.append(tail, T0 + seq, payload_for(seq, 1500))
    assert len(fdatasync_calls) == 1  # the sealed segment, synced at rotation
    wal.sync()
    assert len(fdatasync_calls) == 2
    wal.sync()  # nothing new
    assert len(fdatasync_calls) == 2
    wal.close()


# --- fail-stop after a failed fdatasync ---------------------------------------------------------


def _eio(fd: int) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def assert_failed_stop(wal: Wal, tail: WalTail, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed sync: every append and every sync raises, and fdatasync is never retried."""
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    assert not wal.usable
    path = segment_path(wal.directory, tail.segment)
    before = path.read_bytes()
    for attempt in range(3):
        with pytest.raises(StorageFailedError, match="reopen"):
            wal.append(tail, T0 + 1000 + attempt, b"after the failure")
        with pytest.raises(StorageFailedError):
            wal.sync()
    assert path.read_bytes() == before  # nothing was written
    wal.close()  # closes without syncing or raising
    assert calls == []


def test_failed_fdatasync_refuses_every_later_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.every_write())
    tail = write_log(wal, [10, 20])
    tail = wal.append(tail, T0 + 3, b"unsynced")
    monkeypatch.setattr(os, "fdatasync", _eio)
    with pytest.raises(StorageFailedError) as caught:
        wal.sync()
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EIO
    assert str(segment_path(tmp_path, 1)) in str(caught.value)
    assert_failed_stop(wal, tail, monkeypatch)


def test_failed_fdatasync_at_rotation_refuses_every_later_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seal's sync fails while this process has nothing else unsynced (every_write synced
    the records already): sync() must still refuse, not succeed by having nothing to do."""
    wal = open_wal(tmp_path, FsyncPolicy.every_write(), segment_size=4096)
    tail = write_log(wal, [1500, 1500])
    monkeypatch.setattr(os, "fdatasync", _eio)
    with pytest.raises(StorageFailedError):
        wal.append(tail, T0 + 3, payload_for(3, 1500))  # rotates: seals and syncs segment 1
    assert segment_files(tmp_path) == [segment_path(tmp_path, 1)]  # no new segment
    assert_failed_stop(wal, tail, monkeypatch)


def test_failed_fdatasync_under_never_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal = open_wal(tmp_path, FsyncPolicy.never())
    tail = write_log(wal, [10, 20, 30])
    monkeypatch.setattr(os, "fdatasync", _eio)
    with pytest.raises(StorageFailedError):
        wal.close()  # close syncs what was appended, and that fails
    wal = open_wal(tmp_path, FsyncPolicy.never())  # a reopened WAL reads what is on disk
    try:
        assert_records(list(wal.records(1, 3)), [10, 20, 30])
        assert tail.next_seq == 4
    finally:
        monkeypatch.undo()
        wal.close()
