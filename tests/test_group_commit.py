"""Group commit: concurrent durable writers share fdatasyncs, nothing is visible before it is
durable, and conditions are judged against every record appended before theirs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import threading

import pytest
from helpers import instances_by_id, order, start_worker
from internals import (
    append_grouped_only,
    fail_append_position_writes,
    force_group_commit,
    start_contention,
    wait_for_queued_writes,
)

from rstmdb_storage import (
    ConflictError,
    InstanceNotFoundError,
    Storage,
    StorageConfig,
    StorageFailedError,
    StorageFullError,
    failpoints,
    thread_group,
)
from rstmdb_storage.changes import IdempotencyKey, PutInstance
from rstmdb_storage.engine import boot_id
from rstmdb_storage.wal import group_commit
from rstmdb_storage.wal.format import RECORD_HEADER_SIZE, padded


@pytest.fixture
def grouped(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """The store with group commit on for every write, as under contention."""
    force_group_commit(storage, monkeypatch)
    return storage


def append_only(storage: Storage, instance, **condition) -> int:
    """Step 1 of a grouped write and no more: a writer paused between appending and syncing."""
    size = storage.config.max_instance_size
    change = PutInstance.of(instance, condition.get("state"), condition.get("seq"), size)
    return append_grouped_only(storage, [change])


def this_boots_append_tail(storage: Storage) -> group_commit.SharedAppendTail:
    """The shared append tail of *storage*'s directory, opened here as another process of this
    boot opens it (close it after use)."""
    return group_commit.SharedAppendTail(
        storage.config.path / "indexes", boot_id(), storage.config.file_mode
    )


def test_grouped_writes_read_back_like_any_other(grouped: Storage) -> None:
    seqs = [grouped.put_instance(order(f"o{i}")) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    moved = grouped.transition("o1", "pending", "paid")
    assert moved.state == "paid" and moved.last_wal_offset == 6
    with pytest.raises(ConflictError):
        grouped.transition("o1", "pending", "paid")
    assert grouped.put_instance(order("o9"), idempotency_key="k") == 7
    assert grouped.put_instance(order("o9", state="other"), idempotency_key="k") == 7
    assert grouped.get_instance("o9").state == "pending"
    with pytest.raises(InstanceNotFoundError):
        grouped.delete_instance("absent")
    assert grouped.applied_seq == 7 and grouped.verify() == []


def test_grouped_applies_reach_the_state_a_replay_of_the_wal_reaches(grouped: Storage) -> None:
    # Group commit's apply takes this process's records from memory and reads the others'
    # back from the WAL; a replay reads them all: both must reach the same instances,
    # times, sequence numbers and index entries.
    for i in range(6):
        grouped.put_instance(order(f"o{i}", metadata={"region": f"r{i % 2}"}, ctx={"n": i}))
        if i % 2:
            append_only(grouped, order(f"other{i}", state="paid"))  # another writer's, pending
    grouped.transition("o1", "pending", "paid", ctx={"paid": True})
    grouped.put_instance(order("o2", state="shipped"), expected_state="pending")
    grouped.delete_instance("o3")
    grouped.put_instance(order("o9"), idempotency_key="key")
    append_only(grouped, order("o4", state="lost"), state="pending")
    grouped.put_instance(order("last"))  # its sync covers the record before it
    applied = grouped.applied_seq
    assert applied == len(list(grouped.read_wal()))
    config = grouped.config
    grouped.close()
    before = instances_by_id(config.path)
    shutil.rmtree(config.path / "indexes")  # opening again replays every record
    after = instances_by_id(config.path)
    assert after == before
    assert before["o4"].state == "lost" and before["other1"].state == "paid"
    assert "o3" not in before and len(before) == 10
    with Storage.open(config) as replayed:
        assert replayed.applied_seq == applied
        assert [i.id for i in replayed.list_by_state("order", "paid")] == [
            "o1",
            "other1",
            "other3",
            "other5",
        ]
        assert [i.id for i in replayed.list_by_metadata("region", "r1")] == ["o1", "o5"]
        assert replayed.verify() == []


def test_an_appended_record_is_invisible_until_a_sync_covers_it(grouped: Storage) -> None:
    grouped.put_instance(order("o"))
    seq = append_only(grouped, order("o", state="paid"))
    assert grouped.get_instance("o").state == "pending"  # appended, not durable: not visible
    assert grouped.applied_seq == 1
    grouped.put_instance(order("other"))  # its sync covers the record before it, too
    assert grouped.get_instance("o").state == "paid"
    assert grouped.get_instance("o").last_wal_offset == seq == 2


def test_conditions_are_judged_against_records_appended_before(grouped: Storage) -> None:
    grouped.put_instance(order("o"))
    append_only(grouped, order("o", state="paid"), state="pending")  # pending, unapplied
    with pytest.raises(ConflictError):
        grouped.put_instance(order("o", state="shipped"), expected_state="pending")
    assert grouped.put_instance(order("o", state="shipped"), expected_state="paid") == 3
    assert grouped.get_instance("o").state == "shipped"
    assert [r.seq for r in grouped.read_wal()] == [1, 2, 3]  # the refused write wrote nothing


def test_a_retry_of_a_pending_keyed_write_waits_for_it_to_be_durable(grouped: Storage) -> None:
    change = PutInstance.of(order("o"), None, None, grouped.config.max_instance_size)
    changes = [change, IdempotencyKey("key", 60_000)]  # put + key, as a keyed write builds them
    first = append_grouped_only(grouped, changes, "key")
    assert grouped.get_instance("o") is None
    assert grouped.put_instance(order("o", state="x"), idempotency_key="key") == first
    assert grouped.get_instance("o").state == "pending"  # the first write, now durable


def test_in_group_mode_threads_share_fsyncs(data_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(group_commit.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    config = StorageConfig(data_dir=data_dir, snapshot_interval=0)
    threads, per_thread = 8, 40
    seqs: list[int] = []
    with Storage.open(config) as storage:
        start_contention(storage)  # start grouped; contention keeps it so

        def writer(name: str) -> None:
            for i in range(per_thread):
                seqs.append(storage.put_instance(order(f"{name}-{i}")))

        workers = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert sorted(seqs) == list(range(1, threads * per_thread + 1))
        assert storage.count_instances() == threads * per_thread
        assert storage.verify() == []
    assert 0 < len(syncs) < threads * per_thread  # some fdatasyncs served several writes


def test_a_failed_shared_sync_fails_the_store_and_shows_nothing(
    grouped: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    grouped.put_instance(order("o"))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(group_commit.os, "fdatasync", broken)
    with pytest.raises(StorageFailedError, match="fdatasync"):
        grouped.put_instance(order("o", state="paid"))
    monkeypatch.undo()
    force_group_commit(grouped, monkeypatch)
    assert grouped.get_instance("o").state == "pending"
    with pytest.raises(StorageFailedError):  # fail-stop: no write until reopened
        grouped.put_instance(order("p"))


def test_an_append_tail_past_the_end_of_the_log_is_reset_on_open(
    grouped: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after a repair that cut records counted by the shared append tail: opening replays
    to where the log really ends, and appends go on there."""
    for i in range(3):
        grouped.put_instance(order(f"o{i}"))
    appends = this_boots_append_tail(grouped)
    with appends.locked():
        tail = appends.tail()
        assert tail is not None and tail.next_seq == 4  # what the grouped writes stored
        appends.write_tail(tail._replace(offset=tail.offset + 4096, next_seq=9))
    appends.close()
    config = grouped.config
    grouped.close()
    with Storage.open(config) as storage:
        force_group_commit(storage, monkeypatch)
        assert storage.put_instance(order("after")) == 4
        assert [r.seq for r in storage.read_wal()] == [1, 2, 3, 4]
        assert storage.verify() == []


def test_an_append_tail_of_another_boot_is_not_trusted(grouped: Storage) -> None:
    """After a reboot the shared append tail may be stale; appends then start from the
    applied tail, past any complete record left behind."""
    grouped.put_instance(order("o1"))
    appends = this_boots_append_tail(grouped)
    with appends.locked():
        tail = appends.tail()
    other_boot = group_commit.SharedAppendTail(
        grouped.config.path / "indexes", "another-boot", grouped.config.file_mode
    )
    with other_boot.locked():
        other_boot.write_tail(tail._replace(offset=tail.offset + 4096, next_seq=9))
    other_boot.close()
    with appends.locked():
        assert appends.tail() is None
    appends.close()
    assert grouped.put_instance(order("o2")) == 2
    assert [r.seq for r in grouped.read_wal()] == [1, 2]
    assert grouped.get_instance("o2").last_wal_offset == 2


def test_a_writer_killed_in_the_middle_of_an_append_blocks_nobody(grouped: Storage) -> None:
    """Killed holding the append lock with half its record written: the kernel drops the
    lock, the next appender cuts the torn record (copying it aside) and appends there."""
    grouped.put_instance(order("o1"))
    worker = start_worker("torn-appender", grouped.config.path, stdin=subprocess.PIPE)
    try:
        event = json.loads(worker.stdout.readline())
        assert event["event"] == "torn"
    finally:
        worker.kill()
        worker.wait()
    assert grouped.put_instance(order("o2")) == 2
    assert [r.seq for r in grouped.read_wal()] == [1, 2]
    assert [repair.offset for repair in grouped.torn_tail_repairs] == [event["offset"]]
    assert grouped.get_instance("o2").last_wal_offset == 2
    assert grouped.verify() == []


# --- threads of one process -------------------------------------------------------------------


def queue_behind_the_first_write(storage: Storage, writes: list) -> dict[str, object]:
    """Put ``o`` and, while its record is appended but not synced, start a thread for each
    of *writes* (``(name, call)``: call(storage) -> result), one after another in that order
    into the queue; return what each thread's call returned or raised, by name."""
    outcomes: dict[str, object] = {}

    def run(name: str, call) -> None:
        try:
            outcomes[name] = call(storage)
        except Exception as exc:  # the outcome under test
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=write, name=write[0]) for write in writes]

    def queue_them() -> None:
        for queued, thread in enumerate(threads, start=1):
            thread.start()
            assert wait_for_queued_writes(storage, queued)

    failpoints.enable("write.after_append", queue_them)
    try:
        storage.put_instance(order("o"))
    finally:
        failpoints.disable()
    for thread in threads:
        thread.join()
    return outcomes


def is_wal(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}").endswith(".wal")


def test_threads_queued_behind_a_write_share_one_sync_and_one_write(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[str] = []
    wal_writes: list[tuple[str, int]] = []
    real_sync, real_write = os.fdatasync, os.pwrite

    def writing(fd: int, data: bytes, offset: int) -> int:
        if is_wal(fd):
            wal_writes.append((threading.current_thread().name, len(data)))
        return real_write(fd, data, offset)

    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (syncs.append(threading.current_thread().name), real_sync(fd))
    )
    monkeypatch.setattr(os, "pwrite", writing)
    writers = [(f"w{n}", lambda s, n=n: s.put_instance(order(f"t{n}"))) for n in range(7)]
    outcomes = queue_behind_the_first_write(storage, writers)
    assert sorted(outcomes.values()) == list(range(2, 9))  # each its own sequence number
    assert outcomes["w0"] == 2 and outcomes["w6"] == 8  # written in the order they queued
    assert [name for name in syncs if name.startswith("w")] == ["w0"]  # the leader's, once
    # the group's seven records, in one write by its leader
    group_writes = [size for name, size in wal_writes if name.startswith("w")]
    assert len(group_writes) == 1
    frames = [RECORD_HEADER_SIZE + padded(len(r.payload)) for r in storage.read_wal()]
    assert group_writes[0] == sum(frames[1:])
    assert storage.count_instances() == 8 and storage.verify() == []


def test_a_group_that_fills_the_map_midway_writes_each_record_once(data_dir) -> None:
    # The map fills while the group's records are applied: the transaction aborts before
    # they are written, the map grows, and the group is judged and appended again, whole.
    config = StorageConfig(data_dir=data_dir, map_size=1024 * 1024, snapshot_interval=0)
    with Storage.open(config) as storage:
        before = storage.stats()["map_size"]
        big = {"pad": "x" * 150_000}
        writers = [
            (f"w{n}", lambda s, n=n: s.put_instance(order(f"t{n}", ctx=big))) for n in range(7)
        ]
        outcomes = queue_behind_the_first_write(storage, writers)
        assert storage.stats()["map_size"] > before  # it did fill
        assert sorted(outcomes.values()) == list(range(2, 9))
        assert [record.seq for record in storage.read_wal()] == list(range(1, 9))
        assert {inst.id: inst.ctx == big for inst in storage.iter_instances()} == {
            "o": False,
            **{f"t{n}": True for n in range(7)},
        }
        assert storage.verify() == []


def test_a_group_that_fills_its_segment_goes_on_in_the_next(storage: Storage) -> None:
    # 7 records of 12 kB do not fit in what is left of a 64 kB segment: the records are
    # written one by one, the segment is sealed where one does not fit, the rest follow it
    pad = {"pad": "y" * 12_000}
    writers = [(f"w{n}", lambda s, n=n: s.put_instance(order(f"t{n}", ctx=pad))) for n in range(7)]
    outcomes = queue_behind_the_first_write(storage, writers)
    assert sorted(outcomes.values()) == list(range(2, 9))
    assert len(storage.wal_segments()) >= 2
    assert [record.seq for record in storage.read_wal()] == list(range(1, 9))
    assert storage.count_instances() == 8 and storage.verify() == []


def test_a_leader_gathers_the_writers_of_the_last_group_before_it_writes(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Woken together when their group is written, threads that write again queue within
    # microseconds: the thread that leads next waits for as many as the last group held
    # (at most GATHER_SECONDS, made long here so that no scheduler delay splits a group;
    # the last round waits it out once, for the thread that finished a round early),
    # so that eight threads share one sync per round of puts instead of alternating
    # between a group of one and a group of the seven that queued behind it.
    monkeypatch.setattr(thread_group, "GATHER_SECONDS", 2.0)
    wal_syncs = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        if is_wal(fd):
            wal_syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    threads, rounds = 8, 25
    barrier = threading.Barrier(threads)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(rounds):
            storage.put_instance(order(f"t{n}-{i}"))

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert storage.count_instances() == threads * rounds and storage.verify() == []
    assert len(wal_syncs) <= rounds + 2  # alternating, it took about 2 syncs a round


def test_a_group_judges_each_write_against_the_ones_before_it(storage: Storage) -> None:
    writes = [
        ("paid", lambda s: s.put_instance(order("o", state="paid"), expected_state="pending")),
        ("lost", lambda s: s.put_instance(order("o", state="lost"), expected_state="pending")),
        ("keyed", lambda s: s.put_instance(order("k", state="first"), idempotency_key="key")),
        ("retry", lambda s: s.put_instance(order("k", state="again"), idempotency_key="key")),
        ("gone", lambda s: s.delete_instance("never-put")),
        ("after", lambda s: s.put_instance(order("a"))),
    ]
    outcomes = queue_behind_the_first_write(storage, writes)
    assert outcomes["paid"] == 2
    assert isinstance(outcomes["lost"], ConflictError)  # refused: the one before moved "o"
    assert outcomes["keyed"] == 3 and outcomes["retry"] == 3  # the retry gets the first's
    assert isinstance(outcomes["gone"], InstanceNotFoundError)
    assert outcomes["after"] == 4  # the refusals wrote nothing, and stopped nothing after them
    assert storage.get_instance("o").state == "paid"
    assert storage.get_instance("k").state == "first"
    assert [record.seq for record in storage.read_wal()] == [1, 2, 3, 4]


def test_a_failed_sync_fails_every_write_of_the_group(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fdatasync

    def broken_for_followers(fd: int) -> None:
        if threading.current_thread().name.startswith("w"):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", broken_for_followers)
    writers = [(f"w{n}", lambda s, n=n: s.put_instance(order(f"t{n}"))) for n in range(3)]
    outcomes = queue_behind_the_first_write(storage, writers)
    monkeypatch.undo()
    assert all(isinstance(outcome, StorageFailedError) for outcome in outcomes.values())
    assert [storage.get_instance(f"t{n}") for n in range(3)] == [None] * 3  # none visible
    assert storage.get_instance("o") is not None  # the write before the group is not touched


def test_a_full_disk_met_appending_grouped_is_a_storage_full_error(
    grouped: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    grouped.put_instance(order("o"))

    fail_append_position_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(StorageFullError):
        grouped.put_instance(order("p"))
    monkeypatch.undo()
    assert grouped.get_instance("p") is None
    assert grouped.put_instance(order("q")) > 1  # room again: writes go on


class Interrupted(Exception):
    """What the signal handler of the test below raises in the waiting thread."""


def test_a_queued_write_interrupted_while_it_waits_is_withdrawn(storage: Storage) -> None:
    # The main thread queues behind a write paused at a failpoint, with another thread behind
    # it, and a signal interrupts its wait: its write is never made, and the thread behind it
    # still gets its turn to lead (else every later write of the process waits forever).
    paused, resume = threading.Event(), threading.Event()
    failpoints.enable("write.after_append", lambda: (paused.set(), resume.wait(60)))
    outcomes: dict[str, object] = {}
    leader = threading.Thread(target=lambda: outcomes.update(o=storage.put_instance(order("o"))))
    behind = threading.Thread(
        target=lambda: outcomes.update(b=storage.put_instance(order("b"))), daemon=True
    )

    def interrupt_the_main_thread() -> None:
        assert wait_for_queued_writes(storage, 1)
        behind.start()
        assert wait_for_queued_writes(storage, 2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def raise_interrupted(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    try:
        leader.start()
        assert paused.wait(60)
        threading.Thread(target=interrupt_the_main_thread, daemon=True).start()
        with pytest.raises(Interrupted):
            storage.put_instance(order("main"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        resume.set()
        failpoints.disable()
    leader.join(60)
    behind.join(60)
    assert not behind.is_alive(), "the write queued behind the interrupted one never ran"
    assert outcomes == {"o": 1, "b": 2}
    assert storage.get_instance("main") is None
    assert storage.put_instance(order("after")) == 3


def test_a_lone_writer_applies_a_record_left_past_the_tail_first(storage: Storage) -> None:
    """The write path's catch-up: a record another writer appended and did not apply (paused
    or killed between the steps) is found past the applied tail and applied before the next
    lone write goes after it."""
    storage.put_instance(order("o"))
    seq = append_only(storage, order("o", state="paid"))
    assert storage.get_instance("o").state == "pending"
    assert storage.put_instance(order("other")) == seq + 1
    assert storage.get_instance("o").state == "paid"
    assert [r.seq for r in storage.read_wal()] == [1, 2, 3] and storage.verify() == []
