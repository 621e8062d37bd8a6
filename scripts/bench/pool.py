"""The worker processes of the multi-process rows: :class:`MpPool` and :func:`mp_worker`."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from bench.ceiling import encode_record
from bench.data import fields_of, instance_id, make_instance
from bench.floor_processes import FloorGroupCommit
from bench.settings import WRITER_TIMEOUT
from bench.stores import (
    SQLITE_GET,
    SQLITE_PUT_BY_STATE,
    open_diskcache,
    open_sqlite,
    ours_config,
    sqlite_row,
)
from rstmdb_storage import Instance, Storage

MP_LOOKUP_IDS = 50_000
"""Random existing ids each reader process draws once and then looks up in turn."""

MP_START_DELAY = 0.05
"""Seconds between releasing the worker processes and the common start of a timed run."""

MP_BUSY_TIMEOUT_MS = 60_000
"""SQLite busy timeout of the worker processes: a writer waits for the lock, never fails."""

Answer = tuple[int, int, float]
"""A worker's answer to a timed command: operations, distinct ids written, end time."""


KINDS = ("ours", "sqlite", "diskcache")
"""The stores a worker process can write or read with (see :func:`mp_open`); and, for puts
only, ``"floor"``."""


def mp_open(kind: str, path: str) -> Any:
    """What a worker process writes or reads with: our store with the default config (fsync
    every write) and no automatic snapshots, a SQLite connection as :func:`open_sqlite` (the
    table with the (machine, state) index) that waits up to :data:`MP_BUSY_TIMEOUT_MS` for the
    write lock, or a diskcache ``Cache`` with ``synchronous=FULL``; or the floor's group
    commit (:mod:`bench.floor_processes`)."""
    if kind == "ours":
        return Storage.open(ours_config(path))
    if kind == "floor":
        return FloorGroupCommit(Path(path))
    if kind == "diskcache":
        return open_diskcache(Path(path))
    conn = open_sqlite(Path(path), by_state=True)
    conn.execute(f"PRAGMA busy_timeout = {MP_BUSY_TIMEOUT_MS}")
    return conn


def mp_put_call(kind: str, handle: Any, prefix: str, cap: int) -> tuple[Callable[..., Any], list]:
    """One durable single put and its ``cap`` prepared inputs (fresh ids ``prefix-i``):
    ``put_instance`` of an Instance, an autocommit INSERT OR REPLACE of the same fields'
    CBOR record (encoded in the call), or ``Cache.set`` of it."""
    fields = fields_of(prefix, range(cap))
    if kind in ("ours", "floor"):
        return handle.put_instance, [make_instance(f) for f in fields]
    if kind == "diskcache":
        put = handle.set
        return (lambda f: put(f["id"], encode_record(f, 0))), fields
    execute, sql = handle.execute, SQLITE_PUT_BY_STATE
    return (lambda f: execute(sql, sqlite_row(f))), fields


def mp_get_call(kind: str, handle: Any) -> Callable[[str], Any]:
    """One lookup by id, decoded into an Instance: ``get_instance``, SELECT by primary key,
    or ``Cache.get``, + cbor2.loads."""
    if kind == "ours":
        return handle.get_instance
    loads = cbor2.loads
    if kind == "diskcache":
        fetch = handle.get

        def get_cached(iid: str) -> Any:
            value = fetch(iid)
            return None if value is None else Instance(*loads(value))

        return get_cached
    execute, sql = handle.execute, SQLITE_GET

    def get(iid: str) -> Any:
        row = execute(sql, (iid,)).fetchone()
        return None if row is None else Instance(*loads(row[0]))

    return get


def mp_worker(index: int, conn: Any, go: Any, stop: Any, start: Any) -> None:
    """A worker process of :class:`MpPool` (module level, so that 'spawn' can import it).

    Serves commands from ``conn`` until ``None``:

    - ``("puts", kind, path, prefix, cap, seconds)``: durable single puts of fresh ids for
      ``seconds`` from the common start;
    - ``("puts_until_stop", kind, path, prefix, cap)``: the same until ``stop`` is set;
    - ``("gets", kind, path, records, seed, seconds)``: lookups of random ids among the
      ``records`` instances ``order-00000000`` ... for ``seconds``.

    ``kind`` is one of :data:`KINDS` (see :func:`mp_open`; each store is opened once and
    kept open). Each command is prepared untimed (store opened, instances built), answered with
    ``"ready"``; then the worker waits for ``go``, sleeps until ``start`` (a shared
    ``time.monotonic()`` value, the same clock in every process) and runs, and answers
    ``(operations, distinct ids written, end time)``. A failure answers ``("error",
    traceback)`` and ends the process.
    """
    sys.stdout.reconfigure(line_buffering=True)
    handles: dict[tuple[str, str], Any] = {}
    lookup_ids: dict[tuple[int, int], list[str]] = {}
    clock = time.monotonic
    try:
        while (command := conn.recv()) is not None:
            op, kind, path, *args = command
            if (kind, path) not in handles:
                handles[(kind, path)] = mp_open(kind, path)
            handle = handles[(kind, path)]
            if op == "gets":
                records, seed, seconds = args
                if (records, seed) not in lookup_ids:
                    rng = random.Random(seed)
                    lookup_ids[(records, seed)] = [
                        instance_id("order", rng.randrange(records)) for _ in range(MP_LOOKUP_IDS)
                    ]
                items, call = lookup_ids[(records, seed)], mp_get_call(kind, handle)
            else:
                prefix, cap, *rest = args
                seconds = rest[0] if rest else None
                call, items = mp_put_call(kind, handle, prefix, cap)
            gc.collect()
            conn.send("ready")
            go.wait()
            begin = start.value
            if (delay := begin - clock()) > 0:
                time.sleep(delay)
            n, missing, size = 0, 0, len(items)
            if op == "puts_until_stop":
                while not stop.is_set():
                    call(items[n % size])
                    n += 1
            else:
                deadline = begin + seconds
                while True:
                    if call(items[n % size]) is None:
                        missing += 1
                    n += 1
                    if clock() >= deadline:
                        break
            end = clock()
            if op == "gets" and missing:
                raise RuntimeError(f"{missing:,} of {n:,} lookups of existing ids found nothing")
            conn.send((n, 0 if op == "gets" else min(n, size), end))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        sys.exit(1)
    finally:
        for handle in handles.values():
            handle.close()


def pool_rate(start: float, answers: list[Answer]) -> float:
    """Operations per second of ``answers`` together, from ``start`` to the last one's end."""
    return sum(n for n, _, _ in answers) / (max(end for _, _, end in answers) - start)


class MpPool:
    """Worker processes (:func:`mp_worker`, 'spawn' context) that run timed commands together:
    :meth:`run` prepares every command, then releases them at one common start."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.go, self.stop = ctx.Event(), ctx.Event()
        self.start = ctx.Value("d", 0.0, lock=False)
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        self.runs = 0
        self.broken = False
        for index in range(size):
            parent, child = ctx.Pipe()
            process = ctx.Process(
                target=mp_worker,
                args=(index, child, self.go, self.stop, self.start),
                name=f"bench-worker-{index}",
            )
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    def receive(self, index: int) -> Any:
        conn = self.conns[index]
        if not conn.poll(WRITER_TIMEOUT):
            raise RuntimeError(f"worker process {index}: no answer in {WRITER_TIMEOUT:.0f} s")
        try:
            answer = conn.recv()
        except EOFError:
            self.processes[index].join(5)
            raise RuntimeError(
                f"worker process {index} ended (exit code {self.processes[index].exitcode})"
            ) from None
        if isinstance(answer, tuple) and answer[0] == "error":
            raise RuntimeError(f"worker process {index} failed:\n{answer[1]}")
        return answer

    def run(self, commands: list[tuple[Any, ...]]) -> tuple[float, list[Answer]]:
        """Give ``commands[i]`` to worker ``i``, start them together once all are ready, and set
        ``stop`` when every timed command has answered (``puts_until_stop`` ones run until then).
        Returns the common start time and each worker's answer."""
        if len(commands) > len(self.conns):
            raise ValueError(f"{len(commands)} commands for {len(self.conns)} workers")
        self.runs += 1
        try:
            self.stop.clear()
            for conn, command in zip(self.conns, commands, strict=False):
                conn.send(command)
            for index in range(len(commands)):
                if self.receive(index) != "ready":
                    raise RuntimeError(f"worker process {index} did not get ready")
            start = time.monotonic() + MP_START_DELAY
            self.start.value = start
            self.go.set()
            answers: dict[int, Answer] = {}
            background = [i for i, c in enumerate(commands) if c[0] == "puts_until_stop"]
            for index in range(len(commands)):
                if index not in background:
                    answers[index] = self.receive(index)
            self.stop.set()
            for index in background:
                answers[index] = self.receive(index)
            self.go.clear()
            return start, [answers[i] for i in range(len(commands))]
        except BaseException:
            self.broken = True
            self.kill()
            raise

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()

    def close(self) -> None:
        """End the workers (they close their stores); raise if one did not end cleanly."""
        if self.broken:
            return
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes:
            process.join(60)
        codes = [process.exitcode for process in self.processes]
        self.kill()
        if any(code != 0 for code in codes):
            raise RuntimeError(f"worker processes ended with exit codes {codes}")
