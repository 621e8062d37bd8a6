"""Queries by state, metadata and time, checked against a brute-force in-memory model
(``tests/model_store.py``): orders, bounds, type-strict labels, pagination and its cursors, the
lazy ``iter_*`` forms across their internal pages, and typed errors for bad arguments. (The
hypothesis state machine that runs every query after random writes is
``tests/test_model_stateful.py``.)"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from model_store import ModelStore, Put, view
from query_checks import Query, check_query

from rstmdb_storage import (
    Instance,
    InvalidInputError,
    InvalidTypeError,
    Storage,
    StorageConfig,
)

END_OF_TIME = 2**63  # one past the largest updated_at a write accepts


def inst(
    instance_id: str, state: str = "pending", machine: str = "order", **fields: Any
) -> Instance:
    fields.setdefault("updated_at", 100)
    fields.setdefault("created_at", 1)
    fields.setdefault("version", 1)
    return Instance(id=instance_id, machine=machine, state=state, **fields)


def commit(storage: Storage, model: ModelStore, instances: list[Instance]) -> None:
    """Put *instances* in one batch, into the store and the model alike."""
    with storage.batch() as batch:
        for one in instances:
            batch.put_instance(one)
    assert batch.seq == model.commit([Put(one) for one in instances])


# --- pagination ----------------------------------------------------------------------------------


def varied(n: int) -> list[Instance]:
    """*n* instances with ties in every index, across two machines."""
    return [
        inst(
            f"i{k:02d}",
            ("pending", "paid", "p")[k % 3],
            machine="order" if k % 4 else "order-2",
            metadata={
                "k": (k % 5) - 2,
                "f": (k % 4) * 0.5 - 1.0,
                "s": ("", "a", "a\x00", "é")[k % 4],
                "b": k % 2 == 0,
            },
            updated_at=(k * 7) % 6,
        )
        for k in range(n)
    ]


PAGED_QUERIES = [
    Query("state", ("order", "pending")),
    Query("state", ("order-2", "p")),
    Query("state", ("order", "absent")),
    Query("metadata", ("k", 0)),
    Query("metadata", ("b", True)),
    Query("metadata", ("s", "a\x00")),
    Query("range", ("k", -1, None)),
    Query("range", ("f", None, 0.5)),
    Query("range", ("s", "", None)),
    Query("range", ("b", False, True)),
    Query("range", ("k", 5, -5)),
    Query("time", (0, END_OF_TIME)),
    Query("time", (0, END_OF_TIME), newest_first=True),
    Query("time", (2, 5)),
    Query("time", (2, 5), newest_first=True),
]


@pytest.mark.parametrize("query", PAGED_QUERIES, ids=lambda q: f"{q.kind}{q.args}{q.newest_first}")
def test_pages_of_every_size_add_up_to_the_full_list(storage: Storage, query: Query) -> None:
    model = ModelStore()
    commit(storage, model, varied(24))
    total = len(query.expected(model))
    check_query(storage, model, query, sizes=list(range(1, total + 2)))


def test_limit_must_be_a_positive_int(storage: Storage) -> None:
    storage.put_instance(inst("a"))
    for query in PAGED_QUERIES:
        for limit in (0, -1):
            with pytest.raises(InvalidInputError):
                query.page(storage, limit=limit)
        for limit in (1.5, "2", True):
            with pytest.raises((InvalidInputError, InvalidTypeError)):
                query.page(storage, limit=limit)
    page = storage.list_by_state("order", "pending", limit=1)
    assert [one.id for one in page] == ["a"] and page.next_cursor is None


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Query("state", ("order", "pending")), Query("state", ("order", "paid"))),
        (Query("state", ("order", "pending")), Query("state", ("order-2", "pending"))),
        (Query("state", ("order", "pending")), Query("metadata", ("k", 0))),
        (Query("state", ("order", "pending")), Query("time", (0, END_OF_TIME))),
        (Query("metadata", ("k", 0)), Query("metadata", ("k", 1))),
        (Query("metadata", ("k", 0)), Query("metadata", ("f", 0))),
        (Query("range", ("k", -2, None)), Query("range", ("s", "", None))),
        (Query("range", ("k", -2, None)), Query("time", (0, END_OF_TIME), newest_first=True)),
        (Query("time", (0, END_OF_TIME)), Query("state", ("order", "pending"))),
        (Query("time", (0, END_OF_TIME)), Query("range", ("k", -2, None))),
        (Query("time", (0, 3)), Query("time", (3, 6))),
    ],
    ids=lambda q: f"{q.kind}{q.args}",
)
def test_a_cursor_from_another_query_is_refused(
    storage: Storage, source: Query, target: Query
) -> None:
    model = ModelStore()
    commit(storage, model, varied(24))
    first = source.page(storage, limit=1)
    assert first.next_cursor is not None
    with pytest.raises(InvalidInputError):
        target.page(storage, limit=1, cursor=first.next_cursor)


def test_a_malformed_cursor_is_refused(storage: Storage) -> None:
    storage.put_instance(inst("a"))
    for cursor in ("", "!!!", "b3JkZXI", "AAAA", "b3JkZXIAcGFpZABh"):
        with pytest.raises(InvalidInputError):
            storage.list_by_state("order", "pending", limit=1, cursor=cursor)
    for cursor in (b"b3JkZXIAcGVuZGluZwBh", 5):
        with pytest.raises((InvalidInputError, InvalidTypeError)):
            storage.list_by_state("order", "pending", limit=1, cursor=cursor)


# --- the lazy forms across internal pages --------------------------------------------------------

BIG = 1300  # more than two of the iterators' internal pages of 512


@pytest.fixture
def big(storage: Storage) -> tuple[Storage, ModelStore]:
    model = ModelStore()
    commit(
        storage,
        model,
        [
            inst(
                f"b{k:05d}",
                "pending" if k % 13 else "paid",
                metadata={"all": True, "n": BIG // 2 - k, "x": (k % 7) / 4 - 0.5},
                updated_at=k // 3,
            )
            for k in range(BIG)
        ],
    )
    return storage, model


BIG_QUERIES = [
    Query("state", ("order", "pending")),
    Query("metadata", ("all", True)),
    Query("range", ("n", -(2**63), None)),
    Query("range", ("x", None, math.inf)),
    Query("time", (0, END_OF_TIME)),
    Query("time", (1, END_OF_TIME), newest_first=True),
]


@pytest.mark.parametrize("query", BIG_QUERIES, ids=lambda q: f"{q.kind}{q.args}{q.newest_first}")
def test_iterators_cross_their_internal_pages(
    big: tuple[Storage, ModelStore], query: Query
) -> None:
    storage, model = big
    assert len(query.expected(model)) > 1100
    check_query(storage, model, query, sizes=[511, 512, 700])
    assert storage.count_by_state("order") == model.count_by_state("order")
    assert storage.count_by_state("order") == {"pending": BIG - 100, "paid": 100}


@pytest.mark.parametrize("newest_first", [False, True])
def test_iteration_goes_on_after_the_instance_under_its_cursor_is_deleted(
    big: tuple[Storage, ModelStore], newest_first: bool
) -> None:
    """Each internal page resumes after the last key of the one before; deleting that very
    instance between pages loses nothing and repeats nothing."""
    storage, model = big
    query = Query("time", (0, END_OF_TIME), newest_first=newest_first)
    expected = [view(record) for record in query.expected(model)]
    seen = []
    for position, one in enumerate(query.iterate(storage)):
        seen.append(view(one))
        if position % 512 in (510, 511):
            storage.delete_instance(one.id)
    assert seen == expected
    deleted = {expected[position][0] for position in (510, 511, 1022, 1023)}
    remaining = [one for one in expected if one[0] not in deleted]
    assert [view(one) for one in query.iterate(storage)] == remaining
    assert storage.verify() == []


# --- metadata: types, order, bounds --------------------------------------------------------------


def test_metadata_labels_are_type_strict(storage: Storage) -> None:
    labels = {
        "t": True,
        "one": 1,
        "onef": 1.0,
        "s1": "1",
        "f": False,
        "zero": 0,
        "zf": 0.0,
        "nzf": -0.0,
        "s0": "0",
    }
    for instance_id, value in labels.items():
        storage.put_instance(inst(instance_id, metadata={"v": value}))

    def ids(*args: Any, **kwargs: Any) -> list[str]:
        return [one.id for one in storage.list_by_metadata("v", *args, **kwargs)]

    assert ids(True) == ["t"]
    assert ids(1) == ["one"]
    assert ids(1.0) == ["onef"]
    assert ids("1") == ["s1"]
    assert ids(False) == ["f"]
    assert ids(0) == ["zero"]
    assert ids(0.0) == ids(-0.0) == ["nzf", "zf"]  # -0.0 is indexed as 0.0
    assert ids(2) == ids("") == ids(0.5) == []
    assert ids(start=0) == ["zero", "one"]
    assert ids(start=0.0) == ["nzf", "zf", "onef"]
    assert ids(start=-0.0, end=0.5) == ["nzf", "zf"]
    assert ids(end=1.0) == ["nzf", "zf"]
    assert ids(start=False) == ["f", "t"]
    assert ids(start=False, end=True) == ["f"]
    assert ids(start="") == ["s0", "s1"]
    assert ids(end=1) == ["zero"]
    # the instance keeps what was written; only its index entry folds -0.0 into 0.0
    stored = storage.get_instance("nzf")
    assert stored is not None and math.copysign(1.0, stored.metadata["v"]) == -1.0


INTS = [-(2**63), -(2**62), -300, -1, 0, 1, 255, 256, 2**62, 2**63 - 1]
FLOATS = [-math.inf, -1e308, -1.5, -5e-324, -0.0, 0.0, 5e-324, 0.1, 1.0, 1e308, math.inf]
STRS = ["", "\x00", "\x00\x00", "\x01", "a", "a\x00", "a\x00\x00", "a\x00b", "a\x01", "ab", "b"]
STRS += ["é", "e\u0301", "\u07ff", "\u0800", "\uffff", "\U00010000", "😀"]


def test_metadata_ranges_follow_value_order_then_id(storage: Storage) -> None:
    model = ModelStore()
    values = [*INTS, *FLOATS, *STRS, False, True]
    # two instances per value, ids in an order unrelated to the values'
    instances = [
        inst(f"{prefix}{k:03d}", metadata={"v": value, "w": value})
        for k, value in enumerate(values)
        for prefix in ("y", "x")
    ]
    commit(storage, model, instances)
    queries = []
    for kind_values in (INTS, FLOATS, STRS, [False, True]):
        low, high = kind_values[0], kind_values[-1]
        middle = kind_values[len(kind_values) // 2]
        queries += [
            Query("range", ("v", low, None)),
            Query("range", ("v", None, high)),
            Query("range", ("v", middle, None)),
            Query("range", ("v", None, middle)),
            Query("range", ("v", low, middle)),
            Query("range", ("v", middle, middle)),
            Query("range", ("v", high, low)),
        ]
        queries += [Query("metadata", ("w", value)) for value in kind_values]
    for query in queries:
        check_query(storage, model, query, sizes=[1, 3])
    assert len(storage.list_by_metadata("v", start=-(2**63))) == 2 * len(INTS)
    assert [one.metadata["v"] for one in storage.list_by_metadata("v", start="")] == [
        value for value in sorted(STRS, key=str.encode) for _ in "xy"
    ]


# --- time ----------------------------------------------------------------------------------------


def test_time_ranges_include_the_start_exclude_the_end_and_break_ties_by_id(
    storage: Storage,
) -> None:
    model = ModelStore()
    times = [0, 0, 1, 5, 5, 5, 6, 2**32, 2**63 - 2, 2**63 - 1]
    ids = ["z", "a", "m", "é", "b", "B", "x", "q", "r", "s"]
    commit(storage, model, [inst(i, updated_at=t) for i, t in zip(ids, times, strict=True)])
    spans = [(0, 1), (0, 5), (5, 6), (5, 7), (1, 2**32 + 1), (2**63 - 1, 2**63), (6, 5)]
    spans += [(0, END_OF_TIME), (0, 2**64 - 1), (2**63 - 1, 2**63 - 1), (2**63, 2**64 - 1)]
    for start, end in spans:
        for newest_first in (False, True):
            check_query(storage, model, Query("time", (start, end), newest_first), sizes=[1, 2])
    assert [one.id for one in storage.list_by_time(5, 6)] == ["B", "b", "é"]
    assert [one.id for one in storage.list_by_time(0, 6, newest_first=True)] == [
        "é",
        "b",
        "B",
        "m",
        "z",
        "a",
    ]


# --- upkeep: updates move entries, deletes remove them -------------------------------------------


def test_updates_move_every_index_entry_and_deletes_remove_them(config: StorageConfig) -> None:
    with Storage.open(config) as storage:
        storage.put_instance(inst("a", metadata={"k": 1, "gone": "x"}, created_at=5, updated_at=10))
        storage.put_instance(inst("a", "paid", metadata={"k": "1"}, created_at=None, updated_at=20))
    with Storage.open(config) as storage:
        got = storage.get_instance("a")
        assert got is not None and (got.created_at, got.updated_at) == (5, 20)
        assert storage.list_by_state("order", "pending") == []
        assert [one.id for one in storage.list_by_state("order", "paid")] == ["a"]
        assert storage.list_by_metadata("k", 1) == storage.list_by_metadata("gone", "x") == []
        assert [one.id for one in storage.list_by_metadata("k", "1")] == ["a"]
        assert storage.list_by_time(0, 20) == []
        assert [one.id for one in storage.list_by_time(20, 21)] == ["a"]
        assert storage.count_by_state("order") == {"paid": 1}
        storage.delete_instance("a")
        assert storage.list_by_state("order", "paid") == []
        assert storage.list_by_metadata("k", start="") == []
        assert storage.list_by_time(0, END_OF_TIME) == []
        assert storage.count_by_state("order") == {}
        assert storage.verify() == []


def test_an_update_that_keeps_some_index_entries_is_found_as_written(storage: Storage) -> None:
    """Entries that an update leaves as they were still lead to the instance as updated."""
    model = ModelStore()
    commit(storage, model, [inst("b", metadata={"k": 1, "j": 2, "z": -0.0}, updated_at=10)])
    commit(storage, model, [inst("b", metadata={"k": 1, "j": 3, "z": 0.0}, updated_at=10)])
    commit(storage, model, [inst("c", "paid", metadata={"k": 1}, updated_at=10)])
    commit(storage, model, [inst("c", "paid", metadata={"k": 1}, updated_at=11, version=2)])
    for query in [
        Query("state", ("order", "pending")),
        Query("state", ("order", "paid")),
        Query("metadata", ("k", 1)),
        Query("metadata", ("j", 2)),
        Query("metadata", ("j", 3)),
        Query("metadata", ("z", -0.0)),
        Query("range", ("z", None, math.inf)),
        Query("time", (10, 12), newest_first=True),
    ]:
        check_query(storage, model, query, sizes=[1])
    [found] = storage.list_by_metadata("z", -0.0)
    assert math.copysign(1.0, found.metadata["z"]) == 1.0 and found.last_wal_offset == 2
    assert [one.version for one in storage.list_by_state("order", "paid")] == [2]
    assert storage.verify() == []


def test_count_by_state_counts_one_machine_only(storage: Storage) -> None:
    model = ModelStore()
    machines = ["m", "m2", "mé", "m\x01"]
    states = ["p", "pa", "p\x01", "é"]
    commit(
        storage,
        model,
        [inst(f"{k}", states[k % 4], machine=machines[k % 3], updated_at=k) for k in range(30)],
    )
    for machine in [*machines, "absent"]:
        assert storage.count_by_state(machine) == model.count_by_state(machine)
    assert storage.count_by_state("m") == {"p": 3, "pa": 2, "p\x01": 2, "é": 3}
    assert storage.count_by_state("absent") == {}


# --- bad arguments -------------------------------------------------------------------------------

BAD_QUERIES: list[tuple[str, Callable[[Storage], object], type[Exception]]] = [
    ("empty machine", lambda s: s.list_by_state("", "p"), InvalidInputError),
    ("NUL in machine", lambda s: s.list_by_state("order\x00", "p"), InvalidInputError),
    ("empty state", lambda s: s.list_by_state("order", ""), InvalidInputError),
    ("NUL in state", lambda s: s.list_by_state("order", "p\x00x"), InvalidInputError),
    ("machine not str", lambda s: s.list_by_state(1, "p"), InvalidTypeError),
    ("state None", lambda s: s.list_by_state("order", None), InvalidTypeError),
    ("iter: empty state", lambda s: list(s.iter_by_state("order", "")), InvalidInputError),
    ("count: empty machine", lambda s: s.count_by_state(""), InvalidInputError),
    ("count: NUL machine", lambda s: s.count_by_state("a\x00"), InvalidInputError),
    ("count: machine bytes", lambda s: s.count_by_state(b"order"), InvalidTypeError),
    ("empty label", lambda s: s.list_by_metadata("", 1), InvalidInputError),
    ("NUL in label", lambda s: s.list_by_metadata("k\x00", 1), InvalidInputError),
    ("label not str", lambda s: s.list_by_metadata(1, 1), InvalidTypeError),
    ("list value", lambda s: s.list_by_metadata("k", [1]), InvalidTypeError),
    ("dict value", lambda s: s.list_by_metadata("k", {"a": 1}), InvalidTypeError),
    ("bytes value", lambda s: s.list_by_metadata("k", b"x"), InvalidTypeError),
    ("None value, no bounds", lambda s: s.list_by_metadata("k", None), InvalidInputError),
    ("no value at all", lambda s: s.list_by_metadata("k"), InvalidInputError),
    ("value and bounds", lambda s: s.list_by_metadata("k", 1, start=0), InvalidInputError),
    ("NaN value", lambda s: s.list_by_metadata("k", math.nan), InvalidInputError),
    ("NaN start", lambda s: s.list_by_metadata("k", start=math.nan), InvalidInputError),
    ("NaN end", lambda s: s.list_by_metadata("k", start=0.0, end=math.nan), InvalidInputError),
    ("int beyond 64 bits", lambda s: s.list_by_metadata("k", 2**63), InvalidInputError),
    ("int bound too low", lambda s: s.list_by_metadata("k", end=-(2**63) - 1), InvalidInputError),
    ("int and float bounds", lambda s: s.list_by_metadata("k", start=1, end=2.0), InvalidTypeError),
    (
        "bool and int bounds",
        lambda s: s.list_by_metadata("k", start=False, end=1),
        InvalidTypeError,
    ),
    ("str and int bounds", lambda s: s.list_by_metadata("k", start="a", end=1), InvalidTypeError),
    ("list bound", lambda s: s.list_by_metadata("k", start=[1]), InvalidTypeError),
    ("iter: list value", lambda s: list(s.iter_by_metadata("k", [1])), InvalidTypeError),
    ("float start time", lambda s: s.list_by_time(0.0, 10), InvalidTypeError),
    ("str end time", lambda s: s.list_by_time(0, "10"), InvalidTypeError),
    ("bool start time", lambda s: s.list_by_time(True, 10), InvalidTypeError),
    ("None end time", lambda s: s.list_by_time(0, None), InvalidTypeError),
    ("negative time", lambda s: s.list_by_time(-1, 10), InvalidInputError),
    ("time beyond 64 bits", lambda s: s.list_by_time(0, 2**64), InvalidInputError),
    ("iter: float time", lambda s: list(s.iter_by_time(0, 1.5)), InvalidTypeError),
]


@pytest.mark.parametrize(
    ("call", "error"), [b[1:] for b in BAD_QUERIES], ids=[b[0] for b in BAD_QUERIES]
)
def test_bad_query_arguments_raise_typed_errors(
    storage: Storage, call: Callable[[Storage], object], error: type[Exception]
) -> None:
    storage.put_instance(inst("a", metadata={"k": 1}))
    with pytest.raises(error):
        call(storage)
    assert storage.applied_seq == 1 and storage.verify() == []
