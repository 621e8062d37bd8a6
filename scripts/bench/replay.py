"""WAL replay on open: ``Storage.open`` rebuilding a lost ``indexes/`` from the WAL, against
the floor (the same frames read, checked, decoded and put into a raw LMDB with their index
entries) and the ceiling (reading the frames' bytes alone)."""

from __future__ import annotations

import gc
import mmap
import shutil
import time
from pathlib import Path

import cbor2
import crc32c

from bench import floor
from bench.ceiling import wal_frame, wal_payload
from bench.data import fields_of, instance_id, make_instance
from bench.floor import FloorEnv
from bench.stores import Bench, fast_config, sync_tree
from rstmdb_storage import Storage
from rstmdb_storage.wal.format import RECORD_CHANGES, RECORD_HEADER, RECORD_HEADER_SIZE, padded

REPLAY_GOAL = 120_000
"""SPEC.md's goal for recovery replay, in WAL records per second on open."""

REPLAY_TXN_RECORDS = 2_000
"""Records per write transaction of the replay floor (the store replays 2,000 per txn)."""

READ_CHUNK = 1 << 20


def replay_floor(frames: Path, directory: Path) -> int:
    """The replay floor: read the WAL frames (:func:`bench.ceiling.wal_frame`) back to back
    in ``frames`` (mmap), check each frame's type and CRC32C as the store's WAL does, decode
    its payload (the changes) and each change's body (for the index entries), and put the
    sealed value and its index entries into a fresh :class:`~bench.floor.FloorEnv` in
    ``directory``, :data:`REPLAY_TXN_RECORDS` records per write transaction with the applied
    sequence number. Returns how many records it applied."""
    env = FloorEnv(directory)
    header, unpack = RECORD_HEADER_SIZE, RECORD_HEADER.unpack_from
    crc, loads, decode = crc32c.crc32c, cbor2.loads, floor.decode_body
    value_of, put, count = floor.instance_value, floor.put_value, 0
    try:
        with open(frames, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view, offset, end = memoryview(m), 0, len(m)
            try:
                while offset < end:
                    with env.begin_write() as txn:
                        for _ in range(REPLAY_TXN_RECORDS):
                            if offset >= end:
                                break
                            length, checksum, seq, ms, kind = unpack(view, offset)
                            stop = offset + header + length
                            # the CRC covers bytes 0..4 and 8..32 of the header, then the payload
                            if (
                                crc(view[offset + 8 : stop], crc(view[offset : offset + 4]))
                                != checksum
                                or kind != RECORD_CHANGES
                            ):
                                raise RuntimeError(f"replay floor: bad frame at {offset}")
                            for _, iid, _, _, body, *_ in loads(view[offset + header : stop]):
                                key = iid.encode()
                                put(
                                    env,
                                    txn,
                                    key,
                                    value_of(key, seq, ms, body),
                                    decode(body),
                                    ms,
                                )
                            offset += header + padded(length)
                            count += 1
                        floor.put_applied(env, txn, count.to_bytes(8, "little"))
            finally:
                view.release()
    finally:
        env.close()
    return count


def replay_ceiling(frames: Path) -> int:
    """The replay ceiling: read the frames' file, :data:`READ_CHUNK` at a time. Returns its
    size."""
    size = 0
    with open(frames, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            size += len(chunk)
    return size


def path_replay(bench: Bench) -> dict[str, float]:
    """Records per second of ``Storage.open`` rebuilding a deleted ``indexes/`` from
    ``replay_records`` single-put WAL records, of the floor and of the ceiling (the same
    records, in one file of frames)."""
    n = bench.settings.replay_records
    data_dir = bench.path("ours-replay")
    config = fast_config(data_dir)
    fields = fields_of("replay", range(n))
    with Storage.open(config) as storage:
        first_seq = storage.put_instance(make_instance(fields[0]))
        put = storage.put_instance
        for f in fields[1:]:
            put(make_instance(f))
        last_seq = storage.applied_seq
    if first_seq != 1 or last_seq != n:
        raise RuntimeError(f"replay store: sequence numbers {first_seq}..{last_seq}")
    frames = bench.path("floor-frames") / "frames"
    with open(frames, "wb") as out:
        for seq, f in enumerate(fields, start=1):
            out.write(wal_frame(seq, wal_payload(f)))
    sync_tree(data_dir)
    sync_tree(frames.parent)
    del fields
    indexes = data_dir / "indexes"
    last_id = instance_id("replay", n - 1)

    def ours() -> float:
        shutil.rmtree(indexes)
        gc.collect()
        start = time.perf_counter()
        storage = Storage.open(config)
        elapsed = time.perf_counter() - start
        try:
            if storage.applied_seq != n or storage.get_instance(last_id) is None:
                raise RuntimeError(
                    f"replay: applied_seq {storage.applied_seq} after open, expected {n}"
                )
        finally:
            storage.close()
        return n / elapsed

    def floor_side() -> float:
        directory = bench.workdir / "floor-replay"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        gc.collect()
        start = time.perf_counter()
        replayed = replay_floor(frames, directory)
        elapsed = time.perf_counter() - start
        if replayed != n:
            raise RuntimeError(f"replay floor: {replayed} records")
        return n / elapsed

    def ceiling() -> float:
        gc.collect()
        start = time.perf_counter()
        if replay_ceiling(frames) != frames.stat().st_size:
            raise RuntimeError("replay ceiling: short read")
        return n / (time.perf_counter() - start)

    return bench.rotated({"ours": ours, "floor": floor_side, "ceiling": ceiling})
