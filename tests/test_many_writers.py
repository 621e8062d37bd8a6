"""Pools of worker processes on one data directory, some killed at random (SPEC guarantee 6).

Four processes move ten orders through thirty states with conditional transitions and
idempotency keys, under the default fsync policy (so group commit shares their syncs); two
of them are killed with SIGKILL at random moments. Every acknowledged transition is in the WAL
under the number it was acknowledged with, the sequence numbers are gap-free, and no order
ever takes a step twice. A killed reader's LMDB slot is reclaimed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from pathlib import Path

import pytest
from internals import raw_read_transaction

from rstmdb_storage import ConflictError, Instance, Storage, StorageConfig
from rstmdb_storage.changes import PutInstance
from rstmdb_storage.codec import decode_instance_body

ORDERS = [f"order-{i}" for i in range(10)]
LAST_STEP = 30
WORKERS_TIMEOUT = 300  # seconds; workers still moving orders by then are stuck, not slow


def config_for(data_dir: str) -> StorageConfig:
    return StorageConfig(data_dir=data_dir, wal_segment_size=64 * 1024, snapshot_interval=0)


def _mover(data_dir: str, name: str, seed: int, acks) -> None:  # runs in its own process
    rng = random.Random(seed)
    with Storage.open(config_for(data_dir)) as storage:
        while True:
            unfinished = [
                inst for inst in map(storage.get_instance, ORDERS) if inst.state != f"s{LAST_STEP}"
            ]
            if not unfinished:
                return
            inst = rng.choice(unfinished)
            step = int(inst.state[1:]) + 1
            try:
                moved = storage.transition(
                    inst.id,
                    inst.state,
                    f"s{step}",
                    event_id=f"{name}:{step}",
                    idempotency_key=f"{inst.id}:s{step}",
                )
            except ConflictError:
                continue
            # With a key another worker used first, the instance comes back as it is now.
            acks.send((name, inst.id, step, int(moved.state[1:]), moved.last_wal_offset))


def steps_in_wal(storage: Storage) -> tuple[list[int], list[tuple[int, str, int]]]:
    """The sequence numbers in the WAL, and every (seq, order, step) its puts made."""
    seqs, moves = [], []
    for record in storage.read_wal(1):
        seqs.append(record.seq)
        for change in record.changes():
            if isinstance(change, PutInstance):
                state = decode_instance_body(change.body, change.id)[2]
                moves.append((record.seq, change.id, int(state[1:])))
    return seqs, moves


@pytest.mark.parametrize("seed", [random.SystemRandom().randrange(2**32)])
def test_killed_workers_lose_no_acknowledged_transition_and_none_happens_twice(
    data_dir: Path, seed: int
) -> None:
    rng = random.Random(seed)
    with Storage.open(config_for(str(data_dir))) as storage, storage.batch() as batch:
        for order_id in ORDERS:
            batch.put_instance(Instance(id=order_id, machine="order", version=1, state="s0"))
    context = multiprocessing.get_context("spawn")
    names = ["w0", "w1", "w2", "w3"]
    # One pipe per worker, not one shared queue: a worker killed while it sends an ack would
    # leave a shared queue's lock held, and the others could never send (nor exit) again.
    procs, readers = {}, {}
    for name in names:
        reader, writer = context.Pipe(duplex=False)
        procs[name] = context.Process(
            target=_mover, args=(str(data_dir), name, rng.randrange(2**32), writer)
        )
        procs[name].start()
        writer.close()  # the worker holds the only write end: its exit ends the pipe
        readers[reader] = name
    doomed = {"w1": rng.randint(1, 40), "w3": rng.randint(1, 40)}  # killed after that many acks
    acked: list[tuple[str, str, int, int, int]] = []
    deadline = time.monotonic() + WORKERS_TIMEOUT
    try:
        while readers and time.monotonic() < deadline:
            for reader in multiprocessing.connection.wait(list(readers), timeout=1):
                try:
                    ack = reader.recv()
                except (EOFError, OSError):  # the worker ended (an ack cut short is not one)
                    del readers[reader]
                    continue
                acked.append(ack)
                name = ack[0]
                if name in doomed and sum(1 for a in acked if a[0] == name) >= doomed[name]:
                    del doomed[name]
                    os.kill(procs[name].pid, signal.SIGKILL)
        assert not readers, f"seed={seed}: {sorted(readers.values())} still running"
        for proc in procs.values():
            proc.join(timeout=60)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
    assert [procs[n].exitcode for n in ("w0", "w2")] == [0, 0], f"seed={seed}"
    assert {procs[n].exitcode for n in ("w1", "w3")} <= {-signal.SIGKILL, 0}, f"seed={seed}"

    with Storage.open(config_for(str(data_dir))) as storage:
        seqs, moves = steps_in_wal(storage)
        assert seqs == list(range(1, storage.applied_seq + 1)), f"seed={seed}: gaps"
        for order_id in ORDERS:
            steps = [step for _, oid, step in moves if oid == order_id]
            assert steps == list(range(LAST_STEP + 1)), f"seed={seed}: {order_id} took {steps}"
            assert storage.get_instance(order_id).state == f"s{LAST_STEP}"
        made = {(order_id, step) for _, order_id, step in moves}
        for name, order_id, step, stored_step, seq in acked:
            assert (order_id, step) in made, f"seed={seed}: {name}'s {order_id}:{step} lost"
            assert (seq, order_id, stored_step) in moves, f"seed={seed}: {name}'s {seq} lost"
        assert storage.verify() == []


def _hold_a_read(data_dir: str, ready) -> None:  # runs in its own process, until killed
    storage = Storage.open(StorageConfig(data_dir=data_dir, max_readers=3))
    txn = raw_read_transaction(storage)  # a reader slot, held
    txn.get(b"x")
    ready.set()
    signal.pause()


def test_reader_slots_of_killed_processes_are_reclaimed(data_dir: Path) -> None:
    config = StorageConfig(data_dir=data_dir, max_readers=3)
    Storage.open(config).close()
    context = multiprocessing.get_context("spawn")
    for _ in range(2):  # each killed holder leaves its slots taken in lock.mdb
        ready = context.Event()
        holder = context.Process(target=_hold_a_read, args=(str(data_dir), ready))
        holder.start()
        assert ready.wait(timeout=60)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with Storage.open(config) as storage:
        readers = [raw_read_transaction(storage) for _ in range(3)]  # every slot is usable
        assert all(txn.get(b"x") is None for txn in readers)
        for txn in readers:
            txn.abort()
