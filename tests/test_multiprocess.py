"""Many processes on one data directory at once (SPEC guarantee 6).

* two and four writer processes, released together, each write ids of their own in single puts,
  deletes and batches: every write is there, the sequence numbers they got back are distinct,
  increasing per process, and together exactly the store's gap-free ``read_wal`` 1..applied_seq,
  each record holding the changes of the write that got its number;
* the same while the LMDB map (1 MiB to start with) has to grow, with this process reading
  all along: every instance it read is one some write stored, with that write's number;
* this process, reading while a writer process writes batches, never sees one half-applied;
* a process that forks keeps working in parent and child (``os.fork``), also when the fork
  lands while another thread of the parent is inside a write transaction.

Writer processes run ``tests/workers.py``; they open the store, say "ready", and wait for "go"
on stdin, so that all of them start writing at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import select
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from helpers import start_worker
from internals import held_write_transaction

try:
    import workers  # pytest puts tests/ on sys.path: it is not a package
except ModuleNotFoundError:  # tests/ became a package
    from tests import workers

from rstmdb_storage import FsyncPolicy, Storage, StorageConfig
from rstmdb_storage.changes import CHANGE_DELETE, CHANGE_PUT

SEGMENT_SIZE = 64 * 1024  # rotations happen while the processes race


def make_seed() -> int:
    return int(os.environ.get("RSTMDB_MP_SEED", random.SystemRandom().randrange(2**32)))


def config_for(data_dir: Path) -> StorageConfig:
    return StorageConfig(
        data_dir=data_dir,
        wal_segment_size=SEGMENT_SIZE,
        fsync_policy=FsyncPolicy.every_write(),
        snapshot_interval=0,  # these tests read the WAL from its first record
        compaction_enabled=False,
    )


def expect_line(proc: subprocess.Popen[str], event: str, err: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"worker exited before '{event}' (rc {proc.wait()}): {err.read_text()[-3000:]}"
    found = json.loads(line)
    assert found["event"] == event, found
    return found


def release(procs: list[subprocess.Popen[str]]) -> None:
    """Let every worker (each waiting on its stdin) start at once."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def finish(proc: subprocess.Popen[str], err: Path) -> dict[str, Any]:
    done = expect_line(proc, "done", err)
    assert proc.wait() == 0, err.read_text()[-3000:]
    for stream in (proc.stdin, proc.stdout):
        assert stream is not None
        stream.close()
    return done


def run_writers(
    tmp_path: Path,
    data_dir: Path,
    processes: int,
    ops: int,
    rng: random.Random,
    *extra: object,
    during: Callable[[list[subprocess.Popen[str]]], None] | None = None,
) -> list[Path]:
    """Start *processes* mp-writers, release them together once all have the store open, run
    *during* while they write, wait for them; return their logs."""
    names = [f"p{i}" for i in range(processes)]
    procs, errs, logs = [], [], []
    for name in names:
        err, log = tmp_path / f"{name}.err", tmp_path / f"{name}.jsonl"
        with open(err, "w") as stderr:
            procs.append(
                start_worker(
                    "mp-writer",
                    data_dir,
                    SEGMENT_SIZE,
                    name,
                    ops,
                    rng.randrange(2**32),
                    log,
                    *extra,
                    stderr=stderr,
                    stdin=subprocess.PIPE,
                )
            )
        errs.append(err)
        logs.append(log)
    for proc, err in zip(procs, errs, strict=True):
        expect_line(proc, "ready", err)  # all have the store open before anyone writes
    release(procs)
    if during is not None:
        during(procs)
    for proc, err in zip(procs, errs, strict=True):
        finish(proc, err)
    return logs


@pytest.mark.parametrize(("processes", "ops"), [(2, 300), (4, 150)])
def test_concurrent_writers_get_gap_free_sequence_numbers(
    tmp_path: Path, processes: int, ops: int
) -> None:
    seed = make_seed()
    data_dir = tmp_path / "data"
    logs = run_writers(tmp_path, data_dir, processes, ops, random.Random(seed))
    check_writers(data_dir, logs, ops, f"seed={seed} processes={processes}")


def test_grouped_and_one_transaction_writers_mix(tmp_path: Path) -> None:
    """Two processes always use group commit and two never do: the one-transaction writers
    apply (after syncing them) records the grouped ones appended and have not applied yet, and
    the grouped ones find their records applied by someone else. Sequence numbers stay
    gap-free, every acknowledged write is stored once, with the state its log says."""
    seed = make_seed()
    data_dir = tmp_path / "data"
    ops = 150
    logs = run_writers(tmp_path, data_dir, 4, ops, random.Random(seed), 25, 1 << 30, "mixed")
    check_writers(data_dir, logs, ops, f"seed={seed} mixed")


def test_concurrent_writers_grow_the_map(tmp_path: Path) -> None:
    """A 1 MiB map that the writers fill several times over: each process grows it, or adopts
    the size another process grew it to, while the others write and this process reads. Every
    instance a read returned is one that some write stored, with that write's sequence number."""
    seed = make_seed()
    data_dir = tmp_path / "data"
    ops, map_size = 1200, 1 << 20
    seen: set[tuple[str, int, int]] = set()
    scans = 0

    def read_while_writing(procs: list[subprocess.Popen[str]]) -> None:
        nonlocal scans
        config = dataclasses.replace(config_for(data_dir), map_size=map_size)
        with Storage.open(config) as storage:
            while True:
                running = any(proc.poll() is None for proc in procs)
                for inst in storage.iter_instances():
                    seen.add((inst.id, inst.ctx["n"], inst.last_wal_offset))
                scans += 1
                if not running:
                    return

    logs = run_writers(
        tmp_path,
        data_dir,
        2,
        ops,
        random.Random(seed),
        100_000,
        map_size,
        during=read_while_writing,
    )
    where = f"seed={seed} growing map"
    changes_by_seq = check_writers(data_dir, logs, ops, where)
    assert (data_dir / "indexes" / "data.mdb").stat().st_size > 2 * map_size, where
    for instance_id, n, seq in seen:
        puts = [a for k, a in changes_by_seq[seq] if k == "put" and a["id"] == instance_id]
        assert puts and puts[-1]["ctx"]["n"] == n, (
            f"{where}: a read returned {instance_id} n={n} seq={seq}, which no write stored"
        )
    assert scans > 1, f"{where}: the reader finished no scan while the writers wrote"
    print(f"{where}: {scans} scans during the writes saw {len(seen)} instance versions")


def check_writers(
    data_dir: Path, logs: list[Path], ops: int, where: str
) -> dict[int, list[list[Any]]]:
    """Every write of every process is there; the sequence numbers are right (module doc).
    Returns the changes of every record by sequence number."""
    names = [log.stem for log in logs]
    processes = len(logs)
    expected: dict[str, tuple[dict[str, Any], int]] = {}
    changes_by_seq: dict[int, list[list[Any]]] = {}
    seqs_by_process: dict[str, list[int]] = {}
    for name, log in zip(names, logs, strict=True):
        acks = [json.loads(line) for line in log.read_text().splitlines()]
        assert [a["op"] for a in acks] == list(range(1, ops + 1)), f"{where}: {name} log"
        seqs = [a["seq"] for a in acks]
        assert all(a < b for a, b in itertools.pairwise(seqs)), (
            f"{where}: {name}'s sequence numbers are not strictly increasing: {seqs}"
        )
        seqs_by_process[name] = seqs
        for ack in acks:
            assert ack["seq"] not in changes_by_seq, f"{where}: seq {ack['seq']} given twice"
            changes_by_seq[ack["seq"]] = ack["changes"]
            for kind, arg in ack["changes"]:  # ids are the process's own: its order decides
                if kind == "put":
                    expected[arg["id"]] = (arg, ack["seq"])
                else:
                    del expected[arg]

    all_seqs = sorted(changes_by_seq)
    total = processes * ops
    assert all_seqs == list(range(1, total + 1)), f"{where}: the seqs returned are not 1..{total}"
    # The processes really ran at the same time: their ranges of sequence numbers overlap.
    spans = sorted((seqs[0], seqs[-1]) for seqs in seqs_by_process.values())
    assert any(a_end > b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans)), (
        f"{where}: the writers ran one after the other: {spans}"
    )

    with Storage.open(config_for(data_dir)) as storage:
        assert storage.torn_tail_repairs == [], where
        assert storage.applied_seq == total, where
        records = list(storage.read_wal(1))
        assert [r.seq for r in records] == all_seqs, f"{where}: read_wal is not 1..{total}"
        for record in records:
            changes = changes_by_seq[record.seq]
            decoded = [change.encoded() for change in record.changes()]
            assert [c[:2] for c in decoded] == [
                [CHANGE_PUT, arg["id"]] if kind == "put" else [CHANGE_DELETE, arg]
                for kind, arg in changes
            ], f"{where}: record {record.seq} is not the write that was given its number"
            for change, (kind, arg) in zip(decoded, changes, strict=True):
                if kind == "put":
                    assert cbor2.loads(change[4])[3] == arg["ctx"], f"{where}: {record.seq}"
        found = {}
        for inst in storage.iter_instances():
            spec = {k: getattr(inst, k) for k in ("id", "machine", "version", "state", "ctx")}
            spec["metadata"] = inst.metadata
            found[inst.id] = (spec, inst.last_wal_offset)
        differ = sorted(
            k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k)
        )
        assert found == expected, f"{where}: the store differs at {differ}"
        assert storage.count_instances() == len(expected)
    print(f"{where}: {total} writes, {len(expected)} instances, spans {spans}")
    return changes_by_seq


def test_reader_never_sees_a_half_applied_batch(tmp_path: Path) -> None:
    batches = 400
    data_dir = tmp_path / "data"
    err = tmp_path / "writer.err"
    with Storage.open(config_for(data_dir)) as storage:
        with storage.batch() as batch:
            for instance_id in ("token-0", workers.PAIR_A, workers.PAIR_B):
                batch.put_instance(workers.pair_instance(instance_id, 0))
        with open(err, "w") as stderr:
            proc = start_worker(
                "pair-writer", data_dir, SEGMENT_SIZE, batches, stderr=stderr, stdin=subprocess.PIPE
            )
        expect_line(proc, "ready", err)
        release([proc])
        seen: set[int] = set()
        last_seq = 0
        reads = 0
        while True:
            writer_running = proc.poll() is None
            # One read transaction (count_instances): a batch deletes token-(i-1) and puts
            # token-i, so a half-applied batch shows 2 or 4 instances.
            count = storage.count_instances()
            assert count == 3, f"after {reads} reads: {count} instances, a batch half-applied"
            # One read transaction too while the store holds fewer instances than a page of
            # iter_instances (512): all three carry the same counter and sequence number.
            snapshot = {inst.id: inst for inst in storage.iter_instances()}
            values = {inst.ctx["n"] for inst in snapshot.values()}
            offsets = {inst.last_wal_offset for inst in snapshot.values()}
            assert len(values) == 1 and len(offsets) == 1, f"half-applied batch seen: {snapshot}"
            (n,) = values
            assert f"token-{n}" in snapshot
            # Separate lookups, in the order the batch writes them: A is never ahead of B, and
            # equal counters mean the same record.
            a = storage.get_instance(workers.PAIR_A)
            b = storage.get_instance(workers.PAIR_B)
            assert a is not None and b is not None
            assert n <= a.ctx["n"] <= b.ctx["n"], f"A {a.ctx['n']} ahead of B {b.ctx['n']}"
            if a.ctx["n"] == b.ctx["n"]:
                assert a.last_wal_offset == b.last_wal_offset
            seq = snapshot[workers.PAIR_A].last_wal_offset
            assert seq >= last_seq, "a reader went back in time"
            last_seq = seq
            seen.add(n)
            reads += 1
            if not writer_running:
                break
        done = finish(proc, err)
        assert n == batches, f"the last read saw counter {n}, the writer wrote {batches}"
        assert last_seq == done["last_seq"] == storage.applied_seq == batches + 1
    # The reads overlapped the writes: they saw counters in between.
    assert len(seen - {0, batches}) >= 1, f"{reads} reads saw only {sorted(seen)}"
    print(f"{reads} consistent reads saw {len(seen)} distinct counters")


#: how long a forked child may take before it counts as hung (it needs a few milliseconds)
CHILD_TIMEOUT = 10


def fork(child: Callable[[], Any]) -> tuple[int, int]:
    """Fork; the child runs *child* and reports its result (or error) as a JSON line on a pipe,
    then exits without returning into pytest. Returns (pid, read end of the pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            report = {"result": child()}
            code = 0
        except BaseException as exc:
            report = {"error": repr(exc)}
        finally:
            try:
                os.write(write_end, (json.dumps(report) + "\n").encode())
            finally:
                os._exit(code)
    os.close(write_end)
    return pid, read_end


def child_result(pid: int, read_end: int, what: str) -> Any:
    """What the forked child reported; a child silent for CHILD_TIMEOUT seconds is killed and
    fails the test as hung."""
    ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    line = os.read(read_end, 1 << 16).decode() if ready else ""
    os.close(read_end)
    assert ready, f"{what}: the forked child hung (no answer in {CHILD_TIMEOUT} s; killed)"
    report = json.loads(line)
    assert "result" in report and os.waitstatus_to_exitcode(status) == 0, f"{what}: {report}"
    return report["result"]


def write_and_read(storage: Storage, prefix: str, writes: int) -> list[int]:
    seqs = []
    for j in range(writes):
        inst = workers.pair_instance(f"{prefix}-{j}", j)
        seqs.append(storage.put_instance(inst))
        found = storage.get_instance(inst.id)
        assert found is not None and found.last_wal_offset == seqs[-1] and found.ctx["n"] == j
    return seqs


def test_forked_children_keep_working(tmp_path: Path) -> None:
    """A process that forks keeps working in parent and child: children write and read through
    the Storage they inherited while the parent writes and its flusher thread checkpoints
    (every millisecond here, so that some forks land while it is inside LMDB)."""
    children, writes = 12, 10
    config = dataclasses.replace(config_for(tmp_path / "data"), checkpoint_interval_ms=1)
    parent_seqs: list[int] = []
    child_seqs: dict[int, list[int]] = {}
    with Storage.open(config) as storage:
        for child in range(children):
            pid, read_end = fork(
                lambda child=child: write_and_read(storage, f"child{child}", writes)
            )
            parent_seqs += write_and_read(storage, f"parent{child}", writes)  # meanwhile
            child_seqs[child] = child_result(pid, read_end, f"child {child}")
        all_seqs = sorted(parent_seqs + [s for seqs in child_seqs.values() for s in seqs])
        total = 2 * children * writes
        assert all_seqs == list(range(1, total + 1)), "sequence numbers not distinct, gap-free"
        assert storage.applied_seq == total
        assert [r.seq for r in storage.read_wal(1)] == all_seqs
        for child, seqs in child_seqs.items():
            assert seqs == sorted(seqs)
            for j, seq in enumerate(seqs):
                inst = storage.get_instance(f"child{child}-{j}")
                assert inst is not None and inst.last_wal_offset == seq and inst.ctx["n"] == j
        assert storage.count_instances() == total
    with Storage.open(config) as storage:  # and it opens again, with nothing to repair
        assert storage.torn_tail_repairs == [] and storage.applied_seq == total


def test_fork_while_another_thread_is_in_a_write_transaction(tmp_path: Path) -> None:
    """The deterministic form of a hang the test above hits now and then: fork while another
    thread of the parent is inside a write transaction of the store, as the store's own
    flusher thread is during every checkpoint (``maintenance.checkpoint``). The child must
    still be able to use the Storage it inherited.

    (White-box: the other thread enters the write transaction the way the store does, under
    the environment's write mutex, and holds it for up to half a second: the fork lands inside
    it, unless the store makes fork wait for it.)"""
    with Storage.open(config_for(tmp_path / "data")) as storage:
        first = storage.put_instance(workers.pair_instance("before-fork", 1))
        in_txn, done = threading.Event(), threading.Event()

        def write_transaction() -> None:
            with held_write_transaction(storage):
                in_txn.set()
                done.wait(0.5)  # the length of this transaction, not a synchronisation

        other = threading.Thread(target=write_transaction)
        other.start()
        in_txn.wait()
        try:
            pid, read_end = fork(
                lambda: [
                    storage.get_instance("before-fork").ctx["n"],
                    write_and_read(storage, "child", 3),
                ]
            )
        finally:
            done.set()
            other.join()
        parent_seqs = write_and_read(storage, "parent", 3)
        seen, child_seqs = child_result(pid, read_end, "fork during a write transaction")
        assert seen == 1
        assert sorted([first, *parent_seqs, *child_seqs]) == list(range(1, 8))
        assert storage.applied_seq == 7 and storage.count_instances() == 7


def test_fork_while_other_threads_read(tmp_path: Path) -> None:
    """Reads in flight in other threads at fork time must not hang the child either: the
    store's fork gate waits for them before the fork happens."""
    with Storage.open(config_for(tmp_path / "data")) as storage:
        storage.put_instance(workers.pair_instance("shared", 1))
        stop = threading.Event()
        reads = [0, 0]

        def read_forever(slot: int) -> None:
            while not stop.is_set():
                assert storage.get_instance("shared") is not None
                reads[slot] += 1

        readers = [threading.Thread(target=read_forever, args=(i,)) for i in range(2)]
        for reader in readers:
            reader.start()
        try:
            for child in range(20):
                pid, read_end = fork(lambda child=child: write_and_read(storage, f"c{child}", 1))
                (seq,) = child_result(pid, read_end, f"child {child} forked among readers")
                assert storage.get_instance(f"c{child}-0").last_wal_offset == seq
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        assert min(reads) > 0
        assert storage.count_instances() == 21
