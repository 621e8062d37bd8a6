"""Many processes (SPEC.md guarantee 6): durable puts from 1, 2 and 4 writer processes, and
lookups from 1, 2 and 4 reader processes while a writer process puts, against SQLite and
diskcache with the same processes (when diskcache is installed); the puts also against the
floor's group commit (:mod:`bench.floor_processes`)."""

from __future__ import annotations

import os
import sqlite3
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import floor_processes
from bench.ceiling import encode_record
from bench.pool import KINDS, MpPool, pool_rate
from bench.stores import (
    Bench,
    fast_config,
    fill_sqlite_dataset,
    open_diskcache,
    open_sqlite,
    ours_config,
    put_batches,
    shared,
    sync_tree,
)
from bench.timing import rotated_medians
from rstmdb_storage import Storage

MP_WRITER_COUNTS = (1, 2, 4)
"""Writer processes of the multi-process durable-put rows (SPEC's goal is on 4)."""

MP_READER_COUNTS = (1, 2, 4)
"""Reader processes of the multi-process lookup rows (each with one writer process)."""

MP_PUT_CAP_RATE = 8_000
"""Instances each writer process builds per second of its run, before the run (puts beyond
that many write the same ids again)."""

Lookups = dict[tuple[str, int, bool], tuple[float, float]]


def mp_kinds() -> tuple[str, ...]:
    """The stores the multi-process rows time: diskcache only when it is installed."""
    return KINDS if diskcache_installed() else KINDS[:2]


def diskcache_installed() -> bool:
    try:
        import diskcache  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class MpState:
    """The worker processes and what the writer-process rows measured so far."""

    pool: MpPool | None = None
    put_rates: dict[int, dict[str, float]] = field(default_factory=dict)
    """Median puts/s of each kind, for each writer-process count measured so far."""
    put_totals: dict[str, list[int]] = field(
        default_factory=lambda: {k: [0, 0] for k in (*KINDS, "floor")}
    )
    """Acknowledged puts and distinct ids written so far into each multi-process put store."""


@shared
def mp_state(bench: Bench) -> MpState:
    return MpState()


def mp_pool(bench: Bench) -> MpPool:
    """The worker processes of the multi-process rows, spawned on first use (again after
    a failure, which kills them)."""
    state = mp_state(bench)
    if state.pool is None or state.pool.broken:
        state.pool = MpPool(max(max(MP_WRITER_COUNTS), max(MP_READER_COUNTS) + 1))
        bench.on_close(state.pool.close)
    return state.pool


def put_cap(seconds: float) -> int:
    """Fresh ids each writer process builds for a run of ``seconds``."""
    return max(1_000, int(MP_PUT_CAP_RATE * seconds))


# --- writer processes ---------------------------------------------------------------------------


def mp_put_stores(bench: Bench) -> dict[str, str]:
    """The data directory and the SQLite file that all writer-process counts write into,
    created here (empty) so that the workers only open them."""
    ours = bench.path("ours-mp-put")
    sqlite_file = bench.path("sqlite-mp-put") / "bench.sqlite"
    cache_dir = bench.path("diskcache-mp-put")
    floor_dir = bench.path("floor-mp-put") / "store"
    if not sqlite_file.exists():
        Storage.open(ours_config(ours)).close()
        floor_processes.create(floor_dir)
        open_sqlite(sqlite_file, by_state=True).close()
        if (cache := open_diskcache(cache_dir)) is not None:
            cache.close()
    return {
        "ours": str(ours),
        "floor": str(floor_dir),
        "sqlite": str(sqlite_file),
        "diskcache": str(cache_dir),
    }


def check_mp_put_stores(bench: Bench, paths: dict[str, str]) -> None:
    """Both stores hold every distinct id the workers wrote, and our store's last sequence
    number is the number of acknowledged puts (one per put, none lost or doubled)."""
    totals = mp_state(bench).put_totals
    acked, distinct = totals["ours"]
    with Storage.open(ours_config(paths["ours"])) as storage:
        count, applied = storage.count_instances(), storage.applied_seq
    if count != distinct or applied != acked:
        raise RuntimeError(
            f"writer processes: our store holds {count:,} instances at sequence {applied:,} "
            f"after {acked:,} acknowledged puts of {distinct:,} ids"
        )
    acked, distinct = totals["floor"]
    floor_store = floor_processes.FloorGroupCommit(Path(paths["floor"]))
    try:
        count = floor_store.count()
    finally:
        floor_store.close()
    if count != distinct:
        raise RuntimeError(f"writer processes: the floor holds {count:,} of {distinct:,} ids")
    acked, distinct = totals["sqlite"]
    with sqlite3.connect(paths["sqlite"]) as conn:
        (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
    conn.close()
    if count != distinct:
        raise RuntimeError(f"writer processes: SQLite holds {count:,} rows of {distinct:,} ids")
    acked, distinct = totals["diskcache"]
    if distinct and (cache := open_diskcache(Path(paths["diskcache"]))) is not None:
        count = len(cache)
        cache.close()
        if count != distinct:
            raise RuntimeError(f"writer processes: diskcache holds {count:,} of {distinct:,} ids")


def path_mp_puts(bench: Bench, processes: int) -> dict[str, float]:
    """Durable single puts from ``processes`` processes at once into one data directory (default
    config), against as many processes doing autocommit INSERT OR REPLACE into one SQLite file
    (WAL, ``synchronous=FULL``, busy timeout) and ``Cache.set`` into one diskcache. Each
    run: every process prepares fresh ids, all start together and put for ``mp_seconds``;
    the rate is all acknowledged puts over the wall time from the start to the last
    process's last acknowledgement."""
    pool, paths, state = mp_pool(bench), mp_put_stores(bench), mp_state(bench)
    seconds = bench.settings.mp_seconds
    cap = put_cap(seconds)

    def side(kind: str) -> Callable[[], float]:
        def one_run() -> float:
            run = pool.runs
            commands = [
                ("puts", kind, paths[kind], f"mp{run}w{i}", cap, seconds) for i in range(processes)
            ]
            start, answers = pool.run(commands)
            totals = state.put_totals[kind]
            totals[0] += sum(n for n, _, _ in answers)
            totals[1] += sum(d for _, d, _ in answers)
            return pool_rate(start, answers)

        return one_run

    kinds = ("ours", "floor", *(kind for kind in mp_kinds() if kind != "ours"))
    rates = bench.rotated({kind: side(kind) for kind in kinds})
    check_mp_put_stores(bench, paths)
    state.put_rates[processes] = rates
    return rates


def path_mp_puts_1(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_puts` with 1 process (the baseline of the scaling note)."""
    return path_mp_puts(bench, 1)


def path_mp_puts_2(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_puts` with 2 processes."""
    return path_mp_puts(bench, 2)


def path_mp_puts_4(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_puts` with 4 processes (SPEC: at least 2x SQLite)."""
    return path_mp_puts(bench, 4)


# --- reader processes ---------------------------------------------------------------------------


@shared
def mp_lookup_stores(bench: Bench) -> dict[str, str]:
    """Our store (built fast, then synced) and a SQLite file, each holding the ``records``
    instances of :meth:`Bench.dataset`."""
    ours = bench.path("ours-mp-get")
    storage = Storage.open(fast_config(ours))
    try:
        put_batches(storage, bench.dataset())
        if storage.count_instances() != bench.settings.records:
            raise RuntimeError(f"lookup store holds {storage.count_instances()} instances")
    finally:
        storage.close()
    sqlite_file = bench.path("sqlite-mp-get") / "bench.sqlite"
    conn = open_sqlite(sqlite_file, by_state=True)
    try:
        fill_sqlite_dataset(conn, bench.settings.records, by_state=True)
    finally:
        conn.close()
    cache_dir = bench.path("diskcache-mp-get")
    if (cache := open_diskcache(cache_dir)) is not None:
        try:
            with cache.transact():
                for seq, f in enumerate(bench.dataset(), start=1):
                    cache.set(f["id"], encode_record(f, seq))
        finally:
            cache.close()
    sync_tree(ours)
    sync_tree(sqlite_file.parent)
    sync_tree(cache_dir)
    return {"ours": str(ours), "sqlite": str(sqlite_file), "diskcache": str(cache_dir)}


@shared
def mp_lookups(bench: Bench) -> Lookups:
    """Lookups per second of 1 and 2 reader processes, each with and without one writer
    process making durable puts of fresh ids into the same store meanwhile, and the writer
    alone, ours and SQLite, all in rotation. Returns, for (kind, readers, with writer), the
    median lookups/s of all readers together and the median puts/s of the writer (0 without
    one); for (kind, 0, True), the writer alone: its puts/s twice. Measured once for both
    reader-process rows."""
    pool, paths = mp_pool(bench), mp_lookup_stores(bench)
    seconds = bench.settings.mp_seconds / 2
    records = bench.settings.records
    cap = put_cap(seconds)
    configs = [
        (kind, readers, writer)
        for kind in mp_kinds()
        for readers in (0, *MP_READER_COUNTS)
        for writer in ((True, False) if bench.settings.mp_idle else (True,))
        if readers or writer
    ]
    writer_rates: dict[tuple[str, int, bool], list[float]] = {c: [] for c in configs}

    def config_run(config: tuple[str, int, bool]) -> Callable[[], float]:
        kind, readers, writer = config

        def one_run() -> float:
            run = pool.runs
            commands: list[tuple[Any, ...]] = [
                ("gets", kind, paths[kind], records, 1_000 + i, seconds) for i in range(readers)
            ]
            if not readers:
                commands.append(("puts", kind, paths[kind], f"mpr{run}", cap, seconds))
            elif writer:
                commands.append(("puts_until_stop", kind, paths[kind], f"mpr{run}", cap))
            start, answers = pool.run(commands)
            if writer:
                n, _, end = answers[-1]
                writer_rates[config].append(n / (end - start))
            return pool_rate(start, answers[:readers] or answers)

        return one_run

    medians = rotated_medians([config_run(c) for c in configs], bench.settings.repeats)
    return {
        c: (m, statistics.median(writer_rates[c]) if writer_rates[c] else 0.0)
        for c, m in zip(configs, medians, strict=True)
    }


def path_mp_lookups(bench: Bench, readers: int) -> dict[str, float]:
    """``get_instance`` of random existing ids by ``readers`` processes for ``mp_seconds / 2``
    while one writer process makes durable puts into the same store, against SQLite readers
    (SELECT by pk + cbor2.loads) while one SQLite writer inserts, and the same of diskcache;
    lookups/s of all readers."""
    lookups = mp_lookups(bench)
    return {kind: lookups[(kind, readers, True)][0] for kind in mp_kinds()}


def path_mp_lookups_1(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_lookups` with 1 reader process."""
    return path_mp_lookups(bench, 1)


def path_mp_lookups_2(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_lookups` with 2 reader processes."""
    return path_mp_lookups(bench, 2)


def path_mp_lookups_4(bench: Bench) -> dict[str, float]:
    """:func:`path_mp_lookups` with 4 reader processes (SPEC: at least 2.5x SQLite)."""
    return path_mp_lookups(bench, 4)


MP_LOOKUP_RUNS = (path_mp_lookups_1, path_mp_lookups_2, path_mp_lookups_4)


# --- the notes under the table ------------------------------------------------------------------


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mp_notes(bench: Bench, runs: Sequence[Callable[[Bench], Any]]) -> list[str]:
    """The lines printed under the table about the multi-process rows that ran (``runs``: the
    functions of the rows in the table)."""
    lines = []
    cores = usable_cores()
    state = bench.built.get(mp_state)
    rates = state.put_rates if state is not None else {}
    if rates:
        seconds = bench.settings.mp_seconds
        lines.append(
            f"writer-process rows: durable single puts/s of all processes together, each "
            f"putting its own fresh ids for {seconds:g} s from a common start (default config "
            f"of ours, fsync every write)"
        )
        if 1 in rates and len(rates) > 1:
            more = [n for n in sorted(rates) if n > 1]
            parts = [
                f"{kind} " + ", ".join(f"{n}: {rates[n][kind] / rates[1][kind]:.2f}x" for n in more)
                for kind in rates[1]
            ]
            lines.append(f"  scaling, rate with N processes / with 1: {'; '.join(parts)}")
        if max(rates) > cores:
            lines.append(f"  {max(rates)} processes on {cores} usable cores oversubscribe the CPU")
    lookups = bench.built.get(mp_lookups)
    if lookups is not None and any(run in MP_LOOKUP_RUNS for run in runs):
        lines += lookup_notes(bench, lookups, cores)
    return lines


def lookup_notes(bench: Bench, lookups: Lookups, cores: int) -> list[str]:
    lines = [
        f"reader-process rows: get_instance (SQLite: SELECT by pk + cbor2) of random ids "
        f"among {bench.settings.records:,} instances, lookups/s of all readers together, "
        f"for {bench.settings.mp_seconds / 2:g} s while one writer process makes durable "
        f"puts of fresh ids into the same store"
    ]
    for kind in mp_kinds():
        name = {"ours": "ours", "sqlite": "SQLite"}.get(kind, kind)
        parts = []
        for readers in MP_READER_COUNTS:
            busy, writer_rate = lookups[(kind, readers, True)]
            part = (
                f"{readers} reader{'s' if readers > 1 else ''} {busy:,.0f}/s with the writer "
                f"({writer_rate:,.0f} puts/s)"
            )
            if (kind, readers, False) in lookups:
                idle = lookups[(kind, readers, False)][0]
                part += f", {idle:,.0f}/s with none ({busy / idle:.2f}x)"
            parts.append(part)
        alone = lookups[(kind, 0, True)][1]
        lines.append(f"  {name}: " + "; ".join(parts) + f"; the writer alone {alone:,.0f} puts/s")
    if max(MP_READER_COUNTS) + 1 > cores:
        lines.append(
            f"  {max(MP_READER_COUNTS)} readers + 1 writer on {cores} usable cores "
            f"oversubscribe the CPU"
        )
    return lines
