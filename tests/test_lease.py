"""One writer per store id ships to a bucket (the lease), and a new writer raises the epoch:
disaster recovery onto an empty disk, then the restored store takes over as the primary. Against
the real S3 server of ``s3server.py``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import boto3
import pytest
from helpers import instances_by_id, put_orders, start_worker, wait_until
from s3server import bucket_keys

from rstmdb_storage import LeaseHeldError, Storage, StorageConfig
from rstmdb_storage.replication.objects import parse_url


def lease_of(url: str) -> dict:
    bucket, prefix = parse_url(url)
    client = boto3.client("s3")
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    (key,) = [i["Key"] for i in listing["Contents"] if i["Key"].endswith("/lease")]
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_a_second_writer_of_the_same_store_is_refused_while_the_first_holds_the_lease(
    config: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    primary_config = dataclasses.replace(config, replica_url=s3_url)
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 20)
        primary.ship()
        # A copy of the store (same store id) started as a primary too: refused at open.
        Storage.restore(s3_url, tmp_path / "copy")
        copy_config = dataclasses.replace(primary_config, data_dir=tmp_path / "copy")
        with pytest.raises(LeaseHeldError, match="held by another writer"):
            Storage.open(copy_config)
        with Storage.open(copy_config.path) as copy:  # refused, it holds no WAL for shipping
            assert copy.wal_holds() == {}
        put_orders(primary, 20, 5)  # the first goes on
        assert primary.ship().shipped_seq == 25
        assert primary.replication_status()["epoch"] == 1


def test_the_processes_of_one_data_directory_are_one_writer(
    config: StorageConfig, s3_url: str
) -> None:
    primary_config = dataclasses.replace(config, replica_url=s3_url)
    with Storage.open(primary_config) as first, Storage.open(primary_config) as second:
        put_orders(first, 0, 10)
        assert second.ship().shipped_seq == 10  # whichever ships, under the one lease
        assert first.replication_status()["epoch"] == second.replication_status()["epoch"] == 1


def test_a_primary_lost_with_its_host_is_restored_from_the_bucket_and_takes_over(
    tmp_path: Path, s3_url: str
) -> None:
    # The primary: killed while it writes, its lease left to expire.
    old_dir = tmp_path / "old-primary"
    worker = start_worker("shipping-writer", old_dir, s3_url, 64 * 1024, 50, 500)
    try:
        for line in worker.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            if event["event"] == "shipped" and event["seq"] >= 300:
                break
    finally:
        worker.kill()
        worker.wait()
    replica_config = StorageConfig(data_dir=tmp_path / "replica", replica_of=s3_url)
    with Storage.open(replica_config) as replica:
        followed = replica.catch_up()

        # Disaster recovery onto an empty disk, then the restored store ships as the primary.
        restored_seq = Storage.restore(s3_url, tmp_path / "new-primary")
        assert restored_seq >= followed >= 300
        new_config = StorageConfig(
            data_dir=tmp_path / "new-primary", replica_url=s3_url, lease_ttl_ms=500
        )
        assert wait_until(lambda: lease_of(s3_url)["expires_ms"] < time.time_ns() // 1_000_000)
        with Storage.open(new_config) as new_primary:
            status = new_primary.replication_status()
            assert status["epoch"] == 2 and status["shipped_seq"] == restored_seq
            put_orders(new_primary, 10_000, 50)
            shipped = new_primary.ship().shipped_seq
            assert shipped == restored_seq + 50
            # The replica follows across the epoch, where the new primary began.
            assert replica.catch_up() == shipped
            assert replica.replication_status()["epoch"] == 2
            assert {i.id: i for i in replica.iter_instances()} == {
                i.id: i for i in new_primary.iter_instances()
            }
        assert lease_of(s3_url)["epoch"] == 2
    # The bucket restores the new primary's state, from its epoch.
    assert Storage.restore(s3_url, tmp_path / "again") == shipped
    assert instances_by_id(tmp_path / "again") == instances_by_id(tmp_path / "new-primary")
    # And a point before the new epoch, from the old one.
    early = restored_seq - 100
    assert Storage.restore(s3_url, tmp_path / "early", seq=early) == early


def test_a_clean_close_lets_the_next_writer_take_the_lease_at_once(
    config: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    primary_config = dataclasses.replace(config, replica_url=s3_url)
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 20)
    Storage.restore(s3_url, tmp_path / "next")
    with Storage.open(dataclasses.replace(primary_config, data_dir=tmp_path / "next")) as nxt:
        assert nxt.replication_status()["epoch"] == 2
        put_orders(nxt, 20, 1)
        assert nxt.ship().shipped_seq == 21


def test_restore_if_missing_brings_a_lost_disk_back_from_the_bucket(
    config: StorageConfig, s3_url: str
) -> None:
    primary_config = dataclasses.replace(config, replica_url=s3_url, restore_if_missing=True)
    with Storage.open(primary_config) as primary:  # the bucket is empty: a new store
        put_orders(primary, 0, 30)
        before = {i.id: i for i in primary.iter_instances()}
    shutil.rmtree(config.path)  # the disk is lost

    with Storage.open(primary_config) as primary:
        assert {i.id: i for i in primary.iter_instances()} == before
        assert primary.replication_status()["epoch"] == 2  # another writer: a new epoch
        put_orders(primary, 30, 1)
        assert primary.ship().shipped_seq == 31


def test_restore_if_missing_without_the_bucket_starts_nothing(
    config: StorageConfig, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3server import closed_port

    from rstmdb_storage import ConfigError, ObjectStoreUnavailableError

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ObjectStoreUnavailableError):
        Storage.open(dataclasses.replace(config, replica_url=s3_url, restore_if_missing=True))
    assert not (config.path / "wal").exists()
    with pytest.raises(ConfigError, match="restore_if_missing"):
        Storage.open(dataclasses.replace(config, restore_if_missing=True))


def test_a_primary_paused_past_its_lease_ships_nothing_once_another_took_over(
    tmp_path: Path, s3_url: str
) -> None:
    """Split brain: a primary frozen (SIGSTOP: a VM paused, a long GC) while a restored copy
    takes its expired lease; thawed, it must not ship another object, and says why."""
    worker = start_worker("shipping-writer", tmp_path / "old", s3_url, 64 * 1024, 50, 300)
    try:
        events = worker.stdout  # type: ignore[union-attr]
        while json.loads(next(events)).get("seq", 0) < 200:
            pass
        os.kill(worker.pid, signal.SIGSTOP)
        before = bucket_keys(s3_url)
        assert wait_until(lambda: lease_of(s3_url)["expires_ms"] < time.time_ns() // 1_000_000)
        Storage.restore(s3_url, tmp_path / "new")
        new_config = StorageConfig(data_dir=tmp_path / "new", replica_url=s3_url, lease_ttl_ms=300)
        with Storage.open(new_config) as new_primary:  # takes the lease: epoch 2
            assert new_primary.replication_status()["epoch"] == 2
            os.kill(worker.pid, signal.SIGCONT)
            refused = None
            while refused is None:  # the thawed primary writes on, and ships nothing
                event = json.loads(next(events))
                if event["event"] == "shipped" and event["error"]:
                    refused = event["error"]
            assert "LeaseHeldError" in refused

            # At most the upload in flight when it froze landed since; then nothing more,
            # while it writes on (100 writes: several seal intervals).
            def old_epoch_since() -> set[str]:  # what the old primary shipped after the pause
                return {k for k in bucket_keys(s3_url) if "/e1/" in k} - set(before)

            since = old_epoch_since()
            assert len(since) <= 1
            acks = 0
            while acks < 100:
                acks += json.loads(next(events))["event"] == "ack"
            assert old_epoch_since() == since
    finally:
        worker.kill()
        worker.wait()
