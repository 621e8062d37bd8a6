"""Bad input to the API is a typed error (a StorageError that is also a ValueError or a
TypeError) that writes nothing, however odd the value: never a bare TypeError, never a
ValueError raised while the message is being built.

The table (``BAD_INPUT``) covers every public call and argument of ``Storage``, ``Batch``,
``Instance`` and ``StorageConfig``/``FsyncPolicy``; each case runs on a store holding two
instances, a machine definition and a snapshot, and must raise the error named in its row
and leave the store as it was: the same applied sequence number, WAL records and bytes, WAL
holds, instances, machines and files (and no new directory where a target was named)."""

from __future__ import annotations

import enum
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import order, wal_bytes

from rstmdb_storage import (
    Batch,
    ConfigError,
    ConflictError,
    CorruptionError,
    FsyncPolicy,
    Instance,
    InstanceNotFoundError,
    InvalidInputError,
    InvalidTypeError,
    NotAStoreError,
    RecordTooLargeError,
    SnapshotManifest,
    Storage,
    StorageConfig,
    StorageError,
)

# --- the store every case runs on ---------------------------------------------------------------

#: small limits, so that the too-large cases need kilobytes, not megabytes
MAX_INSTANCE = 4 * 1024
MAX_RECORD = 8 * 1024


def small_config(data_dir: Path, **fields: Any) -> StorageConfig:
    return StorageConfig(
        data_dir=data_dir,
        wal_segment_size=64 * 1024,
        snapshot_interval=0,
        compaction_enabled=False,
        max_instance_size=MAX_INSTANCE,
        max_record_size=MAX_RECORD,
        **fields,
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Storage]:
    """A store holding ``o-1`` (pending) and ``o-2`` (paid), machine ``order`` version 1, and
    a snapshot taken between the two puts."""
    with Storage.open(small_config(tmp_path / "data")) as storage:
        storage.put_instance(order("o-1", ctx={"total": 1.5}, metadata={"customer": "alice"}))
        storage.put_machine("order", 1, {"states": ["pending", "paid"]})
        storage.create_snapshot()
        storage.put_instance(order("o-2", "paid", metadata={"priority": 5}))
        yield storage


def footprint(storage: Storage, root: Path) -> dict[str, Any]:
    """What a refused call must leave as it was."""
    return {
        "applied_seq": storage.applied_seq,
        "wal_records": [record.seq for record in storage.read_wal()],
        "wal_bytes": wal_bytes(storage.config.path),
        "holds": storage.wal_holds(),
        "instances": list(storage.iter_instances()),
        "machines": storage.list_machines(),
        "snapshots": storage.list_snapshots(),
        "files": sorted(str(p.relative_to(root)) for p in root.rglob("*")),
    }


# --- builders for the rows ----------------------------------------------------------------------

Call = Callable[[Storage, Path], object]  # (the store, a target path that does not exist yet)


def inst(**fields: Any) -> Instance:
    """A storable instance ``n-1``, with *fields* replaced."""
    base: dict[str, Any] = {"id": "n-1", "machine": "order", "version": 1, "state": "pending"}
    return Instance(**{**base, **fields})


def put(**fields: Any) -> Call:
    return lambda s, t: s.put_instance(inst(**fields))


def in_batch(*ops: Callable[[Batch], object]) -> Call:
    """A batch that makes a good put first, then *ops*."""

    def call(s: Storage, t: Path) -> None:
        with s.batch() as batch:
            batch.put_instance(inst(id="b-1"))
            for op in ops:
                op(batch)

    return call


def opened(**fields: Any) -> Call:
    """Open a new store in the target with the config fields *fields*."""
    return lambda s, t: Storage.open(StorageConfig(data_dir=t, **fields))


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


def manifest_of(s: Storage, **fields: Any) -> SnapshotManifest:
    """The store's snapshot manifest with *fields* replaced."""
    real = s.list_snapshots()[0]
    values = {name: getattr(real, name) for name in SnapshotManifest.__slots__}
    return SnapshotManifest(**{**values, **fields})


def wrong_arity(s: Storage, t: Path) -> None:
    pass


class Version(enum.IntEnum):
    ONE = 1


class LyingStr(str):
    """A str whose ``encode`` lies: the LMDB key and the WAL record would disagree."""

    __slots__ = ()

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return b"someone-else"


def _batch_key(s: Storage, key: object) -> None:
    with s.batch(idempotency_key=key) as batch:
        batch.put_instance(inst())


def _non_empty(t: Path) -> None:
    t.mkdir()
    (t / "keep").write_bytes(b"")


def _a_file(t: Path) -> None:
    t.write_bytes(b"")


BIG = 2**64
HUGE = 10**5000  # past the 4,300 digits Python turns into text
NAN, INF = math.nan, math.inf
LONG = "x" * 256  # over MAX_ID_BYTES
LONG_UTF8 = "é" * 128  # 128 characters, 256 bytes in UTF-8
SURROGATE = "a\ud800"
TOO_BIG = "x" * (MAX_INSTANCE + 1)

T, I, C = InvalidTypeError, InvalidInputError, ConfigError  # noqa: E741

#: (name, call, the error it must raise[, setup of the target before the call])
BAD_INPUT: list[tuple[Any, ...]] = [
    # --- put_instance: not an Instance ----------------------------------------------------
    ("put None", lambda s, t: s.put_instance(None), T),
    ("put dict", lambda s, t: s.put_instance({"id": "n-1"}), T),
    ("put str", lambda s, t: s.put_instance("n-1"), T),
    # --- Instance.id ------------------------------------------------------------------------
    ("id None", put(id=None), T),
    ("id bytes", put(id=b"n-1"), T),
    ("id int", put(id=1), T),
    ("id list", put(id=["n-1"]), T),
    ("id empty", put(id=""), I),
    ("id NUL", put(id="n\x001"), I),
    ("id 256 bytes", put(id=LONG), I),
    ("id 256 UTF-8 bytes", put(id=LONG_UTF8), I),
    ("id lone surrogate", put(id=SURROGATE), I),
    # --- Instance.machine -------------------------------------------------------------------
    ("machine None", put(machine=None), T),
    ("machine bytes", put(machine=b"order"), T),
    ("machine int", put(machine=5), T),
    ("machine empty", put(machine=""), I),
    ("machine NUL", put(machine="\x00"), I),
    ("machine 256 bytes", put(machine=LONG), I),
    ("machine lone surrogate", put(machine="\udfff"), I),
    # --- Instance.version -------------------------------------------------------------------
    ("version None", put(version=None), T),
    ("version str", put(version="1"), T),
    ("version float", put(version=1.0), T),
    ("version bool", put(version=True), T),
    ("version IntEnum", put(version=Version.ONE), T),
    ("version -1", put(version=-1), I),
    ("version 2**63", put(version=2**63), I),
    ("version 2**64", put(version=BIG), I),
    ("version 10**5000", put(version=HUGE), I),
    ("version -10**5000", put(version=-HUGE), I),
    # --- Instance.state ---------------------------------------------------------------------
    ("state None", put(state=None), T),
    ("state dict", put(state={"a": 1}), T),
    ("state empty", put(state=""), I),
    ("state NUL", put(state="pending\x00"), I),
    ("state 256 UTF-8 bytes", put(state=LONG_UTF8), I),
    ("state lone surrogate", put(state=SURROGATE), I),
    # --- Instance.ctx -----------------------------------------------------------------------
    ("ctx None", put(ctx=None), T),
    ("ctx list", put(ctx=[]), T),
    ("ctx str", put(ctx="{}"), T),
    ("ctx int key", put(ctx={1: "a"}), T),
    ("ctx None key", put(ctx={None: 1}), T),
    ("ctx bytes key", put(ctx={b"k": 1}), T),
    ("ctx tuple key", put(ctx={(1, 2): 1}), T),
    ("ctx int key nested in a list", put(ctx={"l": [{"a": 1}, {2: 3}]}), T),
    ("ctx set", put(ctx={"k": {1, 2}}), T),
    ("ctx complex", put(ctx={"k": 1j}), T),
    ("ctx object", put(ctx={"k": object()}), T),
    ("ctx str subclass", put(ctx={"k": LyingStr("v")}), T),
    ("ctx lone surrogate", put(ctx={"k": "\udfff"}), I),
    ("ctx lone surrogate key", put(ctx={"\ud800": 1}), I),
    ("ctx 100 deep", put(ctx=nested(100)), I),
    ("ctx refers to itself", put(ctx=cyclic()), I),
    ("ctx too large (str)", put(ctx={"k": TOO_BIG}), RecordTooLargeError),
    ("ctx too large (bytes)", put(ctx={"k": TOO_BIG.encode()}), RecordTooLargeError),
    # --- Instance.metadata ------------------------------------------------------------------
    ("metadata None", put(metadata=None), T),
    ("metadata list", put(metadata=[("k", 1)]), T),
    ("metadata int key", put(metadata={1: "v"}), T),
    ("metadata empty key", put(metadata={"": 1}), I),
    ("metadata NUL key", put(metadata={"k\x00": 1}), I),
    ("metadata 256-byte key", put(metadata={LONG: 1}), I),
    ("metadata None value", put(metadata={"k": None}), T),
    ("metadata list value", put(metadata={"k": [1]}), T),
    ("metadata bytes value", put(metadata={"k": b"v"}), T),
    ("metadata NaN", put(metadata={"k": NAN}), I),
    ("metadata int 2**63", put(metadata={"k": 2**63}), I),
    ("metadata int below -2**63", put(metadata={"k": -(2**63) - 1}), I),
    ("metadata int 10**5000", put(metadata={"k": HUGE}), I),
    ("metadata 256-byte value", put(metadata={"k": LONG}), I),
    ("metadata lone surrogate value", put(metadata={"k": SURROGATE}), I),
    (
        "metadata too large",
        put(metadata={f"k{i}": "v" * 250 for i in range(20)}),
        RecordTooLargeError,
    ),
    # --- Instance.status, last_event_id, created_at, updated_at ------------------------------
    ("status unknown", put(status="archived"), I),
    ("status capitalised", put(status="ACTIVE"), I),
    ("status None", put(status=None), I),
    ("last_event_id int", put(last_event_id=5), T),
    ("last_event_id bytes", put(last_event_id=b"e"), T),
    ("last_event_id lone surrogate", put(last_event_id=SURROGATE), I),
    ("last_event_id too large", put(last_event_id=TOO_BIG), RecordTooLargeError),
    ("created_at str", put(created_at="1"), T),
    ("created_at float", put(created_at=1.5), T),
    ("created_at bool", put(created_at=True), T),
    ("created_at -1", put(created_at=-1), I),
    ("created_at 2**63", put(created_at=2**63), I),
    ("created_at 2**64", put(created_at=BIG), I),
    ("created_at 10**5000", put(created_at=HUGE), I),
    ("updated_at float", put(updated_at=1e3), T),
    ("updated_at -1", put(updated_at=-1), I),
    ("updated_at 2**64", put(updated_at=BIG), I),
    # --- put_instance's conditions and key ----------------------------------------------------
    ("put expected_state int", lambda s, t: s.put_instance(inst(), expected_state=1), T),
    ("put expected_state empty", lambda s, t: s.put_instance(inst(), expected_state=""), I),
    ("put expected_state NUL", lambda s, t: s.put_instance(inst(), expected_state="\x00"), I),
    ("put expected_seq -1", lambda s, t: s.put_instance(inst(), expected_seq=-1), I),
    ("put expected_seq 2**63", lambda s, t: s.put_instance(inst(), expected_seq=2**63), I),
    ("put expected_seq 10**5000", lambda s, t: s.put_instance(inst(), expected_seq=HUGE), I),
    ("put expected_seq str", lambda s, t: s.put_instance(inst(), expected_seq="0"), T),
    ("put expected_seq float", lambda s, t: s.put_instance(inst(), expected_seq=0.0), T),
    ("put expected_seq bool", lambda s, t: s.put_instance(inst(), expected_seq=False), T),
    (
        "put expected_seq stale",
        lambda s, t: s.put_instance(inst(id="o-1"), expected_seq=0),
        ConflictError,
    ),
    ("put idempotency_key int", lambda s, t: s.put_instance(inst(), idempotency_key=1), T),
    ("put idempotency_key empty", lambda s, t: s.put_instance(inst(), idempotency_key=""), I),
    ("put idempotency_key NUL", lambda s, t: s.put_instance(inst(), idempotency_key="k\x00"), I),
    ("put idempotency_key long", lambda s, t: s.put_instance(inst(), idempotency_key=LONG), I),
    (
        "put idempotency_key lone surrogate",
        lambda s, t: s.put_instance(inst(), idempotency_key=SURROGATE),
        I,
    ),
    # --- delete_instance ----------------------------------------------------------------------
    ("delete id None", lambda s, t: s.delete_instance(None), T),
    ("delete id bytes", lambda s, t: s.delete_instance(b"o-1"), T),
    ("delete id empty", lambda s, t: s.delete_instance(""), I),
    ("delete id NUL", lambda s, t: s.delete_instance("o-1\x00"), I),
    ("delete id 256 bytes", lambda s, t: s.delete_instance(LONG), I),
    ("delete id lone surrogate", lambda s, t: s.delete_instance(SURROGATE), I),
    ("delete absent", lambda s, t: s.delete_instance("absent"), InstanceNotFoundError),
    ("delete expected_state int", lambda s, t: s.delete_instance("o-1", expected_state=1), T),
    (
        "delete expected_state wrong",
        lambda s, t: s.delete_instance("o-1", expected_state="paid"),
        ConflictError,
    ),
    ("delete expected_seq -1", lambda s, t: s.delete_instance("o-1", expected_seq=-1), I),
    ("delete expected_seq str", lambda s, t: s.delete_instance("o-1", expected_seq="1"), T),
    (
        "delete idempotency_key bytes",
        lambda s, t: s.delete_instance("o-1", idempotency_key=b"k"),
        T,
    ),
    # --- transition ---------------------------------------------------------------------------
    ("transition id None", lambda s, t: s.transition(None, "pending", "paid"), T),
    ("transition id empty", lambda s, t: s.transition("", "pending", "paid"), I),
    ("transition id NUL", lambda s, t: s.transition("o\x00", "pending", "paid"), I),
    (
        "transition absent",
        lambda s, t: s.transition("absent", "pending", "paid"),
        InstanceNotFoundError,
    ),
    ("transition from_state None", lambda s, t: s.transition("o-1", None, "paid"), T),
    ("transition from_state empty", lambda s, t: s.transition("o-1", "", "paid"), I),
    (
        "transition from_state wrong",
        lambda s, t: s.transition("o-1", "paid", "done"),
        ConflictError,
    ),
    ("transition to_state None", lambda s, t: s.transition("o-1", "pending", None), T),
    ("transition to_state int", lambda s, t: s.transition("o-1", "pending", 1), T),
    ("transition to_state empty", lambda s, t: s.transition("o-1", "pending", ""), I),
    ("transition to_state NUL", lambda s, t: s.transition("o-1", "pending", "p\x00"), I),
    ("transition to_state 256 bytes", lambda s, t: s.transition("o-1", "pending", LONG), I),
    ("transition ctx list", lambda s, t: s.transition("o-1", "pending", "paid", ctx=[1]), T),
    ("transition ctx int key", lambda s, t: s.transition("o-1", "pending", "paid", ctx={1: 2}), T),
    ("transition ctx set", lambda s, t: s.transition("o-1", "pending", "paid", ctx={"k": {1}}), T),
    (
        "transition ctx 100 deep",
        lambda s, t: s.transition("o-1", "pending", "paid", ctx=nested(100)),
        I,
    ),
    (
        "transition ctx too large",
        lambda s, t: s.transition("o-1", "pending", "paid", ctx={"k": TOO_BIG}),
        RecordTooLargeError,
    ),
    ("transition event_id int", lambda s, t: s.transition("o-1", "pending", "paid", event_id=1), T),
    (
        "transition idempotency_key int",
        lambda s, t: s.transition("o-1", "pending", "paid", idempotency_key=1),
        T,
    ),
    (
        "transition idempotency_key empty",
        lambda s, t: s.transition("o-1", "pending", "paid", idempotency_key=""),
        I,
    ),
    # --- batch and Batch.put_instance / delete_instance -----------------------------------
    ("batch idempotency_key int", lambda s, t: _batch_key(s, 1), T),
    ("batch idempotency_key NUL", lambda s, t: _batch_key(s, "k\x00"), I),
    ("batch put None", in_batch(lambda b: b.put_instance(None)), T),
    ("batch put id empty", in_batch(lambda b: b.put_instance(inst(id=""))), I),
    ("batch put version 2**64", in_batch(lambda b: b.put_instance(inst(version=BIG))), I),
    ("batch put ctx int key", in_batch(lambda b: b.put_instance(inst(ctx={1: 1}))), T),
    ("batch put metadata NaN", in_batch(lambda b: b.put_instance(inst(metadata={"k": NAN}))), I),
    (
        "batch put too large",
        in_batch(lambda b: b.put_instance(inst(ctx={"k": TOO_BIG}))),
        RecordTooLargeError,
    ),
    (
        "batch put expected_seq -1",
        in_batch(lambda b: b.put_instance(inst(), expected_seq=-1)),
        I,
    ),
    (
        "batch put expected_state bytes",
        in_batch(lambda b: b.put_instance(inst(), expected_state=b"s")),
        T,
    ),
    (
        "batch record too large",
        in_batch(
            *[
                lambda b, i=i: b.put_instance(inst(id=f"b-{i + 2}", ctx={"k": "x" * 3000}))
                for i in range(3)
            ]
        ),
        RecordTooLargeError,
    ),
    ("batch delete None", in_batch(lambda b: b.delete_instance(None)), T),
    ("batch delete empty", in_batch(lambda b: b.delete_instance("")), I),
    ("batch delete lone surrogate", in_batch(lambda b: b.delete_instance(SURROGATE)), I),
    ("batch delete absent", in_batch(lambda b: b.delete_instance("absent")), InstanceNotFoundError),
    (
        "batch delete expected_seq 2**64",
        in_batch(lambda b: b.delete_instance("o-1", expected_seq=BIG)),
        I,
    ),
    # --- get_instance ------------------------------------------------------------------------
    ("get None", lambda s, t: s.get_instance(None), T),
    ("get int", lambda s, t: s.get_instance(1), T),
    ("get bytes", lambda s, t: s.get_instance(b"o-1"), T),
    ("get empty", lambda s, t: s.get_instance(""), I),
    ("get NUL", lambda s, t: s.get_instance("o-1\x00"), I),
    ("get 256 bytes", lambda s, t: s.get_instance(LONG), I),
    ("get lone surrogate", lambda s, t: s.get_instance(SURROGATE), I),
    # --- list_by_state / iter_by_state / count_by_state --------------------------------------
    ("list_by_state machine None", lambda s, t: s.list_by_state(None, "pending"), T),
    ("list_by_state machine empty", lambda s, t: s.list_by_state("", "pending"), I),
    ("list_by_state state int", lambda s, t: s.list_by_state("order", 1), T),
    ("list_by_state state NUL", lambda s, t: s.list_by_state("order", "p\x00"), I),
    ("list_by_state limit 0", lambda s, t: s.list_by_state("order", "pending", limit=0), I),
    ("list_by_state limit -1", lambda s, t: s.list_by_state("order", "pending", limit=-1), I),
    ("list_by_state limit str", lambda s, t: s.list_by_state("order", "pending", limit="10"), T),
    ("list_by_state limit float", lambda s, t: s.list_by_state("order", "pending", limit=1.5), T),
    ("list_by_state limit bool", lambda s, t: s.list_by_state("order", "pending", limit=True), T),
    ("list_by_state cursor int", lambda s, t: s.list_by_state("order", "pending", cursor=5), T),
    (
        "list_by_state cursor bytes",
        lambda s, t: s.list_by_state("order", "pending", cursor=b"x"),
        T,
    ),
    ("list_by_state cursor junk", lambda s, t: s.list_by_state("order", "pending", cursor="!!"), I),
    ("list_by_state cursor empty", lambda s, t: s.list_by_state("order", "pending", cursor=""), I),
    (
        "list_by_state cursor lone surrogate",
        lambda s, t: s.list_by_state("order", "pending", cursor=SURROGATE),
        I,
    ),
    (
        "list_by_state cursor of another query",
        lambda s, t: s.list_by_state(
            "order", "pending", cursor=s.list_by_time(0, 2**63, limit=1).next_cursor
        ),
        I,
    ),
    ("iter_by_state machine None", lambda s, t: s.iter_by_state(None, "pending"), T),
    ("iter_by_state state empty", lambda s, t: s.iter_by_state("order", ""), I),
    ("count_by_state None", lambda s, t: s.count_by_state(None), T),
    ("count_by_state empty", lambda s, t: s.count_by_state(""), I),
    ("count_by_state 256 bytes", lambda s, t: s.count_by_state(LONG), I),
    # --- list_by_metadata / iter_by_metadata -------------------------------------------------
    ("list_by_metadata key None", lambda s, t: s.list_by_metadata(None, "alice"), T),
    ("list_by_metadata key empty", lambda s, t: s.list_by_metadata("", "alice"), I),
    ("list_by_metadata key NUL", lambda s, t: s.list_by_metadata("c\x00", "alice"), I),
    ("list_by_metadata no value or bounds", lambda s, t: s.list_by_metadata("customer"), I),
    (
        "list_by_metadata value and start",
        lambda s, t: s.list_by_metadata("customer", "alice", start="a"),
        I,
    ),
    ("list_by_metadata value NaN", lambda s, t: s.list_by_metadata("k", NAN), I),
    ("list_by_metadata value list", lambda s, t: s.list_by_metadata("k", [1]), T),
    ("list_by_metadata value bytes", lambda s, t: s.list_by_metadata("k", b"v"), T),
    ("list_by_metadata value 2**63", lambda s, t: s.list_by_metadata("k", 2**63), I),
    ("list_by_metadata value 256 bytes", lambda s, t: s.list_by_metadata("k", LONG), I),
    ("list_by_metadata start NaN", lambda s, t: s.list_by_metadata("k", start=NAN), I),
    ("list_by_metadata end NaN", lambda s, t: s.list_by_metadata("k", start=1.0, end=NAN), I),
    ("list_by_metadata start 10**5000", lambda s, t: s.list_by_metadata("k", start=HUGE), I),
    (
        "list_by_metadata end below -2**63",
        lambda s, t: s.list_by_metadata("k", end=-(2**63) - 1),
        I,
    ),
    ("list_by_metadata start dict", lambda s, t: s.list_by_metadata("k", start={"a": 1}), T),
    (
        "list_by_metadata bounds of two types",
        lambda s, t: s.list_by_metadata("k", start=1, end="z"),
        T,
    ),
    (
        "list_by_metadata int and float bounds",
        lambda s, t: s.list_by_metadata("k", start=1, end=INF),
        T,
    ),
    ("list_by_metadata limit 0", lambda s, t: s.list_by_metadata("customer", "alice", limit=0), I),
    (
        "list_by_metadata cursor int",
        lambda s, t: s.list_by_metadata("customer", "alice", cursor=1),
        T,
    ),
    (
        "list_by_metadata cursor junk",
        lambda s, t: s.list_by_metadata("customer", "alice", cursor="AAAA"),
        I,
    ),
    ("iter_by_metadata key int", lambda s, t: s.iter_by_metadata(1, "alice"), T),
    ("iter_by_metadata no value or bounds", lambda s, t: s.iter_by_metadata("customer"), I),
    ("iter_by_metadata start NaN", lambda s, t: s.iter_by_metadata("k", start=NAN), I),
    # --- list_by_time / iter_by_time ----------------------------------------------------------
    ("list_by_time start None", lambda s, t: s.list_by_time(None, 10), T),
    ("list_by_time start str", lambda s, t: s.list_by_time("0", 10), T),
    ("list_by_time start float", lambda s, t: s.list_by_time(0.0, 10), T),
    ("list_by_time start bool", lambda s, t: s.list_by_time(False, 10), T),
    ("list_by_time start -1", lambda s, t: s.list_by_time(-1, 10), I),
    ("list_by_time end 2**64", lambda s, t: s.list_by_time(0, BIG), I),
    ("list_by_time end 10**5000", lambda s, t: s.list_by_time(0, HUGE), I),
    ("list_by_time start -10**5000", lambda s, t: s.list_by_time(-HUGE, 10), I),
    ("list_by_time end NaN", lambda s, t: s.list_by_time(0, NAN), T),
    ("list_by_time end inf", lambda s, t: s.list_by_time(0, INF), T),
    ("list_by_time limit 0", lambda s, t: s.list_by_time(0, 2**63, limit=0), I),
    ("list_by_time limit str", lambda s, t: s.list_by_time(0, 2**63, limit="1"), T),
    ("list_by_time cursor junk", lambda s, t: s.list_by_time(0, 2**63, cursor="bm9wZQ=="), I),
    (
        "list_by_time cursor of another query",
        lambda s, t: s.list_by_time(
            0, 2**63, cursor=s.list_by_state("order", "pending", limit=1).next_cursor or "x"
        ),
        I,
    ),
    ("iter_by_time start str", lambda s, t: s.iter_by_time("0", 10), T),
    ("iter_by_time end -1", lambda s, t: s.iter_by_time(0, -1), I),
    ("iter_by_time end 2**64", lambda s, t: s.iter_by_time(0, BIG), I),
    # --- put_machine / get_machine / list_machines --------------------------------------------
    ("put_machine name None", lambda s, t: s.put_machine(None, 1, {}), T),
    ("put_machine name int", lambda s, t: s.put_machine(1, 1, {}), T),
    ("put_machine name empty", lambda s, t: s.put_machine("", 1, {}), I),
    ("put_machine name NUL", lambda s, t: s.put_machine("o\x00", 1, {}), I),
    ("put_machine name 256 bytes", lambda s, t: s.put_machine(LONG, 1, {}), I),
    ("put_machine name lone surrogate", lambda s, t: s.put_machine(SURROGATE, 1, {}), I),
    ("put_machine version None", lambda s, t: s.put_machine("m", None, {}), T),
    ("put_machine version str", lambda s, t: s.put_machine("m", "1", {}), T),
    ("put_machine version float", lambda s, t: s.put_machine("m", 1.0, {}), T),
    ("put_machine version bool", lambda s, t: s.put_machine("m", True, {}), T),
    ("put_machine version -1", lambda s, t: s.put_machine("m", -1, {}), I),
    ("put_machine version 2**63", lambda s, t: s.put_machine("m", 2**63, {}), I),
    ("put_machine version 2**64", lambda s, t: s.put_machine("m", BIG, {}), I),
    ("put_machine version 10**5000", lambda s, t: s.put_machine("m", HUGE, {}), I),
    ("put_machine definition None", lambda s, t: s.put_machine("m", 1, None), T),
    ("put_machine definition list", lambda s, t: s.put_machine("m", 1, ["a"]), T),
    ("put_machine definition int key", lambda s, t: s.put_machine("m", 1, {1: "a"}), T),
    ("put_machine definition set", lambda s, t: s.put_machine("m", 1, {"s": {1}}), T),
    (
        "put_machine definition lone surrogate",
        lambda s, t: s.put_machine("m", 1, {"s": "\udfff"}),
        I,
    ),
    ("put_machine definition 100 deep", lambda s, t: s.put_machine("m", 1, nested(100)), I),
    (
        "put_machine definition too large",
        lambda s, t: s.put_machine("m", 1, {"s": TOO_BIG}),
        RecordTooLargeError,
    ),
    (
        "put_machine redefinition",
        lambda s, t: s.put_machine("order", 1, {"states": []}),
        ConflictError,
    ),
    ("get_machine name None", lambda s, t: s.get_machine(None), T),
    ("get_machine name empty", lambda s, t: s.get_machine(""), I),
    ("get_machine name NUL", lambda s, t: s.get_machine("o\x00"), I),
    ("get_machine version str", lambda s, t: s.get_machine("order", "1"), T),
    ("get_machine version float", lambda s, t: s.get_machine("order", 1.0), T),
    ("get_machine version bool", lambda s, t: s.get_machine("order", True), T),
    ("get_machine version -1", lambda s, t: s.get_machine("order", -1), I),
    ("get_machine version 2**63", lambda s, t: s.get_machine("order", 2**63), I),
    ("get_machine version 2**64", lambda s, t: s.get_machine("order", BIG), I),
    ("get_machine version 10**5000", lambda s, t: s.get_machine("order", HUGE), I),
    ("list_machines name int", lambda s, t: s.list_machines(1), T),
    ("list_machines name empty", lambda s, t: s.list_machines(""), I),
    ("list_machines name NUL", lambda s, t: s.list_machines("o\x00"), I),
    # --- hold_wal / release_wal ----------------------------------------------------------------
    ("hold_wal name None", lambda s, t: s.hold_wal(None, 1), T),
    ("hold_wal name empty", lambda s, t: s.hold_wal("", 1), I),
    ("hold_wal name NUL", lambda s, t: s.hold_wal("h\x00", 1), I),
    ("hold_wal name 256 bytes", lambda s, t: s.hold_wal(LONG, 1), I),
    ("hold_wal name lone surrogate", lambda s, t: s.hold_wal(SURROGATE, 1), I),
    ("hold_wal from_seq None", lambda s, t: s.hold_wal("h", None), T),
    ("hold_wal from_seq str", lambda s, t: s.hold_wal("h", "1"), T),
    ("hold_wal from_seq float", lambda s, t: s.hold_wal("h", 1.0), T),
    ("hold_wal from_seq bool", lambda s, t: s.hold_wal("h", True), T),
    ("hold_wal from_seq -1", lambda s, t: s.hold_wal("h", -1), I),
    ("hold_wal from_seq 2**63", lambda s, t: s.hold_wal("h", 2**63), I),
    ("hold_wal from_seq 10**5000", lambda s, t: s.hold_wal("h", HUGE), I),
    ("release_wal None", lambda s, t: s.release_wal(None), T),
    ("release_wal empty", lambda s, t: s.release_wal(""), I),
    ("release_wal lone surrogate", lambda s, t: s.release_wal(SURROGATE), I),
    # --- read_wal ------------------------------------------------------------------------------
    ("read_wal from_seq None", lambda s, t: s.read_wal(from_seq=None), T),
    ("read_wal from_seq str", lambda s, t: s.read_wal(from_seq="1"), T),
    ("read_wal from_seq float", lambda s, t: s.read_wal(from_seq=1.5), T),
    ("read_wal from_seq bool", lambda s, t: s.read_wal(from_seq=True), T),
    ("read_wal from_seq 0", lambda s, t: s.read_wal(from_seq=0), I),
    ("read_wal from_seq -10**5000", lambda s, t: s.read_wal(from_seq=-HUGE), I),
    ("read_wal limit str", lambda s, t: s.read_wal(limit="10"), T),
    ("read_wal limit float", lambda s, t: s.read_wal(limit=1.0), T),
    ("read_wal limit 0", lambda s, t: s.read_wal(limit=0), I),
    ("read_wal limit -1", lambda s, t: s.read_wal(limit=-1), I),
    # --- create_snapshot / compact / check_snapshot: progress and manifest ------------------
    ("create_snapshot progress int", lambda s, t: s.create_snapshot(progress=5), T),
    ("create_snapshot progress str", lambda s, t: s.create_snapshot(progress="x"), T),
    (
        "create_snapshot progress of the wrong arity",
        lambda s, t: s.create_snapshot(progress=wrong_arity),
        T,
    ),
    ("compact progress int", lambda s, t: s.compact(progress=5), T),
    ("check_snapshot None", lambda s, t: s.check_snapshot(None), T),
    ("check_snapshot str", lambda s, t: s.check_snapshot("00000000000000000002"), T),
    (
        "check_snapshot absent",
        lambda s, t: s.check_snapshot(manifest_of(s, seq=999)),
        CorruptionError,
    ),
    (
        "check_snapshot seq -1",
        lambda s, t: s.check_snapshot(manifest_of(s, seq=-1)),
        I,  # a sequence number below 0 is refused as input
    ),
    ("check_snapshot seq 10**5000", lambda s, t: s.check_snapshot(manifest_of(s, seq=HUGE)), I),
    ("check_snapshot seq str", lambda s, t: s.check_snapshot(manifest_of(s, seq="2")), T),
    (
        "check_snapshot progress int",
        lambda s, t: s.check_snapshot(s.list_snapshots()[0], progress=5),
        T,
    ),
    # --- backup --------------------------------------------------------------------------------
    ("backup None", lambda s, t: s.backup(None), T),
    ("backup int", lambda s, t: s.backup(5), T),
    ("backup target NUL", lambda s, t: s.backup(f"{t}\x00x"), I),
    ("backup target not empty", lambda s, t: s.backup(t), I, _non_empty),
    ("backup target a file", lambda s, t: s.backup(t), I, _a_file),
    ("backup target the store", lambda s, t: s.backup(s.config.path), I),
    ("backup progress int", lambda s, t: s.backup(t, progress=5), T),
    # --- Storage.restore -----------------------------------------------------------------------
    ("restore source None", lambda s, t: Storage.restore(None, t), C),
    ("restore source NUL", lambda s, t: Storage.restore("a\x00b", t), C),
    ("restore source not a store", lambda s, t: Storage.restore(t.parent, t), NotAStoreError),
    ("restore target None", lambda s, t: Storage.restore(s.config.path, None), T),
    ("restore target int", lambda s, t: Storage.restore(s.config.path, 5), T),
    ("restore target NUL", lambda s, t: Storage.restore(s.config.path, f"{t}\x00x"), I),
    ("restore target not empty", lambda s, t: Storage.restore(s.config.path, t), I, _non_empty),
    ("restore target a file", lambda s, t: Storage.restore(s.config.path, t), I, _a_file),
    ("restore target the source", lambda s, t: Storage.restore(s.config.path, s.config.path), I),
    ("restore seq -1", lambda s, t: Storage.restore(s.config.path, t, seq=-1), I),
    ("restore seq str", lambda s, t: Storage.restore(s.config.path, t, seq="2"), T),
    ("restore seq float", lambda s, t: Storage.restore(s.config.path, t, seq=2.0), T),
    ("restore seq bool", lambda s, t: Storage.restore(s.config.path, t, seq=True), T),
    ("restore seq past the WAL", lambda s, t: Storage.restore(s.config.path, t, seq=99), I),
    ("restore seq 2**63", lambda s, t: Storage.restore(s.config.path, t, seq=2**63), I),
    ("restore seq 2**64", lambda s, t: Storage.restore(s.config.path, t, seq=BIG), I),
    ("restore seq 10**5000", lambda s, t: Storage.restore(s.config.path, t, seq=HUGE), I),
    ("restore seq -10**5000", lambda s, t: Storage.restore(s.config.path, t, seq=-HUGE), I),
    (
        "restore seq and until_ms",
        lambda s, t: Storage.restore(s.config.path, t, seq=1, until_ms=1),
        I,
    ),
    ("restore until_ms str", lambda s, t: Storage.restore(s.config.path, t, until_ms="1"), T),
    ("restore until_ms float", lambda s, t: Storage.restore(s.config.path, t, until_ms=1.5), T),
    ("restore until_ms bool", lambda s, t: Storage.restore(s.config.path, t, until_ms=True), T),
    ("restore until_ms -1", lambda s, t: Storage.restore(s.config.path, t, until_ms=-1), I),
    ("restore until_ms 2**64", lambda s, t: Storage.restore(s.config.path, t, until_ms=BIG), I),
    ("restore until_ms 10**5000", lambda s, t: Storage.restore(s.config.path, t, until_ms=HUGE), I),
    ("restore progress int", lambda s, t: Storage.restore(s.config.path, t, progress=5), T),
    # --- repair_wal ----------------------------------------------------------------------------
    ("repair_wal None", lambda s, t: Storage.repair_wal(None), C),
    ("repair_wal empty path", lambda s, t: Storage.repair_wal(""), C),
    ("repair_wal NUL", lambda s, t: Storage.repair_wal(f"{t}\x00x"), C),
    ("repair_wal not a store", lambda s, t: Storage.repair_wal(t), NotAStoreError),
    (
        "repair_wal bad config",
        lambda s, t: Storage.repair_wal(small_config(t, file_mode=0o7777)),
        C,
    ),
    ("repair_wal an open store", lambda s, t: Storage.repair_wal(s.config), StorageError),
    # --- StorageConfig and FsyncPolicy (Storage.open) -----------------------------------------
    ("open config None", lambda s, t: Storage.open(None), C),
    ("open config int", lambda s, t: Storage.open(5), C),
    ("data_dir None", lambda s, t: Storage.open(StorageConfig(data_dir=None)), C),
    ("data_dir empty", lambda s, t: Storage.open(StorageConfig(data_dir="")), C),
    ("data_dir int", lambda s, t: Storage.open(StorageConfig(data_dir=5)), C),
    ("data_dir bytes", lambda s, t: Storage.open(StorageConfig(data_dir=os.fsencode(t))), C),
    ("data_dir NUL", lambda s, t: Storage.open(StorageConfig(data_dir=f"{t}\x00x")), C),
    ("data_dir Path with NUL", lambda s, t: Storage.open(StorageConfig(data_dir=t / "a\x00b")), C),
    ("snapshot_interval -1", opened(snapshot_interval=-1), C),
    ("snapshot_interval str", opened(snapshot_interval="10"), C),
    ("snapshot_interval float", opened(snapshot_interval=10.0), C),
    ("snapshot_interval bool", opened(snapshot_interval=True), C),
    ("max_wal_segments 0", opened(max_wal_segments=0), C),
    ("compaction_enabled int", opened(compaction_enabled=1), C),
    ("compaction_enabled str", opened(compaction_enabled="no"), C),
    ("snapshots_kept 0", opened(snapshots_kept=0), C),
    ("snapshots_kept None", opened(snapshots_kept=None), C),
    ("wal_segment_size 1000", opened(wal_segment_size=1000), C),
    ("wal_segment_size 2**64", opened(wal_segment_size=BIG), C),
    ("wal_segment_size 10**5000", opened(wal_segment_size=HUGE), C),
    ("map_size 0", opened(map_size=0), C),
    ("map_size 2**64", opened(map_size=BIG), C),
    ("map_size 10**5000", opened(map_size=HUGE), C),
    ("max_instance_size 0", opened(max_instance_size=0), C),
    ("max_instance_size over 16 MiB", opened(max_instance_size=2**30), C),
    ("max_record_size below max_instance_size", opened(max_record_size=1024), C),
    ("max_record_size over 256 MiB", opened(max_record_size=2**40), C),
    ("max_readers 0", opened(max_readers=0), C),
    ("max_readers 2**64", opened(max_readers=BIG), C),
    ("checkpoint_interval_ms 0", opened(checkpoint_interval_ms=0), C),
    ("checkpoint_interval_ms 2**64", opened(checkpoint_interval_ms=BIG), C),
    ("idempotency_retention_ms 0", opened(idempotency_retention_ms=0), C),
    # a key's retention travels in the WAL record, which replay refuses from 2**63 on; its
    # expiry is stored as u64 (from 2**64 on, the write fails after appending its record)
    ("idempotency_retention_ms 2**63", opened(idempotency_retention_ms=2**63), C),
    ("idempotency_retention_ms 2**64", opened(idempotency_retention_ms=BIG), C),
    ("file_mode 0o7777", opened(file_mode=0o7777), C),
    ("file_mode 0o200", opened(file_mode=0o200), C),
    ("file_mode str", opened(file_mode="0o600"), C),
    ("read_only str", opened(read_only="no"), C),
    ("create None", opened(create=None), C),
    ("fsync_policy str", opened(fsync_policy="every_write"), C),
    ("fsync_policy None", opened(fsync_policy=None), C),
    ("fsync_policy unknown mode", opened(fsync_policy=FsyncPolicy("sometimes")), C),
    ("fsync_policy every_n(0)", opened(fsync_policy=FsyncPolicy.every_n(0)), C),
    ("fsync_policy every_n(-1)", opened(fsync_policy=FsyncPolicy.every_n(-1)), C),
    ("fsync_policy every_n str", opened(fsync_policy=FsyncPolicy.every_n("5")), C),
    ("fsync_policy every_n bool", opened(fsync_policy=FsyncPolicy.every_n(True)), C),
    ("fsync_policy every_ms float", opened(fsync_policy=FsyncPolicy.every_ms(1.5)), C),
    ("fsync_policy every_ms(0)", opened(fsync_policy=FsyncPolicy.every_ms(0)), C),
    ("fsync_policy every_ms None", opened(fsync_policy=FsyncPolicy.every_ms(None)), C),
]


@pytest.mark.parametrize(
    ("call", "error", "setup"),
    [pytest.param(*row[1:], *[None] * (4 - len(row)), id=row[0]) for row in BAD_INPUT],
)
def test_bad_input(
    seeded: Storage,
    tmp_path: Path,
    call: Call,
    error: type[StorageError],
    setup: Callable[[Path], None] | None,
) -> None:
    target = tmp_path / "target"
    if setup is not None:
        setup(target)
    before = footprint(seeded, tmp_path)
    try:
        result = call(seeded, target)
        if isinstance(result, Storage):  # opened when it should not have been
            result.close()
    except Exception as exc:  # what was raised, judged below
        raised: Exception | None = exc
    else:
        raised = None
    after = footprint(seeded, tmp_path)
    wrote = [_change(key, before[key], after[key]) for key in before if before[key] != after[key]]
    problems = []
    if raised is None:
        problems.append("accepted")
    elif not isinstance(raised, error) or not isinstance(raised, StorageError):
        kind = type(raised)
        problems.append(f"raised {kind.__module__}.{kind.__qualname__}: {_clip(str(raised))}")
    if wrote:
        problems.append("wrote: " + "; ".join(wrote))
    assert not problems, f"expected {error.__name__}; " + "; ".join(problems)


def _change(key: str, before: Any, after: Any) -> str:
    """What changed under *key* of the footprint, briefly."""
    if key == "wal_bytes":
        return f"WAL bytes ({len(before)} -> {len(after)})"
    if isinstance(before, list):
        added = [item for item in after if item not in before]
        removed = [item for item in before if item not in after]
        return f"{key} +{_clip(repr(added))} -{_clip(repr(removed))}"
    return f"{key} {_clip(repr(before))} -> {_clip(repr(after))}"


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."


def test_the_table_is_big_enough() -> None:
    assert len(BAD_INPUT) >= 100
    assert len({row[0] for row in BAD_INPUT}) == len(BAD_INPUT), "row names repeat"


# --- non-finite floats -------------------------------------------------------------------------


def test_nan_and_infinities_in_ctx_are_stored_faithfully(tmp_path: Path) -> None:
    """NaN and infinities are JSON-like floats to the store: ctx (and a machine definition)
    takes them and gives them back, from LMDB, the WAL, and after a rebuild from the WAL;
    infinities are metadata labels (NaN is not: it cannot be ordered, see the table)."""
    ctx = {"nan": NAN, "inf": INF, "-inf": -INF, "list": [NAN, {"deep": -INF}], "-0": -0.0}
    config = small_config(tmp_path / "data")

    def faithful(value: Any, expected: Any) -> bool:
        if isinstance(expected, float) and math.isnan(expected):
            return isinstance(value, float) and math.isnan(value)
        if isinstance(expected, float):
            return (
                type(value) is float
                and value == expected
                and (math.copysign(1, value) == math.copysign(1, expected))
            )
        if isinstance(expected, dict):
            return value.keys() == expected.keys() and all(
                faithful(value[k], expected[k]) for k in expected
            )
        if isinstance(expected, list):
            return len(value) == len(expected) and all(map(faithful, value, expected))
        return value == expected

    with Storage.open(config) as storage:
        seq = storage.put_instance(order("f-1", ctx=ctx, metadata={"hi": INF, "lo": -INF}))
        got = storage.get_instance("f-1")
        assert faithful(got.ctx, ctx)
        assert got.metadata == {"hi": INF, "lo": -INF}
        assert [i.id for i in storage.list_by_metadata("hi", INF)] == ["f-1"]
        assert [i.id for i in storage.list_by_metadata("lo", start=-INF, end=0.0)] == ["f-1"]
        assert storage.list_by_metadata("hi", start=-INF, end=INF) == []  # end is exclusive
        moved = storage.transition("f-1", "pending", "paid", ctx={"x": NAN})
        assert math.isnan(moved.ctx["x"])
        storage.put_machine("m", 1, {"limit": INF, "unset": NAN})
        definition = storage.get_machine("m").definition
        assert definition["limit"] == INF and math.isnan(definition["unset"])
        (record,) = storage.read_wal(from_seq=seq, limit=1)
        assert record.changes()[0].id == "f-1"
    for path in (config.path / "indexes").iterdir():  # rebuilt from the WAL alone
        path.unlink()
    (config.path / "indexes").rmdir()
    with Storage.open(config) as storage:
        got = storage.get_instance("f-1")
        assert got.state == "paid" and math.isnan(got.ctx["x"])
        assert got.metadata == {"hi": INF, "lo": -INF}
        assert math.isnan(storage.get_machine("m").definition["unset"])


# --- kept from before the table -----------------------------------------------------------------


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.put_instance(Instance(id="o-1", machine="m", version=10**5000, state="s")),
        lambda s: s.put_instance(order("o-1", created_at=2**70)),
        lambda s: s.put_machine("order", 10**5000, {}),
    ],
)
def test_huge_ints_are_refused_with_a_short_message(storage: Storage, write) -> None:
    before = wal_bytes(storage.config.path)
    with pytest.raises(InvalidInputError) as caught:
        write(storage)
    assert len(str(caught.value)) < 200
    assert wal_bytes(storage.config.path) == before


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"from_seq": "x"}, InvalidTypeError),
        ({"from_seq": 1.5}, InvalidTypeError),
        ({"from_seq": 0}, InvalidInputError),
        ({"limit": "10"}, InvalidTypeError),
        ({"limit": 0}, InvalidInputError),
    ],
)
def test_read_wal_refuses_bad_arguments_at_once(storage: Storage, kwargs, error) -> None:
    with pytest.raises(error):
        storage.read_wal(**kwargs)  # raised by the call, before any iteration


def test_backup_needs_a_path(storage: Storage) -> None:
    with pytest.raises(InvalidTypeError, match="backup target"):
        storage.backup(None)


def test_a_data_dir_with_a_nul_byte_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        Storage.open(StorageConfig(data_dir=f"{tmp_path}/a\x00b"))


def test_a_str_subclass_is_stored_under_the_text_it_holds(config: StorageConfig) -> None:
    """A StrEnum member (or any str subclass) is welcome as an id, machine or state; the store
    keeps the text it holds, whatever its ``encode`` says, in LMDB and in the WAL alike."""

    class State(enum.StrEnum):
        PENDING = "pending"

    with Storage.open(config) as storage:
        storage.put_instance(
            Instance(id=LyingStr("n-1"), machine=LyingStr("m"), version=1, state=State.PENDING)
        )
        assert storage.get_instance("n-1").state == "pending"
        assert storage.get_instance(LyingStr("n-1")) is not None
        assert [i.id for i in storage.list_by_state("m", State.PENDING)] == ["n-1"]
    shutil.rmtree(config.path / "indexes")  # rebuilt from the WAL: the same text
    with Storage.open(config) as storage:
        assert [(i.id, i.machine, i.state) for i in storage.iter_instances()] == [
            ("n-1", "m", "pending")
        ]
        assert storage.verify() == []
