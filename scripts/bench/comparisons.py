"""The rows of the table and the sections under it, in the order a run goes through them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench import gets, listing, processes, puts, replay, snapshots
from bench.stores import Bench


@dataclass(frozen=True)
class Comparison:
    what: str
    against: str
    goal: float | None
    """The ratio to reach, or None for a row that is shown for information."""
    run: Callable[[Bench], tuple[float, float]] = field(repr=False)

    @property
    def name(self) -> str:
        """What ``--only`` matches and problems are reported under."""
        return f"{self.what} vs {self.against}"


@dataclass(frozen=True)
class Section:
    """A figure that is not a pair of rates: ``run`` returns the lines printed under the table."""

    name: str
    run: Callable[[Bench], list[str]] = field(repr=False)


COMPARISONS: list[Comparison] = [
    Comparison("get_instance", "raw lmdb+crc32c+cbor2 (ceiling)", 0.7, gets.compare_get_vs_ceiling),
    Comparison("get_instance", "SQLite WAL, SELECT by pk", 3.0, gets.compare_get_vs_sqlite),
    Comparison(
        "reader().get_instance",
        "raw lmdb+crc32c+cbor2, one txn (ceiling)",
        0.7,
        gets.compare_reader_get_vs_ceiling,
    ),
    Comparison("reader().get_instance", "get_instance", None, gets.compare_reader_get_vs_get),
    Comparison(
        "durable put_instance", "SQLite FULL/WAL autocommit", 1.5, puts.compare_put_vs_sqlite
    ),
    Comparison(
        "durable put_instance", "pwrite+fdatasync (ceiling)", 0.7, puts.compare_put_vs_fdatasync
    ),
    Comparison("batch of 10k puts", "SQLite FULL/WAL, 1 txn", 3.0, puts.compare_batch_vs_sqlite),
    Comparison(
        "list_by_state, decoded",
        "SQLite WAL, indexed + cbor2",
        1.5,
        listing.compare_list_vs_sqlite,
    ),
    Comparison(
        "iter_by_state (lazy listing)",
        "SQLite WAL, indexed + cbor2",
        None,
        listing.compare_iter_vs_sqlite,
    ),
    Comparison(
        "create_snapshot",
        "copyfile data.mdb + fsync",
        0.5,
        snapshots.compare_snapshot_vs_cp_fsync,
    ),
    Comparison(
        "create_snapshot", "copyfile data.mdb, no fsync", None, snapshots.compare_snapshot_vs_cp
    ),
    Comparison(
        "WAL replay on open", "SPEC goal, 100k records/s", 1.0, replay.compare_replay_vs_goal
    ),
    Comparison(
        "WAL replay on open",
        "read+crc32c+cbor2+lmdb put (ceiling)",
        None,
        replay.compare_replay_vs_ceiling,
    ),
    Comparison(
        "durable puts, 1 writer process",
        "SQLite FULL/WAL, 1 process",
        None,
        processes.compare_mp_puts_1,
    ),
    Comparison(
        "durable puts, 2 writer processes",
        "SQLite FULL/WAL, 2 processes",
        None,
        processes.compare_mp_puts_2,
    ),
    Comparison(
        "durable puts, 4 writer processes",
        "SQLite FULL/WAL, 4 processes",
        processes.MP_WRITERS_GOAL,
        processes.compare_mp_puts_4,
    ),
    Comparison(
        "get_instance, 1 reader process + writer",
        "SQLite, 1 reader + 1 writer process",
        None,
        processes.compare_mp_lookups_1,
    ),
    Comparison(
        "get_instance, 2 reader processes + writer",
        "SQLite, 2 readers + 1 writer process",
        None,
        processes.compare_mp_lookups_2,
    ),
]

SECTIONS: list[Section] = [
    Section("writer latency while create_snapshot runs", snapshots.section_writer_latency),
]
