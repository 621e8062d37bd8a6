"""Idempotency keys: a retried write returns the first result and writes nothing."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import order

from rstmdb_storage import Storage, StorageConfig
from rstmdb_storage.codec import cbor_dumps


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
        change, _ = storage._put_change(order("o", "twice"), None, None)
        record = [change, [4, "k", config.idempotency_retention_ms]]
        env = storage._env
        with env.write_mutex, env.begin_write() as txn:
            now = time.time_ns() // 1_000_000
            storage._wal.append(storage._meta.tail(txn), now, cbor_dumps(record, "test"))
            storage._wal.sync()
            txn.abort()  # dies before applying
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
    # workers): the write itself finds the key and writes nothing.
    monkeypatch.setattr(storage, "_remembered", lambda key: None)
    monkeypatch.setattr(storage, "get_instance", _moved_back_to_pending(storage))
    again = storage.transition("o", "pending", "paid", event_id="b", idempotency_key="step-1")
    assert again.state == "shipped" and again.last_event_id != "b"
    assert storage.applied_seq == first.last_wal_offset + 1  # nothing more was written


def _moved_back_to_pending(storage: Storage):
    """get_instance that shows the retry its stale read once ("pending"), then the truth."""
    real = storage.get_instance
    calls = []

    def get(instance_id: str):
        calls.append(instance_id)
        inst = real(instance_id)
        if len(calls) == 1:
            inst.state = "pending"
        return inst

    return get
