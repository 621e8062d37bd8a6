"""Lookups by id: ``get_instance`` and ``reader().get_instance`` against the floor (raw
lmdb get, CRC32C check, strict cbor2 decoding, the Instance built), the ceiling (the raw
lmdb get alone), SQLite (SELECT by primary key, decoded) and diskcache (``Cache.get``,
decoded). Every side looks up the same ids and builds an Instance of each, and drops it."""

from __future__ import annotations

import sqlite3
from typing import Any

import cbor2

from bench import floor
from bench.ceiling import encode_record
from bench.data import make_instance
from bench.floor import FloorEnv
from bench.stores import (
    SQLITE_GET,
    Bench,
    fill_sqlite_dataset,
    open_diskcache,
    open_ours,
    open_sqlite,
    put_batches,
    shared,
)
from bench.timing import rate
from rstmdb_storage import Instance, Storage


@shared
def ours_loaded(bench: Bench) -> Storage:
    """Our store holding ``records`` instances, loaded in batches."""
    storage = open_ours(bench.path("ours-get"))
    bench.on_close(storage.close)
    put_batches(storage, bench.dataset())
    return storage


@shared
def floor_loaded(bench: Bench) -> FloorEnv:
    """The floor's LMDB holding the same instances, as the store lays them out."""
    env = FloorEnv(bench.path("floor-get"))
    bench.on_close(env.close)
    floor.fill(env, [make_instance(f) for f in bench.dataset()])
    return env


@shared
def sqlite_loaded(bench: Bench) -> sqlite3.Connection:
    """SQLite holding the same records, cbor2-encoded."""
    conn = open_sqlite(bench.path("sqlite-get") / "bench.sqlite")
    bench.on_close(conn.close)
    fill_sqlite_dataset(conn, bench.settings.records)
    return conn


@shared
def diskcache_loaded(bench: Bench) -> Any:
    """diskcache holding the same records (id -> cbor2 bytes), or None without diskcache."""
    cache = open_diskcache(bench.path("diskcache-get"))
    if cache is None:
        return None
    bench.on_close(cache.close)
    with cache.transact():
        for seq, fields in enumerate(bench.dataset(), start=1):
            cache.set(fields["id"], encode_record(fields, seq))
    return cache


def run_ours_gets(get: Any, ids: list[str]) -> float:
    def run() -> None:
        for iid in ids:
            get(iid)

    return rate(len(ids), run)


def run_floor_gets(env: FloorEnv, ids: list[str], one_txn: bool) -> float:
    """The floor: a read transaction per call (or one for all), get, decode (see
    :func:`bench.floor.decode`)."""
    keys = [iid.encode() for iid in ids]
    begin, db, decode = env.env.begin, env.instances, floor.decode

    def per_call() -> None:
        for key in keys:
            with begin(db) as txn:
                raw = txn.get(key)
            decode(key, raw)

    def in_one() -> None:
        with begin(db) as txn:
            get = txn.get
            for key in keys:
                decode(key, get(key))

    return rate(len(keys), in_one if one_txn else per_call)


def run_ceiling_gets(env: FloorEnv, ids: list[str], one_txn: bool) -> float:
    """The ceiling: the raw lmdb get alone, in a read transaction per call (or one)."""
    keys = [iid.encode() for iid in ids]
    begin, db = env.env.begin, env.instances

    def per_call() -> None:
        for key in keys:
            with begin(db) as txn:
                txn.get(key)

    def in_one() -> None:
        with begin(db) as txn:
            get = txn.get
            for key in keys:
                get(key)

    return rate(len(keys), in_one if one_txn else per_call)


def run_sqlite_gets(conn: sqlite3.Connection, ids: list[str], one_txn: bool) -> float:
    execute, loads, sql = conn.execute, cbor2.loads, SQLITE_GET

    def run() -> None:
        if one_txn:
            execute("BEGIN")
        try:
            for iid in ids:
                Instance(*loads(execute(sql, (iid,)).fetchone()[0]))
        finally:
            if one_txn:
                execute("COMMIT")

    return rate(len(ids), run)


def run_diskcache_gets(cache: Any, ids: list[str]) -> float:
    get, loads = cache.get, cbor2.loads

    def run() -> None:
        for iid in ids:
            Instance(*loads(get(iid)))

    return rate(len(ids), run)


def path_get(bench: Bench) -> dict[str, float]:
    """``get_instance`` of random existing ids, a read transaction per call on every side."""
    storage, env, ids = ours_loaded(bench), floor_loaded(bench), bench.lookup_ids
    conn, cache = sqlite_loaded(bench), diskcache_loaded(bench)
    return bench.rotated(
        {
            "ours": lambda: run_ours_gets(storage.get_instance, ids),
            "floor": lambda: run_floor_gets(env, ids, one_txn=False),
            "ceiling": lambda: run_ceiling_gets(env, ids, one_txn=False),
            "sqlite": lambda: run_sqlite_gets(conn, ids, one_txn=False),
            "diskcache": None if cache is None else lambda: run_diskcache_gets(cache, ids),
        }
    )


def run_reader_gets(storage: Storage, ids: list[str]) -> float:
    with storage.reader() as reader:
        return run_ours_gets(reader.get_instance, ids)


def path_reader_get(bench: Bench) -> dict[str, float]:
    """``reader().get_instance``: all the lookups of a repetition in one read transaction
    (SQLite: inside one BEGIN ... COMMIT), and ``get_instance`` for reference."""
    storage, env, ids = ours_loaded(bench), floor_loaded(bench), bench.lookup_ids
    conn = sqlite_loaded(bench)
    return bench.rotated(
        {
            "ours": lambda: run_reader_gets(storage, ids),
            "floor": lambda: run_floor_gets(env, ids, one_txn=True),
            "ceiling": lambda: run_ceiling_gets(env, ids, one_txn=True),
            "sqlite": lambda: run_sqlite_gets(conn, ids, one_txn=True),
            "get_instance": lambda: run_ours_gets(storage.get_instance, ids),
        }
    )
