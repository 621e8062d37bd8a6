"""Idempotency keys: a retried write returns the first result and writes nothing."""

from __future__ import annotations

from pathlib import Path

from helpers import order
from internals import append_raw_records, stage_transition_race

from rstmdb_storage import Instance, Storage, StorageConfig, failpoints
from rstmdb_storage.changes import IdempotencyKey, PutInstance


def test_a_retried_put_returns_the_first_seq_and_writes_nothing(storage: Storage) -> None:
    first = storage.put_instance(order("o"), idempotency_key="req-1")
    storage.put_instance(order("o", "paid"))
    again = storage.put_instance(order("o", "cancelled"), idempotency_key="req-1")
    assert again == first
    assert storage.get_instance("o").state == "paid"
    assert storage.applied_seq == 2
    assert storage.put_instance(order("o", "cancelled"), idempotency_key="req-2") == 3


def test_a_retried_batch_and_delete(storage: Storage) -> None:
    with storage.batch(idempotency_key="import-7") as batch:
        batch.put_instance(order("a"))
        batch.put_instance(order("b"))
    with storage.batch(idempotency_key="import-7") as again:
        again.put_instance(order("c"))
    assert again.seq == batch.seq and storage.get_instance("c") is None
    seq = storage.delete_instance("a", idempotency_key="del-a")
    assert storage.delete_instance("a", idempotency_key="del-a") == seq  # no NotFound


def test_a_retried_transition_returns_the_instance(storage: Storage) -> None:
    storage.put_instance(order("o"))
    moved = storage.transition("o", "pending", "paid", idempotency_key="pay-o")
    assert storage.transition("o", "pending", "paid", idempotency_key="pay-o") == moved


def test_keys_expire_after_the_retention(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, idempotency_retention_ms=1)
    with Storage.open(config) as storage:
        first = storage.put_instance(order("o"), idempotency_key="k")
        # A write with the key made at least 1 ms later finds it expired; the write's own
        # timestamp decides, so this needs no waiting beyond the clock moving on.
        later = first
        for _ in range(100_000):  # the clock moves on; bounded
            later = storage.put_instance(order("o", "paid"), idempotency_key="k")
            if later != first:
                break
        assert later == first + 1
        assert storage.get_instance("o").state == "paid"


def test_replay_of_a_retry_record_applies_nothing(config: StorageConfig) -> None:
    """Two records with one key can reach the WAL (a writer that died between append and
    commit, then a retry): whoever applies the second must skip it, in every process."""
    with Storage.open(config) as storage:
        storage.put_instance(order("o"), idempotency_key="k")
        change = PutInstance.of(order("o", "twice"), None, None, config.max_instance_size)
        retry = [change, IdempotencyKey("k", config.idempotency_retention_ms)]
        append_raw_records(storage, [retry])  # written now, and the writer dies before applying
    with Storage.open(config) as storage:
        assert storage.applied_seq == 2
        assert storage.get_instance("o").state == "pending"
        assert storage.verify() == []


def test_purge_reclaims_expired_keys_only(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, idempotency_retention_ms=3_600_000)
    with Storage.open(config) as storage:
        for i in range(5):
            storage.put_instance(order(f"o{i}"), idempotency_key=f"k{i}")
        assert storage.purge_idempotency_keys() == 0  # none has expired
    short = StorageConfig(data_dir=data_dir, idempotency_retention_ms=1)
    with Storage.open(short) as storage:
        for i in range(3):
            storage.put_instance(order(f"s{i}"), idempotency_key=f"short{i}")
        purged = 0
        for _ in range(100_000):  # until the clock has moved past their 1 ms; bounded
            purged += storage.purge_idempotency_keys()
            if purged == 3:
                break
        assert purged == 3
        first = storage.put_instance(order("o0", "again"), idempotency_key="k0")
        assert first == 1  # the long-lived key is still remembered


def test_a_transition_whose_key_is_found_only_inside_the_write_returns_what_is_stored(
    storage: Storage, monkeypatch
) -> None:
    storage.put_instance(order("o"))
    first = storage.transition("o", "pending", "paid", event_id="a", idempotency_key="step-1")
    storage.put_instance(order("o", "shipped"))
    # As if the retry checked its key just before the first write landed (a race between two
    # workers), and read the instance then, still "pending": the write itself finds the key
    # and writes nothing.
    stage_transition_race(monkeypatch, stale_state="pending")
    again = storage.transition("o", "pending", "paid", event_id="b", idempotency_key="step-1")
    assert again.state == "shipped" and again.last_event_id != "b"
    assert storage.applied_seq == first.last_wal_offset + 1  # nothing more was written


def test_a_transition_retried_while_its_first_attempt_commits_returns_that_result(
    storage: Storage,
) -> None:
    storage.put_instance(order("o", "pending"))
    first: list[Instance] = []

    def first_attempt_commits() -> None:  # between the retry's key lookup and its state check
        first.append(storage.transition("o", "pending", "paid", idempotency_key="pay-o"))

    failpoints.enable("transition.after_key_check", first_attempt_commits)
    try:
        retried = storage.transition("o", "pending", "paid", idempotency_key="pay-o")
    finally:
        failpoints.disable()
    assert first and first[0].state == "paid"
    assert retried == first[0] == storage.get_instance("o")
    assert [record.seq for record in storage.read_wal()] == [1, 2]  # written once
