"""Durable single puts and batches of 10k, against the floor, the ceiling, SQLite and
diskcache. Every side writes fresh ids, made into their inputs (Instances, or the fields)
before the timed run and encoded inside it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2

from bench import floor
from bench.ceiling import CHANGE_PUT, encode_record, wal_frame, wal_payload
from bench.data import BATCH_SIZE, Counter, chunks, fresh_fields, make_instance
from bench.floor import FloorEnv
from bench.stores import (
    SQLITE_PUT_BY_STATE,
    Bench,
    open_diskcache,
    open_ours,
    open_sqlite,
    sqlite_row,
)
from bench.timing import rate
from rstmdb_storage.fsutil import fsync_dir


@contextmanager
def preallocated(directory: Path, name: str, size: int) -> Iterator[int]:
    """A new file of ``size`` bytes, allocated and synced (with its directory) before the
    timed run, as the store's WAL segments are; removed afterwards. Yields its descriptor."""
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
        fsync_dir(directory)
        yield fd
    finally:
        os.close(fd)
        path.unlink()


def ours_side(bench: Bench, name: str, per_rep: int, run_part: Callable[..., None]) -> Any:
    """A fresh store in ``name``; each call runs one repetition: ``run_part(storage, insts)``
    over ``per_rep`` fresh Instances."""
    storage = open_ours(bench.path(name))
    bench.on_close(storage.close)
    counter = Counter()

    def one_rep() -> float:
        insts = [make_instance(f) for f in fresh_fields(counter, name, per_rep)]
        return rate(len(insts), lambda: run_part(storage, insts))

    return one_rep


def floor_side(bench: Bench, name: str, per_rep: int, batch: bool) -> Callable[[], float]:
    """The floor in ``name``: durable single puts (:func:`bench.floor.durable_put`) or
    batches (the WAL record of all changes, one ``pwrite`` + ``fdatasync``, one LMDB
    transaction putting the values and index entries)."""
    env = FloorEnv(bench.path(name))
    bench.on_close(env.close)
    counter, seq = Counter(), [0]

    def singles(fd: int, insts: list[Any]) -> None:
        offset, put, s = 0, floor.durable_put, seq[0]
        for inst in insts:
            s += 1
            offset = put(env, fd, offset, inst, s)
        seq[0] = s

    def batches(fd: int, insts: list[Any]) -> None:
        offset, body_of = 0, floor.body_of
        for part in chunks(insts, BATCH_SIZE):
            seq[0] += 1
            bodies = [body_of(inst) for inst in part]
            changes = [[CHANGE_PUT, i.id, None, None, b] for i, b in zip(part, bodies, strict=True)]
            frame = wal_frame(seq[0], cbor2.dumps(changes))
            os.pwrite(fd, frame, offset)
            os.fdatasync(fd)
            offset += len(frame)
            now, put = floor.now_ms(), floor.put_in_txn
            with env.begin_write() as txn:
                for inst, body in zip(part, bodies, strict=True):
                    put(env, txn, inst, body, seq[0], now)
                floor.put_applied(env, txn, seq[0].to_bytes(8, "little"))

    def one_rep() -> float:
        insts = [make_instance(f) for f in fresh_fields(counter, name, per_rep)]
        with preallocated(bench.path(name), "wal", per_rep * 512 + (1 << 20)) as fd:
            return rate(per_rep, lambda: (batches if batch else singles)(fd, insts))

    return one_rep


def ceiling_side(bench: Bench, per_rep: int, per_sync: int) -> Callable[[], float]:
    """``pwrite`` + ``fdatasync`` on a preallocated file of the WAL frames of ``per_rep``
    fresh puts, ``per_sync`` changes per frame (1: single puts; 10k: batches), framed before
    the timed run: the bare physical operation."""
    directory, counter = bench.path("ceiling-put"), Counter()

    def one_rep() -> float:
        fields = fresh_fields(counter, "ceiling", per_rep)
        frames = [
            wal_frame(seq, b"".join(wal_payload(f) for f in part))
            for seq, part in enumerate(chunks(fields, per_sync), start=1)
        ]
        with preallocated(directory, f"wal-{counter.next}", sum(map(len, frames)) + 4096) as fd:
            pwrite, fdatasync = os.pwrite, os.fdatasync

            def run() -> None:
                offset = 0
                for frame in frames:
                    offset += pwrite(fd, frame, offset)
                    fdatasync(fd)

            return rate(per_rep, run)

    return one_rep


def sqlite_side(bench: Bench, name: str, per_rep: int, batch: bool) -> Callable[[], float]:
    """SQLite FULL/WAL into a table with the (machine, state) index: autocommit INSERT OR
    REPLACE of each record, or ``BATCH_SIZE`` rows a transaction, records encoded in the run."""
    conn = open_sqlite(bench.path(name) / "bench.sqlite", by_state=True)
    bench.on_close(conn.close)
    counter = Counter()

    def one_rep() -> float:
        fields = fresh_fields(counter, name, per_rep)
        execute, sql = conn.execute, SQLITE_PUT_BY_STATE

        def singles() -> None:
            for f in fields:
                execute(sql, sqlite_row(f))

        def batches() -> None:
            for part in chunks(fields, BATCH_SIZE):
                execute("BEGIN")
                conn.executemany(sql, (sqlite_row(f) for f in part))
                execute("COMMIT")

        return rate(per_rep, batches if batch else singles)

    return one_rep


def diskcache_side(bench: Bench, name: str, per_rep: int, batch: bool) -> Any:
    """diskcache with ``synchronous=FULL``: ``Cache.set`` of each record, or ``BATCH_SIZE``
    of them inside one ``transact()``; None without diskcache."""
    cache = open_diskcache(bench.path(name))
    if cache is None:
        return None
    bench.on_close(cache.close)
    counter = Counter()

    def one_rep() -> float:
        fields = fresh_fields(counter, name, per_rep)
        put = cache.set

        def run() -> None:
            for part in chunks(fields, BATCH_SIZE if batch else 1):
                with cache.transact():
                    for f in part:
                        put(f["id"], encode_record(f, 0))

        def singles() -> None:
            for f in fields:
                put(f["id"], encode_record(f, 0))

        return rate(per_rep, run if batch else singles)

    return one_rep


def put_each(storage: Any, insts: list[Any]) -> None:
    put = storage.put_instance
    for inst in insts:
        put(inst)


def put_batched(storage: Any, insts: list[Any]) -> None:
    for part in chunks(insts, BATCH_SIZE):
        with storage.batch() as b:
            put = b.put_instance
            for inst in part:
                put(inst)


def path_put(bench: Bench) -> dict[str, float]:
    """Durable single ``put_instance`` (default policy: fsync every write) of fresh ids."""
    n = bench.settings.puts
    return bench.rotated(
        {
            "ours": ours_side(bench, "ours-put", n, put_each),
            "floor": floor_side(bench, "floor-put", n, batch=False),
            "ceiling": ceiling_side(bench, n, per_sync=1),
            "sqlite": sqlite_side(bench, "sqlite-put", n, batch=False),
            "diskcache": diskcache_side(bench, "diskcache-put", n, batch=False),
        }
    )


def path_batch(bench: Bench) -> dict[str, float]:
    """``storage.batch()`` of 10k fresh instances, ``batches`` of them per repetition."""
    n = BATCH_SIZE * bench.settings.batches
    return bench.rotated(
        {
            "ours": ours_side(bench, "ours-batch", n, put_batched),
            "floor": floor_side(bench, "floor-batch", n, batch=True),
            "ceiling": ceiling_side(bench, n, per_sync=BATCH_SIZE),
            "sqlite": sqlite_side(bench, "sqlite-batch", n, batch=True),
            "diskcache": diskcache_side(bench, "diskcache-batch", n, batch=True),
        }
    )
