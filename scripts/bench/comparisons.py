"""The rows of the table (one per path of the store), the goals each is held to, and what is
known of why a row still misses its goal; then the sections under the table.

A row's ``run(bench)`` returns the median rate of *ours* and of each contender that applies,
by name, measured in rotation within each repetition (:meth:`bench.stores.Bench.rotated`):

- ``floor``: the same work with the same libraries and no project layers (:mod:`bench.floor`);
- ``ceiling``: the bare physical operation (an LMDB get, ``pwrite`` + ``fdatasync``, ``cp``);
- ``sqlite``: stdlib sqlite3, WAL mode, ``synchronous=FULL``, the same records and indexes;
- ``diskcache``: where it does the same job (get and set by key), with ``synchronous=FULL``;
- and, in a few rows, a named reference (``get_instance`` beside ``reader().get_instance``).

Goals are SPEC.md's ("Figures it must reach"), each on the ratio it is about. ``why_short``
is the current best understanding of why a row misses its goal, printed with the row when it
does and written into the README; keep it up to date with the code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import allocations, gets, listing, processes, puts, replay, snapshots, threads
from bench.stores import Bench

RATE = "rate"
"""A goal on ours' own rate (ops/s), not on a ratio."""

RATIO_CONTENDERS = ("floor", "ceiling", "sqlite")
"""The contenders whose ratio ours / contender every row prints (when they ran)."""

NAMES = {"floor": "floor", "ceiling": "ceiling", "sqlite": "SQLite", "diskcache": "diskcache"}


@dataclass(frozen=True)
class Goal:
    """ours / ``against`` (or ours' rate, for :data:`RATE`) at least ``at_least``."""

    against: str
    at_least: float
    text: str = ""
    """How SPEC.md words it, when not "≥ at_least"."""

    def describe(self) -> str:
        return self.text or f"≥ {self.at_least:g}"

    def met(self, value: float) -> bool:
        return value >= self.at_least


@dataclass(frozen=True)
class Row:
    path: str
    """What the store does, as ``--only`` matches it and the table shows it."""
    run: Callable[[Bench], dict[str, float]] = field(repr=False)
    goals: tuple[Goal, ...] = ()
    why_short: str = ""
    unit: str = "ops/s"

    @property
    def name(self) -> str:
        return self.path


@dataclass
class Result:
    """A row that ran, with the median rate of each side by name (``ours`` first)."""

    row: Row
    rates: dict[str, float]
    seconds: float

    def ratio(self, against: str) -> float | None:
        if against == RATE:
            return self.rates["ours"]
        other = self.rates.get(against)
        return None if not other else self.rates["ours"] / other

    def goal_of(self, against: str) -> Goal | None:
        return next((g for g in self.row.goals if g.against == against), None)

    def verdicts(self) -> list[tuple[Goal, float | None, bool]]:
        """Each goal, the value it is about (None: its contender did not run), and met."""
        out = []
        for goal in self.row.goals:
            value = self.ratio(goal.against)
            out.append((goal, value, value is not None and goal.met(value)))
        return out

    def missed(self) -> bool:
        return any(not met for _, _, met in self.verdicts())

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.row.path,
            "unit": self.row.unit,
            "rates": self.rates,
            "ratios": {
                k: self.ratio(k) for k in self.rates if k != "ours" and self.ratio(k) is not None
            },
            "goals": [
                {
                    "against": g.against,
                    "at_least": g.at_least,
                    "text": g.describe(),
                    "value": value,
                    "met": met,
                }
                for g, value, met in self.verdicts()
            ],
            "met": None if not self.row.goals else not self.missed(),
            "why_short": self.row.why_short if self.missed() else "",
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class Section:
    """A figure that is not a row of rates: ``run`` returns the lines printed under the table."""

    name: str
    run: Callable[[Bench], list[str]] = field(repr=False)


WHY_GET = (
    "Most of a lookup is cbor2 decoding of the body, which the floor pays too, and ours keeps "
    "about 0.9 of the floor; the floor itself is only about 2.1-2.3x SQLite here, so the 2x "
    "goal is met or missed by the noise between runs."
)
WHY_PUT = (
    "A durable put makes one fdatasync, like SQLite FULL in WAL mode, and the floor itself is "
    "about half the ceiling and 1.0-1.2x SQLite here (its LMDB commit follows the sync); the rest "
    "is the Python work around it (checks, CBOR, the WAL append, the LMDB transaction, index "
    "entries): about 269k instructions a put against the floor's 131k (callgrind)."
)
WHY_MANY = (
    "The floor here is SPEC's group-commit prototype with the same libraries (append, sync "
    "unless another's sync covered it, apply every synced record), and even it is far below "
    "2x SQLite on 2 cores. Ours makes 0.65-0.8 of it: a grouped put costs about 195 us of "
    "CPU (user 115-120, system 76-80) against the floor's 125 (55 and 70): the store's "
    "checks, its lock files' extra reads and the strict decoding of other writers' records."
)
WHY_THREADS = (
    "The floor here is group commit with the same libraries and no layers, about 2.4-3x "
    "SQLite: both gather each group from the writers of the last (nearly always eight), with "
    "one write of its records, one sync and one LMDB transaction. Ours makes 0.7-0.8 of it: a "
    "put costs about 110 us of CPU against the floor's 75 (user 75 against 44), and under the "
    "GIL that CPU is the rate."
)
WHY_BATCH = (
    "Batches spend their time in Python per instance: input checks, CBOR encoding of the body "
    "and of the WAL record, the instance's two CRCs and about five LMDB puts (about 114k "
    "instructions a put against the floor's 91k, callgrind)."
)
WHY_LIST = (
    "Index entries carry no CRC of their own and a listing reads index keys only, then a get "
    "per instance; the rest is cbor2 decoding and building each Instance, where the floor "
    "itself costs about 16% more instructions than SQLite's row (40.2k against 34.8k, "
    "callgrind; ours 42.2k)."
)
WHY_REPLAY = (
    "A record costs about 126k instructions (callgrind, a 10k-record open): reading 17k "
    "(chunked reads), decoding 58k and applying 47k with its index entries. Decoding is as "
    "strict as the API's checks of a write: cbor2 decoding of the body with safe options 23k, "
    "the instance checks 14k, the check that nothing follows the record's CBOR value 6k; the "
    "floor decodes without the last two. The goal is above the floor itself here."
)
WHY_READERS = (
    "Lookups lose part of their CPU to a durable writer process on two cores; SQLite's "
    "readers lose more, but the floor of a lookup is only about 2.2-2.7x SQLite's."
)
WHY_SNAPSHOT = (
    "A snapshot is a compacting copy, an fsync and a CRC32C pass over the copy: more work "
    "than cp, and it competes with the writeback of the copy."
)

ROWS: list[Row] = [
    Row(
        "get_instance by id",
        gets.path_get,
        (Goal("floor", 0.9), Goal("sqlite", 2.0, "≥ 2x")),
        WHY_GET,
    ),
    Row("reader().get_instance by id", gets.path_reader_get),
    Row(
        "durable put_instance",
        puts.path_put,
        (Goal("ceiling", 0.8), Goal("sqlite", 1.0, "≥ 1x")),
        WHY_PUT,
    ),
    Row("batch of 10k puts", puts.path_batch, (Goal("sqlite", 1.0, "≥ 1x"),), WHY_BATCH),
    Row(
        "list_by_state, 10k matches, decoded",
        listing.path_list,
        (Goal("sqlite", 1.0, "≥ 1x"),),
        WHY_LIST,
    ),
    Row("iter_by_state, same query", listing.path_iter),
    Row(
        "WAL replay on open",
        replay.path_replay,
        (Goal(RATE, replay.REPLAY_GOAL, f"≥ {replay.REPLAY_GOAL // 1000}k records/s"),),
        WHY_REPLAY,
        unit="records/s",
    ),
    Row(
        "create_snapshot of the big store",
        snapshots.path_snapshot,
        (Goal("ceiling", 1 / 1.5, "time ≤ 1.5x (≥ 0.67)"),),
        WHY_SNAPSHOT,
        unit="copies/s",
    ),
    Row("durable puts, 1 writer process", processes.path_mp_puts_1),
    Row("durable puts, 2 writer processes", processes.path_mp_puts_2),
    Row(
        "durable puts, 4 writer processes",
        processes.path_mp_puts_4,
        (Goal("sqlite", 2.0, "≥ 2x"),),
        WHY_MANY,
    ),
    Row(
        "durable puts, 8 threads of one process",
        threads.path_threads,
        (Goal("sqlite", 3.0, "≥ 3x"),),
        WHY_THREADS,
    ),
    Row("lookups, 1 reader process + 1 writer", processes.path_mp_lookups_1),
    Row("lookups, 2 reader processes + 1 writer", processes.path_mp_lookups_2),
    Row(
        "lookups, 4 reader processes + 1 writer",
        processes.path_mp_lookups_4,
        (Goal("sqlite", 2.5, "≥ 2.5x"),),
        WHY_READERS,
    ),
]

SECTIONS: list[Section] = [
    Section("objects left for the garbage collector", allocations.section_allocations),
    Section("writer latency while create_snapshot runs", snapshots.section_writer_latency),
]
