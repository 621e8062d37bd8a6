"""Worker processes for the crash and multi-process tests, run as ``python tests/workers.py``.

Each worker talks to the test through JSON lines on stdout (one object per line, flushed as soon
as it is printed) or, where several workers run at once, through a log file of its own, so that no
worker ever blocks on a pipe the test is not reading yet.

Writers print what they are about to write *before* the write (``"event": "try"``) and its
sequence number *after* the store acknowledged it (``"event": "ack"``). A writer killed with
SIGKILL therefore leaves a transcript in which every acknowledged write is marked, and at most one
write, the last ``try`` without an ``ack``, was in flight.

A change in a transcript is ``["put", spec]`` (``spec`` holds the :class:`Instance` fields the
worker passed: id, machine, version, state, ctx, metadata) or ``["del", id]``.

Commands::

    crash-writer DATA_DIR SEED SEGMENT_SIZE [PREFIX IDS POLICY MAINTENANCE LIMIT START END
                 MAP_SIZE]                             write until killed, or LIMIT writes (stdout)
    thread-writer DATA_DIR SEGMENT_SIZE THREADS PREFIX THREADS threads put fresh ids until
                                                       killed, sharing syncs (stdout)
    opener DATA_DIR SEGMENT_SIZE                       open, report, close (stdout)
    call DATA_DIR SEGMENT_SIZE KEPT ACTION [TARGET]    one maintenance call: snapshot, compact,
                                                       checkpoint, repair, restore or backup
    mp-writer DATA_DIR SEGMENT_SIZE NAME OPS SEED LOG [IDS MAP_SIZE GROUPING]
                                                       wait for "go" on stdin, write OPS ops
    pair-writer DATA_DIR SEGMENT_SIZE BATCHES          wait for "go", write BATCHES batches
    torn-appender DATA_DIR                             under the append lock, write half a
                                                       record, report, and wait to be killed
    shipping-writer DATA_DIR URL SEGMENT_SIZE SEAL_MS [LEASE_MS]
                                                       put w1, w2, ... shipping to URL, until
                                                       killed (stdout)
    follower URL DATA_DIR                              open DATA_DIR as a replica of URL, catch
                                                       up, report (stdout)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time
from typing import Any

from rstmdb_storage import FsyncPolicy, Instance, Storage, StorageConfig

try:
    from helpers import write_changes
    from internals import force_group_commit  # tests/ is on sys.path, as for helpers
except ModuleNotFoundError:  # tests/ became a package
    from tests.helpers import write_changes
    from tests.internals import force_group_commit
from rstmdb_storage.engine import boot_id
from rstmdb_storage.wal.encoder import encode_record
from rstmdb_storage.wal.format import RECORD_CHANGES, segment_name
from rstmdb_storage.wal.group_commit import SharedAppendTail

PAIR_A = "pair-a"
PAIR_B = "pair-b"


def emit(out: Any, **event: Any) -> None:
    out.write(json.dumps(event, separators=(",", ":")) + "\n")
    out.flush()


def parse_policy(text: str) -> FsyncPolicy:
    """``every_write``, ``never``, ``every_n:5`` or ``every_ms:20``."""
    mode, _, value = text.partition(":")
    return FsyncPolicy(mode, int(value)) if value else FsyncPolicy(mode)  # type: ignore[arg-type]


def open_store(*args: Any, **kwargs: Any) -> Storage:
    """The store, configured by :func:`store_config`."""
    return Storage.open(store_config(*args, **kwargs))


def store_config(
    data_dir: str,
    segment_size: int,
    map_size: int = 1 << 30,
    policy: str = "every_write",
    maintenance: bool = False,
    snapshots_kept: int = 2,
) -> StorageConfig:
    """With *maintenance*, automatic snapshots and compaction run often; without, none (most
    tests read the WAL from its first record)."""
    return StorageConfig(
        data_dir=data_dir,
        wal_segment_size=segment_size,
        fsync_policy=parse_policy(policy),
        map_size=map_size,
        snapshot_interval=40 if maintenance else 0,
        compaction_enabled=maintenance,
        max_wal_segments=3,
        snapshots_kept=snapshots_kept,
        # A map-full test wants the write, not the flusher's early growth, to find the map
        # full: with a small map, the flusher does not run while the test does.
        checkpoint_interval_ms=20 if maintenance else 1000 if map_size >= 1 << 30 else 600_000,
    )


def make_spec(rng: random.Random, instance_id: str, n: int) -> dict[str, Any]:
    """A distinctive instance: every write of the same id differs in ``ctx["n"]``."""
    return {
        "id": instance_id,
        "machine": rng.choice(["order", "payment", "shipment"]),
        "version": rng.randint(1, 5),
        "state": rng.choice(["pending", "paid", "shipped", "done", "failed"]),
        "ctx": {
            "n": n,
            "total": rng.randint(0, 10**6) / 100,
            "items": [rng.randint(0, 999) for _ in range(rng.randint(0, 5))],
            "note": "x" * rng.randint(0, 1200),  # sizes vary so segments fill unevenly
            "flag": rng.random() < 0.5,
            "nested": {"depth": {"n": n}} if rng.random() < 0.3 else None,
        },
        "metadata": {"owner": f"w{rng.randint(0, 3)}", "prio": rng.randint(0, 9)},
    }


def make_op(
    rng: random.Random, present: set[str], n: int, prefix: str, id_count: int
) -> dict[str, Any]:
    """One operation: a single put or delete, or a batch of 2-4 puts and deletes. Deletes only
    name ids present at that point (before the op, or put earlier in the same batch)."""
    live = set(present)
    kind = rng.random()
    if kind < 0.5:
        target = f"{prefix}{rng.randrange(id_count)}"
        return {"batch": False, "changes": [["put", make_spec(rng, target, n)]]}
    if kind < 0.6 and live:
        return {"batch": False, "changes": [["del", rng.choice(sorted(live))]]}
    changes: list[list[Any]] = []
    for _ in range(rng.randint(2, 4)):
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            live.discard(victim)
            changes.append(["del", victim])
        else:
            target = f"{prefix}{rng.randrange(id_count)}"
            live.add(target)
            changes.append(["put", make_spec(rng, target, n)])
    return {"batch": True, "changes": changes}


def run_op(storage: Storage, op: dict[str, Any]) -> int:
    """Write *op* and return the sequence number the store acknowledged it with."""
    return write_changes(storage, op["changes"], op["batch"])


def apply_to_present(present: set[str], op: dict[str, Any]) -> None:
    for kind, arg in op["changes"]:
        if kind == "put":
            present.add(arg["id"])
        else:
            present.discard(arg)


def crash_writer(
    data_dir: str,
    seed: str,
    segment_size: str,
    prefix: str = "inst-",
    ids: str = "40",
    policy: str = "every_write",
    maintenance: str = "off",
    limit: str = "0",
    start: str = "now",
    end: str = "close",
    map_size: str = str(1 << 30),
) -> None:
    """Write forever (until SIGKILL), announcing each write before and after. Ids are
    ``<prefix><i>``; the instances of other prefixes are left alone. With *maintenance*
    "on", automatic snapshots and compaction run all along.

    With LIMIT > 0 the writer stops after that many writes (so that one armed with a
    failpoint that never fires ends instead of writing forever): END "checkpoint" calls
    ``checkpoint()`` first, then it closes the store and says "done". START "go" waits for
    "go" on stdin after "ready" (to start several writers at once)."""
    rng = random.Random(int(seed))
    out = sys.stdout
    emit(out, event="opening")
    storage = open_store(
        data_dir,
        int(segment_size),
        int(map_size),
        policy=policy,
        maintenance=maintenance == "on",
    )
    present = {inst.id for inst in storage.iter_instances() if inst.id.startswith(prefix)}
    emit(out, event="ready", applied_seq=storage.applied_seq, count=len(present))
    if start == "go" and sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    n = 0
    while n < int(limit) or limit == "0":
        n += 1
        op = make_op(rng, present, n, prefix, int(ids))
        emit(out, event="try", op=n, **op)
        seq = run_op(storage, op)
        apply_to_present(present, op)
        emit(out, event="ack", op=n, seq=seq)
    if end == "checkpoint":
        emit(out, event="checkpoint", applied_seq=storage.checkpoint())
    storage.close()
    emit(out, event="done")


def thread_writer(data_dir: str, segment_size: str, threads: str, prefix: str) -> None:
    """THREADS threads of one process put fresh ids (``<prefix>t<thread>-<n>``, ctx
    ``{"n": n}``) until the process is killed, so that their writes share syncs in groups;
    each announces a put (``try``) before it and acknowledges it (``ack``) after, under one
    lock so that lines stay whole. Any thread's error ends the process (``error``, exit
    status 1)."""
    storage = open_store(data_dir, int(segment_size), 1 << 30)
    out, lock = sys.stdout, threading.Lock()
    emit(out, event="ready", applied_seq=storage.applied_seq)

    def writer(t: int) -> None:
        try:
            for n in itertools.count(1):
                inst = Instance(
                    id=f"{prefix}t{t}-{n}", machine="order", version=1, state="new", ctx={"n": n}
                )
                with lock:
                    emit(out, event="try", id=inst.id)
                seq = storage.put_instance(inst)
                with lock:
                    emit(out, event="ack", id=inst.id, seq=seq)
        except BaseException as exc:
            with lock:
                emit(out, event="error", error=repr(exc))
            os._exit(1)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def opener(data_dir: str, segment_size: str) -> None:
    """Open (replaying whatever LMDB has not applied, reporting the records replayed after
    each transaction), report, close."""
    out = sys.stdout

    def progress(step: str, done: int, total: int) -> None:
        if step == "replay":
            emit(out, event="replayed", records=done)

    emit(out, event="opening")
    started = time.monotonic()
    storage = Storage.open(store_config(data_dir, int(segment_size)), progress=progress)
    elapsed = time.monotonic() - started
    emit(
        out,
        event="opened",
        applied_seq=storage.applied_seq,
        count=storage.count_instances(),
        elapsed=elapsed,
    )
    storage.close()
    emit(out, event="closed")


def call(data_dir: str, segment_size: str, kept: str, action: str, target: str = "") -> None:
    """One call, reported before ("ready") and after ("done"): ``create_snapshot()``,
    ``compact()`` or ``checkpoint()`` of the open store (snapshots_kept KEPT), ``backup(TARGET)``,
    or ``Storage.repair_wal`` or ``Storage.restore(DATA_DIR, TARGET)`` of the closed store."""
    out = sys.stdout
    config = store_config(data_dir, int(segment_size), snapshots_kept=int(kept))
    if action in ("repair", "restore"):
        emit(out, event="ready")
        if action == "repair":
            repair = Storage.repair_wal(config)
            emit(out, event="done", offset=None if repair is None else repair.offset)
        else:
            emit(out, event="done", seq=Storage.restore(data_dir, target))
        return
    with Storage.open(config) as storage:
        emit(out, event="ready", applied_seq=storage.applied_seq)
        if action == "snapshot":
            emit(out, event="done", seq=storage.create_snapshot().seq)
        elif action == "compact":
            result = storage.compact()
            emit(out, event="done", segments=result.segments_deleted)
        elif action == "checkpoint":
            emit(out, event="done", seq=storage.checkpoint())
        elif action == "backup":
            emit(out, event="done", seq=storage.backup(target))
        else:
            raise SystemExit(f"unknown action {action!r}")


def mp_writer(
    data_dir: str,
    segment_size: str,
    name: str,
    ops: str,
    seed: str,
    log: str,
    ids: str = "25",
    map_size: str = str(1 << 30),
    grouping: str = "auto",
) -> None:
    """Open, say ready, wait for "go", write OPS operations on IDS ids of our own (named
    ``<name>-<i>``), log them. GROUPING "mixed" makes writers whose name ends in an even digit
    always use group commit and the others never (instead of as contention decides)."""
    rng = random.Random(int(seed))
    storage = open_store(data_dir, int(segment_size), int(map_size))
    if grouping == "mixed":
        grouped = int(name[-1]) % 2 == 0
        force_group_commit(storage, when=lambda: grouped)
    emit(sys.stdout, event="ready", name=name)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    present: set[str] = set()
    with open(log, "w", encoding="utf-8") as out:
        for n in range(1, int(ops) + 1):
            op = make_op(rng, present, n, f"{name}-", int(ids))
            seq = run_op(storage, op)
            apply_to_present(present, op)
            emit(out, event="ack", op=n, seq=seq, **op)
    storage.close()
    emit(sys.stdout, event="done", name=name)


def pair_writer(data_dir: str, segment_size: str, batches: str) -> None:
    """Batch i sets PAIR_A and PAIR_B to counter i and moves the token from ``token-{i-1}`` to
    ``token-{i}`` (delete first): the store holds exactly three instances whenever it holds
    no half-applied batch."""
    storage = open_store(data_dir, int(segment_size))
    emit(sys.stdout, event="ready")
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")
    last = 0
    for i in range(1, int(batches) + 1):
        with storage.batch() as batch:
            batch.delete_instance(f"token-{i - 1}")
            batch.put_instance(pair_instance(f"token-{i}", i))
            batch.put_instance(pair_instance(PAIR_A, i))
            batch.put_instance(pair_instance(PAIR_B, i))
        assert batch.seq is not None and batch.seq > last
        last = batch.seq
    storage.close()
    emit(sys.stdout, event="done", last_seq=last)


def pair_instance(instance_id: str, n: int) -> Instance:
    return Instance(
        id=instance_id, machine="pair", version=1, state=f"s{n % 7}", ctx={"n": n, "pad": "p" * 64}
    )


def torn_appender(data_dir: str) -> None:
    """A grouped writer stopped in the middle of its append: it holds the append lock and has
    written half of its record, and the append tail does not count it yet."""
    config = StorageConfig(data_dir=data_dir, snapshot_interval=0)
    storage = Storage.open(config)  # a writer of the store, as the real one would be
    appends = SharedAppendTail(config.path / "indexes", boot_id(), config.file_mode)
    with appends.locked():
        tail = appends.tail()
        assert tail is not None, "the store's open wrote the append tail"
        frame = encode_record(tail.next_seq, 0, RECORD_CHANGES, b"\x80" * 200)
        fd = os.open(config.path / "wal" / segment_name(tail.segment), os.O_WRONLY)
        os.pwrite(fd, frame[: len(frame) // 2], tail.offset)
        os.close(fd)
        emit(sys.stdout, event="torn", offset=tail.offset)
        sys.stdin.read()  # the test kills us here, the lock still held
    storage.close()


def shipping_writer(
    data_dir: str, url: str, segment_size: str, seal_ms: str, lease_ms: str = "30000"
) -> None:
    """Put instance ``w<n>`` (one record each, so its sequence number is *n* in a new store)
    until killed, shipping to URL: announce each put before ("try") and after ("ack"), and
    every 20 acks the last sequence number the bucket holds ("shipped"). Automatic snapshots
    and compaction run all along, so that the hold on unshipped segments is tried too."""
    config = StorageConfig(
        data_dir=data_dir,
        wal_segment_size=int(segment_size),
        snapshot_interval=150,
        max_wal_segments=2,
        replica_url=url,
        max_seal_interval_ms=int(seal_ms),
        lease_ttl_ms=int(lease_ms),
    )
    out = sys.stdout
    with Storage.open(config) as storage:
        emit(out, event="ready", applied_seq=storage.applied_seq)
        n = storage.applied_seq
        while True:
            n += 1
            emit(out, event="try", n=n)
            seq = storage.put_instance(shipped_instance(n))
            emit(out, event="ack", n=n, seq=seq)
            if n % 20 == 0:
                status = storage.replication_status()
                emit(out, event="shipped", seq=status["shipped_seq"], error=status["last_error"])


def follower(url: str, data_dir: str) -> None:
    """Open DATA_DIR as a replica of URL, apply what the bucket holds, report, close."""
    with Storage.open(data_dir, replica_of=url) as replica:
        emit(sys.stdout, event="caught-up", applied_seq=replica.catch_up())


def shipped_instance(n: int) -> Instance:
    return Instance(
        id=f"w{n}", machine="order", version=1, state="pending", ctx={"n": n, "pad": "x" * 200}
    )


COMMANDS = {
    "shipping-writer": shipping_writer,
    "follower": follower,
    "crash-writer": crash_writer,
    "thread-writer": thread_writer,
    "opener": opener,
    "call": call,
    "mp-writer": mp_writer,
    "pair-writer": pair_writer,
    "torn-appender": torn_appender,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
