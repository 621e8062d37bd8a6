"""Benchmarks for rstmdb-storage, printed as ratios measured in one run.

Each comparison times *ours* against *the other* (a ceiling built from the raw
libraries, or SQLite) in the same run, alternating the two within every
repetition, and reports the median rate of each over ``--repeats`` repetitions.
Absolute rates move 20% or more between runs on a shared machine; the ratios
are what the goals in SPEC.md ("Figures it must reach") are about.

Run it from the repository root::

    python scripts/bench.py            # full run (100k records for gets, 10k listed)
    python scripts/bench.py --quick    # small counts, for CI smoke runs (< 60 s)
    python scripts/bench.py --only snapshot --only replay   # just those rows and sections

The exit status is 1 when the package does not behave as the benchmark assumes
(the problems are printed under the table), not when a goal is missed.

To add a comparison, write a function ``compare_xxx(bench) -> (ours, other)``
returning two rates in ops/s (use :func:`paired_medians`) and list it in
:data:`COMPARISONS`. A figure that is not a pair of rates (latency percentiles,
say) is a :class:`Section` in :data:`SECTIONS`: a function ``section_xxx(bench)``
returning the lines printed under the table.

Besides the per-operation rows, the run measures what SPEC.md asks of snapshots and
recovery: ``create_snapshot()`` of a store of ``--snapshot-instances`` instances
(1M) against ``cp`` of its LMDB file, the latency of durable puts in another
process while snapshots run, and WAL replay on open (records per second, rebuilding
a lost ``indexes/`` from ``--replay-records`` single-instance records).

Many processes (SPEC.md guarantee 6): durable puts per second of 1, 2 and 4 writer
processes on one data directory against as many SQLite processes on one file, and
lookups per second of 1 and 2 reader processes while a writer process puts, each run
``--mp-seconds`` long (lookups half of it) in worker processes that :class:`MpPool`
spawns once and starts together. They use only the public API.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import mmap
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import cbor2
import crc32c
import lmdb

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

BATCH_SIZE = 10_000
"""Instances per ``storage.batch()`` (and rows per SQLite transaction)."""

CREATED_MS = 1_767_225_600_000
"""A fixed timestamp for the ceiling's and SQLite's records (2026-01-01)."""

WAL_FRAME = struct.Struct("<IQI")
"""The ceiling's stand-in for WAL framing: length, sequence, CRC32C."""

LIST_MACHINE = "order"
LIST_STATES = ("pending", "paid", "shipped", "delivered", "cancelled")
"""The listing stores hold ``list_matches`` instances in each of these states, in turn."""

LIST_STATE = "paid"
"""The state the listing comparisons ask for: exactly ``list_matches`` instances."""

LIST_MIN_PER_REPETITION = 20_000
"""Each listing repetition repeats the listing until it has listed at least this many
instances (twice for 10k matches, ten times for --quick's 2k), so that no run is timed alone."""

REPLAY_GOAL = 100_000
"""SPEC.md's goal for recovery replay, in WAL records per second on open."""

REPLAY_TXN_RECORDS = 2_000
"""Records per write transaction of the replay ceiling (the store replays 2,000 per txn)."""

WRITER_TIMEOUT = 300.0
"""Seconds the latency section waits for its writer process before giving up."""

MP_WRITER_COUNTS = (1, 2, 4)
"""Writer processes of the multi-process durable-put rows (SPEC's goal is on 4)."""

MP_READER_COUNTS = (1, 2)
"""Reader processes of the multi-process lookup rows (each with one writer process)."""

MP_WRITERS_GOAL = 2.0
"""SPEC.md's goal for 4 writer processes against SQLite with 4 processes."""

MP_PUT_CAP_RATE = 8_000
"""Instances each writer process builds per second of its run, before the run (puts beyond
that many write the same ids again)."""

MP_LOOKUP_IDS = 50_000
"""Random existing ids each reader process draws once and then looks up in turn."""

MP_START_DELAY = 0.05
"""Seconds between releasing the worker processes and the common start of a timed run."""

MP_BUSY_TIMEOUT_MS = 60_000
"""SQLite busy timeout of the worker processes: a writer waits for the lock, never fails."""


# --------------------------------------------------------------------------
# Settings and the dataset
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Counts for one run; ``--quick`` picks small ones."""

    repeats: int
    records: int
    lookups: int
    puts: int
    batches: int
    list_matches: int
    snapshot_instances: int
    replay_records: int
    mp_seconds: float
    """Seconds of each multi-process durable-put run (lookup runs take half of it)."""


def settings_from(args: argparse.Namespace) -> Settings:
    """Turn the command line into counts, filling what was not given."""
    quick = args.quick
    records = args.records or (10_000 if quick else 100_000)
    return Settings(
        repeats=args.repeats or (3 if quick else 5),
        records=records,
        lookups=args.lookups or (20_000 if quick else 100_000),
        puts=args.puts or (500 if quick else 3_000),
        batches=args.batches or (1 if quick else 3),
        list_matches=args.list_matches or (2_000 if quick else 10_000),
        snapshot_instances=args.snapshot_instances or (20_000 if quick else 1_000_000),
        replay_records=args.replay_records or (20_000 if quick else 200_000),
        mp_seconds=args.mp_seconds or (0.5 if quick else 2.0),
    )


def instance_id(prefix: str, i: int) -> str:
    return f"{prefix}-{i:08d}"


def instance_fields(iid: str, i: int) -> dict[str, Any]:
    """The caller-supplied fields of one ~200-byte instance."""
    return {
        "id": iid,
        "machine": "order",
        "version": 1,
        "state": ("pending", "paid", "shipped", "delivered")[i % 4],
        "ctx": {
            "total": 99.5 + i % 1000,
            "items": i % 7 + 1,
            "currency": "EUR",
            "priority": i % 3,
            "note": "leave at the back door, ring twice",
        },
        "metadata": {"customer": f"customer-{i % 5000:05d}", "region": "eu-west-1"},
    }


def listing_fields(i: int) -> dict[str, Any]:
    """Instance ``i`` of the listing stores, in ``LIST_STATES[i % len(LIST_STATES)]``."""
    fields = instance_fields(instance_id("list", i), i)
    fields["state"] = LIST_STATES[i % len(LIST_STATES)]
    return fields


def record_array(fields: dict[str, Any], seq: int) -> list[Any]:
    """All instance fields as a positional array: the ceiling's and SQLite's record.

    The order is Instance's: id, machine, version, state, ctx, metadata,
    status, last_event_id, last_wal_offset, created_at, updated_at.
    """
    return [
        fields["id"],
        fields["machine"],
        fields["version"],
        fields["state"],
        fields["ctx"],
        fields["metadata"],
        "active",
        None,
        seq,
        CREATED_MS,
        CREATED_MS,
    ]


def encode_record(fields: dict[str, Any], seq: int) -> bytes:
    """``cbor2.dumps`` of the record array (what SQLite stores)."""
    return cbor2.dumps(record_array(fields, seq))


def envelope(payload: bytes) -> bytes:
    """CRC32C (4 bytes, little-endian) + payload (what the raw LMDB ceiling stores)."""
    return crc32c.crc32c(payload).to_bytes(4, "little") + payload


def make_instance(fields: dict[str, Any]) -> Any:
    from rstmdb_storage import Instance

    return Instance(**fields)


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def rate(ops: int, run: Callable[[], None]) -> float:
    """Run ``run`` once and return ``ops`` per second of wall time."""
    gc.collect()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    return ops / elapsed


def paired_medians(
    ours: Callable[[], float], other: Callable[[], float], repeats: int
) -> tuple[float, float]:
    """Run both sides ``repeats`` times, alternating which goes first.

    Each callable runs one repetition and returns its rate. Returns the two
    median rates; running the pair back to back keeps the machine's drift
    from favouring either side.
    """
    ours_median, other_median = rotated_medians([ours, other], repeats)
    return ours_median, other_median


def rotated_medians(runs: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """:func:`paired_medians` for any number of sides: repetition ``r`` starts with side
    ``r % len(runs)`` and goes round. Returns the median rate of each side, in order."""
    rates: list[list[float]] = [[] for _ in runs]
    for rep in range(repeats):
        for k in range(len(runs)):
            side = (rep + k) % len(runs)
            rates[side].append(runs[side]())
    return [statistics.median(side_rates) for side_rates in rates]


# --------------------------------------------------------------------------
# The contenders' stores
# --------------------------------------------------------------------------


def open_sqlite(path: Path) -> sqlite3.Connection:
    """SQLite in WAL mode, ``synchronous=FULL``, autocommit; table (id, value)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, value BLOB)")
    return conn


def open_sqlite_by_state(path: Path) -> sqlite3.Connection:
    """SQLite as :func:`open_sqlite`, with table (id, machine, state, value) indexed on
    (machine, state)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS instances "
        "(id TEXT PRIMARY KEY, machine TEXT, state TEXT, value BLOB)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS by_state ON instances (machine, state)")
    return conn


def open_ceiling_env(path: Path, map_size: int) -> tuple[lmdb.Environment, Any]:
    """A raw LMDB environment, as the store opens its own, with one sub-database."""
    env = lmdb.open(str(path), subdir=True, max_dbs=4, sync=False, map_size=map_size)
    return env, env.open_db(b"instances")


def open_ours_fast(path: Path) -> Any:
    """Our store in ``path`` with :func:`fast_config`."""
    from rstmdb_storage import Storage

    return Storage.open(fast_config(path))


def open_ours(path: Path, durable: bool = True) -> Any:
    """Our store in ``path``: the default fsync policy (every write), or none. Automatic
    snapshots are off, so that a snapshot started in the background by loading a store does
    not run under the timings of gets, puts and listings (snapshots have rows of their own)."""
    from rstmdb_storage import FsyncPolicy, Storage, StorageConfig

    policy = FsyncPolicy.every_write() if durable else FsyncPolicy.never()
    return Storage.open(StorageConfig(data_dir=str(path), fsync_policy=policy, snapshot_interval=0))


def fast_config(path: Path) -> Any:
    """A config for building big stores quickly: no fsync, and no automatic snapshots or
    compaction (the replay comparison needs the whole WAL, from sequence number 1)."""
    from rstmdb_storage import FsyncPolicy, StorageConfig

    return StorageConfig(
        data_dir=str(path),
        fsync_policy=FsyncPolicy.never(),
        snapshot_interval=0,
        compaction_enabled=False,
    )


def chunks(seq: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: a store built without fsync leaves
    hundreds of MB dirty, and their writeback would otherwise land inside a timed run.

    Lock files are left alone: they hold no data, and closing a descriptor of ``lock.mdb``
    drops every POSIX lock this process holds on it, among them the one that tells other
    processes its LMDB readers are alive. Their ``reader_check`` would then free our
    readers' slots, and their writes reuse pages our snapshots were still copying."""
    from rstmdb_storage.fsutil import fsync_dir, fsync_file

    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name != "lock.mdb" and not name.endswith(".lock"):
                fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def remove_snapshot(data_dir: Path, manifest: Any) -> None:
    """Delete a published snapshot's two files (so the next one is made afresh)."""
    from rstmdb_storage.snapshots import DATA_SUFFIX, MANIFEST_SUFFIX

    for suffix in (DATA_SUFFIX, MANIFEST_SUFFIX):
        (data_dir / "snapshots" / (manifest.name + suffix)).unlink(missing_ok=True)


class Bench:
    """Working directory, counts, and the stores shared by several comparisons.

    Stores are built lazily on first use and closed by :meth:`close`.
    """

    def __init__(self, workdir: Path, settings: Settings) -> None:
        self.workdir = workdir
        self.settings = settings
        self._closers: list[Callable[[], None]] = []
        rng = random.Random(20260101)
        n = settings.records
        self.lookup_ids = [instance_id("order", rng.randrange(n)) for _ in range(settings.lookups)]
        self._mp_pool: MpPool | None = None
        self.mp_put_rates: dict[int, tuple[float, float]] = {}
        """(ours, SQLite) median puts/s of each writer-process count measured so far."""
        self.mp_put_totals = {"ours": [0, 0], "sqlite": [0, 0]}
        """Acknowledged puts and distinct ids written so far into each multi-process put store."""

    def mp_pool(self) -> MpPool:
        """The worker processes of the multi-process rows, spawned on first use (again after
        a failure, which kills them)."""
        if self._mp_pool is None or self._mp_pool.broken:
            size = max(max(MP_WRITER_COUNTS), max(MP_READER_COUNTS) + 1)
            self._mp_pool = MpPool(size)
            self.on_close(self._mp_pool.close)
        return self._mp_pool

    def path(self, name: str) -> Path:
        p = self.workdir / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> list[str]:
        """Close every store, newest first; return what went wrong."""
        problems = []
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:
                problems.append(f"closing: {exc!r}")
        return problems

    def dataset(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(self.settings.records):
            yield i, instance_fields(instance_id("order", i), i)

    @cached_property
    def ours_loaded(self) -> Any:
        """Our store holding ``records`` instances, loaded in batches."""
        storage = open_ours(self.path("ours-get"))
        self.on_close(storage.close)
        for part in chunks(list(self.dataset()), BATCH_SIZE):
            with storage.batch() as b:
                for _, fields in part:
                    b.put_instance(make_instance(fields))
        return storage

    @cached_property
    def ceiling_loaded(self) -> tuple[lmdb.Environment, Any]:
        """Raw LMDB holding the same records as ``crc32c + cbor2 array``."""
        env, db = open_ceiling_env(self.path("ceiling-get"), map_size=1 << 32)
        self.on_close(env.close)
        with env.begin(write=True, db=db) as txn:
            for i, fields in self.dataset():
                txn.put(fields["id"].encode(), envelope(encode_record(fields, i + 1)))
        return env, db

    @cached_property
    def sqlite_loaded(self) -> sqlite3.Connection:
        """SQLite holding the same records, cbor2-encoded."""
        conn = open_sqlite(self.path("sqlite-get") / "bench.sqlite")
        self.on_close(conn.close)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO instances (id, value) VALUES (?, ?)",
            ((f["id"], encode_record(f, i + 1)) for i, f in self.dataset()),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conn

    def listing_dataset(self) -> list[dict[str, Any]]:
        n = self.settings.list_matches * len(LIST_STATES)
        return [listing_fields(i) for i in range(n)]

    @cached_property
    def ours_by_state(self) -> Any:
        """Our store holding ``list_matches`` instances in each of ``LIST_STATES``."""
        storage = open_ours(self.path("ours-list"))
        self.on_close(storage.close)
        for part in chunks(self.listing_dataset(), BATCH_SIZE):
            with storage.batch() as b:
                for fields in part:
                    b.put_instance(make_instance(fields))
        return storage

    @cached_property
    def sqlite_by_state(self) -> sqlite3.Connection:
        """SQLite holding the same records, cbor2-encoded, one transaction per 10k."""
        conn = open_sqlite_by_state(self.path("sqlite-list") / "bench.sqlite")
        self.on_close(conn.close)
        seq = 0
        for part in chunks(self.listing_dataset(), BATCH_SIZE):
            rows = []
            for f in part:
                seq += 1
                rows.append((f["id"], f["machine"], f["state"], encode_record(f, seq)))
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO instances (id, machine, state, value) VALUES (?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # No ANALYZE: with statistics, SQLite scans the primary key in id order instead
        # of using the (machine, state) index and sorting, as the comparison asks.
        return conn

    @cached_property
    def snapshot_store(self) -> tuple[Any, Path]:
        """Our store holding ``snapshot_instances`` instances, built without fsync in batches
        of 10k, then synced; and its data directory."""
        data_dir = self.path("ours-snapshot")
        storage = open_ours_fast(data_dir)
        self.on_close(storage.close)
        n = self.settings.snapshot_instances
        for start in range(0, n, BATCH_SIZE):
            with storage.batch() as b:
                for i in range(start, min(n, start + BATCH_SIZE)):
                    b.put_instance(make_instance(instance_fields(instance_id("snap", i), i)))
        storage.checkpoint()
        sync_tree(data_dir)
        if storage.count_instances() != n:
            raise RuntimeError(f"snapshot store holds {storage.count_instances()} instances")
        return storage, data_dir

    @cached_property
    def snapshot_medians(self) -> dict[str, float]:
        """Median rates (whole copies per second) of ``create_snapshot()`` and of copying
        ``indexes/data.mdb`` with and without fsync, measured in rotation."""
        from rstmdb_storage.fsutil import fsync_file

        storage, data_dir = self.snapshot_store
        n = self.settings.snapshot_instances
        source = data_dir / "indexes" / "data.mdb"
        target = data_dir / "indexes" / "data.mdb.cp"

        def snapshot() -> float:
            gc.collect()
            start = time.perf_counter()
            manifest = storage.create_snapshot()
            elapsed = time.perf_counter() - start
            remove_snapshot(data_dir, manifest)
            if manifest.instances != n:
                raise RuntimeError(f"create_snapshot: manifest counts {manifest.instances}")
            return 1 / elapsed

        def copy(fsync: bool) -> float:
            gc.collect()
            start = time.perf_counter()
            shutil.copyfile(source, target)
            if fsync:
                fsync_file(target)
            elapsed = time.perf_counter() - start
            target.unlink()
            return 1 / elapsed

        ours, cp_fsync, cp = rotated_medians(
            [snapshot, lambda: copy(True), lambda: copy(False)], self.settings.repeats
        )
        return {"snapshot": ours, "cp+fsync": cp_fsync, "cp": cp}

    @cached_property
    def replay_medians(self) -> dict[str, float]:
        """Median rates (records per second) of ``Storage.open`` rebuilding a deleted
        ``indexes/`` from ``replay_records`` WAL records, and of the raw ceiling."""
        n = self.settings.replay_records
        data_dir = self.path("ours-replay")
        config = fast_config(data_dir)
        fields = [instance_fields(instance_id("replay", i), i) for i in range(n)]
        from rstmdb_storage import Storage

        with Storage.open(config) as storage:
            first_seq = storage.put_instance(make_instance(fields[0]))
            put = storage.put_instance
            for f in fields[1:]:
                put(make_instance(f))
            last_seq = storage.applied_seq
        if first_seq != 1 or last_seq != n:
            raise RuntimeError(f"replay store: sequence numbers {first_seq}..{last_seq}")
        frames = self.path("ceiling-replay") / "frames"
        with open(frames, "wb") as out:
            for seq, f in enumerate(fields, start=1):
                value = envelope(encode_record(f, seq))
                out.write(WAL_FRAME.pack(len(value), seq, crc32c.crc32c(value)) + value)
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
            directory = self.workdir / "ceiling-replay" / "env"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            gc.collect()
            start = time.perf_counter()
            replayed = replay_ceiling(frames, directory)
            elapsed = time.perf_counter() - start
            if replayed != n:
                raise RuntimeError(f"replay ceiling: {replayed} records")
            return n / elapsed

        ours_rate, ceiling_rate = paired_medians(ours, ceiling, self.settings.repeats)
        return {"ours": ours_rate, "ceiling": ceiling_rate}

    @cached_property
    def mp_lookups(self) -> dict[tuple[str, int, bool], tuple[float, float]]:
        """:func:`measure_mp_lookups`, once for both reader-process rows."""
        return measure_mp_lookups(self)

    @cached_property
    def by_state_stores(self) -> tuple[Any, sqlite3.Connection]:
        """Both listing stores, checked once to list the same ids in the same order."""
        storage, conn = self.ours_by_state, self.sqlite_by_state
        query = (LIST_MACHINE, LIST_STATE)
        ours_ids = [inst.id for inst in storage.list_by_state(*query)]
        lazy_ids = [inst.id for inst in storage.iter_by_state(*query)]
        sqlite_ids = [row[0] for row in conn.execute(SQLITE_BY_STATE, query)]
        if len(ours_ids) != self.settings.list_matches:
            raise RuntimeError(f"list_by_state listed {len(ours_ids)} instances")
        if ours_ids != sqlite_ids or lazy_ids != sqlite_ids:
            raise RuntimeError("list_by_state, iter_by_state and SQLite list different ids")
        plan = " ".join(
            row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {SQLITE_BY_STATE}", query)
        )
        if "USING INDEX by_state" not in plan:
            raise RuntimeError(f"SQLite does not use its (machine, state) index: {plan}")
        return storage, conn


# --------------------------------------------------------------------------
# One repetition of each contender
# --------------------------------------------------------------------------


def run_ours_gets(storage: Any, ids: list[str]) -> float:
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
    execute, loads = conn.execute, cbor2.loads
    sql = "SELECT value FROM instances WHERE id = ?"

    def run() -> None:
        for iid in ids:
            loads(execute(sql, (iid,)).fetchone()[0])

    return rate(len(ids), run)


SQLITE_BY_STATE = "SELECT id, value FROM instances WHERE machine = ? AND state = ? ORDER BY id"


def listing_rounds(expected: int) -> int:
    """Listings per repetition: see :data:`LIST_MIN_PER_REPETITION`."""
    return -(-LIST_MIN_PER_REPETITION // expected)


def run_ours_list(storage: Any, expected: int) -> float:
    list_by_state, rounds = storage.list_by_state, listing_rounds(expected)

    def run() -> None:
        for _ in range(rounds):
            if len(list_by_state(LIST_MACHINE, LIST_STATE)) != expected:
                raise RuntimeError("list_by_state: wrong number of instances")

    return rate(expected * rounds, run)


def run_ours_iter(storage: Any, expected: int) -> float:
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
            if len([loads(value) for _, value in rows]) != expected:
                raise RuntimeError("SQLite: wrong number of rows")

    return rate(expected * rounds, run)


def replay_ceiling(frames: Path, directory: Path) -> int:
    """The replay ceiling: read ``WAL_FRAME``-framed records from ``frames``, check each
    frame's CRC32C, decode the record to find its id, and put it into a fresh raw LMDB
    environment in ``directory``, :data:`REPLAY_TXN_RECORDS` per write transaction (no
    indexes, no meta). Returns how many records it applied."""
    env, db = open_ceiling_env(directory, map_size=1 << 32)
    header, crc, loads = WAL_FRAME.size, crc32c.crc32c, cbor2.loads
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
                            length, _seq, checksum = WAL_FRAME.unpack_from(view, offset)
                            value = bytes(view[offset + header : offset + header + length])
                            if crc(value) != checksum:
                                raise RuntimeError(f"replay ceiling: CRC mismatch at {offset}")
                            txn.put(loads(value[4:])[0].encode(), value)
                            offset += header + length
                            count += 1
            finally:
                view.release()
    finally:
        env.close()
    return count


class Counter:
    """Hands out fresh id ranges so that every repetition inserts new instances."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> range:
        start = self.next
        self.next += n
        return range(start, start + n)


def fresh_fields(counter: Counter, prefix: str, n: int) -> list[dict[str, Any]]:
    return [instance_fields(instance_id(prefix, i), i) for i in counter.take(n)]


# --------------------------------------------------------------------------
# Comparisons: each returns (ours ops/s, other ops/s)
# --------------------------------------------------------------------------


def compare_get_vs_ceiling(bench: Bench) -> tuple[float, float]:
    """``get_instance`` against raw lmdb get + crc32c + cbor2.loads."""
    storage = bench.ours_loaded
    env, db = bench.ceiling_loaded
    ids = bench.lookup_ids
    return paired_medians(
        lambda: run_ours_gets(storage, ids),
        lambda: run_ceiling_gets(env, db, ids),
        bench.settings.repeats,
    )


def compare_get_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """``get_instance`` against SQLite SELECT by primary key + cbor2.loads."""
    storage = bench.ours_loaded
    conn = bench.sqlite_loaded
    ids = bench.lookup_ids
    return paired_medians(
        lambda: run_ours_gets(storage, ids),
        lambda: run_sqlite_gets(conn, ids),
        bench.settings.repeats,
    )


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
    sql = "INSERT OR REPLACE INTO instances (id, value) VALUES (?, ?)"

    def sqlite_rep() -> float:
        fields = fresh_fields(counter, "put", bench.settings.puts)
        rows = [(f["id"], encode_record(f, i)) for i, f in enumerate(fields)]
        execute = conn.execute

        def run() -> None:
            for row in rows:
                execute(sql, row)

        return rate(len(rows), run)

    return paired_medians(
        ours_durable_puts(bench, "ours-put-1"), sqlite_rep, bench.settings.repeats
    )


def compare_put_vs_fdatasync(bench: Bench) -> tuple[float, float]:
    """Durable ``put_instance`` against pwrite + fdatasync on a preallocated file."""
    from rstmdb_storage.fsutil import fsync_dir

    directory = bench.path("ceiling-put")
    counter = Counter()

    def ceiling_rep() -> float:
        fields = fresh_fields(counter, "put", bench.settings.puts)
        records = []
        for seq, f in enumerate(fields, start=1):
            value = envelope(encode_record(f, seq))
            records.append(WAL_FRAME.pack(len(value), seq, crc32c.crc32c(value)) + value)
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

    return paired_medians(
        ours_durable_puts(bench, "ours-put-2"), ceiling_rep, bench.settings.repeats
    )


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
        sql = "INSERT OR REPLACE INTO instances (id, value) VALUES (?, ?)"

        def run() -> None:
            for part in chunks(fields, BATCH_SIZE):
                conn.execute("BEGIN")
                conn.executemany(sql, ((f["id"], encode_record(f, 0)) for f in part))
                conn.execute("COMMIT")

        return rate(n, run)

    return paired_medians(ours_rep, sqlite_rep, bench.settings.repeats)


def compare_list_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """``list_by_state`` (all matches, decoded Instances) against SQLite's indexed
    SELECT ... ORDER BY id + cbor2.loads of each value."""
    storage, conn = bench.by_state_stores
    n = bench.settings.list_matches
    return paired_medians(
        lambda: run_ours_list(storage, n),
        lambda: run_sqlite_list(conn, n),
        bench.settings.repeats,
    )


def compare_iter_vs_sqlite(bench: Bench) -> tuple[float, float]:
    """``iter_by_state`` (lazy, page by page) against the same SQLite query; no goal."""
    storage, conn = bench.by_state_stores
    n = bench.settings.list_matches
    return paired_medians(
        lambda: run_ours_iter(storage, n),
        lambda: run_sqlite_list(conn, n),
        bench.settings.repeats,
    )


def compare_snapshot_vs_cp_fsync(bench: Bench) -> tuple[float, float]:
    """``create_snapshot()`` of the big store (compacting copy in one read transaction,
    fsync, CRC32C pass, publish) against ``shutil.copyfile`` of its ``indexes/data.mdb``
    plus fsync of the copy. Rates are whole copies per second, so the ratio is
    time(cp) / time(snapshot)."""
    medians = bench.snapshot_medians
    return medians["snapshot"], medians["cp+fsync"]


def compare_snapshot_vs_cp(bench: Bench) -> tuple[float, float]:
    """As :func:`compare_snapshot_vs_cp_fsync`, against the copy without fsync (as
    ``cp`` leaves it: in the page cache)."""
    medians = bench.snapshot_medians
    return medians["snapshot"], medians["cp"]


def compare_replay_vs_goal(bench: Bench) -> tuple[float, float]:
    """WAL records replayed per second by ``Storage.open`` rebuilding a deleted
    ``indexes/``, against SPEC.md's 100k records/s (a constant, not a measurement)."""
    return bench.replay_medians["ours"], float(REPLAY_GOAL)


def compare_replay_vs_ceiling(bench: Bench) -> tuple[float, float]:
    """The same replay against :func:`replay_ceiling` on the same records."""
    medians = bench.replay_medians
    return medians["ours"], medians["ceiling"]


# --------------------------------------------------------------------------
# Many processes: durable writers, and readers while a writer runs
# --------------------------------------------------------------------------


def mp_open(kind: str, path: str) -> Any:
    """What a worker process writes or reads with: our store with the default config (fsync
    every write) and no automatic snapshots, or a SQLite connection as :func:`open_sqlite` that
    waits up to :data:`MP_BUSY_TIMEOUT_MS` for the write lock."""
    if kind == "ours":
        from rstmdb_storage import Storage, StorageConfig

        return Storage.open(StorageConfig(data_dir=path, snapshot_interval=0))
    conn = open_sqlite(Path(path))
    conn.execute(f"PRAGMA busy_timeout = {MP_BUSY_TIMEOUT_MS}")
    return conn


def mp_put_call(kind: str, handle: Any, prefix: str, cap: int) -> tuple[Callable[..., Any], list]:
    """One durable single put and its ``cap`` prepared arguments (fresh ids ``prefix-i``):
    ``put_instance`` of an Instance, or an autocommit INSERT OR REPLACE of the same fields'
    CBOR record bytes."""
    fields = [instance_fields(instance_id(prefix, i), i) for i in range(cap)]
    if kind == "ours":
        return handle.put_instance, [make_instance(f) for f in fields]
    execute = handle.execute
    sql = "INSERT OR REPLACE INTO instances (id, value) VALUES (?, ?)"
    return (lambda row: execute(sql, row)), [
        (f["id"], encode_record(f, i)) for i, f in enumerate(fields)
    ]


def mp_get_call(kind: str, handle: Any) -> Callable[[str], Any]:
    """One lookup by id, decoded: ``get_instance``, or SELECT by primary key + cbor2.loads."""
    if kind == "ours":
        return handle.get_instance
    execute, loads = handle.execute, cbor2.loads
    sql = "SELECT value FROM instances WHERE id = ?"

    def get(iid: str) -> Any:
        row = execute(sql, (iid,)).fetchone()
        return None if row is None else loads(row[0])

    return get


def mp_worker(index: int, conn: Any, go: Any, stop: Any, start: Any) -> None:
    """A worker process of :class:`MpPool` (module level, so that 'spawn' can import it).

    Serves commands from ``conn`` until ``None``:

    - ``("puts", kind, path, prefix, cap, seconds)``: durable single puts of fresh ids for
      ``seconds`` from the common start;
    - ``("puts_until_stop", kind, path, prefix, cap)``: the same until ``stop`` is set;
    - ``("gets", kind, path, records, seed, seconds)``: lookups of random ids among the
      ``records`` instances ``order-00000000`` ... for ``seconds``.

    ``kind`` is ``"ours"`` or ``"sqlite"`` (see :func:`mp_open`; each store is opened once and
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

    def run(self, commands: list[tuple[Any, ...]]) -> tuple[float, list[tuple[int, int, float]]]:
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
            answers: dict[int, tuple[int, int, float]] = {}
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


def mp_put_stores(bench: Bench) -> dict[str, str]:
    """The data directory and the SQLite file that all writer-process counts write into,
    created here (empty) so that the workers only open them."""
    from rstmdb_storage import Storage, StorageConfig

    ours = bench.path("ours-mp-put")
    sqlite_file = bench.path("sqlite-mp-put") / "bench.sqlite"
    if not sqlite_file.exists():
        Storage.open(StorageConfig(data_dir=str(ours), snapshot_interval=0)).close()
        open_sqlite(sqlite_file).close()
    return {"ours": str(ours), "sqlite": str(sqlite_file)}


def check_mp_put_stores(bench: Bench, paths: dict[str, str]) -> None:
    """Both stores hold every distinct id the workers wrote, and our store's last sequence
    number is the number of acknowledged puts (one per put, none lost or doubled)."""
    from rstmdb_storage import Storage, StorageConfig

    acked, distinct = bench.mp_put_totals["ours"]
    with Storage.open(StorageConfig(data_dir=paths["ours"], snapshot_interval=0)) as storage:
        count, applied = storage.count_instances(), storage.applied_seq
    if count != distinct or applied != acked:
        raise RuntimeError(
            f"writer processes: our store holds {count:,} instances at sequence {applied:,} "
            f"after {acked:,} acknowledged puts of {distinct:,} ids"
        )
    acked, distinct = bench.mp_put_totals["sqlite"]
    with sqlite3.connect(paths["sqlite"]) as conn:
        (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
    conn.close()
    if count != distinct:
        raise RuntimeError(f"writer processes: SQLite holds {count:,} rows of {distinct:,} ids")


def compare_mp_puts(bench: Bench, processes: int) -> tuple[float, float]:
    """Durable single puts from ``processes`` processes at once into one data directory (default
    config), against as many processes doing autocommit INSERT OR REPLACE into one SQLite file
    (WAL, ``synchronous=FULL``, busy timeout). Each run: every process prepares fresh ids, all
    start together and put for ``mp_seconds``; the rate is all acknowledged puts over the wall
    time from the start to the last process's last acknowledgement."""
    pool, paths = bench.mp_pool(), mp_put_stores(bench)
    seconds = bench.settings.mp_seconds
    cap = max(1_000, int(MP_PUT_CAP_RATE * seconds))

    def side(kind: str) -> Callable[[], float]:
        def one_run() -> float:
            run = pool.runs
            commands = [
                ("puts", kind, paths[kind], f"mp{run}w{i}", cap, seconds) for i in range(processes)
            ]
            start, answers = pool.run(commands)
            totals = bench.mp_put_totals[kind]
            totals[0] += sum(n for n, _, _ in answers)
            totals[1] += sum(d for _, d, _ in answers)
            return sum(n for n, _, _ in answers) / (max(end for _, _, end in answers) - start)

        return one_run

    ours, other = paired_medians(side("ours"), side("sqlite"), bench.settings.repeats)
    check_mp_put_stores(bench, paths)
    bench.mp_put_rates[processes] = (ours, other)
    return ours, other


def compare_mp_puts_1(bench: Bench) -> tuple[float, float]:
    """:func:`compare_mp_puts` with 1 process (the baseline of the scaling note)."""
    return compare_mp_puts(bench, 1)


def compare_mp_puts_2(bench: Bench) -> tuple[float, float]:
    """:func:`compare_mp_puts` with 2 processes."""
    return compare_mp_puts(bench, 2)


def compare_mp_puts_4(bench: Bench) -> tuple[float, float]:
    """:func:`compare_mp_puts` with 4 processes (SPEC: at least 2x SQLite)."""
    return compare_mp_puts(bench, 4)


def mp_lookup_stores(bench: Bench) -> dict[str, str]:
    """Our store (built fast, then synced) and a SQLite file, each holding the ``records``
    instances of :meth:`Bench.dataset`."""
    ours = bench.path("ours-mp-get")
    storage = open_ours_fast(ours)
    try:
        for part in chunks(list(bench.dataset()), BATCH_SIZE):
            with storage.batch() as b:
                for _, fields in part:
                    b.put_instance(make_instance(fields))
        if storage.count_instances() != bench.settings.records:
            raise RuntimeError(f"lookup store holds {storage.count_instances()} instances")
    finally:
        storage.close()
    sqlite_file = bench.path("sqlite-mp-get") / "bench.sqlite"
    conn = open_sqlite(sqlite_file)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO instances (id, value) VALUES (?, ?)",
            ((f["id"], encode_record(f, i + 1)) for i, f in bench.dataset()),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    sync_tree(ours)
    sync_tree(sqlite_file.parent)
    return {"ours": str(ours), "sqlite": str(sqlite_file)}


def measure_mp_lookups(bench: Bench) -> dict[tuple[str, int, bool], tuple[float, float]]:
    """Lookups per second of 1 and 2 reader processes, each with and without one writer
    process making durable puts of fresh ids into the same store meanwhile, and the writer
    alone, ours and SQLite, all in rotation. Returns, for (kind, readers, with writer), the
    median lookups/s of all readers together and the median puts/s of the writer (0 without
    one); for (kind, 0, True), the writer alone: its puts/s twice."""
    pool, paths = bench.mp_pool(), mp_lookup_stores(bench)
    seconds = bench.settings.mp_seconds / 2
    records = bench.settings.records
    cap = max(1_000, int(MP_PUT_CAP_RATE * seconds))
    configs = [
        (kind, readers, writer)
        for kind in ("ours", "sqlite")
        for readers in (0, *MP_READER_COUNTS)
        for writer in (True, False)
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
            reads = answers[:readers] or answers
            return sum(n for n, _, _ in reads) / (max(end for _, _, end in reads) - start)

        return one_run

    medians = rotated_medians([config_run(c) for c in configs], bench.settings.repeats)
    return {
        c: (m, statistics.median(writer_rates[c]) if writer_rates[c] else 0.0)
        for c, m in zip(configs, medians, strict=True)
    }


def compare_mp_lookups(bench: Bench, readers: int) -> tuple[float, float]:
    """``get_instance`` of random existing ids by ``readers`` processes for ``mp_seconds / 2``
    while one writer process makes durable puts into the same store, against SQLite readers
    (SELECT by pk + cbor2.loads) while one SQLite writer inserts; lookups/s of all readers."""
    lookups = bench.mp_lookups
    return lookups[("ours", readers, True)][0], lookups[("sqlite", readers, True)][0]


def compare_mp_lookups_1(bench: Bench) -> tuple[float, float]:
    """:func:`compare_mp_lookups` with 1 reader process."""
    return compare_mp_lookups(bench, 1)


def compare_mp_lookups_2(bench: Bench) -> tuple[float, float]:
    """:func:`compare_mp_lookups` with 2 reader processes."""
    return compare_mp_lookups(bench, 2)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mp_notes(bench: Bench, comparisons: list[Comparison]) -> list[str]:
    """The lines printed under the table about the multi-process rows that ran."""
    lines = []
    cores = usable_cores()
    rates = bench.mp_put_rates
    if rates:
        seconds = bench.settings.mp_seconds
        lines.append(
            f"writer-process rows: durable single puts/s of all processes together, each "
            f"putting its own fresh ids for {seconds:g} s from a common start (default config "
            f"of ours, fsync every write)"
        )
        if 1 in rates and len(rates) > 1:
            more = [n for n in sorted(rates) if n > 1]
            ours = ", ".join(f"{n}: {rates[n][0] / rates[1][0]:.2f}x" for n in more)
            other = ", ".join(f"{n}: {rates[n][1] / rates[1][1]:.2f}x" for n in more)
            lines.append(f"  scaling, rate with N processes / with 1: ours {ours}; SQLite {other}")
        if max(rates) > cores:
            lines.append(f"  {max(rates)} processes on {cores} usable cores oversubscribe the CPU")
    lookups = bench.__dict__.get("mp_lookups")
    if lookups is not None and any(c.run in MP_LOOKUP_RUNS for c in comparisons):
        lines.append(
            f"reader-process rows: get_instance (SQLite: SELECT by pk + cbor2) of random ids "
            f"among {bench.settings.records:,} instances, lookups/s of all readers together, "
            f"for {bench.settings.mp_seconds / 2:g} s while one writer process makes durable "
            f"puts of fresh ids into the same store"
        )
        for kind, name in (("ours", "ours"), ("sqlite", "SQLite")):
            parts = []
            for readers in MP_READER_COUNTS:
                busy, writer_rate = lookups[(kind, readers, True)]
                idle, _ = lookups[(kind, readers, False)]
                parts.append(
                    f"{readers} reader{'s' if readers > 1 else ''} {busy:,.0f}/s with the writer "
                    f"({writer_rate:,.0f} puts/s), {idle:,.0f}/s with none ({busy / idle:.2f}x)"
                )
            alone = lookups[(kind, 0, True)][1]
            lines.append(
                f"  {name}: " + "; ".join(parts) + f"; the writer alone {alone:,.0f} puts/s"
            )
        if max(MP_READER_COUNTS) + 1 > cores:
            lines.append(
                f"  {max(MP_READER_COUNTS)} readers + 1 writer on {cores} usable cores "
                f"oversubscribe the CPU"
            )
    return lines


@dataclass(frozen=True)
class Comparison:
    what: str
    against: str
    goal: float | None
    """The ratio to reach, or None for a row that is shown for information."""
    run: Callable[[Bench], tuple[float, float]] = field(repr=False)


COMPARISONS: list[Comparison] = [
    Comparison("get_instance", "raw lmdb+crc32c+cbor2 (ceiling)", 0.7, compare_get_vs_ceiling),
    Comparison("get_instance", "SQLite WAL, SELECT by pk", 3.0, compare_get_vs_sqlite),
    Comparison("durable put_instance", "SQLite FULL/WAL autocommit", 1.5, compare_put_vs_sqlite),
    Comparison("durable put_instance", "pwrite+fdatasync (ceiling)", 0.7, compare_put_vs_fdatasync),
    Comparison("batch of 10k puts", "SQLite FULL/WAL, 1 txn", 3.0, compare_batch_vs_sqlite),
    Comparison(
        "list_by_state, decoded", "SQLite WAL, indexed + cbor2", 1.5, compare_list_vs_sqlite
    ),
    Comparison(
        "iter_by_state (lazy listing)", "SQLite WAL, indexed + cbor2", None, compare_iter_vs_sqlite
    ),
    Comparison("create_snapshot", "copyfile data.mdb + fsync", 0.5, compare_snapshot_vs_cp_fsync),
    Comparison("create_snapshot", "copyfile data.mdb, no fsync", None, compare_snapshot_vs_cp),
    Comparison("WAL replay on open", "SPEC goal, 100k records/s", 1.0, compare_replay_vs_goal),
    Comparison(
        "WAL replay on open",
        "read+crc32c+cbor2+lmdb put (ceiling)",
        None,
        compare_replay_vs_ceiling,
    ),
    Comparison(
        "durable puts, 1 writer process", "SQLite FULL/WAL, 1 process", None, compare_mp_puts_1
    ),
    Comparison(
        "durable puts, 2 writer processes", "SQLite FULL/WAL, 2 processes", None, compare_mp_puts_2
    ),
    Comparison(
        "durable puts, 4 writer processes",
        "SQLite FULL/WAL, 4 processes",
        MP_WRITERS_GOAL,
        compare_mp_puts_4,
    ),
    Comparison(
        "get_instance, 1 reader process + writer",
        "SQLite, 1 reader + 1 writer process",
        None,
        compare_mp_lookups_1,
    ),
    Comparison(
        "get_instance, 2 reader processes + writer",
        "SQLite, 2 readers + 1 writer process",
        None,
        compare_mp_lookups_2,
    ),
]

MP_LOOKUP_RUNS = (compare_mp_lookups_1, compare_mp_lookups_2)


# --------------------------------------------------------------------------
# Sections: figures that are not a pair of rates, printed under the table
# --------------------------------------------------------------------------


def latency_writer(data_dir: str, conn: Any, stop: Any, done: Any) -> None:
    """The writer process of :func:`section_writer_latency`.

    Opens the store with the default fsync policy (every write) but no automatic snapshots
    or compaction (only the main process's snapshots are to run), makes a few untimed
    puts, answers ``"ready"``, then serves commands from ``conn``: ``("count", n)`` makes
    ``n`` durable puts, ``("until_stop",)`` makes puts until ``stop`` is set; each answers
    the list of (start, end) ``time.monotonic()`` pairs of its puts, and keeps ``done``
    (a shared counter) up to date. ``None`` closes the store and ends the process.
    """
    sys.stdout.reconfigure(line_buffering=True)
    from rstmdb_storage import Storage, StorageConfig

    config = StorageConfig(data_dir=data_dir, snapshot_interval=0, compaction_enabled=False)
    storage = Storage.open(config)
    counter = Counter()
    put, clock = storage.put_instance, time.monotonic

    def one_put() -> tuple[float, float]:
        (i,) = counter.take(1)
        inst = make_instance(instance_fields(instance_id("latency", i), i))
        start = clock()
        put(inst)
        return start, clock()

    try:
        for _ in range(20):
            one_put()
        conn.send("ready")
        while (command := conn.recv()) is not None:
            times: list[tuple[float, float]] = []
            done.value = 0
            if command[0] == "count":
                for _ in range(command[1]):
                    times.append(one_put())
                    done.value += 1
            else:
                while not stop.is_set():
                    times.append(one_put())
                    done.value += 1
            conn.send(times)
    finally:
        storage.close()


def latencies_ms(times: list[tuple[float, float]]) -> list[float]:
    """Sorted durations in milliseconds of (start, end) pairs in seconds."""
    return sorted((end - start) * 1000 for start, end in times)


def percentile(ms: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``ms``, nearest rank."""
    return ms[min(len(ms) - 1, int(len(ms) * q))]


def latency_line(label: str, ms: list[float], per_second: float) -> str:
    return (
        f"  {label:<16} {len(ms):>7,}  {percentile(ms, 0.5):>7.2f}  "
        f"{percentile(ms, 0.99):>7.2f}  {ms[-1]:>8.2f}  {per_second:>9,.0f}"
    )


def overlapping(
    times: list[tuple[float, float]], intervals: list[tuple[float, float]]
) -> tuple[list[tuple[float, float]], int]:
    """The (start, end) pairs of ``times`` that overlap one of ``intervals``, and how many
    lie wholly inside one."""
    over = [(s, e) for s, e in times if any(s < b and e > a for a, b in intervals)]
    inside = sum(1 for s, e in over if any(a <= s and e <= b for a, b in intervals))
    return over, inside


def section_writer_latency(bench: Bench) -> list[str]:
    """Durable ``put_instance`` latency in another process, without and while the main
    process runs ``create_snapshot()`` of the big store in a loop.

    The writer makes ``puts`` puts with nothing else running. Then, for each phase, it
    puts until the main process has repeated the phase's operation at least ``repeats``
    times and the writer has made at least ``puts`` puts: first ``create_snapshot()``,
    then, for reference, ``copyfile`` of ``data.mdb`` + fsync (what the filesystem alone
    does to a writer's fdatasync). A put counts for a phase when its time overlaps one of
    the operations; puts/s counts the puts wholly inside them.
    """
    from rstmdb_storage.fsutil import fsync_file

    storage, data_dir = bench.snapshot_store
    settings = bench.settings
    source = data_dir / "indexes" / "data.mdb"
    target = data_dir / "indexes" / "data.mdb.cp"

    def snapshot() -> None:
        remove_snapshot(data_dir, storage.create_snapshot())

    def copy() -> None:
        shutil.copyfile(source, target)
        fsync_file(target)

    def uncopy() -> None:
        target.unlink()

    phases: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
        ("during snapshot", snapshot, lambda: None),
        ("during cp+fsync", copy, uncopy),
    ]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    stop, done = ctx.Event(), ctx.Value("q", 0, lock=False)
    writer = ctx.Process(target=latency_writer, args=(str(data_dir), child, stop, done))
    writer.start()
    results: list[tuple[str, list[tuple[float, float]], list[tuple[float, float]]]] = []

    def receive() -> Any:
        if not parent.poll(WRITER_TIMEOUT):
            raise RuntimeError(f"latency writer: no answer in {WRITER_TIMEOUT:.0f} s")
        return parent.recv()

    try:
        if receive() != "ready":
            raise RuntimeError("latency writer did not start")
        parent.send(("count", settings.puts))
        idle = receive()
        for label, operation, cleanup in phases:
            stop.clear()
            parent.send(("until_stop",))
            intervals: list[tuple[float, float]] = []
            deadline = time.monotonic() + WRITER_TIMEOUT
            while len(intervals) < settings.repeats or done.value < settings.puts:
                if time.monotonic() > deadline or not writer.is_alive():
                    raise RuntimeError("latency writer stopped or took too long")
                start = time.monotonic()
                operation()
                intervals.append((start, time.monotonic()))
                cleanup()
            stop.set()
            results.append((label, receive(), intervals))
        parent.send(None)
        writer.join(WRITER_TIMEOUT)
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"latency writer exited with {writer.exitcode}")

    idle_ms = latencies_ms(idle)
    idle_rate = len(idle) / (idle[-1][1] - idle[0][0])
    lines = [
        f"writer latency while create_snapshot runs ({settings.snapshot_instances:,} "
        f"instances; durable put_instance, default policy, in another process):",
        f"  {'':<16} {'puts':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>8}  {'puts/s':>9}  "
        f"{'ops':>4}  {'op p50 ms':>9}  {'op max ms':>9}",
        latency_line("no snapshot", idle_ms, idle_rate),
    ]
    ratios = []
    for label, times, intervals in results:
        over, inside = overlapping(times, intervals)
        if not over:
            raise RuntimeError(f"{label}: no put overlapped the operation")
        durations = [b - a for a, b in intervals]
        rate_inside = inside / sum(durations)
        ms = latencies_ms(over)
        lines.append(
            f"{latency_line(label, ms, rate_inside)}  {len(intervals):>4}"
            f"  {statistics.median(durations) * 1000:>9,.0f}  {max(durations) * 1000:>9,.0f}"
        )
        ratios.append(
            f"  {label} / no snapshot: p50 {percentile(ms, 0.5) / percentile(idle_ms, 0.5):.2f}x,"
            f" p99 {percentile(ms, 0.99) / percentile(idle_ms, 0.99):.2f}x,"
            f" puts/s {rate_inside / idle_rate:.2f}x;"
            f" longest put = {ms[-1] / 1000 / statistics.median(durations):.0%} of the median"
            f" operation"
        )
    return lines + ratios


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Bench], list[str]] = field(repr=False)


SECTIONS: list[Section] = [
    Section("writer latency while create_snapshot runs", section_writer_latency),
]


# --------------------------------------------------------------------------
# Checks, facts and the table
# --------------------------------------------------------------------------


def check_api(bench: Bench) -> list[str]:
    """Cheap checks, on a small store of its own, that the package behaves as assumed here."""
    from rstmdb_storage import Storage, StorageConfig

    problems: list[str] = []
    path = bench.path("ours-check")
    with Storage.open(StorageConfig(data_dir=str(path))) as storage:
        fields = [instance_fields(instance_id("check", i), i) for i in range(3)]
        seqs = [storage.put_instance(make_instance(f)) for f in fields[:2]]
        if not all(isinstance(seq, int) for seq in seqs) or seqs[0] >= seqs[1]:
            problems.append(f"put_instance returned {seqs!r}, not increasing ints")
        got = storage.get_instance(fields[0]["id"])
        if got is None:
            problems.append("get_instance returned None for an instance just put")
        else:
            for name, value in fields[0].items():
                if getattr(got, name, None) != value:
                    problems.append(f"get_instance: {name} is {getattr(got, name, None)!r}")
        if storage.get_instance("no-such-id") is not None:
            problems.append("get_instance of an absent id did not return None")
        with storage.batch() as b:
            b.put_instance(make_instance(fields[2]))
            b.delete_instance(fields[1]["id"])
        if storage.get_instance(fields[2]["id"]) is None:
            problems.append("batch: put_instance not visible after the batch")
        if storage.get_instance(fields[1]["id"]) is not None:
            problems.append("batch: delete_instance did not delete")
    return problems


def filesystem_of(path: Path) -> str:
    """The mount point and type holding ``path``, from /proc/mounts."""
    best = ("?", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, mount_point, fs_type, *_ = line.split()
                if str(path).startswith(mount_point) and len(mount_point) >= len(best[0]):
                    best = (mount_point, fs_type)
    except OSError:
        pass
    return f"{best[1]} (mounted on {best[0]})"


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def package_facts() -> str:
    import rstmdb_storage

    version = getattr(rstmdb_storage, "__version__", None) or version_of("rstmdb-storage")
    return f"{version} from {Path(rstmdb_storage.__file__ or '?').parent}"


def machine_facts(workdir: Path, settings: Settings) -> list[tuple[str, str]]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("platform", platform.platform()),
        ("cores", f"{cores} ({usable} usable)"),
        ("lmdb", f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"),
        ("cbor2", version_of("cbor2")),
        ("crc32c", f"{version_of('crc32c')} (hardware: {crc32c.hardware_based})"),
        ("sqlite", sqlite3.sqlite_version),
        ("rstmdb-storage", package_facts()),
        ("work dir", f"{workdir} on {filesystem_of(workdir)}"),
        ("record", f"{len(encode_record(instance_fields(instance_id('order', 0), 0), 1))} bytes"),
        (
            "counts",
            f"repeats={settings.repeats} records={settings.records} "
            f"lookups={settings.lookups} puts={settings.puts} "
            f"batches={settings.batches}x{BATCH_SIZE} "
            f"list={settings.list_matches} of {settings.list_matches * len(LIST_STATES)} "
            f"snapshot-instances={settings.snapshot_instances} "
            f"replay-records={settings.replay_records} mp-seconds={settings.mp_seconds:g}",
        ),
    ]


def format_rate(value: float) -> str:
    """Whole ops/s with separators; three significant digits below 100 (snapshot rows)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def print_table(rows: list[tuple[Comparison, float, float]]) -> None:
    header = ("what", "against", "ours ops/s", "other ops/s", "ratio", "goal", "met?")
    lines = [header]
    for comp, ours, other in rows:
        ratio = ours / other
        lines.append(
            (
                comp.what,
                comp.against,
                format_rate(ours),
                format_rate(other),
                f"{ratio:.2f}",
                "-" if comp.goal is None else f">= {comp.goal:g}",
                "-" if comp.goal is None else "yes" if ratio >= comp.goal else "NO",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 3, 4}
    for n, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def default_tmp_dir() -> Path:
    """The repository's parent when writable (same disk, outside git), else the repository."""
    return REPO_ROOT.parent if os.access(REPO_ROOT.parent, os.W_OK) else REPO_ROOT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for CI smoke runs")
    parser.add_argument("--repeats", type=int, help="repetitions per side (default 5, quick 3)")
    parser.add_argument("--records", type=int, help="instances in the get stores (default 100k)")
    parser.add_argument("--lookups", type=int, help="random gets per repetition")
    parser.add_argument("--puts", type=int, help="durable single puts per repetition")
    parser.add_argument("--batches", type=int, help=f"batches of {BATCH_SIZE} per repetition")
    parser.add_argument(
        "--list-matches",
        type=int,
        help=f"instances listed per repetition (default 10k, quick 2k); the listing stores "
        f"hold that many in each of {len(LIST_STATES)} states",
    )
    parser.add_argument(
        "--snapshot-instances",
        type=int,
        help="instances in the store that create_snapshot copies (default 1M, quick 20k)",
    )
    parser.add_argument(
        "--replay-records",
        type=int,
        help="single-instance WAL records replayed on open (default 200k, quick 20k)",
    )
    parser.add_argument(
        "--mp-seconds",
        type=float,
        help="seconds of each multi-process durable-put run; lookup runs take half "
        "(default 2, quick 0.5)",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=default_tmp_dir(),
        help="where to create the temporary directory (a real disk, not tmpfs; "
        "default: beside the repository, so that a killed run leaves nothing in the work tree)",
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        help="run only comparisons and sections whose name contains TEXT (repeatable: any)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines interleave with tracebacks
    settings = settings_from(args)

    def selected(name: str) -> bool:
        return not args.only or any(text in name for text in args.only)

    comparisons = [c for c in COMPARISONS if selected(f"{c.what} vs {c.against}")]
    sections = [s for s in SECTIONS if selected(s.name)]
    workdir = Path(tempfile.mkdtemp(prefix=".bench-", dir=args.tmp_dir))
    bench = Bench(workdir, settings)
    problems: list[str] = []
    try:
        for name, value in machine_facts(workdir, settings):
            print(f"{name:>15}: {value}")
        if "tmpfs" in filesystem_of(workdir):
            print("warning: the work dir is on tmpfs; fsync figures mean nothing there")
        print()
        started = time.perf_counter()
        try:
            problems += check_api(bench)
        except Exception as exc:
            traceback.print_exc()
            problems.append(f"API check: {exc!r}")
        rows = []
        for comp in comparisons:
            t0 = time.perf_counter()
            try:
                ours, other = comp.run(bench)
            except Exception as exc:  # report it and go on with the other comparisons
                traceback.print_exc()
                problems.append(f"{comp.what} vs {comp.against}: {exc!r}")
                continue
            rows.append((comp, ours, other))
            took = time.perf_counter() - t0
            print(f"  {comp.what} vs {comp.against}: {ours / other:.2f} ({took:.1f} s)")
        section_lines: list[str] = []
        for section in sections:
            t0 = time.perf_counter()
            try:
                section_lines += ["", *section.run(bench)]
            except Exception as exc:
                traceback.print_exc()
                problems.append(f"{section.name}: {exc!r}")
                continue
            print(f"  {section.name} ({time.perf_counter() - t0:.1f} s)")
        print()
        took = time.perf_counter() - started
        print(f"medians of {settings.repeats} repetitions, in {took:.0f} s")
        if rows:
            print_table(rows)
        if any("_by_state" in comp.what for comp, _, _ in rows):
            print("listing rows: ops/s are instances listed (and decoded) per second")
        if any(comp.what == "create_snapshot" for comp, _, _ in rows):
            print(
                f"create_snapshot rows: ops/s are whole copies of the "
                f"{settings.snapshot_instances:,}-instance store per second (1 / seconds), "
                f"so the ratio is time(copy) / time(snapshot); >= 0.5 is 'at most 2x cp'"
            )
        if any(comp.what == "WAL replay on open" for comp, _, _ in rows):
            print(
                f"replay rows: ops/s are WAL records applied per second, rebuilding a lost "
                f"indexes/ from {settings.replay_records:,} single-instance records"
            )
        if any(comp.goal is None for comp, _, _ in rows):
            print("rows without a goal are shown for information")
        for line in mp_notes(bench, [comp for comp, _, _ in rows]):
            print(line)
        for line in section_lines:
            print(line)
    finally:
        problems += bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
