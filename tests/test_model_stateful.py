"""A hypothesis state machine against the model (``tests/model_store.py``): puts, conditional
puts, transitions, deletes, batches (abandoned ones too), reopens, compactions, a lost
``indexes/``, restored copies and a switch between the two commit paths, after each of which
every instance, every count, every query and every page of it, and ``verify()`` agree with the
model."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from internals import force_group_commit
from model_store import Change, Delete, ModelAbsent, ModelStore, Put, label_sort_key, view
from query_checks import Query, check_query

from rstmdb_storage import (
    ConflictError,
    FsyncPolicy,
    Instance,
    InstanceNotFoundError,
    Storage,
    StorageConfig,
)

IDS = ["a", "ab", "b", "B", "a b", "é", "e\u0301", "\uffff", "😀", "9", "10", "a\x01"]
MACHINES = ["order", "order-2"]
STATES = ["pending", "paid", "p"]
LABELS = ["k", "k2", "ü"]
TIMES = [0, 1, 2, 3, 5, 8, 2**32, 2**63 - 1]
QUERY_TIMES = [*TIMES, 4, 2**63, 2**64 - 1]

label_ints = st.sampled_from([-(2**63), -300, -1, 0, 1, 2**63 - 1]) | st.integers(-2, 2)
label_floats = st.sampled_from([-math.inf, -1.5, -0.0, 0.0, 5e-324, 1.0, math.inf])
label_strs = st.sampled_from(["", "a", "a\x00", "ab", "é", "\uffff", "😀", "\x00"])
label_values = st.one_of(st.booleans(), label_ints, label_floats, label_strs)
BOUNDS = {bool: st.booleans(), int: label_ints, float: label_floats, str: label_strs}

instances = st.builds(
    Instance,
    id=st.sampled_from(IDS),
    machine=st.sampled_from([*MACHINES, MACHINES[0]]),
    version=st.integers(1, 3),
    state=st.sampled_from(STATES),
    ctx=st.dictionaries(st.sampled_from(["n", "s"]), st.integers(-5, 5) | st.text(max_size=3)),
    # each label mostly of one or two types, so that ranges find several values
    metadata=st.fixed_dictionaries(
        {},
        optional={
            "k": label_ints | label_floats,
            "k2": label_strs | st.booleans(),
            "ü": label_values,
        },
    ),
    status=st.sampled_from(["active", "deleted"]),
    last_event_id=st.none() | st.sampled_from(["e1", "e2"]),
    created_at=st.none() | st.sampled_from(TIMES),
    updated_at=st.sampled_from(TIMES),
)


@st.composite
def queries(draw: st.DrawFn, model: ModelStore) -> Query:
    """A query of any kind; values and bounds are drawn mostly from what the model holds, so
    that results are seldom empty."""
    kind = draw(st.sampled_from(["state", "metadata", "range", "time"]))
    records = list(model.records.values())

    def mostly_held(held: list[Any], pool: st.SearchStrategy[Any]) -> Any:
        """Three times in four a value from *held*, else one from *pool*; a float zero may
        come back with the other sign (-0.0 must find 0.0 and the reverse)."""
        value = draw(st.sampled_from(held) if held and draw(st.integers(0, 3)) else pool)
        if type(value) is float and value == 0.0 and draw(st.booleans()):
            value = -value
        return value

    if kind == "state":
        pairs = [(r.machine, r.state) for r in records]
        everything = st.tuples(
            st.sampled_from([*MACHINES, "order-3"]), st.sampled_from([*STATES, "pa"])
        )
        return Query(kind, mostly_held(pairs, everything))
    label = mostly_held(
        [k for r in records for k in r.metadata], st.sampled_from([*LABELS, "none"])
    )
    value = mostly_held([r.metadata[label] for r in records if label in r.metadata], label_values)
    if kind == "metadata":
        return Query(kind, (label, value))
    if kind == "range":
        same_type = [
            r.metadata[label] for r in records if type(r.metadata.get(label)) is type(value)
        ]
        other = mostly_held(same_type, BOUNDS[type(value)])
        bounds = sorted([value, other], key=label_sort_key)
        shape = draw(st.sampled_from(["both", "start", "start", "end", "end", "reversed"]))
        start, end = {
            "both": bounds,
            "start": [bounds[0], None],
            "end": [None, bounds[1]],
            "reversed": bounds[::-1],
        }[shape]
        return Query(kind, (label, start, end))
    start, end = sorted(
        mostly_held([r.updated_at for r in records], st.sampled_from(QUERY_TIMES)) for _ in "se"
    )
    end = min(end + draw(st.integers(0, 1)), 2**64 - 1)  # the end is exclusive
    if draw(st.integers(0, 4)) == 0:
        start, end = end, start
    return Query(kind, (start, end), newest_first=draw(st.booleans()))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class StoreAgainstModel(RuleBasedStateMachine):
    """Writes go to the store and the model; after every step every invariant holds, also
    after compactions, a lost ``indexes/`` rebuilt, in restored copies, and whichever commit
    path (group commit or one transaction) the writes took.

    A new kind of write (a conditional put, a transition) is a rule that builds model changes
    and a store call and hands both to :meth:`write`."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rstmdb-queries-"))
        self.config = StorageConfig(
            data_dir=self.dir / "data",
            wal_segment_size=64 * 1024,
            fsync_policy=FsyncPolicy.never(),
        )
        self.grouped = False
        self.storage = self.open_store()
        self.model = ModelStore()
        self.restores = 0

    def open_store(self) -> Storage:
        """The store, writing by group commit or in one transaction as the machine chose."""
        storage = Storage.open(self.config)
        force_group_commit(storage, when=lambda: self.grouped)
        return storage

    def teardown(self) -> None:
        try:
            self.storage.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, changes: list[Change], store_write: Callable[[], int | None]) -> None:
        """Commit *changes* to a copy of the model and run *store_write*: the same sequence
        number, or the same refusal with nothing changed."""
        outcome = self.model.clone()
        try:
            expected_seq = outcome.commit(changes)
        except ModelAbsent:
            with pytest.raises(InstanceNotFoundError):
                store_write()
            return
        before = now_ms()
        assert store_write() == expected_seq
        after = now_ms()
        self.model = outcome
        filled = {}
        for instance_id in self.model.unresolved():
            stored = self.storage.get_instance(instance_id)
            assert stored is not None and stored.created_at is not None
            assert before <= stored.created_at <= after
            filled[instance_id] = stored.created_at
            self.model.resolve_created_at(instance_id, stored.created_at)
        assert len(set(filled.values())) <= 1, "one write, one timestamp"

    def some_id(self) -> st.SearchStrategy[str]:
        """Mostly an id the model holds (so that deletes hit), sometimes any id of the pool."""
        held = sorted(self.model.records)
        return (
            st.sampled_from(held) | st.sampled_from(held) | st.sampled_from(IDS)
            if held
            else st.sampled_from(IDS)
        )

    @initialize(seed=st.lists(instances, min_size=6, max_size=16))
    def seed(self, seed: list[Instance]) -> None:
        self.batch_of(seed)

    def batch_of(self, changes: list[Instance | str]) -> None:
        def run() -> int | None:
            with self.storage.batch() as batch:
                for change in changes:
                    if isinstance(change, Instance):
                        batch.put_instance(change)
                    else:
                        batch.delete_instance(change)
            return batch.seq

        self.write([Put(c) if isinstance(c, Instance) else Delete(c) for c in changes], run)

    @rule(instance=instances)
    def put(self, instance: Instance) -> None:
        self.write([Put(instance)], lambda: self.storage.put_instance(instance))

    @rule(instance=instances, data=st.data())
    def conditional_put(self, instance: Instance, data: st.DataObject) -> None:
        """A put guarded by the state and/or sequence number the writer believes current:
        it applies exactly when the model agrees, else ConflictError and nothing changes."""
        record = self.model.records.get(instance.id)
        expected_state = data.draw(st.sampled_from([None, *STATES]))
        actual_seq = record.seq if record is not None else 0
        expected_seq = data.draw(st.sampled_from([None, actual_seq, actual_seq + 1]))
        if expected_state is None and expected_seq is None:
            expected_seq = actual_seq
        holds = expected_seq in (None, actual_seq) and (
            expected_state is None or (record is not None and record.state == expected_state)
        )

        def run() -> int:
            return self.storage.put_instance(
                instance, expected_state=expected_state, expected_seq=expected_seq
            )

        if holds:
            self.write([Put(instance)], run)
            return
        applied = self.storage.applied_seq
        with pytest.raises(ConflictError):
            run()
        assert self.storage.applied_seq == applied

    @rule(data=st.data())
    def transition(self, data: st.DataObject) -> None:
        """transition() moves an instance only from the state the model holds; it fills in
        updated_at from the clock, which the model then takes from the store."""
        instance_id = data.draw(self.some_id())
        from_state, to_state = (
            data.draw(st.sampled_from(STATES)),
            data.draw(st.sampled_from(STATES)),
        )
        event_id = data.draw(st.sampled_from(["evt-1", "evt-2", "é-3"]))
        record = self.model.records.get(instance_id)
        applied = self.storage.applied_seq
        if record is None or record.state != from_state:
            error = InstanceNotFoundError if record is None else ConflictError
            with pytest.raises(error):
                self.storage.transition(instance_id, from_state, to_state, event_id=event_id)
            assert self.storage.applied_seq == applied
            return
        before = now_ms()
        moved = self.storage.transition(instance_id, from_state, to_state, event_id=event_id)
        assert before <= moved.updated_at <= now_ms()
        expected = Instance(
            id=record.id,
            machine=record.machine,
            version=record.version,
            state=to_state,
            ctx=record.ctx,
            metadata=record.metadata,
            status=record.status,
            last_event_id=event_id,
            created_at=record.created_at,
            updated_at=moved.updated_at,
        )
        assert self.model.commit([Put(expected)]) == moved.last_wal_offset
        if record.created_at is None:  # filled by the store earlier, not read back yet
            self.model.resolve_created_at(instance_id, moved.created_at)
        assert view(moved) == view(self.model.records[instance_id])

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        instance_id = data.draw(self.some_id())
        self.write([Delete(instance_id)], lambda: self.storage.delete_instance(instance_id))

    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        change = st.one_of(instances, instances, instances, self.some_id())
        self.batch_of(data.draw(st.lists(change, min_size=1, max_size=6)))

    @rule(abandoned=st.lists(instances, min_size=1, max_size=3))
    def abandoned_batch(self, abandoned: list[Instance]) -> None:
        """A batch whose block raises writes nothing."""
        with pytest.raises(KeyError), self.storage.batch() as batch:
            for one in abandoned:
                batch.put_instance(one)
            raise KeyError("abandon")
        assert batch.seq is None

    @rule()
    def reopen(self) -> None:
        self.storage.close()
        self.storage = self.open_store()

    @rule(grouped=st.booleans())
    def switch_commit_path(self, grouped: bool) -> None:
        """Writes from here on take group commit's three steps (append, shared sync, apply;
        conditions judged at append), or the one-transaction path."""
        self.grouped = grouped

    @rule()
    def compact(self) -> None:
        self.storage.compact()  # a snapshot, then the WAL before the older kept one goes

    @rule()
    def lose_indexes(self) -> None:
        """indexes/ lost: rebuilt from the newest snapshot and the WAL (or the WAL alone)."""
        self.storage.close()
        shutil.rmtree(self.config.path / "indexes")
        self.storage = self.open_store()

    @rule()
    def restore_a_copy(self) -> None:
        self.restores += 1
        target = self.dir / f"restored-{self.restores}"
        assert Storage.restore(self.config.path, target) == self.model.next_seq - 1
        with Storage.open(target) as restored:
            for instance_id in IDS:
                stored, record = restored.get_instance(instance_id), self.model.get(instance_id)
                assert (stored and view(stored)) == (record and view(record)), instance_id
            assert restored.verify() == []

    @rule(data=st.data())
    def query(self, data: st.DataObject) -> None:
        for query in data.draw(st.lists(queries(self.model), min_size=1, max_size=4)):
            total = len(query.expected(self.model))
            check_query(self.storage, self.model, query, [data.draw(st.integers(1, total + 2))])

    @invariant()
    def instances_agree(self) -> None:
        for instance_id in IDS:
            stored = self.storage.get_instance(instance_id)
            record = self.model.get(instance_id)
            assert (stored and view(stored)) == (record and view(record)), instance_id
        assert self.storage.count_instances() == len(self.model.records)
        assert self.storage.applied_seq == self.model.next_seq - 1
        for machine in MACHINES:
            assert self.storage.count_by_state(machine) == self.model.count_by_state(machine)

    @invariant()
    def verify_finds_nothing(self) -> None:
        assert self.storage.verify() == []


StoreAgainstModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None
)
TestStoreAgainstModel = StoreAgainstModel.TestCase
