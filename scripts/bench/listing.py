"""Listing by state: ``list_by_state`` and ``iter_by_state`` against the floor (a cursor over
the state index's range in one read transaction, get + CRC32C + strict decoding of each
instance, the Instances in a list), the ceiling (the same cursor and gets, nothing decoded)
and SQLite's indexed query (each record decoded into an Instance). Every side builds the
list of a listing and drops it after counting it."""

from __future__ import annotations

import sqlite3
from typing import Any

import cbor2

from bench import floor
from bench.ceiling import encode_record
from bench.data import (
    BATCH_SIZE,
    LIST_MACHINE,
    LIST_STATE,
    LIST_STATES,
    listing_fields,
    make_instance,
)
from bench.floor import FloorEnv
from bench.stores import Bench, fill_sqlite, open_ours, open_sqlite, put_batches, shared
from bench.timing import rate
from rstmdb_storage import Instance, Storage

LIST_MIN_PER_REPETITION = 20_000
"""Each listing repetition repeats the listing until it has listed at least this many
instances (twice for 10k matches, ten times for --quick's 2k), so that no run is timed alone."""

SQLITE_BY_STATE = "SELECT id, value FROM instances WHERE machine = ? AND state = ? ORDER BY id"


def listing_dataset(bench: Bench) -> list[dict[str, Any]]:
    n = bench.settings.list_matches * len(LIST_STATES)
    return [listing_fields(i) for i in range(n)]


@shared
def ours_by_state(bench: Bench) -> Storage:
    """Our store holding ``list_matches`` instances in each of ``LIST_STATES``."""
    storage = open_ours(bench.path("ours-list"))
    bench.on_close(storage.close)
    put_batches(storage, listing_dataset(bench))
    return storage


@shared
def floor_by_state(bench: Bench) -> FloorEnv:
    """The floor's LMDB holding the same instances, with their index entries."""
    env = FloorEnv(bench.path("floor-list"))
    bench.on_close(env.close)
    floor.fill(env, [make_instance(f) for f in listing_dataset(bench)])
    return env


@shared
def sqlite_by_state(bench: Bench) -> sqlite3.Connection:
    """SQLite holding the same records, cbor2-encoded, one transaction per 10k."""
    conn = open_sqlite(bench.path("sqlite-list") / "bench.sqlite", by_state=True)
    bench.on_close(conn.close)
    rows = (
        (f["id"], f["machine"], f["state"], encode_record(f, seq))
        for seq, f in enumerate(listing_dataset(bench), start=1)
    )
    sql = "INSERT INTO instances (id, machine, state, value) VALUES (?, ?, ?, ?)"
    fill_sqlite(conn, sql, rows, per_txn=BATCH_SIZE)
    # No ANALYZE: with statistics, SQLite scans the primary key in id order instead
    # of using the (machine, state) index and sorting, as the comparison asks.
    return conn


@shared
def by_state_stores(bench: Bench) -> tuple[Storage, sqlite3.Connection]:
    """Both listing stores, checked once to list the same ids in the same order."""
    storage, conn = ours_by_state(bench), sqlite_by_state(bench)
    query = (LIST_MACHINE, LIST_STATE)
    ours_ids = [inst.id for inst in storage.list_by_state(*query)]
    lazy_ids = [inst.id for inst in storage.iter_by_state(*query)]
    sqlite_ids = [row[0] for row in conn.execute(SQLITE_BY_STATE, query)]
    if len(ours_ids) != bench.settings.list_matches:
        raise RuntimeError(f"list_by_state listed {len(ours_ids)} instances")
    if ours_ids != sqlite_ids or lazy_ids != sqlite_ids:
        raise RuntimeError("list_by_state, iter_by_state and SQLite list different ids")
    plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {SQLITE_BY_STATE}", query))
    if "USING INDEX by_state" not in plan:
        raise RuntimeError(f"SQLite does not use its (machine, state) index: {plan}")
    return storage, conn


def listing_rounds(expected: int) -> int:
    """Listings per repetition: see :data:`LIST_MIN_PER_REPETITION`."""
    return -(-LIST_MIN_PER_REPETITION // expected)


def run_ours_list(storage: Storage, expected: int) -> float:
    list_by_state, rounds = storage.list_by_state, listing_rounds(expected)

    def run() -> None:
        for _ in range(rounds):
            if len(list_by_state(LIST_MACHINE, LIST_STATE)) != expected:
                raise RuntimeError("list_by_state: wrong number of instances")

    return rate(expected * rounds, run)


def run_ours_iter(storage: Storage, expected: int) -> float:
    iter_by_state, rounds = storage.iter_by_state, listing_rounds(expected)

    def run() -> None:
        for _ in range(rounds):
            n = 0
            for _ in iter_by_state(LIST_MACHINE, LIST_STATE):
                n += 1
            if n != expected:
                raise RuntimeError("iter_by_state: wrong number of instances")

    return rate(expected * rounds, run)


def run_sqlite_list(conn: sqlite3.Connection, expected: int) -> float:
    execute, loads, rounds = conn.execute, cbor2.loads, listing_rounds(expected)

    def run() -> None:
        for _ in range(rounds):
            rows = execute(SQLITE_BY_STATE, (LIST_MACHINE, LIST_STATE))
            if len([Instance(*loads(value)) for _, value in rows]) != expected:
                raise RuntimeError("SQLite: wrong number of rows")

    return rate(expected * rounds, run)


_LOWER = b"%s\x00%s\x00" % (LIST_MACHINE.encode(), LIST_STATE.encode())
_UPPER = _LOWER[:-1] + b"\x01"


def floor_list(env: FloorEnv, decode: bool = True) -> list[Any]:
    """One listing of the floor (``decode``) or the ceiling, in one read transaction: a
    cursor over the state index's range, a get of each instance it names, decoded into an
    Instance (the floor) or not (the ceiling)."""
    unpack = floor.decode if decode else (lambda key, raw: raw)
    cut, upper = len(_LOWER), _UPPER
    with env.env.begin() as txn:
        get, found = txn.cursor(db=env.instances).get, []
        cursor = txn.cursor(db=env.state)
        if cursor.set_range(_LOWER):
            for index_key in cursor.iternext(values=False):
                if index_key >= upper:
                    break
                key = index_key[cut:]
                found.append(unpack(key, get(key)))
    return found


def run_floor_list(env: FloorEnv, expected: int, decode: bool) -> float:
    """:func:`floor_list`, repeated as the other sides repeat their listings."""
    rounds = listing_rounds(expected)

    def run() -> None:
        for _ in range(rounds):
            found = floor_list(env, decode)
            if len(found) != expected:
                raise RuntimeError(f"floor listing: {len(found)} instances")

    return rate(expected * rounds, run)


def listing_sides(bench: Bench, ours: Any) -> dict[str, float]:
    (storage, conn), n = by_state_stores(bench), bench.settings.list_matches
    env = floor_by_state(bench)
    return bench.rotated(
        {
            "ours": lambda: ours(storage, n),
            "floor": lambda: run_floor_list(env, n, decode=True),
            "ceiling": lambda: run_floor_list(env, n, decode=False),
            "sqlite": lambda: run_sqlite_list(conn, n),
        }
    )


def path_list(bench: Bench) -> dict[str, float]:
    """``list_by_state`` of all ``list_matches`` matches (decoded Instances, in id order);
    SQLite: indexed SELECT ... ORDER BY id, each record decoded into an Instance."""
    return listing_sides(bench, run_ours_list)


def path_iter(bench: Bench) -> dict[str, float]:
    """``iter_by_state`` (lazy, a page of short read transaction at a time) of the same."""
    return listing_sides(bench, run_ours_iter)
