"""WAL replay on open: ``Storage.open`` rebuilding a lost ``indexes/``, against SPEC.md's goal
and against a raw ceiling replaying the same WAL frames."""

from __future__ import annotations

import gc
import mmap
import shutil
import time
from pathlib import Path

import cbor2
import crc32c

from bench.ceiling import open_ceiling_env, wal_frame, wal_payload
from bench.data import fields_of, instance_id, make_instance
from bench.stores import Bench, fast_config, shared, sync_tree
from rstmdb_storage import Storage
from rstmdb_storage.wal.format import RECORD_CHANGES, RECORD_HEADER, RECORD_HEADER_SIZE, padded

REPLAY_GOAL = 100_000
"""SPEC.md's goal for recovery replay, in WAL records per second on open."""

REPLAY_TXN_RECORDS = 2_000
"""Records per write transaction of the replay ceiling (the store replays 2,000 per txn)."""


def replay_ceiling(frames: Path, directory: Path) -> int:
    """The replay ceiling: read the WAL frames (:func:`bench.ceiling.wal_frame`) back to back
    in ``frames``, check each frame's type and CRC32C as the store's WAL does, decode its
    payload (the changes) and each change's body (as the store does to find what its indexes
    hold), and put the body under its id into a fresh raw LMDB environment in ``directory``,
    :data:`REPLAY_TXN_RECORDS` records per write transaction (no indexes, no meta). Returns
    how many records it applied."""
    env, db = open_ceiling_env(directory, map_size=1 << 32)
    header, unpack = RECORD_HEADER_SIZE, RECORD_HEADER.unpack_from
    crc, loads = crc32c.crc32c, cbor2.loads
    count = 0
    try:
        with open(frames, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view, offset, end = memoryview(m), 0, len(m)
            try:
                while offset < end:
                    with env.begin(write=True, db=db) as txn:
                        for _ in range(REPLAY_TXN_RECORDS):
                            if offset >= end:
                                break
                            length, checksum, _seq, _ms, kind = unpack(view, offset)
                            stop = offset + header + length
                            # the CRC covers bytes 0..4 and 8..32 of the header, then the payload
                            if (
                                crc(view[offset + 8 : stop], crc(view[offset : offset + 4]))
                                != checksum
                                or kind != RECORD_CHANGES
                            ):
                                raise RuntimeError(f"replay ceiling: bad frame at {offset}")
                            for _, iid, _, _, body, *_ in loads(view[offset + header : stop]):
                                loads(body)  # the whole record decoded, as the store does
                                txn.put(iid.encode(), body)
                            offset += header + padded(length)
                            count += 1
            finally:
                view.release()
    finally:
        env.close()
    return count


@shared
def replay_medians(bench: Bench) -> dict[str, float]:
    """Median rates (records per second) of ``Storage.open`` rebuilding a deleted
    ``indexes/`` from ``replay_records`` WAL records, and of the raw ceiling."""
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
    frames = bench.path("ceiling-replay") / "frames"
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

    def ceiling() -> float:
        directory = bench.workdir / "ceiling-replay" / "env"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        gc.collect()
        start = time.perf_counter()
        replayed = replay_ceiling(frames, directory)
        elapsed = time.perf_counter() - start
        if replayed != n:
            raise RuntimeError(f"replay ceiling: {replayed} records")
        return n / elapsed

    ours_rate, ceiling_rate = bench.paired(ours, ceiling)
    return {"ours": ours_rate, "ceiling": ceiling_rate}


def compare_replay_vs_goal(bench: Bench) -> tuple[float, float]:
    """WAL records replayed per second by ``Storage.open`` rebuilding a deleted
    ``indexes/``, against SPEC.md's 100k records/s (a constant, not a measurement)."""
    return replay_medians(bench)["ours"], float(REPLAY_GOAL)


def compare_replay_vs_ceiling(bench: Bench) -> tuple[float, float]:
    """The same replay against :func:`replay_ceiling` on the same records."""
    medians = replay_medians(bench)
    return medians["ours"], medians["ceiling"]
