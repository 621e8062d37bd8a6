"""Opening and filling the contenders' stores, and :class:`Bench`, which holds them for a run."""

from __future__ import annotations

import functools
import os
import random
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from bench.ceiling import encode_record
from bench.data import BATCH_SIZE, chunks, dataset, instance_id, make_instance
from bench.settings import Settings
from bench.timing import named_medians
from rstmdb_storage import FsyncPolicy, Storage, StorageConfig
from rstmdb_storage.fsutil import fsync_dir, fsync_file
from rstmdb_storage.snapshots import DATA_SUFFIX, MANIFEST_SUFFIX

T = TypeVar("T")

SQLITE_INSERT = "INSERT INTO instances (id, value) VALUES (?, ?)"
SQLITE_GET = "SELECT value FROM instances WHERE id = ?"
SQLITE_PUT_BY_STATE = (
    "INSERT OR REPLACE INTO instances (id, machine, state, value) VALUES (?, ?, ?, ?)"
)
"""A put into SQLite's table with the (machine, state) index: what the put rows write."""


def sqlite_row(fields: dict[str, Any]) -> tuple[str, str, str, bytes]:
    """The row SQLite puts: id, machine, state (its index) and the CBOR record."""
    return fields["id"], fields["machine"], fields["state"], encode_record(fields, 0)


def open_sqlite(path: Path, by_state: bool = False, **connect: Any) -> sqlite3.Connection:
    """SQLite in WAL mode, ``synchronous=FULL``, autocommit; table (id, value), or with
    ``by_state`` table (id, machine, state, value) indexed on (machine, state). ``connect``:
    more arguments of ``sqlite3.connect``."""
    conn = sqlite3.connect(path, isolation_level=None, **connect)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    if not by_state:
        conn.execute("CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, value BLOB)")
        return conn
    conn.execute(
        "CREATE TABLE IF NOT EXISTS instances "
        "(id TEXT PRIMARY KEY, machine TEXT, state TEXT, value BLOB)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS by_state ON instances (machine, state)")
    return conn


def fill_sqlite(
    conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[Any, ...]], per_txn: int | None
) -> None:
    """Insert ``rows`` with ``sql``, ``per_txn`` per transaction (all in one without), then
    checkpoint SQLite's WAL into the database file."""
    for part in chunks(rows, per_txn):
        conn.execute("BEGIN")
        conn.executemany(sql, part)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def fill_sqlite_dataset(conn: sqlite3.Connection, records: int, by_state: bool = False) -> None:
    """The ``records`` instances of :func:`bench.data.dataset`, cbor2-encoded (sequence number:
    position + 1), in one transaction; into the table of :func:`open_sqlite` ``by_state``
    with their machine and state, or not."""
    numbered = enumerate(dataset(records), start=1)
    if by_state:
        rows: Iterable[tuple[Any, ...]] = (
            (f["id"], f["machine"], f["state"], encode_record(f, seq)) for seq, f in numbered
        )
        fill_sqlite(conn, SQLITE_PUT_BY_STATE, rows, per_txn=None)
    else:
        rows = ((f["id"], encode_record(f, seq)) for seq, f in numbered)
        fill_sqlite(conn, SQLITE_INSERT, rows, per_txn=None)


def open_diskcache(path: Path, durable: bool = True) -> Any:
    """A ``diskcache.Cache`` in ``path`` (SQLite underneath, WAL mode) with SQLite's
    ``synchronous=FULL`` for durable rows, or None when diskcache is not installed (its rows
    then leave it out; ``pip install -e '.[bench]'``)."""
    try:
        import diskcache
    except ImportError:
        return None
    return diskcache.Cache(str(path), sqlite_synchronous=2 if durable else 1, size_limit=1 << 40)


def ours_config(path: Path | str, **changes: Any) -> StorageConfig:
    """The default config for a store in ``path``, with ``changes``, and no automatic
    snapshots: a snapshot started in the background by loading a store must not run under
    the timings of gets, puts and listings (snapshots have rows of their own)."""
    return StorageConfig(data_dir=str(path), snapshot_interval=0, **changes)


def open_ours(path: Path, durable: bool = True) -> Storage:
    """Our store in ``path``: the default fsync policy (every write), or none."""
    policy = FsyncPolicy.every_write() if durable else FsyncPolicy.never()
    return Storage.open(ours_config(path, fsync_policy=policy))


def fast_config(path: Path) -> StorageConfig:
    """A config for building big stores quickly: no fsync, and no automatic snapshots or
    compaction (the replay comparison needs the whole WAL, from sequence number 1)."""
    return ours_config(path, fsync_policy=FsyncPolicy.never(), compaction_enabled=False)


def put_batches(storage: Storage, fields: Iterable[dict[str, Any]]) -> None:
    """Put the instances of ``fields`` in batches of :data:`BATCH_SIZE`."""
    for part in chunks(fields, BATCH_SIZE):
        with storage.batch() as b:
            for f in part:
                b.put_instance(make_instance(f))


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: a store built without fsync leaves
    hundreds of MB dirty, and their writeback would otherwise land inside a timed run.

    Lock files are left alone: they hold no data, and closing a descriptor of ``lock.mdb``
    drops every POSIX lock this process holds on it, among them the one that tells other
    processes its LMDB readers are alive. Their ``reader_check`` would then free our
    readers' slots, and their writes reuse pages our snapshots were still copying."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name != "lock.mdb" and not name.endswith(".lock"):
                fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def remove_snapshot(data_dir: Path, manifest: Any) -> None:
    """Delete a published snapshot's two files (so the next one is made afresh)."""
    for suffix in (DATA_SUFFIX, MANIFEST_SUFFIX):
        (data_dir / "snapshots" / (manifest.name + suffix)).unlink(missing_ok=True)


class Bench:
    """Working directory, counts, and the stores shared by several repetitions or comparisons.

    Stores are built lazily on first use (see :func:`shared`) and closed by :meth:`close`.
    """

    def __init__(self, workdir: Path, settings: Settings) -> None:
        self.workdir = workdir
        self.settings = settings
        self._closers: list[Callable[[], None]] = []
        self.built: dict[Callable[..., Any], Any] = {}
        """What each :func:`shared` function has built so far."""
        rng = random.Random(20260101)
        n = settings.records
        self.lookup_ids = [instance_id("order", rng.randrange(n)) for _ in range(settings.lookups)]

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

    def dataset(self) -> Iterable[dict[str, Any]]:
        """The ``records`` instances of the lookup stores (sequence number: position + 1)."""
        return dataset(self.settings.records)

    def rotated(self, sides: dict[str, Callable[[], float] | None]) -> dict[str, float]:
        """:func:`~bench.timing.named_medians` of the sides over ``repeats`` repetitions, all
        in rotation within each: ``ours`` and each contender that applies (a ``None`` side,
        such as diskcache when it is not installed, is left out)."""
        return named_medians(sides, self.settings.repeats)


def shared(build: Callable[[Bench], T]) -> Callable[[Bench], T]:
    """Make ``build(bench)`` run once per :class:`Bench`, on first use; later calls return
    what it built (a failure is not kept: the next call builds again)."""

    @functools.wraps(build)
    def get(bench: Bench) -> T:
        if get not in bench.built:
            bench.built[get] = build(bench)
        return bench.built[get]

    return get
