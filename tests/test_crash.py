"""Crash tests: real processes killed with SIGKILL, then the data checked (SPEC guarantees 1, 2).

* a writer kills itself at a failpoint of its write path (the n-th time it reaches it, n
  seeded), trial after trial in the same data directory: every acknowledged write must be
  there with exactly its content, the one write in flight all or nothing (there for certain
  once its record was synced, absent for certain when it was not written), and the WAL
  gap-free 1..applied_seq;
* a writer is killed while automatic snapshots and compaction run in its background: nothing
  acknowledged is lost, verify() passes, dead snapshots' temporaries are cleaned up, and the
  snapshots plus the WAL rebuild a lost ``indexes/``;
* one of two writers is killed while the other keeps writing (and must take over: the lock the
  dead one held, the record it left at the WAL tail), then the other one too;
* an opener kills itself between two replay chunks or in its checkpoint while it replays
  the WAL into a lost or half-rebuilt ``indexes/``, or is killed while it creates a new
  store;
* a torn tail (bytes of an unfinished record after the last good one) is cut on open and copied
  aside, while bad bytes *before* a good record are a ``CorruptionError`` naming file and offset.

Workers are run from ``tests/workers.py`` (see there for the transcript they print); the
failpoints are those of ``rstmdb_storage/failpoints.py``, armed through ``RSTMDB_FAILPOINTS``.

Seeds: every test prints its seed in its assertion messages; set ``RSTMDB_CRASH_SEED`` to replay
one. ``--crash-trials`` sets the number of kills (20 by default; e.g. 500 for a long run).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from helpers import (
    State,
    apply_op,
    change_lists,
    parse_lines,
    start_armed_worker,
    start_worker,
    stored_state,
    write_changes,
)

try:
    import workers  # pytest puts tests/ on sys.path: it is not a package
except ModuleNotFoundError:  # tests/ became a package
    from tests import workers

from rstmdb_storage import CorruptionError, FsyncPolicy, Instance, Storage, StorageConfig
from rstmdb_storage import engine as engine_module
from rstmdb_storage.changes import CHANGE_DELETE, CHANGE_PUT
from rstmdb_storage.wal import Wal
from rstmdb_storage.wal.decoder import decode_record
from rstmdb_storage.wal.encoder import encode_record
from rstmdb_storage.wal.format import (
    RECORD_CHANGES,
    RECORD_SEAL,
    SEGMENT_HEADER_SIZE,
    parse_segment_name,
    segment_name,
)

SEGMENT_SIZE = 64 * 1024


def make_seed() -> int:
    return int(os.environ.get("RSTMDB_CRASH_SEED", random.SystemRandom().randrange(2**32)))


def config_for(data_dir: Path, policy: FsyncPolicy | None = None) -> StorageConfig:
    return StorageConfig(
        data_dir=data_dir,
        wal_segment_size=SEGMENT_SIZE,
        fsync_policy=policy or FsyncPolicy.every_write(),
        snapshot_interval=0,  # these tests read the WAL from its first record
        compaction_enabled=False,
    )


def check_wal(
    storage: Storage, ops_by_seq: dict[int, list[list[Any]]], state: State, where: str
) -> None:
    """``read_wal(1)`` is gap-free 1..applied_seq; each known record holds exactly the changes
    written with that sequence number; each instance's updated_at is its record's timestamp."""
    applied = storage.applied_seq
    records = list(storage.read_wal(1))
    seqs = [record.seq for record in records]
    assert seqs == list(range(1, applied + 1)), (
        f"{where}: WAL sequence numbers are not 1..{applied}"
    )
    by_seq = {record.seq: record for record in records}
    for seq, changes in ops_by_seq.items():
        decoded = change_lists(by_seq[seq].payload, f"record {seq}")
        assert len(decoded) == len(changes), f"{where}: record {seq} has the wrong changes"
        for found, (kind, arg) in zip(decoded, changes, strict=True):
            if kind == "del":
                assert found == [CHANGE_DELETE, arg], f"{where}: record {seq}: {found!r}"
                continue
            assert found[:2] == [CHANGE_PUT, arg["id"]], f"{where}: record {seq}: {found[:2]!r}"
            body = cbor2.loads(found[4])
            expected = [arg[k] for k in ("machine", "version", "state", "ctx", "metadata")]
            assert body[:5] == expected, f"{where}: record {seq} carries another body"
    for instance_id, (_, seq) in state.items():
        inst = storage.get_instance(instance_id)
        assert inst is not None
        assert inst.updated_at == by_seq[seq].timestamp_ms, f"{where}: {instance_id} updated_at"


# --- a writer killed at a failpoint of its write path, again and again ---------------------


def kill_writer_after(
    stderr_path: Path,
    writer_args: tuple[object, ...],
    event: str,
    count: int,
    where: str,
) -> str:
    """Run a crash-writer, kill it with SIGKILL as soon as its *count*-th *event* is read,
    and return its whole transcript."""
    with open(stderr_path, "w") as stderr:
        proc = start_worker("crash-writer", *writer_args, stderr=stderr)
        assert proc.stdout is not None
        seen, text = 0, ""
        for line in proc.stdout:
            text += line
            if json.loads(line)["event"] == event:
                seen += 1
                if seen == count:
                    break
        proc.kill()
        proc.wait()
        text += proc.stdout.read()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, (
        f"{where}: the writer died by itself (rc {proc.returncode}): "
        f"{stderr_path.read_text()[-3000:]}"
    )
    return text


def run_killed(stderr_path: Path, failpoints: str, args: tuple[object, ...], where: str) -> str:
    """Run the worker *args* armed with *failpoints* until it kills itself there (anything
    else fails the test); return its whole transcript."""
    with open(stderr_path, "w") as stderr:
        proc = start_armed_worker(failpoints, *args, stderr=stderr)
        try:
            text, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"{where}: {args[0]} armed with {failpoints} got stuck") from None
    assert proc.returncode == -signal.SIGKILL, (
        f"{where}: {args[0]} was not killed at {failpoints} (rc {proc.returncode}): "
        f"{stderr_path.read_text()[-3000:]}"
    )
    return text


#: the writer's failpoints, and whether the write in flight there must be found after reopening
#: (True), must not (False: its record was not written yet), or may be (None)
WRITE_POINTS = {
    "write.after_append": None,  # written, not synced, LMDB not committed
    "write.after_sync": True,  # the record is durable (or, under a lax policy, in the page cache)
    "write.after_commit": True,  # committed and visible, not acknowledged
    "wal.after_seal": False,  # rotation comes before the record is written
    "wal.after_new_segment": False,
}

#: writes after which a writer whose failpoint never fired stops (and fails the test)
WRITER_LIMIT = 2000


@pytest.mark.parametrize("policy", ["every_write", "every_n:7", "never"])
def test_sigkill_writer_keeps_every_acknowledged_write(
    tmp_path: Path, crash_trials: int, policy: str
) -> None:
    """A killed *process* loses nothing acknowledged under any fsync policy (the record is in
    the page cache before the write returns); the default policy gets the full trials."""
    if policy != "every_write":
        crash_trials = max(1, crash_trials // 4)
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    state: State = {}
    applied = 0
    ops_by_seq: dict[int, list[list[Any]]] = {}
    in_flight_applied = 0
    repairs = []
    for trial in range(crash_trials):
        # Kill at the n-th hit of a point of the write path: the n-th write with its record
        # written, synced or committed, or the n-th segment rotation.
        point = rng.choice(sorted(WRITE_POINTS))
        if point.startswith("wal."):
            passes = rng.randint(0, 3)
        else:
            passes = rng.choice([0, rng.randint(1, 20), rng.randint(1, 150)])
        where = f"seed={seed} policy={policy} trial={trial} point={point} passes={passes}"
        armed = f"{point}={passes}*off->kill" if passes else f"{point}=kill"
        writer_args = (data_dir, rng.randrange(2**32), SEGMENT_SIZE, "inst-", 40, policy)
        text = run_killed(
            tmp_path / f"writer-{trial}.err",
            armed,
            ("crash-writer", *writer_args, "off", WRITER_LIMIT),
            where,
        )
        events = parse_lines(text)
        ready = [e for e in events if e["event"] == "ready"]
        assert ready, f"{where}: the writer never opened the store"
        assert ready[0]["applied_seq"] == applied, f"{where}: the writer opened another state"
        assert ready[0]["count"] == len(state), f"{where}: the writer opened another state"
        tries = {e["op"]: e for e in events if e["event"] == "try"}
        acks = [e for e in events if e["event"] == "ack"]
        # One writer: its acknowledged writes carry the next sequence numbers, in order.
        assert [a["seq"] for a in acks] == list(range(applied + 1, applied + 1 + len(acks))), (
            f"{where}: acknowledged sequence numbers are not consecutive: {acks}"
        )
        assert [a["op"] for a in acks] == list(range(1, len(acks) + 1)), where
        for ack in acks:
            changes = tries[ack["op"]]["changes"]
            state = apply_op(state, changes, ack["seq"])
            ops_by_seq[ack["seq"]] = changes
        applied += len(acks)
        unacked = sorted(op for op in tries if op > len(acks))
        assert unacked == [len(acks) + 1], f"{where}: not one write in flight: {unacked}"
        if point.startswith("write."):
            assert len(acks) == passes, f"{where}: killed in another write"
        in_flight = tries[unacked[0]]["changes"]
        with Storage.open(config_for(data_dir)) as storage:
            repairs.extend(storage.torn_tail_repairs)
            found = stored_state(storage)
            store_seq = storage.applied_seq
            if WRITE_POINTS[point] is not None:
                assert store_seq == applied + int(WRITE_POINTS[point]), (
                    f"{where}: applied_seq {store_seq}: the write in flight "
                    f"{'is lost' if WRITE_POINTS[point] else 'was not written, yet is there'}"
                )
            if store_seq == applied + 1:
                # The write in flight reached the WAL in full: it must be there in full.
                state = apply_op(state, in_flight, applied + 1)
                ops_by_seq[applied + 1] = in_flight
                applied += 1
                in_flight_applied += 1
            assert store_seq == applied, (
                f"{where}: applied_seq {store_seq}, acknowledged up to {applied} (+1 in flight)"
            )
            assert found == state, (
                f"{where}: the store differs from the acknowledged writes (+1 in flight): "
                f"missing or different {sorted(k for k in state if found.get(k) != state[k])}, "
                f"unexpected {sorted(set(found) - set(state))}"
            )
            check_wal(storage, ops_by_seq, state, where)
    for repair in repairs:
        assert Path(repair.copy_path).exists(), f"seed={seed}: {repair}"
    # Every kill is behind us: the store opens again without repairing anything.
    with Storage.open(config_for(data_dir)) as storage:
        assert storage.torn_tail_repairs == []
        assert storage.applied_seq == applied
        assert stored_state(storage) == state
    segments = sorted(p.name for p in (data_dir / "wal").glob("*.wal"))
    assert applied > 0, f"seed={seed}: no trial wrote anything"
    print(
        f"seed={seed} policy={policy}: {applied} writes, {len(segments)} segments, "
        f"{in_flight_applied} in-flight writes applied, {len(repairs)} torn tails cut"
    )


# --- a process whose threads write in groups, killed at a point of the group's write -------

#: the failpoints a group's write passes once a group, as in WRITE_POINTS
GROUP_POINTS = ("write.after_append", "write.after_sync", "write.after_commit")


def test_sigkill_threads_writing_in_groups_keeps_every_acknowledged_write(
    tmp_path: Path, crash_trials: int
) -> None:
    """Eight threads of one process share each group's write and sync; killed at any point
    of it, every acknowledged put is found, with its sequence number, and nothing that was
    never tried."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    acked: dict[str, int] = {}
    tried: set[str] = set()
    grouped = 0  # trials whose writer wrote groups of several puts
    for trial in range(max(4, crash_trials // 2)):
        point = rng.choice(GROUP_POINTS)
        passes = rng.randint(0, 40)
        where = f"seed={seed} trial={trial} point={point} passes={passes}"
        armed = f"{point}={passes}*off->kill" if passes else f"{point}=kill"
        text = run_killed(
            tmp_path / f"threads-{trial}.err",
            armed,
            ("thread-writer", data_dir, SEGMENT_SIZE, 8, f"r{trial}-"),
            where,
        )
        events = parse_lines(text)
        assert not [e for e in events if e["event"] == "error"], f"{where}: {events[-3:]}"
        ready = [e for e in events if e["event"] == "ready"]
        assert ready and ready[0]["applied_seq"] >= max(acked.values(), default=0), where
        tried.update(e["id"] for e in events if e["event"] == "try")
        acks = {e["id"]: e["seq"] for e in events if e["event"] == "ack"}
        assert len(set(acks.values())) == len(acks), f"{where}: a sequence number acked twice"
        acked.update(acks)
        grouped += len(acks) > passes  # more puts acknowledged than the point passed: groups
        with Storage.open(config_for(data_dir)) as storage:
            found = {inst.id: inst for inst in storage.iter_instances()}
            lost = sorted(i for i, seq in acked.items() if i not in found)
            assert not lost, f"{where}: acknowledged puts lost: {lost[:5]}"
            moved = sorted(i for i, seq in acked.items() if found[i].last_wal_offset != seq)
            assert not moved, f"{where}: puts found under other sequence numbers: {moved[:5]}"
            assert set(found) <= tried, f"{where}: instances nobody put"
            assert all(inst.ctx == {"n": int(i.rsplit("-", 1)[1])} for i, inst in found.items())
            applied = storage.applied_seq
            seqs = [record.seq for record in storage.read_wal(1)]
            assert seqs == list(range(1, applied + 1)), f"{where}: the WAL has gaps"
            assert len(found) == applied, f"{where}: a record applied twice, or not at all"
            assert storage.verify() == [], where
    assert grouped > 0, f"seed={seed}: the threads never wrote in groups"
    print(f"seed={seed}: {len(acked)} acknowledged puts, {len(tried)} tried")


# --- killed while automatic snapshots and compaction run ------------------------------------


def test_sigkill_while_snapshots_and_compaction_run(tmp_path: Path, crash_trials: int) -> None:
    """Automatic snapshots every 40 changes and compaction down to 3 segments run in the
    writer's background while it is killed: what was acknowledged is there, verify() finds
    nothing wrong (snapshots against their manifests, the WAL after each), no temporary file
    piles up, and with indexes/ lost the snapshots and the WAL bring back the same state."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    config = workers.store_config(str(data_dir), SEGMENT_SIZE, maintenance=True)
    acknowledged: State = {}
    for trial in range(max(1, crash_trials // 2)):
        where = f"seed={seed} trial={trial}"
        writer_args = (data_dir, rng.randrange(2**32), SEGMENT_SIZE, "inst-", 40)
        text = kill_writer_after(
            tmp_path / f"writer-{trial}.err",
            (*writer_args, "every_write", "on"),
            "ack",
            rng.randint(1, 150),
            where,
        )
        events = parse_lines(text)
        tries = {e["op"]: e for e in events if e["event"] == "try"}
        acks = [e for e in events if e["event"] == "ack"]
        for ack in acks:
            acknowledged = apply_op(acknowledged, tries[ack["op"]]["changes"], ack["seq"])
        with Storage.open(config) as storage:
            found = stored_state(storage)
            in_flight = [op for op in tries if op > len(acks)]
            if found != acknowledged and in_flight:  # it reached the WAL: all of it is there
                landed = tries[in_flight[0]]["changes"]
                acknowledged = apply_op(acknowledged, landed, acks[-1]["seq"] + 1)
            assert found == acknowledged, f"{where}: the store differs from what was written"
            assert storage.verify() == [], where
        leftovers = [p.name for p in (data_dir / "snapshots").glob("*.tmp-*")]
        assert len(leftovers) <= 1, f"{where}: temporary files pile up: {leftovers}"
    assert list((data_dir / "snapshots").glob("*.manifest")), f"seed={seed}: no snapshot taken"
    shutil.rmtree(data_dir / "indexes")
    with Storage.open(config) as storage:
        assert stored_state(storage) == acknowledged, f"seed={seed}: rebuilt state differs"


# --- one of two writers killed while the other keeps writing ---------------------------------


class Transcript:
    """A worker's stdout, drained by a thread into a queue shared by all workers (so that no
    worker blocks on a full pipe while the test waits for another)."""

    def __init__(self, name: str, proc: subprocess.Popen[str], events: queue.Queue) -> None:
        self.name, self.proc, self.text = name, proc, ""
        self.thread = threading.Thread(target=self._drain, args=(events,), daemon=True)
        self.thread.start()

    def _drain(self, events: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.text += line
            if line.endswith("\n"):
                events.put((self.name, json.loads(line)))
        events.put((self.name, None))

    def kill(self) -> list[dict[str, Any]]:
        self.proc.kill()
        self.proc.wait()
        self.thread.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return parse_lines(self.text)


def test_sigkill_one_of_two_writers(tmp_path: Path, crash_trials: int) -> None:
    """Writer A is killed at a random moment while B writes; B must go on (taking over the
    lock A died holding, applying the record A left at the WAL tail, if any); then B is killed
    too. Every acknowledged write of both survives; each in-flight write is all or nothing."""
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    state: State = {}
    applied = 0
    ops_by_seq: dict[int, list[list[Any]]] = {}
    taken_over = 0  # in-flight writes of A that B applied before its own next write
    trials = max(1, crash_trials // 2)
    for trial in range(trials):
        where = f"seed={seed} trial={trial}"
        events: queue.Queue = queue.Queue()
        transcripts = {}
        for name in ("a", "b"):
            with open(tmp_path / f"{name}-{trial}.err", "w") as stderr:
                proc = start_worker(
                    "crash-writer",
                    data_dir,
                    rng.randrange(2**32),
                    SEGMENT_SIZE,
                    f"{name}-",
                    30,
                    stderr=stderr,
                )
            transcripts[name] = Transcript(name, proc, events)
        a_target = (rng.choice(["ack", "try"]), rng.randint(1, 60))
        b_more = rng.randint(5, 40)  # acknowledgements of B received after A died
        counts = {("a", "ack"): 0, ("a", "try"): 0, ("b", "ack"): 0}
        a_dead = False
        while True:
            name, event = events.get(timeout=60)
            if event is None and name == "a" and a_dead:
                continue  # the end of the transcript of the writer we killed
            assert event is not None, (
                f"{where}: writer {name} died by itself: "
                + (tmp_path / f"{name}-{trial}.err").read_text()[-3000:]
            )
            key = (name, event["event"])
            if key in counts:
                counts[key] += 1
            if not a_dead and counts.get(("a", a_target[0])) == a_target[1]:
                transcripts["a"].kill()
                a_dead, b_at_kill = True, counts[("b", "ack")]
            elif a_dead and counts[("b", "ack")] >= b_at_kill + b_more:
                break
        transcript = {name: t.kill() for name, t in transcripts.items()}
        for name, t in transcripts.items():
            assert t.proc.returncode == -signal.SIGKILL, f"{where}: {name} rc {t.proc.returncode}"

        # What was acknowledged, and what was in flight when each writer died.
        acked: dict[int, list[list[Any]]] = {}
        in_flight = {}
        for name, lines in transcript.items():
            tries = {e["op"]: e["changes"] for e in lines if e["event"] == "try"}
            acks = [e for e in lines if e["event"] == "ack"]
            seqs = [a["seq"] for a in acks]
            assert seqs == sorted(set(seqs)) and all(s > applied for s in seqs), (
                f"{where}: {name}'s sequence numbers: {seqs}"
            )
            assert [a["op"] for a in acks] == list(range(1, len(acks) + 1)), where
            for ack in acks:
                assert ack["seq"] not in acked, f"{where}: seq {ack['seq']} acknowledged twice"
                acked[ack["seq"]] = tries[ack["op"]]
            unacked = sorted(op for op in tries if op > len(acks))
            assert unacked in ([], [len(acks) + 1]), f"{where}: {name}: {unacked}"
            if unacked:
                in_flight[name] = tries[unacked[0]]
        with Storage.open(config_for(data_dir)) as storage:
            top = storage.applied_seq
            assert top >= max(acked, default=applied), where
            unexplained = sorted(set(range(applied + 1, top + 1)) - set(acked))
            # Sequence numbers nobody acknowledged belong to in-flight writes, one per writer.
            assert len(unexplained) <= len(in_flight), (
                f"{where}: records {unexplained} but only {len(in_flight)} writes in flight"
            )
            records = {r.seq: r for r in storage.read_wal(applied + 1)}
            assert sorted(records) == list(range(applied + 1, top + 1)), f"{where}: WAL gap"
            for seq in unexplained:
                ids = [c[:2] for c in change_lists(records[seq].payload, f"record {seq}")]
                owners = [
                    name
                    for name, changes in in_flight.items()
                    if ids
                    == [
                        [CHANGE_PUT, a["id"]] if k == "put" else [CHANGE_DELETE, a]
                        for k, a in changes
                    ]
                ]
                assert len(owners) == 1, f"{where}: record {seq} is nobody's write: {ids}"
                acked[seq] = in_flight.pop(owners[0])
                if owners[0] == "a" and any(s > seq for s, _ in acked.items()):
                    taken_over += 1
            for seq in sorted(acked):
                state = apply_op(state, acked[seq], seq)
                ops_by_seq[seq] = acked[seq]
            applied = top
            found = stored_state(storage)
            assert found == state, (
                f"{where}: the store differs from the acknowledged writes at "
                f"{sorted(k for k in found.keys() | state.keys() if found.get(k) != state.get(k))}"
            )
            check_wal(storage, ops_by_seq, state, where)
    print(
        f"seed={seed}: {applied} writes; {taken_over} in-flight writes of a killed writer "
        f"applied by the other one"
    )


# --- an opener killed while it replays ------------------------------------------------------


def build_store(data_dir: Path, rng: random.Random, records: int) -> tuple[State, dict[int, Any]]:
    """A store of *records* WAL records (mostly batches), written fast (no fsync: nothing is
    killed while building). Returns its state and the changes of every record."""
    state: State = {}
    ops_by_seq: dict[int, list[list[Any]]] = {}
    present: set[str] = set()
    with Storage.open(config_for(data_dir, FsyncPolicy.never())) as storage:
        for n in range(1, records + 1):
            op = workers.make_op(rng, present, n, "inst-", 300)
            seq = workers.run_op(storage, op)
            workers.apply_to_present(present, op)
            state = apply_op(state, op["changes"], seq)
            ops_by_seq[seq] = op["changes"]
        assert storage.applied_seq == records
    return state, ops_by_seq


def run_opener(data_dir: Path, stderr_path: Path, kill: str | None) -> tuple[list, int]:
    """Run the opener and return its events and exit code. *kill*: None lets it finish;
    "opening" kills it as soon as it announced the open; anything else is a
    ``RSTMDB_FAILPOINTS`` value it runs armed with (it kills itself there, if it gets there)."""
    with open(stderr_path, "w") as stderr:
        if kill is None or kill == "opening":
            proc = start_worker("opener", data_dir, SEGMENT_SIZE, stderr=stderr)
        else:
            proc = start_armed_worker(kill, "opener", data_dir, SEGMENT_SIZE, stderr=stderr)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if kill == "opening":
            proc.kill()
        text = first + proc.stdout.read()
        proc.wait(timeout=120)
        proc.stdout.close()
    # the counts reported after each replay transaction are not looked at here
    events = [event for event in parse_lines(text) if event["event"] != "replayed"]
    return events, proc.returncode


#: kills in the opener's close: the checkpoint after the replay, before or after its record
CHECKPOINT_KILLS = ["checkpoint.after_wal_sync=kill", "checkpoint.before_lmdb_sync=kill"]


#: records in the store rebuilt while being killed: several replay transactions of 2,000 changes
RECORDS = 5000


def test_sigkill_while_opening_and_replaying(tmp_path: Path, crash_trials: int) -> None:
    seed = make_seed()
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    state, ops_by_seq = build_store(data_dir, rng, RECORDS)
    indexes = data_dir / "indexes"

    def verify(where: str) -> None:
        with Storage.open(config_for(data_dir)) as storage:
            assert storage.torn_tail_repairs == [], where
            assert storage.applied_seq == RECORDS, where
            assert stored_state(storage) == state, f"{where}: the rebuilt store differs"
            check_wal(storage, ops_by_seq, state, where)

    # A full rebuild from the WAL, uninterrupted, in a worker.
    shutil.rmtree(indexes)
    events, rc = run_opener(data_dir, tmp_path / "calibrate.err", None)
    assert rc == 0 and events[-1]["event"] == "closed", (tmp_path / "calibrate.err").read_text()
    assert events[1]["applied_seq"] == RECORDS and events[1]["count"] == len(state)
    replay_time = events[1]["elapsed"]
    verify(f"seed={seed} after calibration")

    killed_mid_open = 0
    for trial in range(crash_trials):
        where = f"seed={seed} trial={trial}"
        # Lose indexes/ (a full rebuild from the WAL), or keep what the last kill left behind
        # (a half-finished replay, or a complete one).
        if trial == 0 or rng.random() < 0.6:
            shutil.rmtree(indexes, ignore_errors=True)
        # Killed after the n-th replay transaction of 2,000 changes (if that many are left to
        # replay; the first trial is sure to be), or in the checkpoint of its close.
        chunks = 0 if trial == 0 else rng.randint(0, 2)
        kill = f"replay.after_chunk={chunks}*off->kill" if chunks else "replay.after_chunk=kill"
        if trial and rng.random() < 0.3:
            kill = rng.choice(CHECKPOINT_KILLS)
        where += f" kill={kill}"
        stderr_path = tmp_path / f"opener-{trial}.err"
        events, rc = run_opener(data_dir, stderr_path, kill)
        names = [e["event"] for e in events]
        assert names[:1] == ["opening"], f"{where}: {names} {stderr_path.read_text()[-2000:]}"
        if rc == -signal.SIGKILL:
            killed_mid_open += "opened" not in names
        else:
            assert rc == 0 and names == ["opening", "opened", "closed"], (
                f"{where}: the opener failed (rc {rc}): {stderr_path.read_text()[-3000:]}"
            )
        if "opened" in names:
            opened = events[1]
            assert (opened["applied_seq"], opened["count"]) == (RECORDS, len(state)), where
        if rng.random() < 0.25:
            verify(where)
    verify(f"seed={seed} at the end")
    # The first trial kills after the first chunk of a full rebuild.
    assert killed_mid_open >= 1, f"seed={seed}: no kill landed inside an open"
    print(
        f"seed={seed}: a full rebuild takes {replay_time:.3f}s in a worker; "
        f"{killed_mid_open} of {crash_trials} kills landed inside an open"
    )


def test_sigkill_while_creating_a_store(tmp_path: Path, crash_trials: int) -> None:
    """A process killed while it creates a store (directories, first WAL segment, LMDB meta),
    or in the first checkpoint of the new store, leaves a directory that opens cleanly as an
    empty store, and works. (No failpoint lies inside the creation itself: a kill there is
    sent as soon as the opener announced the open.)"""
    seed = make_seed()
    rng = random.Random(seed)
    events, rc = run_opener(tmp_path / "calibrate", tmp_path / "calibrate.err", None)
    assert rc == 0, (tmp_path / "calibrate.err").read_text()
    creation_time = events[1]["elapsed"]
    killed_mid_open = 0
    for trial in range(max(1, crash_trials // 2)):
        data_dir = tmp_path / f"data-{trial}"
        kill = "opening" if trial == 0 else rng.choice(["opening", *CHECKPOINT_KILLS])
        where = f"seed={seed} trial={trial} kill={kill}"
        events, rc = run_opener(data_dir, tmp_path / f"create-{trial}.err", kill)
        if kill != "opening":  # (a kill sent from here could come after a quick open)
            assert rc == -signal.SIGKILL, f"{where}: the opener was not killed (rc {rc})"
        killed_mid_open += rc == -signal.SIGKILL and len(events) == 1
        with Storage.open(config_for(data_dir)) as storage:
            assert storage.applied_seq == 0 and storage.count_instances() == 0, where
            spec = workers.make_spec(rng, "first", 1)
            assert storage.put_instance(Instance(**spec)) == 1, where
        with Storage.open(config_for(data_dir)) as storage:
            assert storage.torn_tail_repairs == [], where
            assert stored_state(storage) == {"first": (spec, 1)}, where
            assert [r.seq for r in storage.read_wal(1)] == [1], where
    assert killed_mid_open >= 1, f"seed={seed}: no kill landed inside the creation"
    print(
        f"seed={seed}: creating a store takes {creation_time:.3f}s; {killed_mid_open} kills inside"
    )


# --- torn tails and damage inside the log ---------------------------------------------------


def closed_store(data_dir: Path, writes: int, seed: int) -> tuple[State, list[Any], Path, int]:
    """A store with *writes* records over several segments (and one more when the last of them
    began a segment: the last segment holds two at least), cleanly closed. Returns its state,
    its records, the last segment and the offset just past its last record."""
    state, _ = build_store(data_dir, random.Random(seed), writes)
    while True:
        with Storage.open(config_for(data_dir)) as storage:
            records = list(storage.read_wal(1))
            assert stored_state(storage) == state
            names = (p.name for p in (data_dir / "wal").iterdir())
            ids = sorted(i for name in names if (i := parse_segment_name(name)))
            if records[-1].seq > ids[-1]:
                break
            # The last record began a segment: one more, so that a good record follows one
            # there too (what damage "in the last segment" needs; some seeds end this way).
            spec = {"id": "inst-last", "machine": "m", "version": 1, "state": "s"}
            spec |= {"ctx": {}, "metadata": {}}
            changes = [["put", spec]]
            state = apply_op(state, changes, write_changes(storage, changes, batch=False))
    assert len(ids) >= 3, "the test needs several segments"
    last = data_dir / "wal" / segment_name(ids[-1])
    assert records[-1].seq >= ids[-1]
    return state, records, last, framed_record(data_dir, records[-1].seq).end


def framed_record(data_dir: Path, seq: int) -> Any:
    """Record *seq* with where it lies in its segment (``read_wal`` hands out its contents)."""
    probe = Wal(data_dir / "wal", b"", 1 << 20, FsyncPolicy.never(), 0o600)
    store_id = probe.segment_store_id(probe.segment_ids()[0])
    wal = Wal(data_dir / "wal", store_id, 1 << 20, FsyncPolicy.never(), 0o600)
    try:
        (record,) = wal.records(seq, seq)
        return record
    finally:
        wal.close()
        probe.close()


def torn_bytes(kind: str, rng: random.Random, next_seq: int) -> bytes:
    """What a write cut short leaves after the last record."""
    if kind == "garbage":
        return bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 300)))
    if kind == "hole":
        # The record's first page never reached the disk, a later one did (after a power loss
        # the kernel may have written back any subset of the pages).
        return bytes(rng.randint(8, 64) * 8) + bytes(rng.randint(1, 255) for _ in range(100))
    spec = workers.make_spec(rng, "inst-torn", 0)
    payload = cbor2.dumps([[CHANGE_PUT, spec["id"], None, None, b"z" * 500]])
    frame = encode_record(next_seq, int(time.time() * 1000), RECORD_CHANGES, payload)
    # Any prefix that stops before the last non-zero byte of the frame: an unfinished write.
    meaningful = len(frame.rstrip(b"\x00"))
    return frame[: rng.randint(1, meaningful - 1)]


@pytest.mark.parametrize("kind", ["partial-record", "garbage", "hole", "truncated-file"])
def test_torn_tail_is_cut_and_kept_aside(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = make_seed()
    rng = random.Random(seed)
    where = f"seed={seed} kind={kind}"
    data_dir = tmp_path / "data"
    state, records, segment, tail = closed_store(data_dir, 300, seed)
    torn = torn_bytes(
        "partial-record" if kind == "truncated-file" else kind, rng, records[-1].seq + 1
    )
    with open(segment, "r+b") as f:
        f.seek(tail)
        f.write(torn)
        if kind == "truncated-file":
            f.truncate(tail + len(torn))  # the file ends inside the unfinished record
    damaged = segment.read_bytes()
    size = len(damaged)
    if kind == "hole":
        # Only a power loss leaves a hole, and the store checks the end of the log byte for
        # byte only after a reboot: make this open look like the first one after a reboot.
        monkeypatch.setattr(engine_module, "boot_id", lambda: "a-later-boot")

    with Storage.open(config_for(data_dir)) as storage:
        repairs = storage.torn_tail_repairs
        assert len(repairs) == 1, f"{where}: {repairs}"
        (repair,) = repairs
        assert repair.path == str(segment), where
        assert repair.offset == tail, where
        assert repair.bytes_cut == len(torn.rstrip(b"\x00")), where
        assert repair.copy_path == f"{segment}.broken-{tail}", where
        # The copy was taken before the cut; the segment holds zeros from the tail on.
        assert Path(repair.copy_path).read_bytes() == damaged, where
        repaired = segment.read_bytes()
        assert len(repaired) == size and repaired[:tail] == damaged[:tail], where
        assert repaired[tail:].count(0) == size - tail, f"{where}: the tail was not zeroed"
        # Every record is still there, byte for byte, and so is every instance.
        assert list(storage.read_wal(1)) == records, f"{where}: records were lost"
        assert storage.applied_seq == records[-1].seq
        assert stored_state(storage) == state, where
        # The log goes on where the torn write began.
        seq = storage.put_instance(Instance(**workers.make_spec(rng, "after-repair", 1)))
        assert seq == records[-1].seq + 1
        record = framed_record(data_dir, seq)
        if storage.wal_segments()[-1] == seq:  # it did not fit: the segment was sealed at tail
            assert record.offset == SEGMENT_HEADER_SIZE, where
            image = segment.read_bytes()
            assert decode_record(lambda o, n: image[o : o + n], tail).type == RECORD_SEAL
        else:
            assert record.offset == tail, where
    with Storage.open(config_for(data_dir)) as storage:
        assert storage.torn_tail_repairs == [], f"{where}: cut twice"
        assert storage.applied_seq == seq
        inst = storage.get_instance("after-repair")
        assert inst is not None and inst.last_wal_offset == seq


def damage(
    kind: str, data_dir: Path, records: list[Any], last: Path, tail: int, rng: random.Random
) -> tuple[Path, int]:
    """Put bad bytes in front of a good record; return the segment and offset of the damage."""
    wal_dir = data_dir / "wal"
    if kind == "garbage-before-appended-record":
        # A record LMDB has not applied yet sits behind bytes that are not a record: the record
        # before it was lost, which is not a torn tail. (LMDB stays as it was.)
        garbage = bytes(rng.randint(1, 255) for _ in range(64))
        payload = cbor2.dumps([[CHANGE_DELETE, "inst-1"]])
        frame = encode_record(records[-1].seq + 1, int(time.time() * 1000), RECORD_CHANGES, payload)
        with open(last, "r+b") as f:
            f.seek(tail)
            f.write(garbage + frame)
        return last, tail
    # indexes/ lost: the whole WAL is replayed, through a record whose payload has a flipped bit.
    shutil.rmtree(data_dir / "indexes")
    ids = sorted(i for p in wal_dir.iterdir() if (i := parse_segment_name(p.name)))
    index = len(ids) - 1 if kind == "flipped-bit-in-last-segment" else len(ids) // 2
    first = ids[index]
    end = ids[index + 1] if index + 1 < len(ids) else records[-1].seq + 1
    in_segment = [r for r in records if first <= r.seq < end]
    # a good record follows it in the same segment
    victim = framed_record(data_dir, rng.choice(in_segment[:-1]).seq)
    path = wal_dir / segment_name(first)
    with open(path, "r+b") as f:
        f.seek(victim.offset + 32 + len(victim.payload) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return path, victim.offset


@pytest.mark.parametrize(
    "kind",
    [
        "garbage-before-appended-record",
        "flipped-bit-in-last-segment",
        "flipped-bit-in-sealed-segment",
    ],
)
def test_damage_before_a_good_record_is_corruption(tmp_path: Path, kind: str) -> None:
    seed = make_seed()
    rng = random.Random(seed)
    where = f"seed={seed} kind={kind}"
    data_dir = tmp_path / "data"
    _, records, last, tail = closed_store(data_dir, 300, seed)
    path, offset = damage(kind, data_dir, records, last, tail, rng)
    before = {p.name: p.read_bytes() for p in (data_dir / "wal").iterdir()}
    for attempt in range(2):  # the same answer every time: nothing was "repaired" away
        with pytest.raises(CorruptionError) as caught:
            Storage.open(config_for(data_dir))
        error = caught.value
        assert error.path == str(path), f"{where} attempt {attempt}: {error}"
        assert error.offset == offset, f"{where} attempt {attempt}: {error}"
        assert str(path) in str(error) and f"offset {offset}" in str(error), where
        after = {p.name: p.read_bytes() for p in (data_dir / "wal").iterdir()}
        assert after == before, f"{where}: the WAL was changed (or a copy made) on a failed open"
