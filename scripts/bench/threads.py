"""Durable puts from 8 threads of one process: ``put_instance`` on one shared Storage
against SQLite FULL/WAL with one connection per thread (and diskcache's thread-local
connections). Whatever the library does across threads (a group commit, or a lock) is what
this row measures: it uses only the public API.

The floor (:class:`FloorThreadGroup`) is group commit with the floor's libraries and layout
(SPEC.md's prototype, with the index entries): a thread encodes its change and queues it; one
that finds no write in flight leads, waits (as the store's thread group does, at most
:data:`rstmdb_storage.thread_group.GATHER_SECONDS`) until as many are queued as its last
group held, takes the whole queue, writes its records with one ``pwrite`` and one
``fdatasync``, applies them in one LMDB transaction, then wakes the members of its group and
the next leader only."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import cbor2

from bench import floor
from bench.ceiling import CHANGE_PUT, encode_record, wal_frame
from bench.data import Counter, fresh_fields, make_instance
from bench.floor import FloorEnv
from bench.puts import preallocated
from bench.stores import (
    SQLITE_PUT_BY_STATE,
    Bench,
    open_diskcache,
    open_ours,
    open_sqlite,
    sqlite_row,
)
from bench.timing import rate
from rstmdb_storage.thread_group import GATHER_SECONDS

THREADS = 8
SQLITE_BUSY_TIMEOUT_MS = 60_000
"""SQLite's threads wait for the write lock (one writer at a time), never fail."""


class _Queued:
    """One thread's put, queued in a :class:`FloorThreadGroup`."""

    __slots__ = ("body", "error", "inst", "leads", "payload", "wake")

    def __init__(self, inst: Any) -> None:
        self.inst, self.body = inst, floor.body_of(inst)
        self.payload = cbor2.dumps([[CHANGE_PUT, inst.id, None, None, self.body]])
        self.wake: threading.Lock | None = None
        self.leads = False
        self.error: BaseException | None = None


class FloorThreadGroup:
    """The floor of durable puts from many threads (see the module docstring)."""

    def __init__(self, env: FloorEnv, fd: int) -> None:
        self.env, self.fd = env, fd
        self.offset, self.seq = 0, 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: list[_Queued] = []
        self._leading = False
        self._last_size = 0

    def put(self, inst: Any) -> None:
        request = _Queued(inst)
        with self._lock:
            follows = self._leading
            if follows:
                request.wake = threading.Lock()
                request.wake.acquire()
            self._queue.append(request)
            self._leading = True
            if len(self._queue) >= self._last_size:
                self._arrived.notify()
        if follows:
            request.wake.acquire()  # type: ignore[union-attr]
            if not request.leads:
                if request.error is not None:
                    raise request.error
                return
        with self._lock:
            if self._last_size > 1:
                self._arrived.wait_for(lambda: len(self._queue) >= self._last_size, GATHER_SECONDS)
            group, self._queue = self._queue, []
            self._last_size = len(group)
        try:
            self._write(group)
        except BaseException as exc:
            for member in group:
                member.error = exc
            raise
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor.leads = True
            if successor is not None:
                successor.wake.release()  # type: ignore[union-attr]
            for member in group:
                if member is not request:
                    member.wake.release()  # type: ignore[union-attr]

    def _write(self, group: list[_Queued]) -> None:
        first = self.seq + 1
        frames = b"".join(wal_frame(first + n, r.payload) for n, r in enumerate(group))
        os.pwrite(self.fd, frames, self.offset)
        os.fdatasync(self.fd)
        self.offset += len(frames)
        env, now, put = self.env, floor.now_ms(), floor.put_in_txn
        with env.begin_write() as txn:
            for n, request in enumerate(group):
                put(env, txn, request.inst, request.body, first + n, now)
            self.seq = first + len(group) - 1
            floor.put_applied(env, txn, self.seq.to_bytes(8, "little"))


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
    floor_env = FloorEnv(bench.path("floor-threads"))
    bench.on_close(floor_env.close)
    counters = {k: Counter() for k in ("ours", "floor", "sqlite", "diskcache")}

    def ours(i: int) -> Callable[[], None]:
        insts = [make_instance(f) for f in fresh_fields(counters["ours"], f"t{i}", per_thread)]
        put = storage.put_instance

        def job() -> None:
            for inst in insts:
                put(inst)

        return job

    def floor_side() -> float:
        with preallocated(bench.path("floor-threads"), "wal", THREADS * per_thread * 512) as fd:
            group = FloorThreadGroup(floor_env, fd)

            def prepare(i: int) -> Callable[[], None]:
                insts = [
                    make_instance(f) for f in fresh_fields(counters["floor"], f"t{i}", per_thread)
                ]
                put = group.put

                def job() -> None:
                    for inst in insts:
                        put(inst)

                return job

            return threads_side(per_thread, prepare)()

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
            "floor": floor_side,
            "sqlite": threads_side(per_thread, sqlite),
            "diskcache": None if cache is None else threads_side(per_thread, diskcache),
        }
    )
    # every acknowledged put is there, once (the ids are fresh: the counts must match)
    (rows,) = connections[0].execute("SELECT count(*) FROM instances").fetchone()
    with floor_env.env.begin(db=floor_env.instances) as txn:
        floor_count = txn.stat(floor_env.instances)["entries"]
    found = {"ours": storage.count_instances(), "floor": floor_count, "sqlite": rows}
    if cache is not None:
        found["diskcache"] = len(cache)
    for kind, count in found.items():
        if count != counters[kind].next:
            raise RuntimeError(f"threads: {kind} holds {count:,} of {counters[kind].next:,} puts")
    return rates
