"""Snapshots: ``create_snapshot()`` against the floor (LMDB's compacting copy, fsync, a CRC32C
pass) and the ceiling (copying the LMDB file + fsync), and the latency of a durable writer in
another process while snapshots run (a section: not a row of rates)."""

from __future__ import annotations

import gc
import multiprocessing
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c

from bench.data import Counter, instance_fields, instance_id, make_instance
from bench.floor import FloorEnv
from bench.settings import WRITER_TIMEOUT
from bench.stores import (
    Bench,
    fast_config,
    ours_config,
    put_batches,
    remove_snapshot,
    shared,
    sync_tree,
)
from rstmdb_storage import Storage
from rstmdb_storage.fsutil import fsync_file

Times = list[tuple[float, float]]
"""(start, end) ``time.monotonic()`` pairs of operations."""


@shared
def snapshot_store(bench: Bench) -> tuple[Storage, Path]:
    """Our store holding ``snapshot_instances`` instances, built without fsync in batches
    of 10k, then synced; and its data directory."""
    data_dir = bench.path("ours-snapshot")
    storage = Storage.open(fast_config(data_dir))
    bench.on_close(storage.close)
    n = bench.settings.snapshot_instances
    put_batches(storage, (instance_fields(instance_id("snap", i), i) for i in range(n)))
    storage.checkpoint()
    sync_tree(data_dir)
    if storage.count_instances() != n:
        raise RuntimeError(f"snapshot store holds {storage.count_instances()} instances")
    return storage, data_dir


def copy_data_file(data_dir: Path, fsync: bool) -> Path:
    """``shutil.copyfile`` of ``indexes/data.mdb`` beside it, fsync'd or not; the copy's path."""
    target = data_dir / "indexes" / "data.mdb.cp"
    shutil.copyfile(data_dir / "indexes" / "data.mdb", target)
    if fsync:
        fsync_file(target)
    return target


@shared
def floor_copy_source(bench: Bench) -> FloorEnv:
    """A raw LMDB environment on a copy of the snapshot store's ``data.mdb`` (the same pages;
    one process may not open the store's own environment twice)."""
    _, data_dir = snapshot_store(bench)
    directory = bench.path("floor-snapshot")
    shutil.copyfile(data_dir / "indexes" / "data.mdb", directory / "data.mdb")
    env = FloorEnv(directory, map_size=4 * (directory / "data.mdb").stat().st_size + (1 << 30))
    bench.on_close(env.close)
    return env


def floor_snapshot(env: FloorEnv, target: Path) -> None:
    """The floor of ``create_snapshot()``: LMDB's compacting copy in one read transaction,
    fsync of the copy, and a CRC32C pass over it."""
    with env.env.begin() as txn:
        env.env.copy(str(target), compact=True, txn=txn)
    fsync_file(target / "data.mdb")
    crc = 0
    with open(target / "data.mdb", "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            crc = crc32c.crc32c(chunk, crc)


def path_snapshot(bench: Bench) -> dict[str, float]:
    """Whole copies per second (1 / seconds) of ``create_snapshot()`` of the big store
    (compacting copy in one read transaction, fsync, CRC32C pass, publish), of the floor
    (:func:`floor_snapshot`), of the ceiling (``shutil.copyfile`` of ``indexes/data.mdb`` +
    fsync) and of ``cp`` alone (the copy left in the page cache), measured in rotation. The
    ratio ours / ceiling is time(cp) / time(snapshot)."""
    storage, data_dir = snapshot_store(bench)
    env = floor_copy_source(bench)
    n = bench.settings.snapshot_instances

    def snapshot() -> float:
        gc.collect()
        start = time.perf_counter()
        manifest = storage.create_snapshot()
        elapsed = time.perf_counter() - start
        remove_snapshot(data_dir, manifest)
        if manifest.instances != n:
            raise RuntimeError(f"create_snapshot: manifest counts {manifest.instances}")
        return 1 / elapsed

    def floor_side() -> float:
        target = bench.workdir / "floor-snapshot-copy"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        gc.collect()
        start = time.perf_counter()
        floor_snapshot(env, target)
        elapsed = time.perf_counter() - start
        shutil.rmtree(target)
        return 1 / elapsed

    def copy(fsync: bool) -> float:
        gc.collect()
        start = time.perf_counter()
        target = copy_data_file(data_dir, fsync)
        elapsed = time.perf_counter() - start
        target.unlink()
        return 1 / elapsed

    return bench.rotated(
        {
            "ours": snapshot,
            "floor": floor_side,
            "ceiling": lambda: copy(True),
            "cp, no fsync": lambda: copy(False),
        }
    )


# --- the writer latency section -----------------------------------------------------------------


def latency_writer(data_dir: str, conn: Any, stop: Any, done: Any) -> None:
    """The writer process of :func:`section_writer_latency`.

    Opens the store with the default fsync policy (every write) but no automatic snapshots
    or compaction (only the main process's snapshots are to run), makes a few untimed
    puts, answers ``"ready"``, then serves commands from ``conn``: ``("count", n)`` makes
    ``n`` durable puts, ``("until_stop",)`` makes puts until ``stop`` is set; each answers
    the list of (start, end) ``time.monotonic()`` pairs of its puts, and keeps ``done``
    (a shared counter) up to date. ``None`` closes the store and ends the process.
    """
    sys.stdout.reconfigure(line_buffering=True)
    storage = Storage.open(ours_config(data_dir, compaction_enabled=False))
    counter = Counter()
    put, clock = storage.put_instance, time.monotonic

    def one_put() -> tuple[float, float]:
        (i,) = counter.take(1)
        inst = make_instance(instance_fields(instance_id("latency", i), i))
        start = clock()
        put(inst)
        return start, clock()

    try:
        for _ in range(20):
            one_put()
        conn.send("ready")
        while (command := conn.recv()) is not None:
            times: Times = []
            done.value = 0
            if command[0] == "count":
                for _ in range(command[1]):
                    times.append(one_put())
                    done.value += 1
            else:
                while not stop.is_set():
                    times.append(one_put())
                    done.value += 1
            conn.send(times)
    finally:
        storage.close()


def latencies_ms(times: Times) -> list[float]:
    """Sorted durations in milliseconds of (start, end) pairs in seconds."""
    return sorted((end - start) * 1000 for start, end in times)


def percentile(ms: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``ms``, nearest rank."""
    return ms[min(len(ms) - 1, int(len(ms) * q))]


def latency_line(label: str, ms: list[float], per_second: float) -> str:
    return (
        f"  {label:<16} {len(ms):>7,}  {percentile(ms, 0.5):>7.2f}  "
        f"{percentile(ms, 0.99):>7.2f}  {ms[-1]:>8.2f}  {per_second:>9,.0f}"
    )


def overlapping(times: Times, intervals: Times) -> tuple[Times, int]:
    """The (start, end) pairs of ``times`` that overlap one of ``intervals``, and how many
    lie wholly inside one."""
    over = [(s, e) for s, e in times if any(s < b and e > a for a, b in intervals)]
    inside = sum(1 for s, e in over if any(a <= s and e <= b for a, b in intervals))
    return over, inside


def measure_writer_latency(bench: Bench) -> tuple[Times, list[tuple[str, Times, Times]]]:
    """The writer's puts with nothing else running; then, for each phase, its puts and the
    intervals of the phase's operations (see :func:`section_writer_latency`)."""
    storage, data_dir = snapshot_store(bench)
    settings = bench.settings

    def snapshot() -> None:
        remove_snapshot(data_dir, storage.create_snapshot())

    def copy() -> None:
        copy_data_file(data_dir, fsync=True)

    def uncopy() -> None:
        (data_dir / "indexes" / "data.mdb.cp").unlink()

    phases: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
        ("during snapshot", snapshot, lambda: None),
        ("during cp+fsync", copy, uncopy),
    ]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    stop, done = ctx.Event(), ctx.Value("q", 0, lock=False)
    writer = ctx.Process(target=latency_writer, args=(str(data_dir), child, stop, done))
    writer.start()
    results: list[tuple[str, Times, Times]] = []

    def receive() -> Any:
        if not parent.poll(WRITER_TIMEOUT):
            raise RuntimeError(f"latency writer: no answer in {WRITER_TIMEOUT:.0f} s")
        return parent.recv()

    try:
        if receive() != "ready":
            raise RuntimeError("latency writer did not start")
        parent.send(("count", settings.puts))
        idle = receive()
        for label, operation, cleanup in phases:
            stop.clear()
            parent.send(("until_stop",))
            intervals: Times = []
            deadline = time.monotonic() + WRITER_TIMEOUT
            while len(intervals) < settings.repeats or done.value < settings.puts:
                if time.monotonic() > deadline or not writer.is_alive():
                    raise RuntimeError("latency writer stopped or took too long")
                start = time.monotonic()
                operation()
                intervals.append((start, time.monotonic()))
                cleanup()
            stop.set()
            results.append((label, receive(), intervals))
        parent.send(None)
        writer.join(WRITER_TIMEOUT)
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"latency writer exited with {writer.exitcode}")
    return idle, results


def section_writer_latency(bench: Bench) -> list[str]:
    """Durable ``put_instance`` latency in another process, without and while the main
    process runs ``create_snapshot()`` of the big store in a loop.

    The writer makes ``puts`` puts with nothing else running. Then, for each phase, it
    puts until the main process has repeated the phase's operation at least ``repeats``
    times and the writer has made at least ``puts`` puts: first ``create_snapshot()``,
    then, for reference, ``copyfile`` of ``data.mdb`` + fsync (what the filesystem alone
    does to a writer's fdatasync). A put counts for a phase when its time overlaps one of
    the operations; puts/s counts the puts wholly inside them.
    """
    idle, results = measure_writer_latency(bench)
    idle_ms = latencies_ms(idle)
    idle_rate = len(idle) / (idle[-1][1] - idle[0][0])
    lines = [
        f"writer latency while create_snapshot runs ({bench.settings.snapshot_instances:,} "
        f"instances; durable put_instance, default policy, in another process):",
        f"  {'':<16} {'puts':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>8}  {'puts/s':>9}  "
        f"{'ops':>4}  {'op p50 ms':>9}  {'op max ms':>9}",
        latency_line("no snapshot", idle_ms, idle_rate),
    ]
    ratios = []
    for label, times, intervals in results:
        over, inside = overlapping(times, intervals)
        if not over:
            raise RuntimeError(f"{label}: no put overlapped the operation")
        durations = [b - a for a, b in intervals]
        rate_inside = inside / sum(durations)
        ms = latencies_ms(over)
        lines.append(
            f"{latency_line(label, ms, rate_inside)}  {len(intervals):>4}"
            f"  {statistics.median(durations) * 1000:>9,.0f}  {max(durations) * 1000:>9,.0f}"
        )
        ratios.append(
            f"  {label} / no snapshot: p50 {percentile(ms, 0.5) / percentile(idle_ms, 0.5):.2f}x,"
            f" p99 {percentile(ms, 0.99) / percentile(idle_ms, 0.99):.2f}x,"
            f" puts/s {rate_inside / idle_rate:.2f}x;"
            f" longest put = {ms[-1] / 1000 / statistics.median(durations):.0%} of the median"
            f" operation"
        )
    return lines + ratios
