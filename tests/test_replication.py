"""Shipping to an S3-compatible bucket and restoring from it, against a real server
(SeaweedFS's ``weed mini``, started by the ``s3_endpoint`` fixture of ``s3server.py``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import boto3
import pytest
from helpers import instances_by_id, put_orders, start_worker, wait_until
from s3server import StallingProxy, bucket_keys, closed_port, damage_object, free_ports, weed_server
from workers import shipped_instance

from rstmdb_storage import (
    CorruptionError,
    InvalidInputError,
    Storage,
    StorageConfig,
    StorageError,
    WalGapError,
)
from rstmdb_storage.errors import ConfigError, ObjectStoreError, ObjectStoreUnavailableError
from rstmdb_storage.replication.objects import ObjectStore, parse_url

HOLD = "replication"


@pytest.fixture
def shipping(config: StorageConfig, s3_url: str) -> StorageConfig:
    return dataclasses.replace(config, replica_url=s3_url)


def local_state_at(source: Path, seq: int, tmp_path: Path) -> dict[str, object]:
    """What a restore of the source's own directory at *seq* holds: what a restore from the
    bucket to *seq* must equal."""
    target = tmp_path / f"local-{seq}"
    Storage.restore(source, target, seq=seq)
    return instances_by_id(target)


def test_what_was_shipped_restores_from_the_bucket_equal_to_the_source(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 300)
        storage.create_snapshot()
        put_orders(storage, 300, 300)
        report = storage.ship()
        assert report.shipped_seq == storage.applied_seq == 600
        assert report.backlog == 0
        segments = len(storage.wal_segments())
    assert len(bucket_keys(s3_url, ".seg")) == segments - 1  # every one but the open one
    assert len(bucket_keys(s3_url, ".manifest")) == 1

    assert Storage.restore(s3_url, tmp_path / "restored") == 600
    assert instances_by_id(tmp_path / "restored") == instances_by_id(shipping.path)


def test_a_restore_from_the_bucket_to_a_sequence_is_the_state_at_that_sequence(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 200)
        snapshot = storage.create_snapshot()
        put_orders(storage, 200, 400)
        storage.ship()
    for seq in (snapshot.seq - 37, snapshot.seq, snapshot.seq + 123):
        target = tmp_path / f"at-{seq}"
        assert Storage.restore(s3_url, target, seq=seq) == seq
        assert instances_by_id(target) == local_state_at(shipping.path, seq, tmp_path)


def test_a_restore_from_the_bucket_by_time_is_the_state_at_that_time(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 150)
        storage.create_snapshot()
        until_ms = time.time_ns() // 1_000_000  # every record so far was written by now
        while time.time_ns() // 1_000_000 <= until_ms:
            pass  # the clock's next millisecond: every record from here is written after it
        put_orders(storage, 150, 150)
        storage.ship()
    assert Storage.restore(s3_url, tmp_path / "then", until_ms=until_ms) == 150
    assert instances_by_id(tmp_path / "then") == local_state_at(shipping.path, 150, tmp_path)


def test_the_open_segment_is_sealed_and_shipped_within_the_seal_interval(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(shipping, max_seal_interval_ms=100)
    with Storage.open(config) as storage:
        put_orders(storage, 0, 3)
        assert wait_until(lambda: storage.replication_status()["shipped_seq"] == 3)
        status = storage.replication_status()
        assert status["shipping"] and status["lag_seq"] == 0 and status["last_error"] is None
        first, second = storage.wal_segments()
        # Sealed early, the segment was cut to its used length: no preallocated space kept.
        assert (config.path / "wal" / f"{first:020d}.wal").stat().st_size < 4096
        assert second == 4
        put_orders(storage, 3, 1)  # the next segment: shipped too, and the hold follows
        assert wait_until(lambda: storage.replication_status()["shipped_seq"] == 4)
        assert storage.wal_holds()[HOLD] == 5
    assert Storage.restore(s3_url, tmp_path / "restored") == 4


def test_a_store_opened_again_ships_only_what_is_new(shipping: StorageConfig, s3_url: str) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 300)
        storage.ship()
        before = set(bucket_keys(s3_url, ""))
    with Storage.open(shipping) as storage:
        assert storage.ship().shipped == []  # nothing new: nothing written again
        put_orders(storage, 300, 10)
        shipped = storage.ship().shipped
    assert len(shipped) == 1 and shipped[0].endswith(".seg")
    assert before < set(bucket_keys(s3_url, ""))


def test_an_unreachable_bucket_leaves_a_held_backlog_that_ships_when_it_answers(
    shipping: StorageConfig, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 100)
        storage.ship()
        shipped_before = storage.replication_status()["shipped_seq"]
    with monkeypatch.context() as away:
        away.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        with Storage.open(shipping) as storage:
            put_orders(storage, 100, 300)  # writes go on
            with pytest.raises(ObjectStoreUnavailableError):
                storage.ship()
            status = storage.replication_status()
            assert status["backlog"] > 0 and status["last_error"]
            assert status["lag_seq"] == 400 - shipped_before
            unshipped = [s for s in storage.wal_segments() if s > shipped_before]
            storage.create_snapshot()
            storage.compact()
            assert storage.wal_segments() == unshipped  # the shipped one went, the rest stay
    with Storage.open(shipping) as storage:
        report = storage.ship()
        assert report.backlog == 0 and report.shipped_seq == 400
        storage.compact()
        assert storage.wal_segments()[0] > unshipped[0]  # shipped and in a snapshot: compacted
    assert Storage.restore(s3_url, tmp_path / "restored") == 400
    assert instances_by_id(tmp_path / "restored") == instances_by_id(shipping.path)
    assert Storage.restore(s3_url, tmp_path / "early", seq=3) == 3  # all of it was shipped


def test_an_object_changed_in_the_bucket_stops_the_restore_naming_it(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 600)
        storage.ship()
    damaged = bucket_keys(s3_url, ".seg")[1]
    damage_object(s3_url, damaged)  # a byte flipped, the CRC in its metadata kept

    with pytest.raises(CorruptionError, match=damaged):
        Storage.restore(s3_url, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()
    assert list(tmp_path.glob(".rstmdb-download-*")) == []  # the staging directory went too


def test_a_segment_missing_from_the_bucket_stops_the_restore_naming_the_gap(
    shipping: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 600)
        storage.ship()
    bucket, _ = parse_url(s3_url)
    segments = bucket_keys(s3_url, ".seg")
    boto3.client("s3").delete_object(Bucket=bucket, Key=segments[1])

    with pytest.raises(WalGapError, match=segments[2].rpartition("/")[2]):
        Storage.restore(s3_url, tmp_path / "restored")
    # Up to the gap, what is there restores.
    first_missing = int(segments[1].rpartition("/")[2][:16], 16)
    assert Storage.restore(s3_url, tmp_path / "before", seq=first_missing - 1) == first_missing - 1


def test_a_restore_from_an_empty_bucket_is_refused(s3_url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="holds no shipped store"):
        Storage.restore(s3_url, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_an_object_is_written_once(s3_url: str) -> None:
    objects = ObjectStore(s3_url)
    assert objects.put_once("a/b.seg", b"first", {}) is True
    assert objects.put_once("a/b.seg", b"first", {}) is False  # a retry: the same bytes
    with pytest.raises(ObjectStoreError, match="exists with other content"):
        objects.put_once("a/b.seg", b"other", {})
    assert objects.get("a/b.seg") == b"first"


def test_shipping_calls_on_a_store_that_does_not_ship_are_refused(storage: Storage) -> None:
    with pytest.raises(InvalidInputError, match="replica_url"):
        storage.ship()
    with pytest.raises(InvalidInputError, match="replica_url"):
        storage.replication_status()


@pytest.mark.parametrize("url", ["s3:/bucket", "http://bucket/prefix", "s3://", b"s3://b", 7])
def test_a_replica_url_that_is_not_s3_is_refused(config: StorageConfig, url: object) -> None:
    with pytest.raises(ConfigError, match="replica_url"):
        Storage.open(dataclasses.replace(config, replica_url=url))
    assert not config.path.exists()


@pytest.mark.parametrize("url", ["s3:/bucket", "http://bucket/prefix", "s3://b/p?x=1", b"s3://b"])
def test_a_restore_source_url_that_is_not_s3_is_refused(url: object, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        ObjectStore(url)  # type: ignore[arg-type]


# --- a primary killed: what it shipped is what the bucket restores ----------------------------


def read_events(worker: subprocess.Popen[str], until) -> list[dict]:
    """The worker's events up to the first for which *until* holds (asserting one comes)."""
    events = []
    for line in worker.stdout:  # type: ignore[union-attr]
        events.append(json.loads(line))
        if until(events[-1]):
            return events
    raise AssertionError(f"the worker ended first: {events[-3:]}")


def test_a_primary_killed_restores_from_the_bucket_with_every_write_it_shipped(
    data_dir: Path, s3_url: str, tmp_path: Path
) -> None:
    worker = start_worker("shipping-writer", data_dir, s3_url, 64 * 1024, 50)
    try:
        # Killed while it writes, once the bucket holds a few hundred records.
        events = read_events(worker, lambda e: e["event"] == "shipped" and e["seq"] >= 400)
    finally:
        worker.kill()
        worker.wait()
    acked = [e["n"] for e in events if e["event"] == "ack"]
    tried = [e["n"] for e in events if e["event"] == "try"]
    shipped = max(e["seq"] for e in events if e["event"] == "shipped")

    restored = Storage.restore(s3_url, tmp_path / "restored")

    # Everything the primary saw in the bucket is there, and nothing it did not write.
    assert shipped <= restored <= tried[-1]
    with Storage.open(tmp_path / "restored") as storage:
        assert storage.count_instances() == restored
        for n in range(1, restored + 1):
            assert storage.get_instance(f"w{n}").ctx == shipped_instance(n).ctx
    assert set(range(1, shipped + 1)) <= set(acked)


def test_an_upload_cut_off_half_way_leaves_nothing_and_the_next_one_ships_it(
    data_dir: Path, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    with StallingProxy(s3_endpoint, allowed=20_000) as proxy:
        # A long seal interval: the first upload is of a segment sealed on size (64 KiB).
        worker = start_worker(
            "shipping-writer", data_dir, s3_url, 64 * 1024, 600_000, AWS_ENDPOINT_URL=proxy.endpoint
        )
        try:
            assert proxy.stalled.wait(60), "no upload began"
        finally:
            worker.kill()
            worker.wait()
    # Nothing of the segment it was sending; only the lease and the epoch, written before.
    assert [k.rpartition("/")[2] for k in bucket_keys(s3_url, "")] == ["epoch", "lease"]

    with Storage.open(StorageConfig(data_dir=data_dir, replica_url=s3_url)) as storage:
        report = storage.ship()
        assert report.backlog == 0 and report.shipped_seq == storage.applied_seq
    assert Storage.restore(s3_url, tmp_path / "restored") == report.shipped_seq
    assert instances_by_id(tmp_path / "restored") == instances_by_id(data_dir)


def test_a_server_stopped_while_the_store_writes_gets_the_backlog_when_it_is_back(
    data_dir: Path, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket's server itself stopped and started again (its own weed mini, on the same
    ports and files): the store's thread ships the backlog by itself once it answers."""
    server_dir, ports = tmp_path / "weed", free_ports()
    server_dir.mkdir()
    with weed_server(server_dir, ports) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3").create_bucket(Bucket="stopped")
        url = "s3://stopped/store"
        config = StorageConfig(data_dir=data_dir, replica_url=url, wal_segment_size=64 * 1024)
        storage = Storage.open(config)
        put_orders(storage, 0, 100)
        storage.ship()
    try:
        put_orders(storage, 100, 300)  # the server is down: writes go on
        with pytest.raises(ObjectStoreUnavailableError):
            storage.ship()
        assert storage.replication_status()["backlog"] > 0
        with weed_server(server_dir, ports):
            # The thread tries again by itself (backing off, at most 30 s apart).
            assert wait_until(lambda: storage.replication_status()["backlog"] == 0, 60)
            storage.ship()
            assert Storage.restore(url, tmp_path / "restored") == 400
    finally:
        storage.close()
    assert instances_by_id(tmp_path / "restored") == instances_by_id(data_dir)


def test_uploads_left_unfinished_under_the_store_are_aborted_when_shipping_starts(
    shipping: StorageConfig, s3_url: str
) -> None:
    with Storage.open(shipping) as storage:
        put_orders(storage, 0, 5)
        store = storage.store_id.hex()
    bucket, prefix = parse_url(s3_url)
    client = boto3.client("s3")
    key = f"{prefix}/{store}/e1/snap/00000000000000ff.snap"  # as a tool that died would leave
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    elsewhere = client.create_multipart_upload(Bucket=bucket, Key="not-ours/big.bin")

    with Storage.open(shipping):
        pass
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [elsewhere["UploadId"]]  # ours only


def test_a_large_file_goes_up_in_parts_written_once_and_checked(
    s3_url: str, tmp_path: Path
) -> None:
    objects = ObjectStore(s3_url, multipart_threshold=6 << 20, part_size=5 << 20)
    big = tmp_path / "big.snap"
    big.write_bytes(bytes(range(256)) * (12 << 12))  # 12 MiB: three parts
    with big.open("rb") as body:
        assert objects.put_once("snap/big.snap", body, {"seq": "7"}) is True
    with big.open("rb") as body:
        assert objects.put_once("snap/big.snap", body, {"seq": "7"}) is False  # a retry
    other = tmp_path / "other.snap"
    other.write_bytes(b"x" * (7 << 20))
    with other.open("rb") as body, pytest.raises(ObjectStoreError, match="other content"):
        objects.put_once("snap/big.snap", body, {})
    objects.download("snap/big.snap", tmp_path / "back.snap", 0o600)
    assert (tmp_path / "back.snap").read_bytes() == big.read_bytes()
    bucket, _ = parse_url(s3_url)
    assert boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
