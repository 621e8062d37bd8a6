"""Durable single puts (against SQLite and against pwrite + fdatasync), and batches."""

from __future__ import annotations

import os
from collections.abc import Callable

from bench.ceiling import encode_record, sqlite_rows, wal_frame, wal_payload
from bench.data import BATCH_SIZE, Counter, chunks, fresh_fields, make_instance
from bench.stores import SQLITE_PUT, Bench, open_ours, open_sqlite
from bench.timing import rate
from rstmdb_storage.fsutil import fsync_dir


def ours_durable_puts(bench: Bench, name: str) -> Callable[[], float]:
    """A fresh store in ``name``; each call runs one repetition of single durable puts."""
    storage = open_ours(bench.path(name))
    bench.on_close(storage.close)
    counter = Counter()

    def one_rep() -> float:
        insts = [make_instance(f) for f in fresh_fields(counter, "put", bench.settings.puts)]
        put = storage.put_instance

        def run() -> None:
            for inst in insts:
                put(inst)

        return rate(len(insts), run)

    return one_rep


def compare_put_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """Durable ``put_instance`` against SQLite FULL/WAL autocommit INSERT OR REPLACE."""
    conn = open_sqlite(bench.path("sqlite-put") / "bench.sqlite")
    bench.on_close(conn.close)
    counter = Counter()

    def sqlite_rep() -> float:
        rows = sqlite_rows(fresh_fields(counter, "put", bench.settings.puts))
        execute, sql = conn.execute, SQLITE_PUT

        def run() -> None:
            for row in rows:
                execute(sql, row)

        return rate(len(rows), run)

    return bench.paired(ours_durable_puts(bench, "ours-put-1"), sqlite_rep)


def compare_put_vs_fdatasync(bench: Bench) -> tuple[float, float]:
    """Durable ``put_instance`` against pwrite + fdatasync on a preallocated file, of WAL
    frames as the store's (:func:`bench.ceiling.wal_frame`)."""
    directory = bench.path("ceiling-put")
    counter = Counter()

    def ceiling_rep() -> float:
        fields = fresh_fields(counter, "put", bench.settings.puts)
        records = [wal_frame(seq, wal_payload(f)) for seq, f in enumerate(fields, start=1)]
        path = directory / f"segment-{counter.next:012d}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, sum(map(len, records)) + (1 << 20))
            os.fsync(fd)
            fsync_dir(directory)
            pwrite, fdatasync = os.pwrite, os.fdatasync

            def run() -> None:
                offset = 0
                for rec in records:
                    offset += pwrite(fd, rec, offset)
                    fdatasync(fd)

            return rate(len(records), run)
        finally:
            os.close(fd)
            path.unlink()

    return bench.paired(ours_durable_puts(bench, "ours-put-2"), ceiling_rep)


def compare_batch_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """10k instances per ``storage.batch()`` against 10k rows per SQLite transaction.

    Both sides start from Python objects: ours from Instances, SQLite from the
    field values, which it cbor2-encodes inside the timed transaction.
    """
    storage = open_ours(bench.path("ours-batch"))
    bench.on_close(storage.close)
    conn = open_sqlite(bench.path("sqlite-batch") / "bench.sqlite")
    bench.on_close(conn.close)
    n = BATCH_SIZE * bench.settings.batches
    ours_counter, sqlite_counter = Counter(), Counter()

    def ours_rep() -> float:
        insts = [make_instance(f) for f in fresh_fields(ours_counter, "batch", n)]

        def run() -> None:
            for part in chunks(insts, BATCH_SIZE):
                with storage.batch() as b:
                    put = b.put_instance
                    for inst in part:
                        put(inst)

        return rate(n, run)

    def sqlite_rep() -> float:
        fields = fresh_fields(sqlite_counter, "batch", n)

        def run() -> None:
            for part in chunks(fields, BATCH_SIZE):
                conn.execute("BEGIN")
                conn.executemany(SQLITE_PUT, ((f["id"], encode_record(f, 0)) for f in part))
                conn.execute("COMMIT")

        return rate(n, run)

    return bench.paired(ours_rep, sqlite_rep)
