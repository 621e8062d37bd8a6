"""Durable puts from 8 threads of one process: ``put_instance`` on one shared Storage
against SQLite FULL/WAL with one connection per thread (and diskcache's thread-local
connections). Whatever the library does across threads (a group commit, or a lock) is what
this row measures: it uses only the public API."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

from bench.ceiling import encode_record
from bench.data import Counter, fresh_fields, make_instance
from bench.stores import (
    SQLITE_PUT_BY_STATE,
    Bench,
    open_diskcache,
    open_ours,
    open_sqlite,
    sqlite_row,
)
from bench.timing import rate

THREADS = 8
SQLITE_BUSY_TIMEOUT_MS = 60_000
"""SQLite's threads wait for the write lock (one writer at a time), never fail."""


def run_threads(work: list[Callable[[], None]]) -> None:
    """Start a thread per item of ``work`` together, wait for all; re-raise the first error."""
    barrier, errors = threading.Barrier(len(work)), []

    def target(job: Callable[[], None]) -> None:
        try:
            barrier.wait()
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(job,)) for job in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def threads_side(
    per_thread: int, prepare: Callable[[int], Callable[[], None]]
) -> Callable[[], float]:
    """One repetition: ``prepare(i)`` (untimed) gives thread ``i``'s job, which puts
    ``per_thread`` fresh records; the rate is all puts over the wall time of all threads."""

    def one_rep() -> float:
        jobs = [prepare(i) for i in range(THREADS)]
        return rate(THREADS * per_thread, lambda: run_threads(jobs))

    return one_rep


def path_threads(bench: Bench) -> dict[str, float]:
    """Durable single puts of fresh ids, :data:`THREADS` threads at once, ``puts`` /
    :data:`THREADS` each per repetition (at least 20)."""
    per_thread = max(20, bench.settings.puts // THREADS)
    storage = open_ours(bench.path("ours-threads"))
    bench.on_close(storage.close)
    sqlite_path = bench.path("sqlite-threads") / "bench.sqlite"
    open_sqlite(sqlite_path, by_state=True).close()
    connections: list[sqlite3.Connection] = []
    for _ in range(THREADS):
        conn = open_sqlite(sqlite_path, by_state=True, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        bench.on_close(conn.close)
        connections.append(conn)
    cache = open_diskcache(bench.path("diskcache-threads"))
    if cache is not None:
        bench.on_close(cache.close)
    counters = {"ours": Counter(), "sqlite": Counter(), "diskcache": Counter()}

    def ours(i: int) -> Callable[[], None]:
        insts = [make_instance(f) for f in fresh_fields(counters["ours"], f"t{i}", per_thread)]
        put = storage.put_instance

        def job() -> None:
            for inst in insts:
                put(inst)

        return job

    def sqlite(i: int) -> Callable[[], None]:
        fields = fresh_fields(counters["sqlite"], f"t{i}", per_thread)
        execute = connections[i].execute

        def job() -> None:
            for f in fields:
                execute(SQLITE_PUT_BY_STATE, sqlite_row(f))

        return job

    def diskcache(i: int) -> Callable[[], None]:
        fields, put = fresh_fields(counters["diskcache"], f"t{i}", per_thread), cache.set

        def job() -> None:
            for f in fields:
                put(f["id"], encode_record(f, 0))

        return job

    rates = bench.rotated(
        {
            "ours": threads_side(per_thread, ours),
            "sqlite": threads_side(per_thread, sqlite),
            "diskcache": None if cache is None else threads_side(per_thread, diskcache),
        }
    )
    # every acknowledged put is there, once (the ids are fresh: the counts must match)
    (rows,) = connections[0].execute("SELECT count(*) FROM instances").fetchone()
    found = {"ours": storage.count_instances(), "sqlite": rows}
    if cache is not None:
        found["diskcache"] = len(cache)
    for kind, count in found.items():
        if count != counters[kind].next:
            raise RuntimeError(f"threads: {kind} holds {count:,} of {counters[kind].next:,} puts")
    return rates
