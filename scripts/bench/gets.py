"""Lookups by id: ``get_instance`` against the raw LMDB ceiling and against SQLite."""

from __future__ import annotations

import sqlite3
from typing import Any

import cbor2
import crc32c
import lmdb

from bench.ceiling import encode_record, envelope, open_ceiling_env
from bench.stores import (
    SQLITE_GET,
    Bench,
    fill_sqlite_dataset,
    open_ours,
    open_sqlite,
    put_batches,
    shared,
)
from bench.timing import rate
from rstmdb_storage import Storage


@shared
def ours_loaded(bench: Bench) -> Storage:
    """Our store holding ``records`` instances, loaded in batches."""
    storage = open_ours(bench.path("ours-get"))
    bench.on_close(storage.close)
    put_batches(storage, bench.dataset())
    return storage


@shared
def ceiling_loaded(bench: Bench) -> tuple[lmdb.Environment, Any]:
    """Raw LMDB holding the same records as ``crc32c + cbor2 array``."""
    env, db = open_ceiling_env(bench.path("ceiling-get"), map_size=1 << 32)
    bench.on_close(env.close)
    with env.begin(write=True, db=db) as txn:
        for seq, fields in enumerate(bench.dataset(), start=1):
            txn.put(fields["id"].encode(), envelope(encode_record(fields, seq)))
    return env, db


@shared
def sqlite_loaded(bench: Bench) -> sqlite3.Connection:
    """SQLite holding the same records, cbor2-encoded."""
    conn = open_sqlite(bench.path("sqlite-get") / "bench.sqlite")
    bench.on_close(conn.close)
    fill_sqlite_dataset(conn, bench.settings.records)
    return conn


def run_ours_gets(storage: Storage, ids: list[str]) -> float:
    get = storage.get_instance

    def run() -> None:
        for iid in ids:
            get(iid)

    return rate(len(ids), run)


def run_ceiling_gets(env: lmdb.Environment, db: Any, ids: list[str]) -> float:
    keys = [iid.encode() for iid in ids]
    begin, crc, loads = env.begin, crc32c.crc32c, cbor2.loads

    def run() -> None:
        for key in keys:
            with begin(db=db) as txn:
                raw = txn.get(key)
            if int.from_bytes(raw[:4], "little") != crc(raw[4:]):
                raise RuntimeError(f"ceiling: CRC mismatch for {key!r}")
            loads(raw[4:])

    return rate(len(keys), run)


def run_sqlite_gets(conn: sqlite3.Connection, ids: list[str]) -> float:
    execute, loads, sql = conn.execute, cbor2.loads, SQLITE_GET

    def run() -> None:
        for iid in ids:
            loads(execute(sql, (iid,)).fetchone()[0])

    return rate(len(ids), run)


def compare_get_vs_ceiling(bench: Bench) -> tuple[float, float]:
    """``get_instance`` against raw lmdb get + crc32c + cbor2.loads."""
    storage, (env, db), ids = ours_loaded(bench), ceiling_loaded(bench), bench.lookup_ids
    return bench.paired(lambda: run_ours_gets(storage, ids), lambda: run_ceiling_gets(env, db, ids))


def compare_get_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """``get_instance`` against SQLite SELECT by primary key + cbor2.loads."""
    storage, conn, ids = ours_loaded(bench), sqlite_loaded(bench), bench.lookup_ids
    return bench.paired(lambda: run_ours_gets(storage, ids), lambda: run_sqlite_gets(conn, ids))


def run_reader_gets(storage: Storage, ids: list[str]) -> float:
    with storage.reader() as reader:
        get = reader.get_instance

        def run() -> None:
            for iid in ids:
                get(iid)

        return rate(len(ids), run)


def run_ceiling_gets_one_txn(env: lmdb.Environment, db: Any, ids: list[str]) -> float:
    keys = [iid.encode() for iid in ids]
    crc, loads = crc32c.crc32c, cbor2.loads
    with env.begin(db=db) as txn:
        get = txn.get

        def run() -> None:
            for key in keys:
                raw = get(key)
                if int.from_bytes(raw[:4], "little") != crc(raw[4:]):
                    raise RuntimeError(f"ceiling: CRC mismatch for {key!r}")
                loads(raw[4:])

        return rate(len(keys), run)


def compare_reader_get_vs_ceiling(bench: Bench) -> tuple[float, float]:
    """``reader.get_instance`` against raw lmdb gets in one read transaction."""
    storage, (env, db), ids = ours_loaded(bench), ceiling_loaded(bench), bench.lookup_ids
    return bench.paired(
        lambda: run_reader_gets(storage, ids), lambda: run_ceiling_gets_one_txn(env, db, ids)
    )


def compare_reader_get_vs_get(bench: Bench) -> tuple[float, float]:
    """``reader.get_instance`` against ``storage.get_instance`` (a transaction per call)."""
    storage, ids = ours_loaded(bench), bench.lookup_ids
    return bench.paired(lambda: run_reader_gets(storage, ids), lambda: run_ours_gets(storage, ids))
