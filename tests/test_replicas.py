"""Replicas: stores that follow the bucket a primary ships to (``StorageConfig.replica_of``),
against the real S3 server of ``s3server.py``."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from helpers import instances_by_id, order, put_orders, start_armed_worker, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3server import bucket_keys, damage_object

from rstmdb_storage import (
    ConfigError,
    CorruptionError,
    InvalidInputError,
    ReadOnlyError,
    Storage,
    StorageConfig,
    WalGapError,
)
from rstmdb_storage.cli import main
from rstmdb_storage.replication.objects import parse_url


@pytest.fixture
def primary_config(config: StorageConfig, s3_url: str) -> StorageConfig:
    return dataclasses.replace(config, replica_url=s3_url)


@pytest.fixture
def replica_config(tmp_path: Path, s3_url: str) -> StorageConfig:
    return StorageConfig(data_dir=tmp_path / "replica", replica_of=s3_url)


def everything(storage: Storage) -> tuple[list, list, list]:
    return (
        list(storage.iter_instances()),
        list(storage.list_by_state("order", "pending")),
        list(storage.list_by_state("order", "shipped")),
    )


def test_a_replica_starts_from_the_bucket_and_follows_what_the_primary_ships(
    primary_config: StorageConfig, replica_config: StorageConfig
) -> None:
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 200)
        primary.create_snapshot()
        put_orders(primary, 200, 100)
        primary.ship()
        with Storage.open(replica_config) as replica:  # restored from the bucket
            assert replica.applied_seq == 300
            put_orders(primary, 300, 200, state="shipped")
            primary.delete_instance("o7")
            shipped = primary.ship().shipped_seq
            assert replica.catch_up() == shipped == primary.applied_seq
            assert everything(replica) == everything(primary)
            status = replica.replication_status()
            assert status["role"] == "replica" and status["lag_seq"] == 0
            assert status["bucket_seq"] == shipped and status["last_error"] is None
    with Storage.open(replica_config) as replica:  # opened again: goes on where it was
        assert replica.applied_seq == shipped
        assert replica.catch_up() == shipped


def test_a_replica_applies_by_itself_within_its_poll_interval(
    primary_config: StorageConfig, replica_config: StorageConfig
) -> None:
    primary_config = dataclasses.replace(primary_config, max_seal_interval_ms=50)
    replica_config = dataclasses.replace(replica_config, replica_poll_interval_ms=50)
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 10)
        primary.ship()
        with Storage.open(replica_config) as replica:
            put_orders(primary, 10, 5)
            assert wait_until(lambda: replica.applied_seq == 15)
            assert replica.get_instance("o14") == primary.get_instance("o14")
            assert replica.replication_status()["following"]


def test_a_replica_refuses_writes(
    primary_config: StorageConfig, replica_config: StorageConfig, s3_url: str
) -> None:
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 5)
        primary.ship()
    with Storage.open(replica_config.path, replica_of=s3_url) as replica:  # the short form
        with pytest.raises(ReadOnlyError, match="replica"):
            replica.put_instance(order("new"))
        with pytest.raises(ReadOnlyError, match="replica"):
            replica.delete_instance("o1")
        with pytest.raises(ReadOnlyError, match="replica"), replica.batch() as batch:
            batch.put_instance(order("new"))
        assert replica.applied_seq == 5 and replica.count_instances() == 5


def test_lookup_processes_read_the_replica_while_it_applies(
    primary_config: StorageConfig, replica_config: StorageConfig
) -> None:
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 5)
        primary.ship()
        with Storage.open(replica_config) as replica:
            reader = Storage.open(
                dataclasses.replace(replica_config, replica_of=None, read_only=True)
            )
            with reader:
                assert reader.count_instances() == 5
                put_orders(primary, 5, 300)
                primary.ship()
                replica.catch_up()
                assert everything(reader) == everything(primary)


@pytest.mark.parametrize(
    ("harm", "error", "said"),
    [
        ("flip", CorruptionError, "do not match the CRC-32C"),
        ("prev", CorruptionError, "the segment before it ends at 1"),
        ("delete", WalGapError, "are not in the bucket"),
        # Another segment's bytes, with their own good CRC: only the segment's checks see it.
        ("swap", CorruptionError, "header says first sequence"),
    ],
)
def test_a_replica_stops_at_the_last_good_record_and_names_the_object(
    primary_config: StorageConfig,
    replica_config: StorageConfig,
    s3_url: str,
    harm: str,
    error: type[Exception],
    said: str,
) -> None:
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 100)
        primary.ship()
        with Storage.open(replica_config) as replica:
            good = replica.applied_seq
            put_orders(primary, 100, 400)  # several segments more
            primary.ship()
            keys = bucket_keys(s3_url, ".seg")
            harmed = next(k for k in keys if int(k[-37:-21], 16) == good + 1)
            bucket, _ = parse_url(s3_url)
            client = boto3.client("s3")
            if harm == "delete":
                client.delete_object(Bucket=bucket, Key=harmed)
                named = keys[keys.index(harmed) + 1]  # where the gap shows
            elif harm == "swap":
                other = client.get_object(Bucket=bucket, Key=keys[keys.index(harmed) + 1])
                metadata = {**other["Metadata"], "prev-last-seq": str(good)}
                client.put_object(
                    Bucket=bucket, Key=harmed, Body=other["Body"].read(), Metadata=metadata
                )
                named = harmed
            else:
                damage_object(s3_url, harmed, {"prev-last-seq": "1"} if harm == "prev" else None)
                named = harmed
            with pytest.raises(error, match=said):
                replica.catch_up()
            # Stopped: nothing after the harm is applied, nothing skipped, lookups still work.
            assert replica.applied_seq == good
            assert replica.count_instances() == 100
            assert named.rpartition("/")[2] in replica.replication_status()["last_error"]


def test_replica_settings_that_cannot_work_are_refused(
    replica_config: StorageConfig, s3_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="replica_of"):
        Storage.open(dataclasses.replace(replica_config, read_only=True))
    with pytest.raises(ConfigError, match="replica_of"):
        Storage.open(dataclasses.replace(replica_config, replica_url=s3_url))
    with pytest.raises(InvalidInputError, match="no shipped store"):
        Storage.open(replica_config)  # nothing shipped yet
    assert not replica_config.path.exists()
    with Storage.open(tmp_path / "plain") as plain, pytest.raises(InvalidInputError):
        plain.catch_up()


# --- the command line ----------------------------------------------------------------------


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_replicate_follow_and_restore_from_the_command_line(
    data_dir: Path, s3_url: str, tmp_path: Path
) -> None:
    with Storage.open(data_dir) as storage:
        put_orders(storage, 0, 50)
    # The bucket's history starts here: a snapshot at 50, then the WAL after it.
    code, out, err = run("replicate", data_dir, s3_url, "--once")
    assert code == 0, err
    assert json.loads(out)["shipped_seq"] == 50
    with Storage.open(data_dir) as storage:
        put_orders(storage, 50, 20)
    code, out, err = run("replicate", data_dir, s3_url, "--once")
    assert (code, json.loads(out)["shipped_seq"]) == (0, 70), err

    code, out, err = run("follow", s3_url, tmp_path / "replica", "--once")
    assert code == 0, err
    status = json.loads(out)
    assert (status["role"], status["applied_seq"], status["lag_seq"]) == ("replica", 70, 0)

    code, out, err = run("restore", s3_url, tmp_path / "restored", "--seq", 60, "--json")
    assert code == 0, err
    assert json.loads(out)["seq"] == 60
    with Storage.open(tmp_path / "restored") as restored:
        assert restored.count_instances() == 60
    code, _, err = run("restore", s3_url, tmp_path / "too-early", "--seq", 20)
    assert code == 2 and "reaches sequence 20" in err  # before the bucket's history


def test_follow_stops_at_a_damaged_object_with_one_line_and_exit_1(
    data_dir: Path, s3_url: str, tmp_path: Path
) -> None:
    config = StorageConfig(data_dir=data_dir, replica_url=s3_url)
    with Storage.open(config) as storage:
        put_orders(storage, 0, 10)
        storage.ship()
        assert run("follow", s3_url, tmp_path / "replica", "--once")[0] == 0
        put_orders(storage, 10, 10)
        storage.ship()
    damage_object(s3_url, bucket_keys(s3_url, ".seg")[-1])
    code, out, err = run("follow", s3_url, tmp_path / "replica", "--once")
    assert (code, out) == (1, "")
    assert err.startswith("error: s3://") and err.count("\n") == 1


# --- killed at a step of shipping or following ----------------------------------------------


def test_a_primary_killed_right_after_an_upload_ships_on_without_a_duplicate(
    data_dir: Path, s3_url: str, tmp_path: Path
) -> None:
    worker = start_armed_worker(
        "ship.after_upload=1*off->kill", "shipping-writer", data_dir, s3_url, 64 * 1024, 50
    )
    worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL  # killed at the point: the hold not moved yet
    uploaded = bucket_keys(s3_url, ".seg")
    assert len(uploaded) == 2

    with Storage.open(StorageConfig(data_dir=data_dir, replica_url=s3_url)) as storage:
        report = storage.ship()
        assert not set(report.shipped) & {k.rpartition("/e1/")[2] for k in uploaded}
        assert report.shipped_seq == storage.applied_seq
    assert Storage.restore(s3_url, tmp_path / "restored") == report.shipped_seq
    with Storage.open(tmp_path / "restored") as restored:
        assert restored.verify() == []
        assert restored.count_instances() == report.shipped_seq


def test_a_replica_killed_between_taking_a_segment_and_applying_it_catches_up(
    primary_config: StorageConfig, replica_config: StorageConfig, s3_url: str
) -> None:
    with Storage.open(primary_config) as primary:
        put_orders(primary, 0, 50)
        primary.ship()
        with Storage.open(replica_config):
            pass  # restored from the bucket
        put_orders(primary, 50, 300)
        primary.ship()
        follower = start_armed_worker(
            "follow.after_adopt=1*off->kill", "follower", s3_url, replica_config.path
        )
        follower.communicate(timeout=120)
        assert follower.returncode == -signal.SIGKILL
        with Storage.open(replica_config) as replica:
            assert replica.catch_up() == primary.applied_seq
            assert everything(replica) == everything(primary)
            assert replica.verify() == []


# --- against a model: whatever the history, the bucket restores and replicas follow it --------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 30), st.integers(1, 40)),
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.sampled_from(["snapshot", "compact", "ship", "reopen"])),
    ),
    min_size=1,
    max_size=30,
)


@pytest.fixture(scope="module")
def history_bucket(s3_endpoint: str) -> str:
    """One bucket for every example (a SeaweedFS bucket is a collection with volumes of its
    own: hundreds of them exhaust ``weed mini``); each example ships under a prefix of its own."""
    boto3.client("s3").create_bucket(Bucket="histories")
    return "s3://histories"


@settings(
    max_examples=10,  # each ships and restores three times: seconds, not milliseconds
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_any_history_restores_from_the_bucket_and_a_replica_follows_it(
    history_bucket: str, tmp_path_factory: pytest.TempPathFactory, ops: list, seed: int
) -> None:
    root = tmp_path_factory.mktemp("history")
    url = f"{history_bucket}/{root.name}"
    config = StorageConfig(
        data_dir=root / "primary", replica_url=url, wal_segment_size=64 * 1024, snapshot_interval=0
    )
    model: dict[str, int] = {}  # id -> the size of its padding
    states = [dict(model)]  # the model after each record: states[seq]
    storage = Storage.open(config)
    try:
        for op in ops:
            if op[0] == "put":
                _, key, size = op
                storage.put_instance(order(f"o{key}", ctx={"pad": "p" * (size * 100)}))
                model[f"o{key}"] = size
                states.append(dict(model))
            elif op[0] == "delete" and f"o{op[1]}" in model:
                storage.delete_instance(f"o{op[1]}")
                del model[f"o{op[1]}"]
                states.append(dict(model))
            elif op[0] == "snapshot":
                storage.create_snapshot()
            elif op[0] == "compact":
                storage.compact()
            elif op[0] == "ship":
                storage.ship()
            elif op[0] == "reopen":
                storage.close()
                storage = Storage.open(config)
        shipped = storage.ship().shipped_seq
        assert shipped == storage.applied_seq
    finally:
        storage.close()

    def sizes(instances: dict) -> dict[str, int]:
        return {k: len(v.ctx["pad"]) // 100 for k, v in instances.items()}

    # The newest state, from the bucket alone; and any point of its history (which compaction
    # may have taken from the primary's own disk).
    assert shipped == len(states) - 1
    Storage.restore(url, root / "restored")
    restored = instances_by_id(root / "restored")
    assert sizes(restored) == model
    assert restored == instances_by_id(config.path)
    at = random.Random(seed).randint(0, shipped)
    assert Storage.restore(url, root / "then", seq=at) == at
    assert sizes(instances_by_id(root / "then")) == states[at]
    with Storage.open(root / "replica", replica_of=url) as replica:
        assert replica.catch_up() == shipped
        assert {i.id: i for i in replica.iter_instances()} == restored


@pytest.mark.parametrize("point", ["wal.after_seal", "wal.after_new_segment"])
def test_a_primary_killed_inside_an_early_seal_reopens_whole_and_ships_on(
    data_dir: Path, s3_url: str, tmp_path: Path, point: str
) -> None:
    # Segments far larger than what is written: every seal is an early one, for shipping.
    worker = start_armed_worker(f"{point}=kill", "shipping-writer", data_dir, s3_url, 64 << 20, 50)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL
    acked = [e["n"] for e in map(json.loads, out.splitlines()) if e["event"] == "ack"]
    assert acked, "the first seal came before any write"

    with Storage.open(StorageConfig(data_dir=data_dir, replica_url=s3_url)) as storage:
        assert storage.verify() == []
        for n in acked:
            assert storage.get_instance(f"w{n}") is not None
        shipped = storage.ship().shipped_seq
        assert shipped == storage.applied_seq >= len(acked)
    assert Storage.restore(s3_url, tmp_path / "restored") == shipped
    assert instances_by_id(tmp_path / "restored") == instances_by_id(data_dir)
