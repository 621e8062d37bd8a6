"""Crash tests placed by failpoints: a real process, armed through ``RSTMDB_FAILPOINTS`` (see
``rstmdb_storage/failpoints.py``), SIGKILLs itself at one named step; the test then reopens the
store and checks what SPEC guarantees 1, 2, 4 and 5 promise:

* every acknowledged write is there with exactly its content, and the one write in flight is
  all or nothing (there for certain once it was durable in the WAL, absent for certain when
  its record was never written);
* the WAL is gap-free up to ``applied_seq``, ``verify()`` finds nothing, and the store takes
  new writes;
* after a kill inside a snapshot, a compaction, a repair, a restore or a rebuild: only complete
  snapshots are listed, temporaries go with the next snapshot, and a rebuild from the
  snapshots and the WAL brings back every acknowledged write.

Every kill lands on its failpoint: a child that ends any other way fails the test. Workers come
from ``tests/workers.py``. Seeds are printed in assertion messages; ``RSTMDB_CRASH_SEED``
replays one, ``--crash-trials`` scales the count-based (``N*off->kill``) variants.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import State, apply_op, parse_lines, start_armed_worker, stored_state, write_ops

try:
    import workers  # pytest puts tests/ on sys.path: it is not a package
except ModuleNotFoundError:  # tests/ became a package
    from tests import workers

from rstmdb_storage import (
    Instance,
    InvalidInputError,
    NotAStoreError,
    Storage,
    StorageConfig,
)

SEGMENT_SIZE = 64 * 1024  # the smallest allowed: segments rotate every few dozen writes
CHILD_TIMEOUT = 120  # seconds; a child that takes longer is stuck, not slow

#: whether the write in flight at a point must be there after reopening
MUST, MAY, NEVER = "must", "may", "never"


def make_seed() -> int:
    return int(os.environ.get("RSTMDB_CRASH_SEED", random.SystemRandom().randrange(2**32)))


def arm(point: str, passes: int = 0) -> str:
    """The ``RSTMDB_FAILPOINTS`` value that lets *passes* hits of *point* pass, then kills."""
    return f"{point}={passes}*off->kill" if passes else f"{point}=kill"


def config_for(data_dir: Path, **fields: Any) -> StorageConfig:
    """The config the workers open *data_dir* with (no automatic snapshots or compaction)."""
    return workers.store_config(str(data_dir), SEGMENT_SIZE, **fields)


@dataclass
class Child:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str


def run_child(stderr_path: Path, failpoints: str, *args: object) -> Child:
    """Run a worker armed with *failpoints* to its end; return how it ended."""
    with open(stderr_path, "w") as stderr:
        proc = start_armed_worker(failpoints, *args, stderr=stderr)
        try:
            out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"{args[0]} armed with {failpoints} got stuck") from None
    return Child(proc.returncode, parse_lines(out), stderr_path.read_text())


@pytest.fixture
def killed(tmp_path: Path) -> Callable[..., list[dict[str, Any]]]:
    """``killed(failpoints, *worker_args, where=...)`` runs a worker that must die by SIGKILL
    at its failpoint (nobody else kills it), and returns its transcript."""
    runs = itertools.count()

    def run(failpoints: str, *args: object, where: str) -> list[dict[str, Any]]:
        child = run_child(tmp_path / f"child-{next(runs)}.err", failpoints, *args)
        assert child.returncode == -signal.SIGKILL, (
            f"{where}: {args[0]} was not killed at {failpoints} (rc {child.returncode}); "
            f"last events {child.events[-3:]}; stderr: {child.stderr[-3000:]}"
        )
        return child.events

    return run


# --- writers' transcripts and the checks after reopening --------------------------------------


@dataclass
class Writes:
    """One writer's transcript: its acknowledged writes (sequence number, changes) in order,
    the write in flight when it died (None if none), and whether that one must be there."""

    acked: list[tuple[int, list[list[Any]]]]
    in_flight: list[list[Any]] | None
    lands: str = MAY


def read_transcript(events: list[dict[str, Any]], lands: str, where: str) -> Writes:
    tries = {e["op"]: e["changes"] for e in events if e["event"] == "try"}
    acks = [e for e in events if e["event"] == "ack"]
    assert [a["op"] for a in acks] == list(range(1, len(acks) + 1)), f"{where}: {acks}"
    unacked = sorted(op for op in tries if op > len(acks))
    assert unacked in ([], [len(acks) + 1]), f"{where}: more than one write in flight"
    in_flight = tries[unacked[0]] if unacked else None
    return Writes([(a["seq"], tries[a["op"]]) for a in acks], in_flight, lands)


def reconcile(found: State, acked: State, writers: list[Writes], unexplained: list[int]) -> bool:
    """Whether *found* is *acked* plus some of the writes in flight, each whole, at the
    sequence numbers nobody acknowledged (every one of them used, by one write each)."""
    options = []
    for writes in writers:
        if writes.in_flight is None or writes.lands == NEVER:
            options.append([None])
        elif writes.lands == MUST:
            options.append(list(unexplained))
        else:
            options.append([None, *unexplained])
    for choice in itertools.product(*options):
        if sorted(seq for seq in choice if seq is not None) != unexplained:
            continue
        state = acked
        for writes, seq in zip(writers, choice, strict=True):
            if seq is not None:
                assert writes.in_flight is not None
                state = apply_op(state, writes.in_flight, seq)
        if state == found:
            return True
    return False


def check_wal(storage: Storage, state: State, where: str, from_start: bool = True) -> None:
    """The WAL is gap-free from its first segment to applied_seq (from 1 unless compaction
    ran), and each instance's updated_at is the timestamp of its record."""
    applied = storage.applied_seq
    first = storage.wal_segments()[0]
    if from_start:
        assert first == 1, f"{where}: the WAL starts at {first}"
    records = {record.seq: record for record in storage.read_wal(first)}
    assert sorted(records) == list(range(first, applied + 1)), (
        f"{where}: the WAL does not hold {first}..{applied}"
    )
    for instance_id, (_, seq) in state.items():
        if seq >= first:
            inst = storage.get_instance(instance_id)
            assert inst is not None and inst.updated_at == records[seq].timestamp_ms, (
                f"{where}: {instance_id} updated_at is not its record's timestamp"
            )


def write_again(storage: Storage, state: State, name: str, where: str) -> State:
    """The store takes a new write, right after the last record."""
    spec = workers.make_spec(random.Random(name), name, 0)
    expected = storage.applied_seq + 1
    assert storage.put_instance(Instance(**spec)) == expected, f"{where}: write after the kill"
    return {**state, name: (spec, expected)}


def check_after_kill(
    config: StorageConfig,
    base: State,
    base_seq: int,
    writers: list[Writes],
    where: str,
    from_start: bool = True,
) -> tuple[State, int]:
    """Reopen after writers on top of the store *base* (at *base_seq*) were killed, check
    every promise, write once more; return the state and sequence number reached."""
    acked = base
    acked_seqs: list[int] = []
    for writes in writers:
        for seq, changes in writes.acked:
            acked = apply_op(acked, changes, seq)
            acked_seqs.append(seq)
    assert len(set(acked_seqs)) == len(acked_seqs), f"{where}: a seq acknowledged twice"
    assert all(seq > base_seq for seq in acked_seqs), f"{where}: an old seq acknowledged"
    with Storage.open(config) as storage:
        applied = storage.applied_seq
        assert applied >= max(acked_seqs, default=base_seq), (
            f"{where}: applied_seq {applied} is behind the acknowledged writes"
        )
        found = stored_state(storage)
        unexplained = sorted(set(range(base_seq + 1, applied + 1)) - set(acked_seqs))
        in_flight = [(w.lands, w.in_flight is not None) for w in writers]
        assert reconcile(found, acked, writers, unexplained), (
            f"{where}: the store is not the acknowledged writes plus whole writes in flight "
            f"({in_flight}, unexplained seqs {unexplained}): missing or different "
            f"{sorted(k for k in acked if found.get(k) != acked[k])[:10]}, "
            f"unexpected {sorted(set(found) - set(acked))[:10]}"
        )
        check_wal(storage, found, where, from_start)
        assert storage.verify() == [], where
        state = write_again(storage, found, f"after-{base_seq}-{applied}", where)
    with Storage.open(config) as storage:
        assert stored_state(storage) == state, f"{where}: the write after the kill is lost"
        assert storage.torn_tail_repairs == [], where
    return state, applied + 1


def build_store(
    config: StorageConfig, rng: random.Random, phases: list[int], snapshot: bool = False
) -> tuple[State, dict[int, list[list[Any]]], list[int]]:
    """Write ``phases[i]`` operations per phase, with a snapshot after each one when
    *snapshot*; close. Returns the state, every record's changes, and the snapshots' seqs."""
    state: State = {}
    ops_by_seq: dict[int, list[list[Any]]] = {}
    snapshots = []
    with Storage.open(config) as storage:
        for count in phases:
            state, ops = write_ops(storage, rng, count, state)
            ops_by_seq.update(ops)
            if snapshot:
                snapshots.append(storage.create_snapshot().seq)
        assert stored_state(storage) == state
    return state, ops_by_seq, snapshots


def rebuilt_state(config: StorageConfig, where: str) -> State:
    """Lose indexes/ and reopen: the store rebuilds from its snapshots and WAL."""
    shutil.rmtree(config.path / "indexes")
    with Storage.open(config) as storage:
        assert storage.verify() == [], f"{where}: after the rebuild"
        return stored_state(storage)


# --- a writer killed on its write path -------------------------------------------------------

WRITE_PATH = {
    "write.after_append": MAY,  # written, not synced: a killed process keeps the page cache
    "write.after_sync": MUST,  # durable in the WAL
    "write.after_commit": MUST,  # committed, only the acknowledgement is missing
    "wal.after_seal": NEVER,  # rotation comes before the record is written
    "wal.after_new_segment": NEVER,
}


@pytest.mark.parametrize("point", sorted(WRITE_PATH))
def test_writer_killed_on_its_write_path(
    tmp_path: Path, killed: Callable[..., Any], crash_trials: int, point: str
) -> None:
    """A single writer (one-transaction path) killed at the n-th hit of a point, trial after
    trial on the same store."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    config = config_for(data_dir)
    state: State = {}
    applied = 0
    for trial in range(max(1, crash_trials // 10)):
        where = f"seed={seed} point={point} trial={trial}"
        passes = rng.randint(0, 2) if point.startswith("wal.") else rng.randint(0, 60)
        events = killed(
            arm(point, passes),
            *("crash-writer", data_dir, rng.randrange(2**32), SEGMENT_SIZE, "inst-", 40),
            *("every_write", "off", 2000),
            where=f"{where} passes={passes}",
        )
        writes = read_transcript(events, WRITE_PATH[point], where)
        assert writes.in_flight is not None, f"{where}: killed outside a write"
        if point.startswith("write."):
            # At least: a write that waited long for LMDB's lock (on a loaded machine, the
            # scheduler alone can make it wait) takes group commit for a while, whose steps
            # are other points. The write killed is still one at this point.
            assert len(writes.acked) >= passes, f"{where}: killed at an earlier write"
        state, applied = check_after_kill(config, state, applied, [writes], where)
    with Storage.open(config) as storage:
        segments = len(storage.wal_segments())
    assert not point.startswith("wal.") or segments > 1, f"seed={seed}: no rotation"


# --- group commit: two writer processes contending -------------------------------------------

GROUP = {"group.after_append": MAY, "group.after_sync": MUST, "group.after_apply": MUST}


def run_writers_together(
    tmp_path: Path, name: str, armed: list[tuple[str, tuple[object, ...]]], where: str
) -> list[Child]:
    """Start the writers (each waiting for "go" after it opened), start them at once, and
    run them to their end (their stderr in ``<name>-<n>.err``)."""
    procs, stderrs = [], []
    for n, (failpoints, args) in enumerate(armed):
        stderr_path = tmp_path / f"{name}-{n}.err"
        with open(stderr_path, "w") as stderr:
            procs.append(
                start_armed_worker(failpoints, *args, stderr=stderr, stdin=subprocess.PIPE)
            )
        stderrs.append(stderr_path)
    heads = []
    for proc, stderr_path in zip(procs, stderrs, strict=True):
        assert proc.stdout is not None and proc.stdin is not None
        head = proc.stdout.readline() + proc.stdout.readline()  # "opening", "ready"
        assert '"ready"' in head, f"{where}: {head!r} {stderr_path.read_text()[-3000:]}"
        heads.append(head)
    outputs = [""] * len(procs)

    def drain(n: int) -> None:
        stdout = procs[n].stdout
        assert stdout is not None
        outputs[n] = stdout.read()

    readers = [threading.Thread(target=drain, args=(n,)) for n in range(len(procs))]
    for proc, reader in zip(procs, readers, strict=True):
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        reader.start()
    children = []
    for n, (proc, reader) in enumerate(zip(procs, readers, strict=True)):
        try:
            proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            if proc.returncode is None:
                for other in procs:
                    other.kill()
        reader.join()
        assert proc.stdout is not None
        proc.stdout.close()
        events = parse_lines(heads[n] + outputs[n])
        children.append(Child(proc.returncode, events, stderrs[n].read_text()))
    return children


@pytest.mark.parametrize("point", sorted(GROUP))
def test_writer_killed_in_group_commit(tmp_path: Path, crash_trials: int, point: str) -> None:
    """Two durable writers started at once contend, so they commit in groups; each is armed
    to die at the n-th hit of a group-commit point. At least one must die there (nobody
    else kills anything); the other one dies there too or finishes its writes."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    config = config_for(data_dir)
    state: State = {}
    applied = 0
    for trial in range(max(1, crash_trials // 10)):
        where = f"seed={seed} point={point} trial={trial}"
        passes = [rng.randint(0, 20) for _ in "ab"]
        children = run_writers_together(
            tmp_path,
            f"trial-{trial}",
            [
                (
                    arm(point, passes[n]),
                    (
                        *("crash-writer", data_dir, rng.randrange(2**32), SEGMENT_SIZE),
                        *(f"{name}-", 30, "every_write", "off", 400, "go"),
                    ),
                )
                for n, name in enumerate("ab")
            ],
            f"{where} passes={passes}",
        )
        codes = [child.returncode for child in children]
        assert set(codes) <= {0, -signal.SIGKILL}, (
            f"{where}: {codes}: {[c.stderr[-2000:] for c in children]}"
        )
        assert -signal.SIGKILL in codes, f"{where} passes={passes}: no writer reached {point}"
        writers = []
        for child in children:
            writes = read_transcript(child.events, GROUP[point], where)
            if child.returncode == 0:
                assert child.events[-1]["event"] == "done" and writes.in_flight is None, where
            else:
                assert writes.in_flight is not None, f"{where}: killed outside a write"
            writers.append(writes)
        state, applied = check_after_kill(config, state, applied, writers, where)


# --- checkpoints, replay, a full map ---------------------------------------------------------


@pytest.mark.parametrize("point", ["checkpoint.after_wal_sync", "checkpoint.before_lmdb_sync"])
def test_writer_killed_at_a_checkpoint(
    tmp_path: Path, killed: Callable[..., Any], point: str
) -> None:
    """Killed in the checkpoint after its writes (or in one its flusher thread made first,
    maybe while a write was under way)."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    where = f"seed={seed} point={point}"
    limit = rng.randint(1, 80)
    events = killed(
        arm(point),
        *("crash-writer", data_dir, rng.randrange(2**32), SEGMENT_SIZE, "inst-", 40),
        *("every_write", "off", limit, "now", "checkpoint"),
        where=where,
    )
    writes = read_transcript(events, MAY, where)
    assert writes.acked, f"{where}: killed before any write was acknowledged"
    check_after_kill(config_for(data_dir), {}, 0, [writes], where)


#: records replayed while the opener is killed (at least two whole chunks: a replay chunk
#: holds 2,000 changes, so 2,000 records or fewer)
RECORDS = 4500
REPLAY_CHUNK = 2000


def replayed_before_the_kill(events: list[dict[str, Any]]) -> int:
    """The records a killed opener committed: the last count it reported after a chunk."""
    counts = [event["records"] for event in events if event.get("event") == "replayed"]
    assert counts, f"the opener reported no chunk before its kill: {events[-3:]}"
    return counts[-1]


def test_opener_killed_between_replay_chunks(
    tmp_path: Path, killed: Callable[..., Any], crash_trials: int
) -> None:
    """indexes/ lost, no snapshot: opening replays the whole WAL in transactions of 2,000
    changes. The opener is killed after one of its first chunks (and, when enough is left,
    a second opener after its first chunk of the rest); the next open goes on from there."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    config = config_for(data_dir)
    state, _, _ = build_store(config_for(data_dir, policy="never"), rng, [RECORDS])
    applied = RECORDS
    for trial in range(max(1, crash_trials // 10)):
        where = f"seed={seed} trial={trial}"
        shutil.rmtree(data_dir / "indexes")
        chunks = rng.randint(1, applied // REPLAY_CHUNK)  # there are at least this many
        events = killed(
            arm("replay.after_chunk", chunks - 1), "opener", data_dir, SEGMENT_SIZE, where=where
        )
        committed = replayed_before_the_kill(events)
        if applied - committed > REPLAY_CHUNK:
            events = killed(
                arm("replay.after_chunk"), "opener", data_dir, SEGMENT_SIZE, where=where
            )
            committed += replayed_before_the_kill(events)
        replayed: list[int] = []

        def progress(step: str, done: int, total: int, replayed: list[int] = replayed) -> None:
            if step == "replay":
                replayed.append(done)

        with Storage.open(config, progress=progress) as storage:
            assert replayed[-1:] == [applied - committed], (
                f"{where}: the open replayed {replayed}, not the {applied - committed} records "
                f"the killed openers left"
            )
            assert storage.applied_seq == applied, where
            assert stored_state(storage) == state, f"{where}: the replayed store differs"
            check_wal(storage, state, where)
            assert storage.verify() == [], where
            state = write_again(storage, state, f"after-{trial}", where)
            applied += 1


def test_writer_killed_when_the_map_is_full(tmp_path: Path, killed: Callable[..., Any]) -> None:
    """A 1 MiB map fills within a few hundred writes; the write that found it full aborted
    its transaction and is killed before the map grows. The reopened store (same 1 MiB
    config) must take the record left at the WAL tail, and grow."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    where = f"seed={seed}"
    map_size = 1 << 20
    events = killed(
        arm("lmdb.before_grow"),
        *("crash-writer", data_dir, rng.randrange(2**32), SEGMENT_SIZE, "inst-", 5000),
        *("every_write", "off", 5000, "now", "close", map_size),
        where=where,
    )
    writes = read_transcript(events, MAY, where)
    assert writes.in_flight is not None, f"{where}: killed outside a write"
    config = config_for(data_dir, map_size=map_size)
    state, _ = check_after_kill(config, {}, 0, [writes], where)
    with Storage.open(config) as storage:  # and it goes on writing past the old map size
        state, _ = write_ops(storage, rng, 300, state)
        assert stored_state(storage) == state, where


# --- snapshots ------------------------------------------------------------------------------

SNAPSHOT_POINTS = [
    f"snapshot.{part}.{step}"
    for part in ("data", "manifest")
    for step in ("before_rename", "after_rename", "after_dir_sync")
]
#: the points after which the new snapshot is published (its manifest renamed into place)
PUBLISHED = {"snapshot.manifest.after_rename", "snapshot.manifest.after_dir_sync"}


@pytest.mark.parametrize("point", SNAPSHOT_POINTS)
def test_killed_while_creating_a_snapshot(
    tmp_path: Path, killed: Callable[..., Any], point: str
) -> None:
    seed = make_seed()
    rng = random.Random(seed)
    where = f"seed={seed} point={point}"
    data_dir = tmp_path / "data"
    config = config_for(data_dir)
    state, _, (first,) = build_store(config, rng, [120], snapshot=True)
    with Storage.open(config) as storage:
        state, _ = write_ops(storage, rng, 120, state)
        seq = storage.applied_seq
    killed(arm(point), "call", data_dir, SEGMENT_SIZE, 2, "snapshot", where=where)
    snapshots = data_dir / "snapshots"
    with Storage.open(config) as storage:
        assert stored_state(storage) == state, where
        listed = storage.list_snapshots()
        assert [m.seq for m in listed] == ([first, seq] if point in PUBLISHED else [first]), (
            f"{where}: listed {[m.seq for m in listed]}"
        )
        for manifest in listed:
            storage.check_snapshot(manifest)  # only complete snapshots are listed
        assert storage.verify() == [], where
        # The next snapshot (of a later state) cleans up after the one that died.
        state = write_again(storage, state, "after-kill", where)
        newest = storage.create_snapshot()
        assert newest.seq == seq + 1, where
        assert not list(snapshots.glob("*.tmp-*")), f"{where}: temporaries are left"
        published = {m.seq for m in storage.list_snapshots()}
    assert rebuilt_state(config, where) == state, f"{where}: the rebuild from snapshots differs"
    # Nor is the data file of a snapshot that died before its manifest was published left
    # behind (a whole copy of the store each time; no later snapshot or compaction reuses it).
    orphans = sorted(
        p.name for p in snapshots.glob("*.mdb") if int(p.name.split(".")[0]) not in published
    )
    assert orphans == [], f"{where}: snapshot files without a manifest are left: {orphans}"


# --- compaction -----------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["compact.after_snapshot_delete", "wal.after_segment_delete"])
def test_killed_while_compacting(tmp_path: Path, killed: Callable[..., Any], point: str) -> None:
    """Three snapshots over a dozen segments; compact() keeping one is killed after the first
    or second deletion of its kind."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    where = f"seed={seed} point={point}"
    config = config_for(data_dir, snapshots_kept=1)
    state, _, snapshots = build_store(config, rng, [150, 150, 150], snapshot=True)
    with Storage.open(config) as storage:
        segments = storage.wal_segments()
    assert len([s for s in segments if s <= snapshots[-1]]) >= 4, f"{where}: {segments}"
    passes = rng.randint(0, 1)
    killed(arm(point, passes), "call", data_dir, SEGMENT_SIZE, 1, "compact", where=where)
    with Storage.open(config) as storage:
        assert storage.verify() == [], f"{where}: after the killed compaction"
        assert stored_state(storage) == state, where
        assert snapshots[-1] in [m.seq for m in storage.list_snapshots()], where
        check_wal(storage, state, where, from_start=False)
    assert rebuilt_state(config, where) == state, f"{where}: the rebuild after it differs"
    with Storage.open(config) as storage:
        state = write_again(storage, state, "after-kill", where)
        storage.compact()  # finishes what the killed one began
        assert storage.verify() == [], where
        assert [m.seq for m in storage.list_snapshots()] == [storage.applied_seq], where
        check_wal(storage, state, where, from_start=False)
    assert rebuilt_state(config, where) == state, f"{where}: the rebuild after compact differs"


# --- repair, restore, rebuild ---------------------------------------------------------------


def record_span(image: bytes, seq: int, payload: bytes) -> tuple[int, int]:
    """Where the record *seq* with *payload* starts and ends (with its padding) in the
    segment *image*, by the documented format (wal/format.py): a 32-byte header whose bytes
    8..16 are the seq (u64 LE), the payload, zeros up to a multiple of 8."""
    at = image.rfind(payload)
    start = at - 32
    assert at > 0 and struct.unpack_from("<Q", image, start + 8) == (seq,), "record not found"
    return start, (at + len(payload) + 7) // 8 * 8


@pytest.mark.parametrize("then", ["repair", "open"])
def test_killed_while_repairing_a_torn_tail(
    tmp_path: Path, killed: Callable[..., Any], then: str
) -> None:
    """Bytes of an unfinished record after the last one; ``Storage.repair_wal`` is killed
    once it copied the segment aside, before the cut. Repairing again, or opening (which cuts
    a torn tail by itself), loses no synced record."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    where = f"seed={seed} then={then}"
    config = config_for(data_dir)
    state, _, _ = build_store(config, rng, [300])
    with Storage.open(config) as storage:
        records = list(storage.read_wal(1))
        last = data_dir / "wal" / f"{storage.wal_segments()[-1]:020d}.wal"
    image = last.read_bytes()
    start, tail = record_span(image, records[-1].seq, records[-1].payload)
    if rng.random() < 0.5:  # the first bytes of a record, as a write cut short leaves them
        frame = image[start:tail].rstrip(b"\x00")
        torn = frame[: rng.randint(1, len(frame) - 1)]
    else:
        torn = bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 300)))
    with open(last, "r+b") as f:
        f.seek(tail)
        f.write(torn)
    killed(arm("repair.after_copy_aside"), "call", data_dir, SEGMENT_SIZE, 2, "repair", where=where)
    aside = last.with_name(f"{last.name}.broken-{tail}")
    assert aside.read_bytes() == last.read_bytes(), f"{where}: the copy aside is not whole"
    if then == "repair":
        repair = Storage.repair_wal(config)
        assert repair is not None and repair.offset == tail, f"{where}: {repair}"
    with Storage.open(config) as storage:
        assert len(storage.torn_tail_repairs) == (then == "open"), where
        assert list(storage.read_wal(1)) == records, f"{where}: synced records were lost"
        assert stored_state(storage) == state, where
        assert storage.verify() == [], where
        state = write_again(storage, state, "after-repair", where)
    assert last.read_bytes()[tail : tail + len(torn)] != torn, f"{where}: the tail is still there"
    with Storage.open(config) as storage:
        assert storage.torn_tail_repairs == [] and stored_state(storage) == state, where


@pytest.mark.parametrize("call", ["restore", "backup"])
def test_killed_in_the_middle_of_a_restore_copy(
    tmp_path: Path, killed: Callable[..., Any], call: str
) -> None:
    """``Storage.restore(source, target)`` (or ``backup(target)``) killed after it copied the
    first WAL segment. The source keeps its data; a new restore into another directory is
    whole; the half-made target is refused by a restore and by every open (it says it is
    unfinished), instead of serving the older state copied so far."""
    seed = make_seed()
    rng = random.Random(seed)
    source = tmp_path / "source"
    where = f"seed={seed} call={call}"
    config = config_for(source)
    state, _, _ = build_store(config, rng, [400])
    with Storage.open(config) as storage:
        applied = storage.applied_seq
        assert len(storage.wal_segments()) >= 3, where
    before = {p.name: p.read_bytes() for p in (source / "wal").iterdir()}
    half = tmp_path / "half"
    killed(arm("restore.mid_copy"), "call", source, SEGMENT_SIZE, 2, call, half, where=where)
    assert {p.name: p.read_bytes() for p in (source / "wal").iterdir()} == before, (
        f"{where}: the source's WAL changed"
    )
    with Storage.open(config) as storage:
        assert storage.applied_seq == applied and stored_state(storage) == state, where
        assert storage.verify() == [], where
        if call == "backup":
            storage.backup(tmp_path / "whole")
    if call == "restore":
        assert Storage.restore(source, tmp_path / "whole") == applied, where
    with Storage.open(config_for(tmp_path / "whole")) as storage:
        assert storage.applied_seq == applied, where
        assert stored_state(storage) == state, f"{where}: the new restore is not whole"
        assert storage.verify() == [], where
    with pytest.raises(InvalidInputError):
        Storage.restore(source, half)
    for half_config in (config_for(half), StorageConfig(data_dir=half, read_only=True)):
        with pytest.raises(NotAStoreError, match="did not finish"):
            Storage.open(half_config)


@pytest.mark.parametrize("damage", ["indexes-lost", "data-overwritten"])
def test_killed_while_rebuilding_from_a_snapshot(
    tmp_path: Path, killed: Callable[..., Any], damage: str
) -> None:
    """``indexes/`` lost, or ``data.mdb`` unreadable: opening rebuilds from the newest
    snapshot; the opener is killed once the damaged file is moved aside. The next open
    rebuilds, and the file moved aside is kept."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    where = f"seed={seed} damage={damage}"
    config = config_for(data_dir)
    state, _, _ = build_store(config, rng, [150], snapshot=True)
    with Storage.open(config) as storage:
        state, _ = write_ops(storage, rng, 150, state)
    data = data_dir / "indexes" / "data.mdb"
    if damage == "indexes-lost":
        shutil.rmtree(data.parent)
    else:
        with open(data, "r+b") as f:
            f.write(bytes(rng.randint(0, 255) for _ in range(2 * 4096)))
    killed(arm("rebuild.after_move_aside"), "opener", data_dir, SEGMENT_SIZE, where=where)
    aside = sorted(p.name for p in data.parent.glob("data.mdb.broken-*"))
    assert len(aside) == (damage == "data-overwritten"), f"{where}: {aside}"
    with Storage.open(config) as storage:
        assert stored_state(storage) == state, f"{where}: the rebuilt store differs"
        check_wal(storage, state, where)
        assert storage.verify() == [], where
        state = write_again(storage, state, "after-rebuild", where)
    assert sorted(p.name for p in data.parent.glob("data.mdb.broken-*")) == aside, where
    with Storage.open(config) as storage:
        assert stored_state(storage) == state, where
