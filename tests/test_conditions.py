"""Conditional writes and transitions: workers that race never both win."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from helpers import order, wal_bytes
from internals import append_raw_records

from rstmdb_storage import (
    ConflictError,
    FsyncPolicy,
    Instance,
    InstanceNotFoundError,
    InvalidInputError,
    Storage,
    StorageConfig,
)
from rstmdb_storage.changes import PutInstance


def test_expected_seq_guards_a_read_modify_write(storage: Storage, data_dir: Path) -> None:
    seq = storage.put_instance(order("o"))
    first = storage.get_instance("o")
    first.state = "paid"
    assert storage.put_instance(first, expected_seq=seq) == seq + 1
    before = wal_bytes(data_dir)
    stale = storage.get_instance("o")
    stale.last_wal_offset = seq  # what a worker that read earlier still holds
    with pytest.raises(ConflictError, match="sequence 2, not 1"):
        storage.put_instance(stale, expected_seq=seq)
    assert wal_bytes(data_dir) == before and storage.applied_seq == seq + 1


def test_expected_seq_zero_means_create_only(storage: Storage) -> None:
    assert storage.put_instance(order("o"), expected_seq=0) == 1
    with pytest.raises(ConflictError):
        storage.put_instance(order("o", "paid"), expected_seq=0)
    assert storage.get_instance("o").state == "pending"


def test_expected_state(storage: Storage) -> None:
    storage.put_instance(order("o"))
    with pytest.raises(ConflictError, match="in state 'pending', not 'paid'"):
        storage.put_instance(order("o", "shipped"), expected_state="paid")
    with pytest.raises(ConflictError, match="is absent"):
        storage.put_instance(order("new", "paid"), expected_state="pending")
    storage.put_instance(order("o", "paid"), expected_state="pending")
    assert storage.get_instance("o").state == "paid"


def test_conditional_delete(storage: Storage) -> None:
    seq = storage.put_instance(order("o"))
    with pytest.raises(ConflictError):
        storage.delete_instance("o", expected_state="paid")
    storage.delete_instance("o", expected_seq=seq)
    assert storage.get_instance("o") is None


def test_a_failed_condition_fails_the_whole_batch(storage: Storage, data_dir: Path) -> None:
    storage.put_instance(order("a"))
    before = wal_bytes(data_dir)
    with pytest.raises(ConflictError), storage.batch() as batch:
        batch.put_instance(order("b"))
        batch.put_instance(order("a", "paid"), expected_state="shipped")
    assert storage.get_instance("b") is None and wal_bytes(data_dir) == before


def test_conditions_in_a_batch_see_the_changes_before_them(storage: Storage) -> None:
    with storage.batch() as batch:
        batch.put_instance(order("a", "new"), expected_seq=0)
        batch.put_instance(order("a", "paid"), expected_state="new")
        batch.delete_instance("a", expected_state="paid")
        batch.put_instance(order("a", "reborn"), expected_seq=0)
    assert storage.get_instance("a").state == "reborn"


@pytest.mark.parametrize(
    "bad",
    [{"expected_seq": -1}, {"expected_seq": "1"}, {"expected_state": ""}, {"expected_state": 3}],
)
def test_bad_conditions_are_refused(storage: Storage, bad: dict) -> None:
    with pytest.raises((InvalidInputError, TypeError)):
        storage.put_instance(order("o"), **bad)
    assert storage.applied_seq == 0


def test_transition_moves_state_and_records_the_event(storage: Storage) -> None:
    storage.put_instance(order("o", ctx={"total": 5}, updated_at=1))
    moved = storage.transition(
        "o", "pending", "paid", ctx={"total": 5, "paid": True}, event_id="evt-1"
    )
    assert (moved.state, moved.ctx, moved.last_event_id) == (
        "paid",
        {"total": 5, "paid": True},
        "evt-1",
    )
    assert moved == storage.get_instance("o") and moved.updated_at > 1
    assert [i.id for i in storage.list_by_state("order", "paid")] == ["o"]
    kept = storage.transition("o", "paid", "shipped")
    assert kept.ctx == moved.ctx and kept.last_event_id == "evt-1"
    with pytest.raises(ConflictError, match="not 'pending'"):
        storage.transition("o", "pending", "paid")
    with pytest.raises(InstanceNotFoundError):
        storage.transition("nobody", "pending", "paid")


def test_replay_skips_a_record_whose_condition_fails(config: StorageConfig) -> None:
    """A record can reach the WAL with a condition that fails when it is applied (a writer
    that died between append and commit, or, with group commit, a lost race): every process
    that applies it must skip it whole, the same way."""
    with Storage.open(config) as storage:
        storage.put_instance(order("a", "paid"))
        size = storage.config.max_instance_size
        change = PutInstance.of(order("a", "shipped"), "pending", None, size)
        other = PutInstance.of(order("b"), None, None, size)
        append_raw_records(storage, [[other, change]], timestamp_ms=1)  # the writer dies
    with Storage.open(config) as storage:
        assert storage.applied_seq == 2  # replayed ...
        assert storage.get_instance("a").state == "paid"  # ... but skipped whole
        assert storage.get_instance("b") is None
        assert [r.seq for r in storage.read_wal()] == [1, 2]
        assert storage.verify() == []


def _race(data_dir: str, worker: int, rounds: int, barrier, policy: FsyncPolicy) -> list[int]:
    config = StorageConfig(data_dir=data_dir, fsync_policy=policy)
    won = []
    with Storage.open(config) as storage:
        barrier.wait()
        for round_ in range(rounds):
            for _attempt in range(100_000):  # bounded: a broken store fails, never hangs
                state = storage.get_instance("race").state
                step = int(state[1:])
                if step > round_:
                    break  # somebody else moved it past this round
                try:
                    storage.transition(
                        "race", f"s{round_}", f"s{round_ + 1}", event_id=f"w{worker}-r{round_}"
                    )
                    won.append(round_)
                except ConflictError:
                    pass
            else:
                raise AssertionError(f"round {round_} never finished")
    return won


@pytest.mark.parametrize(
    "policy", [FsyncPolicy.never(), FsyncPolicy.every_write()], ids=["never", "group-commit"]
)
def test_racing_transitions_from_two_processes_have_one_winner_each(
    data_dir: Path, policy: FsyncPolicy
) -> None:
    rounds = 200
    config = StorageConfig(data_dir=data_dir, fsync_policy=policy)
    with Storage.open(config) as storage:
        storage.put_instance(Instance(id="race", machine="m", version=1, state="s0"))
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        results = pool.starmap(
            _race, [(str(data_dir), w, rounds, barrier, policy) for w in range(2)]
        )
    wins = sorted(results[0] + results[1])
    assert wins == list(range(rounds))  # every round won exactly once
    with Storage.open(config) as storage:
        assert storage.get_instance("race").state == f"s{rounds}"
        assert storage.applied_seq == rounds + 1
